"""The hosts: systemd-nspawn containers booted from overlays over the base images.

Each host boots from its own overlayfs over its release's shared image, sits on the
bridge with a static address, and is reached over real SSH with a key made for the fleet.
Killing systemd-nspawn does not end a container, so hosts are found by scanning /proc as
well as by the pid files written at boot.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localfleet.errors import FleetError, log, run
from localfleet.image import DEFAULT_RELEASE, image_dir
from localfleet.network import link_exists
from localfleet.settings import BRIDGE, HOSTS_DIR, NETWORK, SSH_DIR

__all__ = [
    "FleetHost",
    "boot",
    "host_pid",
    "in_host",
    "nspawn_pids",
    "orphan_inits",
    "prepare_host",
    "ssh_options",
    "stop_host",
    "system_state",
    "wait_running",
]

BOOT_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class FleetHost:
    """One container of the fleet."""

    name: str
    address: str
    groups: tuple[str, ...]
    release: str = DEFAULT_RELEASE  # the Debian codename its image was built from

    @property
    def dir(self) -> Path:
        return HOSTS_DIR / self.name

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def pid_file(self) -> Path:
        return self.dir / "nspawn.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "console.log"

    @property
    def release_file(self) -> Path:
        """Which image the host's overlay lies over, so ``up`` can tell a host to rebuild."""
        return self.dir / "release"

    def ssh(self, command: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the host as root over SSH; never raises on failure."""
        return subprocess.run(
            ["ssh", *ssh_options(), f"root@{self.address}", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def ssh_options() -> list[str]:
    return [
        "-i", str(SSH_DIR / "id_ed25519"),
        "-o", f"UserKnownHostsFile={SSH_DIR / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=5",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip


def nspawn_pids() -> dict[int, str]:
    """Every systemd-nspawn process booting a host of this fleet: pid -> host name."""
    found = {}
    marker = str(HOSTS_DIR) + "/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"systemd-nspawn"):
            continue
        for arg in argv:
            text = arg.decode(errors="replace")
            if text.startswith(marker):
                found[int(proc.name)] = text[len(marker) :].split("/")[0]
    return found


def orphan_inits() -> dict[int, str]:
    """Container inits of this fleet whose systemd-nspawn is gone (killed): pid -> host name.

    Killing systemd-nspawn does not end the container: its systemd goes on as an orphan,
    holding the host's address. It is known by the overlay it booted from.
    """
    found = {}
    marker = f"upperdir={HOSTS_DIR}/"
    ours = set(nspawn_pids())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            if not any(
                line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2
                for line in status.splitlines()
            ):
                continue
            ppid = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
            root_mount = (proc / "mountinfo").read_text().splitlines()[0]
        except (OSError, StopIteration, IndexError):
            continue
        if ppid in ours or marker not in root_mount:
            continue
        found[int(proc.name)] = root_mount.split(marker, 1)[1].split("/", 1)[0]
    return found


def host_pid(host: FleetHost) -> int | None:
    for pid, name in nspawn_pids().items():
        if name == host.name:
            return pid
    return None


def kill_machine(host: FleetHost) -> None:
    """Kill ``host`` as a power cut would: its link cut first (its port on the bridge down),
    so that not even the kernel's closing of its sockets reaches anyone, then SIGKILL to
    its PID 1, which ends every process of the container at once. Its disk stays:
    :func:`boot_again` brings it back."""
    nspawn = host_pid(host)
    if nspawn is None or (init := init_pid(nspawn)) is None:
        raise RuntimeError(f"{host.name} is not running")
    run(["ip", "link", "set", f"vb-{host.name}", "down"])
    os.kill(init, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while host_pid(host) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host.name}'s systemd-nspawn outlived its init by 20 s")
        time.sleep(0.1)


def boot_again(host: FleetHost, timeout: float = 120.0) -> None:
    """Boot a host that was killed (:func:`kill_machine`) from its own disk, as a server
    that lost its power comes back: what was deployed on it is still there."""
    if host_pid(host) is not None:
        raise RuntimeError(f"{host.name} is running")
    if not mounted(host.root):
        raise RuntimeError(f"{host.name} has no disk to boot from (its overlay is gone)")
    boot(host)
    wait_running(host, time.monotonic() + timeout)


def init_pid(nspawn_pid: int) -> int | None:
    """The container's PID 1 (systemd), seen from here: the nspawn process's child."""
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def in_host(host: FleetHost, argv: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
    """Run a command inside the host's namespaces (no SSH needed), or None if it is down."""
    pid = host_pid(host)
    child = init_pid(pid) if pid else None
    if child is None:
        return None
    return subprocess.run(
        ["nsenter", "-t", str(child), "-a", *argv],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def system_state(host: FleetHost) -> str:
    result = in_host(host, ["systemctl", "is-system-running"])
    return "stopped" if result is None else (result.stdout.strip() or "unknown")


def mounted(path: Path) -> bool:
    target = str(path)
    return any(line.split()[1] == target for line in Path("/proc/mounts").read_text().splitlines())


def prepare_host(host: FleetHost, public_key: str) -> None:
    """A fresh overlay for the host, with its address, name, SSH host keys and root's key."""
    for sub in ("upper", "work", "root"):
        (host.dir / sub).mkdir(parents=True, exist_ok=True)
    if not mounted(host.root):
        layers = f"lowerdir={image_dir(host.release)},upperdir={host.dir / 'upper'}"
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"{layers},workdir={host.dir / 'work'}", str(host.root)])  # fmt: skip
    host.release_file.write_text(host.release + "\n")
    root = host.root
    (root / "etc/hostname").write_text(host.name + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {host.name}\n")
    # Sorts before Debian's 80-container-host0.network, which would ask for DHCP.
    # No gateway: the hosts reach nothing outside the bridge, as on a closed network.
    (root / "etc/systemd/network/10-host0.network").write_text(
        f"[Match]\nName=host0\n\n[Network]\nAddress={host.address}/{NETWORK.prefixlen}\n"
        "LinkLocalAddressing=no\n"
    )
    # No per-login user manager (pam_systemd's user@0.service): once a host's last SSH
    # session closes, logind stops it, and in these containers systemd cannot kill a unit's
    # leftovers, so the stop hangs for its 90 s timeout while every new login waits on it.
    # Nothing the roles do needs a login session; the host's own services are untouched.
    session = root / "etc/pam.d/common-session"
    lines = session.read_text().splitlines(keepends=True)
    session.write_text("".join(line for line in lines if "pam_systemd.so" not in line))
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(public_key)
    (ssh_dir / "authorized_keys").chmod(0o600)
    if not any((root / "etc/ssh").glob("ssh_host_*_key")):
        run(["ssh-keygen", "-A", "-f", str(root)])


def boot(host: FleetHost) -> None:
    """Start systemd-nspawn for the host, detached from this process."""
    argv = [
        "systemd-nspawn",
        "--quiet",
        "-D", str(host.root),
        "--machine", host.name,
        # No systemd as PID 1 out here, so no machined to register with (design.md).
        "--register=no",
        "--keep-unit",
        "--boot",
        f"--network-bridge={BRIDGE}",
        "--console=read-only",
    ]  # fmt: skip
    with host.log_file.open("w") as console:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    host.pid_file.write_text(f"{process.pid}\n")


def wait_running(host: FleetHost, deadline: float) -> None:
    """Wait until systemd in the host says running and SSH answers; else name it, with logs."""
    state = "stopped"
    while time.monotonic() < deadline:
        # The pid file, not a /proc scan: right after Popen the child may not have exec'd.
        pid = int(host.pid_file.read_text())
        if process_state(pid) in ("Z", "?"):
            raise FleetError(f"{host.name} failed to boot:\n{tail(host.log_file)}")
        state = system_state(host)
        if state == "running" and ssh_ready(host):
            return
        if state == "degraded" and not reset_session_units(host):
            break
        time.sleep(0.5)
    failed = in_host(host, ["systemctl", "--failed", "--no-legend"])
    journal = in_host(host, ["journalctl", "-b", "-n", "40", "--no-pager"])
    raise FleetError(
        f"{host.name} did not come up (systemd says {state!r}).\n"
        f"failed units:\n{failed.stdout if failed else '?'}\n"
        f"journal tail:\n{journal.stdout if journal else tail(host.log_file)}"
    )


# Units of the SSH logins this machine makes into the host (pam_systemd), not of the
# host's services: on a loaded machine their setup or teardown may fail once.
SESSION_UNITS = ("user@", "user-runtime-dir@", "session-")


def reset_session_units(host: FleetHost) -> bool:
    """If only login-session units failed, clear them (the host's services are fine) and
    say so; False when anything else failed."""
    listed = in_host(host, ["systemctl", "--failed", "--no-legend", "--plain"])
    units = (
        [line.split()[0] for line in listed.stdout.splitlines() if line.strip()] if listed else []
    )
    if not units or not all(unit.startswith(SESSION_UNITS) for unit in units):
        return False
    log(f"{host.name}: clearing failed login-session units {', '.join(units)}")
    in_host(host, ["systemctl", "reset-failed", *units])
    return True


def ssh_ready(host: FleetHost) -> bool:
    scan = subprocess.run(
        ["ssh-keyscan", "-T", "2", "-t", "ed25519", host.address],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return scan.returncode == 0 and host.address in scan.stdout


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console log)"


def stop_host(name: str, pid: int | None) -> None:
    """Power the container off (SIGTERM asks its systemd to), then kill if it hangs."""
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pid = None
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid is not None and time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or process_state(pid) == "Z":
            break
        time.sleep(0.2)
    else:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    for orphan, orphan_name in orphan_inits().items():
        if orphan_name == name:
            os.kill(orphan, signal.SIGKILL)  # ends its whole PID namespace
    root = HOSTS_DIR / name / "root"
    while mounted(root):
        run(["umount", "-l", str(root)])
    if link_exists(f"vb-{name}"):
        run(["ip", "link", "del", f"vb-{name}"])
    shutil.rmtree(HOSTS_DIR / name, ignore_errors=True)


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"
