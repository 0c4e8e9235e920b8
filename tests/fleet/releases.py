"""Tests that run once per Debian release, each on a host of the (mixed) fleet running it."""

from __future__ import annotations

import pytest

import localfleet
from localfleet.image import RELEASES

__all__ = ["host_of", "per_release"]

# Parametrise a test over the Debian releases a host can run: one case each.
per_release = pytest.mark.parametrize("release", RELEASES)


def host_of(fleet: localfleet.Fleet, release: str) -> localfleet.FleetHost:
    """The first app server of the fleet that runs ``release``."""
    return next(h for h in fleet.app_servers if h.release == release)
