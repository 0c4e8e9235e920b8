"""A new release through site.yml while clients keep connecting: no connection attempt fails.

The deploy restarts each host's instances one at a time (close code 1012 to their
clients, nginx sending new handshakes to the other instances).
"""

from __future__ import annotations

import json

import pytest

import localfleet
from localfleet.ansible import ansible_playbook
from localfleet.image import RELEASES
from localfleet.instances import instance_get
from tests.fleet.load import (
    LONG_LIVED_PER_HOST,
    assert_each_closed_at_most_once,
    assert_no_failures,
    load_on,
    summary,
)
from tests.fleet.releases import ONE_THEN_THE_REST


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


# A release, then back to the session's: two rolling restarts of the fleet (rollback.yml
# leaves it as site.yml would, without a build or an install).
@pytest.mark.timeout(900)
def test_a_release_under_load_fails_no_connection(
    fleet: localfleet.Fleet, deployed: object
) -> None:
    """site.yml with a new app_version under load, on hosts of both Debian releases:
    0 failed handshakes, only 1012, 0 lost."""
    assert {h.release for h in fleet.app_servers} == set(RELEASES)
    addresses = [h.address for h in fleet.app_servers]
    released = False
    try:
        with load_on(addresses) as load:
            ansible_playbook("site.yml", "-e", "app_version=1.0.1-load")
        released = True
        assert_no_failures(load)
        assert load.closes, "no instance restarted: the release did not reach the hosts"
        assert_each_closed_at_most_once(load)
        assert load.handshakes.done > len(addresses) * LONG_LIVED_PER_HOST
        assert versions(fleet) == {h.name: {"1.0.1-load"} for h in fleet.app_servers}
        print(f"\nrelease under load: {summary(load)}")
    finally:
        # Each host's previous release is the session's once the run went through.
        if released:
            ansible_playbook("playbooks/rollback.yml", *ONE_THEN_THE_REST)
        else:
            ansible_playbook("site.yml")
