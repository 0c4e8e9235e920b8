"""The fleet as Ansible sees it: the demo inventory ``up`` writes, and reads back.

Also the hosts' SSH host keys, scanned once they boot, so Ansible checks them
(``StrictHostKeyChecking=yes``) like any real fleet's.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localfleet.errors import FleetError, run
from localfleet.hosts import FleetHost
from localfleet.image import MIX, RELEASES, image_dir
from localfleet.settings import (
    DEMO_GROUP_VARS,
    FIRST_APP_HOST,
    FLEET,
    INVENTORY,
    LB_HOST,
    NAME,
    NETWORK,
    SSH_DIR,
    STATE,
)

__all__ = ["Fleet", "plan", "read_fleet", "write_inventory", "write_known_hosts"]


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


def plan(hosts: int, lb: bool, releases: Sequence[str] = MIX) -> tuple[FleetHost, ...]:
    """Name and address the hosts of a fleet of ``hosts`` app servers (and one balancer).

    App server i runs ``releases[(i - 1) % len(releases)]``: one release, or several in
    turn (a mixed fleet); the balancer runs the first.
    """
    if not 1 <= hosts <= 9:
        raise FleetError(f"--hosts must be between 1 and 9, got {hosts}")
    unknown = [r for r in releases if r not in RELEASES]
    if not releases or unknown:
        raise FleetError(
            f"--release must be one of {', '.join(RELEASES)}, got {', '.join(unknown) or 'none'}"
        )
    planned = [
        FleetHost(
            f"{NAME}{i}",
            str(NETWORK[FIRST_APP_HOST + i - 1]),
            ("app_servers",),
            releases[(i - 1) % len(releases)],
        )
        for i in range(1, hosts + 1)
    ]
    if lb:
        planned.insert(
            0, FleetHost(f"{NAME}lb", str(NETWORK[LB_HOST]), ("load_balancers",), releases[0])
        )
    return tuple(planned)


def controller_state() -> dict[str, Path]:
    """Where site.yml keeps this fleet's side on the controller (role variables).

    Fleet 0's CA is the demo's, outside the checkout (a browser that trusts it keeps
    trusting it across clones), and its bus secrets and builds the roles' defaults; another
    fleet's are its own, beside its hosts, so that two fleets' first deploys never make one
    CA twice or build into one folder at once.
    """
    state = {
        "monitoring_file_sd_dir": STATE / "prometheus" / "file_sd",
        "monitoring_rules_dir": STATE / "prometheus" / "rules",
    }
    if FLEET == 0:
        return {"tls_ca_dir": Path.home() / ".local/share/wsfleet/demo-ca", **state}
    return {
        "tls_ca_dir": STATE / "ca",
        "bus_secret_dir": STATE / "bus",
        "app_build_root": STATE / "builds",
        **state,
    }


def bus_server_package(hosts: Sequence[FleetHost]) -> Path | None:
    """The one nats-server .deb for a bus cluster over two Debian releases (the bus role's
    bus_server_package): the newest release's, from its image's archives (fetched there
    by apt, checked against Debian's keys); None when the app servers run one release."""
    releases = {h.release for h in hosts if "app_servers" in h.groups}
    if len(releases) < 2:
        return None
    newest = max(releases, key=RELEASES.index)
    found = sorted((image_dir(newest) / "var/cache/apt/archives").glob("nats-server_*.deb"))
    if not found:
        raise FleetError(f"the {newest} image has no nats-server package: build it again")
    return found[-1]


def write_inventory(hosts: Sequence[FleetHost]) -> None:
    groups: dict[str, list[FleetHost]] = {}
    for host in hosts:
        for group in host.groups:
            groups.setdefault(group, []).append(host)
    key = SSH_DIR / "id_ed25519"
    known = SSH_DIR / "known_hosts"
    lines = [
        "---",
        "# Written by `python -m localfleet up`: the local fleet of systemd-nspawn hosts.",
        "# Rewritten on every `up`; the demo's settings live in group_vars/.",
        "all:",
        "  vars:",
        "    ansible_user: root",
        "    ansible_python_interpreter: /usr/bin/python3",
        f"    ansible_ssh_private_key_file: {key}",
        f"    ansible_ssh_common_args: -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes",
        "    # This fleet's state on the controller (localfleet.inventory.controller_state).",
        *(f"    {name}: {path}" for name, path in controller_state().items()),
    ]
    package = bus_server_package(hosts)
    if package is not None:
        lines += [
            "    # Debian 12 and 13 hosts: one nats-server version in the bus cluster.",
            f"    bus_server_package: {package}",
        ]
    lines.append("  children:")
    for group in sorted(groups):
        lines += [f"    {group}:", "      hosts:"]
        # localfleet_release: the Debian codename the host was built from, for tests
        # that assert per release (the roles read the facts, never this).
        lines += [
            f"        {h.name}:\n          ansible_host: {h.address}\n"
            f"          localfleet_release: {h.release}"
            for h in groups[group]
        ]
    INVENTORY.parent.mkdir(parents=True, exist_ok=True)
    group_vars = INVENTORY.parent / "group_vars"
    if group_vars.is_symlink() and group_vars.resolve() != DEMO_GROUP_VARS:
        group_vars.unlink()  # left by a checkout since moved
    if not group_vars.exists():
        group_vars.symlink_to(DEMO_GROUP_VARS)
    with tempfile.NamedTemporaryFile("w", dir=INVENTORY.parent, delete=False) as out:
        out.write("\n".join(lines) + "\n")
    os.replace(out.name, INVENTORY)
    INVENTORY.chmod(0o644)


def write_known_hosts(hosts: Sequence[FleetHost]) -> None:
    scan = run(["ssh-keyscan", "-T", "5", "-t", "ed25519", *(h.address for h in hosts)])
    (SSH_DIR / "known_hosts").write_text(scan.stdout)


def read_fleet() -> Fleet:
    """The fleet the inventory describes (as the last ``up`` wrote it)."""
    hosts = []
    if INVENTORY.is_file():
        group = ""
        name = ""
        address = ""
        for line in INVENTORY.read_text().splitlines():
            stripped = line.strip()
            if line.startswith("    ") and not line.startswith("     ") and stripped.endswith(":"):
                group = stripped[:-1]
            elif line.startswith("        ") and not line.startswith("         "):
                name = stripped.rstrip(":")
            elif stripped.startswith("ansible_host:") and name:
                address = stripped.split(":", 1)[1].strip()
            elif stripped.startswith("localfleet_release:") and name and address:
                release = stripped.split(":", 1)[1].strip()
                hosts.append(FleetHost(name, address, (group,), release))
                name = address = ""
    return Fleet(tuple(hosts))
