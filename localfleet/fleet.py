"""Bringing the whole fleet up and down, idempotently, and finding what it left behind.

Kernel state (mounts, links) outlives the processes that made it, so ``up`` clears what a
crashed or killed run left behind before it builds anything, and ``down`` finds the
containers by scanning /proc as well as by the pid files it wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from localfleet.errors import FleetError, log, run
from localfleet.hosts import (
    BOOT_TIMEOUT,
    FleetHost,
    boot,
    host_pid,
    nspawn_pids,
    orphan_inits,
    prepare_host,
    stop_host,
    wait_running,
)
from localfleet.image import MIX, build_images
from localfleet.inventory import Fleet, plan, write_inventory, write_known_hosts
from localfleet.network import bridge_down, bridge_up
from localfleet.settings import BRIDGE, FACTS, HOSTS_DIR, INVENTORY, NAME, SSH_DIR

__all__ = ["down", "leftovers", "preflight", "up"]

REQUIRED_COMMANDS = {
    "systemd-nspawn": "systemd-container",
    "mmdebstrap": "mmdebstrap",
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


def up(hosts: int = 3, lb: bool = False, releases: Sequence[str] = MIX) -> Fleet:
    """Bring the fleet up (idempotent): hosts already running are left as they are.

    ``releases``: the Debian codenames the app servers run, in turn (see ``plan``); a
    running host of another release than wanted is booted afresh from the right image.
    """
    preflight()
    wanted = plan(hosts, lb, releases)
    wanted_names = {h.name for h in wanted if not wrong_release(h)}
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
    build_images([h.release for h in wanted])
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
    if started:
        shutil.rmtree(FACTS, ignore_errors=True)
    write_known_hosts(wanted)
    write_inventory(wanted)
    log(f"up: {', '.join(h.name + '=' + h.address for h in wanted)}"
        f" (booted now: {', '.join(started) or 'none'})")  # fmt: skip
    return Fleet(wanted)


def wrong_release(host: FleetHost) -> bool:
    """Whether the host's overlay lies over another release's image than the plan's, or
    over an image of unknown release (an overlay without a release file)."""
    try:
        return host.release_file.read_text().strip() != host.release
    except OSError:
        return host.dir.is_dir()


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
    bridge_down()
    INVENTORY.unlink(missing_ok=True)
    shutil.rmtree(FACTS, ignore_errors=True)
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
