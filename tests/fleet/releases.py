"""Tests that run once per Debian release, each on a host of the (mixed) fleet running it;
and the batches the release tests roll the fleet out in."""

from __future__ import annotations

import pytest

import localfleet
from localfleet.image import RELEASES

__all__ = ["ONE_THEN_THE_REST", "host_of", "per_release"]

# rollout.yml's and rollback.yml's batches for the three hosts: one, then the other two
# together (the default, a quarter of the fleet at a time, takes them one by one). An
# extra var: Ansible reads a play's serial before any host's variables.
ONE_THEN_THE_REST = ("-e", '{"rollout_batches": [1, "100%"]}')

# Parametrise a test over the Debian releases a host can run: one case each.
per_release = pytest.mark.parametrize("release", RELEASES)


def host_of(fleet: localfleet.Fleet, release: str) -> localfleet.FleetHost:
    """The first app server of the fleet that runs ``release``."""
    return next(h for h in fleet.app_servers if h.release == release)
