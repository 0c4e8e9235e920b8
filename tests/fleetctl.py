"""The local fleet: real Debian 12 systemd hosts as systemd-nspawn containers.

Usage (as root)::

    python -m tests.fleetctl up [--hosts K] [--lb]   # build the image once, boot K hosts
    python -m tests.fleetctl status                  # each host and what systemd says
    python -m tests.fleetctl down                    # remove every container, mount, link

Each host boots from its own overlayfs over one shared base image (debootstrap of
bookworm, cached in ``.fleet/image`` and rebuilt when its recipe below changes), sits on
the private bridge ``wsf0`` with a static address, and is reached by Ansible over real
SSH with a key made for the fleet. ``up`` writes ``inventories/demo/hosts.yml``.

The hosts have no route to any package registry, so the image carries the apt lists and
the .deb archives of what the roles install (nginx, python3-venv): ``apt-get install``
then works offline, as long as it is not asked to update its lists first.

Kernel state (mounts, links) outlives the processes that made it, so ``up`` clears what a
crashed or killed run left behind before it builds anything, and ``down`` finds the
containers by scanning /proc as well as by the pid files it wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Fleet", "FleetError", "FleetHost", "main"]

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / ".fleet"
IMAGE = STATE / "image"
HOSTS_DIR = STATE / "hosts"
SSH_DIR = STATE / "ssh"
INVENTORY = REPO / "inventories" / "demo" / "hosts.yml"

# WSFLEET_FLEET=N (1..9) gives a second checkout its own bridge, subnet and host names,
# so two fleets can run side by side on one machine; 0, the default, is the one below.
FLEET = int(os.environ.get("WSFLEET_FLEET", "0") or 0)
BRIDGE = f"wsf{FLEET}"
NETWORK = ipaddress.ip_network(f"10.213.{FLEET}.0/24")
GATEWAY = str(NETWORK[1])
NAME = "fleet" if FLEET == 0 else f"fl{FLEET}-"  # host names; veth links are vb-<name>
FIRST_APP_HOST = 11  # fleet1 is 10.213.0.11, fleet2 .12, ...
LB_HOST = 10  # fleetlb, when asked for, is 10.213.0.10

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What every host has installed: a booting systemd, SSH for Ansible, Python for its modules.
INCLUDE = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "openssh-server",
    "python3",
    "python3-apt",
    "iproute2",
    "ca-certificates",
    "curl",
    "procps",
]
# What the roles install with apt: fetched into the image (lists and archives), not installed.
PREFETCH = ["nginx", "python3-venv"]
RECIPE_VERSION = "2"  # bump when the build steps below change in a way the lists don't show

BOOT_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


class FleetError(Exception):
    """A fleet operation that cannot go on; the message says what and how to fix it."""


@dataclass(frozen=True)
class FleetHost:
    """One container of the fleet."""

    name: str
    address: str
    groups: tuple[str, ...]

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

    def ssh(self, command: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the host as root over SSH; never raises on failure."""
        return subprocess.run(
            ["ssh", *ssh_options(), f"root@{self.address}", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@dataclass(frozen=True)
class Fleet:
    """The fleet as ``up`` left it: its hosts and its inventory."""

    hosts: tuple[FleetHost, ...]
    inventory: Path = INVENTORY.parent

    @property
    def app_servers(self) -> tuple[FleetHost, ...]:
        return tuple(h for h in self.hosts if "app_servers" in h.groups)

    @property
    def load_balancers(self) -> tuple[FleetHost, ...]:
        return tuple(h for h in self.hosts if "load_balancers" in h.groups)


def plan(hosts: int, lb: bool) -> tuple[FleetHost, ...]:
    """Name and address the hosts of a fleet of ``hosts`` app servers (and one balancer)."""
    if not 1 <= hosts <= 9:
        raise FleetError(f"--hosts must be between 1 and 9, got {hosts}")
    planned = [
        FleetHost(f"{NAME}{i}", str(NETWORK[FIRST_APP_HOST + i - 1]), ("app_servers",))
        for i in range(1, hosts + 1)
    ]
    if lb:
        planned.insert(0, FleetHost(f"{NAME}lb", str(NETWORK[LB_HOST]), ("load_balancers",)))
    return tuple(planned)


def ssh_options() -> list[str]:
    return [
        "-i", str(SSH_DIR / "id_ed25519"),
        "-o", f"UserKnownHostsFile={SSH_DIR / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=5",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip


def log(message: str) -> None:
    print(f"fleet: {message}", flush=True)


def run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command, raising FleetError with its output when it fails."""
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise FleetError(
            f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result  # type: ignore[no-any-return]


# --- preflight ----------------------------------------------------------------------------

REQUIRED_COMMANDS = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ssh-keyscan": "openssh-client",
    "nsenter": "util-linux",
    "mount": "mount",
}


def preflight() -> None:
    """Say what is missing, and how to get it, before touching anything."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (systemd-nspawn, mounts and bridges need it): sudo")
    missing = sorted({pkg for cmd, pkg in REQUIRED_COMMANDS.items() if not shutil.which(cmd)})
    if missing:
        problems.append(f"missing commands: apt-get install {' '.join(missing)}")
    if "overlay" not in Path("/proc/filesystems").read_text():
        problems.append("the kernel has no overlayfs: modprobe overlay")
    if problems:
        raise FleetError("cannot bring the fleet up:\n  " + "\n  ".join(problems))


# --- image ----------------------------------------------------------------------------------


def recipe_hash() -> str:
    recipe = json.dumps([RECIPE_VERSION, SUITE, MIRROR, INCLUDE, PREFETCH])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def build_image() -> None:
    """Debootstrap the base image unless the cached one was built from this recipe."""
    stamp = IMAGE / ".wsfleet-recipe"
    if stamp.is_file() and stamp.read_text().strip() == recipe_hash():
        return
    log(f"building the base image ({SUITE}); this takes a minute or two")
    STATE.mkdir(exist_ok=True)
    scratch = STATE / "image.new"
    shutil.rmtree(scratch, ignore_errors=True)
    run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
         SUITE, str(scratch), MIRROR])  # fmt: skip
    (scratch / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\n"
        f"deb http://deb.debian.org/debian-security {SUITE}-security main\n"
    )
    chroot = ["chroot", str(scratch)]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run([*chroot, "apt-get", "update", "-q"], env=env)
    run([*chroot, "apt-get", "install", "-y", "-q", "--download-only", *PREFETCH], env=env)
    # networkd gives host0 its static address; the apt timers would try the network.
    run([*chroot, "systemctl", "enable", "systemd-networkd", "ssh"])
    run([*chroot, "systemctl", "mask", "apt-daily.timer", "apt-daily-upgrade.timer",
         "systemd-networkd-wait-online.service"])  # fmt: skip
    # Each host gets its own SSH host keys, made in its overlay at boot.
    for key in (scratch / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (scratch / "etc/machine-id").write_text("")
    (scratch / ".wsfleet-recipe").write_text(recipe_hash() + "\n")
    shutil.rmtree(IMAGE, ignore_errors=True)
    scratch.rename(IMAGE)
    log(f"base image ready: {IMAGE}")


# --- network --------------------------------------------------------------------------------


def link_exists(name: str) -> bool:
    return (
        subprocess.run(["ip", "link", "show", name], capture_output=True, check=False).returncode
        == 0
    )


def bridge_up() -> None:
    if not link_exists(BRIDGE):
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    addresses = run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE]).stdout
    if f"{GATEWAY}/" not in addresses:
        run(["ip", "addr", "add", f"{GATEWAY}/{NETWORK.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


# --- hosts ----------------------------------------------------------------------------------


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
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={IMAGE},upperdir={host.dir / 'upper'},workdir={host.dir / 'work'}",
             str(host.root)])  # fmt: skip
    root = host.root
    (root / "etc/hostname").write_text(host.name + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {host.name}\n")
    # Sorts before Debian's 80-container-host0.network, which would ask for DHCP.
    # No gateway: the hosts reach nothing outside the bridge, as on a closed network.
    (root / "etc/systemd/network/10-host0.network").write_text(
        f"[Match]\nName=host0\n\n[Network]\nAddress={host.address}/{NETWORK.prefixlen}\n"
        "LinkLocalAddressing=no\n"
    )
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
        if state == "degraded":
            break
        time.sleep(0.5)
    failed = in_host(host, ["systemctl", "--failed", "--no-legend"])
    journal = in_host(host, ["journalctl", "-b", "-n", "40", "--no-pager"])
    raise FleetError(
        f"{host.name} did not come up (systemd says {state!r}).\n"
        f"failed units:\n{failed.stdout if failed else '?'}\n"
        f"journal tail:\n{journal.stdout if journal else tail(host.log_file)}"
    )


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


# --- inventory ------------------------------------------------------------------------------


def write_inventory(hosts: Sequence[FleetHost]) -> None:
    groups: dict[str, list[FleetHost]] = {}
    for host in hosts:
        for group in host.groups:
            groups.setdefault(group, []).append(host)
    key = SSH_DIR / "id_ed25519"
    known = SSH_DIR / "known_hosts"
    lines = [
        "---",
        "# Written by `python -m tests.fleetctl up`: the local fleet of systemd-nspawn hosts.",
        "# Rewritten on every `up`; the demo's settings live in group_vars/.",
        "all:",
        "  vars:",
        "    ansible_user: root",
        "    ansible_python_interpreter: /usr/bin/python3",
        f"    ansible_ssh_private_key_file: {key}",
        f"    ansible_ssh_common_args: -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes",
        "  children:",
    ]
    for group in sorted(groups):
        lines += [f"    {group}:", "      hosts:"]
        lines += [f"        {h.name}:\n          ansible_host: {h.address}" for h in groups[group]]
    INVENTORY.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=INVENTORY.parent, delete=False) as out:
        out.write("\n".join(lines) + "\n")
    os.replace(out.name, INVENTORY)
    INVENTORY.chmod(0o644)


def write_known_hosts(hosts: Sequence[FleetHost]) -> None:
    scan = run(["ssh-keyscan", "-T", "5", "-t", "ed25519", *(h.address for h in hosts)])
    (SSH_DIR / "known_hosts").write_text(scan.stdout)


# --- commands -------------------------------------------------------------------------------


def read_fleet() -> Fleet:
    """The fleet the inventory describes (as the last ``up`` wrote it)."""
    hosts = []
    if INVENTORY.is_file():
        group = ""
        name = ""
        for line in INVENTORY.read_text().splitlines():
            stripped = line.strip()
            if line.startswith("    ") and not line.startswith("     ") and stripped.endswith(":"):
                group = stripped[:-1]
            elif line.startswith("        ") and not line.startswith("         "):
                name = stripped.rstrip(":")
            elif stripped.startswith("ansible_host:") and name:
                hosts.append(FleetHost(name, stripped.split(":", 1)[1].strip(), (group,)))
    return Fleet(tuple(hosts))


def up(hosts: int = 3, lb: bool = False) -> Fleet:
    """Bring the fleet up (idempotent): hosts already running are left as they are."""
    preflight()
    wanted = plan(hosts, lb)
    wanted_names = {h.name for h in wanted}
    # Clear what a crashed run left: hosts not wanted, or whose container is gone.
    for name in set(orphan_inits().values()):
        # Its address may be taken twice now: remove both and boot the host afresh.
        log(f"removing {name}, left running by a killed run")
        stop_host(name, next((p for p, n in nspawn_pids().items() if n == name), None))
    running = nspawn_pids()
    for pid, name in running.items():
        if name not in wanted_names:
            log(f"removing {name}, not part of this fleet")
            stop_host(name, pid)
    if HOSTS_DIR.is_dir():
        for leftover in HOSTS_DIR.iterdir():
            if leftover.name not in running.values() or leftover.name not in wanted_names:
                stop_host(leftover.name, None)
    build_image()
    SSH_DIR.mkdir(parents=True, exist_ok=True)
    key = SSH_DIR / "id_ed25519"
    if not key.is_file():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "wsfleet-local", "-f", str(key)])
    public_key = (SSH_DIR / "id_ed25519.pub").read_text()
    bridge_up()
    started = []
    for host in wanted:
        if host_pid(host) is None:
            prepare_host(host, public_key)
            boot(host)
            started.append(host.name)
    deadline = time.monotonic() + BOOT_TIMEOUT
    for host in wanted:
        wait_running(host, deadline)
    write_known_hosts(wanted)
    write_inventory(wanted)
    log(f"up: {', '.join(h.name + '=' + h.address for h in wanted)}"
        f" (booted now: {', '.join(started) or 'none'})")  # fmt: skip
    return Fleet(wanted)


def down() -> None:
    """Remove every container, overlay mount, veth link and the bridge (idempotent)."""
    pids = nspawn_pids()
    names = set(pids.values()) | set(orphan_inits().values())
    if HOSTS_DIR.is_dir():
        names |= {d.name for d in HOSTS_DIR.iterdir()}
    for name in sorted(names):
        pid = next((p for p, n in pids.items() if n == name), None)
        stop_host(name, pid)
        log(f"removed {name}")
    if link_exists(BRIDGE):
        run(["ip", "link", "del", BRIDGE])
    INVENTORY.unlink(missing_ok=True)
    log("down: no container, mount, link or bridge left")


def leftovers() -> list[str]:
    """What of the fleet is still on this machine (empty after ``down``)."""
    found = [f"process {pid} ({name})" for pid, name in nspawn_pids().items()]
    found += [f"orphan container {pid} ({name})" for pid, name in orphan_inits().items()]
    found += [
        f"mount {line.split()[1]}"
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(HOSTS_DIR))
    ]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False)
    for line in links.stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        if link == BRIDGE or link.startswith(f"vb-{NAME}"):
            found.append(f"link {link}")
    return found


def status() -> int:
    fleet = read_fleet()
    if not fleet.hosts and not nspawn_pids():
        print("no fleet (run: python -m tests.fleetctl up)")
        return 1
    healthy = True
    for host in fleet.hosts:
        state = system_state(host)
        healthy &= state == "running"
        print(f"{host.name:<10} {host.address:<12} {','.join(host.groups):<16} {state}")
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fleetctl", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="build the image if needed and boot the hosts")
    up_parser.add_argument("--hosts", type=int, default=3, help="app servers to run (default 3)")
    up_parser.add_argument("--lb", action="store_true", help="also run a load balancer host")
    sub.add_parser("down", help="remove every container, mount, link and the bridge")
    sub.add_parser("status", help="list the hosts and what systemd in each says")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.hosts, args.lb)
        elif args.command == "down":
            down()
        else:
            return status()
    except FleetError as error:
        print(f"fleet: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
