"""Fixtures for tests on the local fleet: real systemd hosts, reached over real SSH.

The fleet comes up once per session and is always taken down at its end, leaving the
machine as it was (the teardown checks that nothing of it is left). It is a mixed fleet,
Debian 13 and Debian 12 in turn (fleet1 trixie, fleet2 bookworm, fleet3 trixie): every
test that spans the fleet spans both releases, and ``tests.fleet.releases`` picks a host
of each.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

import localfleet
from localfleet.ansible import ansible_playbook
from localfleet.image import MIX


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/fleet as a fleet test; the fleet's own tests go first.

    Those reboot a host, so they run before anything is deployed on it.
    """
    for item in items:
        if "/tests/fleet/" in str(item.path):
            item.add_marker(pytest.mark.fleet)
    items.sort(key=lambda item: item.path.name != "test_fleet.py")


@pytest.fixture(scope="session")
def fleet() -> Iterator[localfleet.Fleet]:
    """The local fleet of three app servers of both releases, up for the whole session."""
    try:
        yield localfleet.up(hosts=3, releases=MIX)
    finally:
        localfleet.down()
        left = localfleet.leftovers()
        assert not left, f"the fleet left state behind: {left}"


@pytest.fixture(scope="session")
def deployed(fleet: localfleet.Fleet) -> subprocess.CompletedProcess[str]:
    """site.yml applied once to the fleet."""
    return ansible_playbook("site.yml")
