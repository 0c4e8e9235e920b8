"""Tests that run once per Debian release, each on a host of the (mixed) fleet running it;
the batches the release tests roll the fleet out in, and the release each instance runs."""

from __future__ import annotations

import json

import pytest

import localfleet
from localfleet.image import RELEASES
from localfleet.instances import instance_get

__all__ = ["ONE_THEN_THE_REST", "host_of", "per_release", "versions"]

# rollout.yml's and rollback.yml's batches for the three hosts: one, then the other two
# together (the default, a quarter of the fleet at a time, takes them one by one). An
# extra var: Ansible reads a play's serial before any host's variables.
ONE_THEN_THE_REST = ("-e", '{"rollout_batches": [1, "100%"]}')

# Parametrise a test over the Debian releases a host can run: one case each.
per_release = pytest.mark.parametrize("release", RELEASES)


def host_of(fleet: localfleet.Fleet, release: str) -> localfleet.FleetHost:
    """The first app server of the fleet that runs ``release``."""
    return next(h for h in fleet.app_servers if h.release == release)


def versions(fleet: localfleet.Fleet) -> dict[str, set[str]]:
    """The release label every active instance of every host reports."""
    found: dict[str, set[str]] = {}
    for host in fleet.app_servers:
        listed = host.ssh(
            "systemctl list-units --plain --no-legend --state=active 'wsapp@*.service'"
        )
        units = [unit for unit in listed.stdout.split() if unit.startswith("wsapp@")]
        for port in (int(unit.split("@")[1].split(".")[0]) for unit in units):
            health = json.loads(instance_get(host, port, "/healthz").stdout)
            found.setdefault(host.name, set()).add(health["version"])
    return found
