"""Where the local fleet keeps its state and how it names and addresses its hosts.

``WSFLEET_FLEET=N`` (1..9) gives a second checkout its own bridge, subnet and host names,
so two fleets can run side by side on one machine; 0, the default, is the first fleet.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

__all__ = [
    "BRIDGE",
    "FACTS",
    "FIRST_APP_HOST",
    "FLEET",
    "GATEWAY",
    "HOSTS_DIR",
    "IMAGES",
    "INVENTORY",
    "LB_HOST",
    "NAME",
    "NETWORK",
    "REPO",
    "SSH_DIR",
    "STATE",
]

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / ".fleet"
IMAGES = STATE / "images"  # one base image per Debian release: images/<codename>
HOSTS_DIR = STATE / "hosts"
SSH_DIR = STATE / "ssh"
# The hosts' facts between the test playbooks (localfleet.ansible), cleared whenever a
# host boots afresh: a host of another Debian release has another Python.
FACTS = STATE / "facts"
INVENTORY = REPO / "inventories" / "demo" / "hosts.yml"

FLEET = int(os.environ.get("WSFLEET_FLEET", "0") or 0)
BRIDGE = f"wsf{FLEET}"
NETWORK = ipaddress.ip_network(f"10.213.{FLEET}.0/24")
GATEWAY = str(NETWORK[1])
NAME = "fleet" if FLEET == 0 else f"fl{FLEET}-"  # host names; veth links are vb-<name>
FIRST_APP_HOST = 11  # fleet1 is 10.213.0.11, fleet2 .12, ...
LB_HOST = 10  # fleetlb, when asked for, is 10.213.0.10
