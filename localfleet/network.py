"""The private bridge the hosts sit on, with this machine as its gateway address."""

from __future__ import annotations

import subprocess

from localfleet.errors import run
from localfleet.settings import BRIDGE, GATEWAY, NETWORK

__all__ = ["bridge_down", "bridge_up", "link_exists"]


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


def bridge_down() -> None:
    if link_exists(BRIDGE):
        run(["ip", "link", "del", BRIDGE])
