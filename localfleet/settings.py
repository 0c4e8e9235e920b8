"""Where the local fleet keeps its state and how it names and addresses its hosts.

``WSFLEET_FLEET=N`` (1..9) gives a fleet its own bridge, subnet, host names and state on
the controller, so that fleets run side by side on one machine, from one checkout (the
test session's workers: tests/conftest.py) or several; 0, the default, is the first
fleet, whose inventory is the demo's. The fleets of a checkout share its images.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

__all__ = [
    "BRIDGE",
    "DEMO_GROUP_VARS",
    "DEMO_INVENTORY",
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
    "SHARED_STATE",
    "SSH_DIR",
    "STATE",
]

REPO = Path(__file__).resolve().parent.parent
FLEET = int(os.environ.get("WSFLEET_FLEET", "0") or 0)
SHARED_STATE = REPO / ".fleet"
IMAGES = SHARED_STATE / "images"  # one base image per Debian release: images/<codename>
# What is this fleet's own: its hosts, keys, facts, and the controller's side of what
# site.yml makes (CA, bus secrets, builds, monitoring targets) for fleets other than 0.
STATE = SHARED_STATE if FLEET == 0 else SHARED_STATE / f"fl{FLEET}"
HOSTS_DIR = STATE / "hosts"
SSH_DIR = STATE / "ssh"
# The hosts' facts between the test playbooks (localfleet.ansible), cleared whenever a
# host boots afresh: a host of another Debian release has another Python.
FACTS = STATE / "facts"
# Fleet 0's is the demo inventory; another's is a folder of its own whose group_vars are
# the demo's (localfleet.inventory links them).
DEMO_INVENTORY = REPO / "inventories" / "demo"
DEMO_GROUP_VARS = DEMO_INVENTORY / "group_vars"
INVENTORY = (DEMO_INVENTORY if FLEET == 0 else STATE / "inventory") / "hosts.yml"
BRIDGE = f"wsf{FLEET}"
NETWORK = ipaddress.ip_network(f"10.213.{FLEET}.0/24")
GATEWAY = str(NETWORK[1])
NAME = "fleet" if FLEET == 0 else f"fl{FLEET}-"  # host names; veth links are vb-<name>
FIRST_APP_HOST = 11  # fleet1 is 10.213.0.11, fleet2 .12, ...
LB_HOST = 10  # fleetlb, when asked for, is 10.213.0.10
