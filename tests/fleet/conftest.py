"""Fixtures for tests on the local fleet: real systemd hosts, reached over real SSH.

The fleet comes up once per session and is taken down at its end, leaving the machine as
it was (the teardown checks that nothing of it is left), unless WSFLEET_KEEP=1 (``make
test-fleet``): then a running fleet is used as it is and stays up for the next run. A fleet
that cannot come up, or a first deploy that fails, stops the session with one line saying
why, instead of an error for every fleet test. Under ``make test TEST_WORKERS=2`` each
worker has a fleet of its own (tests/conftest.py) and takes whole modules (ORDER below).

It is a mixed fleet, Debian 13 and Debian 12 in turn (the first host trixie, the second
bookworm, the third trixie): every test that spans the fleet spans both releases, and
``tests.fleet.releases`` picks a host of each.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

import localfleet
from localfleet.ansible import ansible_playbook, failure_summary
from localfleet.image import MIX, build_images

# The fleet modules, longest first (roughly their minutes in one process on 2 cores, from
# pytest --durations and the playbook log: docs/testing.md). Under ``make test
# TEST_WORKERS=2`` the two workers take whole modules in this order (pytest-xdist's
# loadfile, not reordered), each on a fleet of its own, the next module going to whichever
# finishes first: longest first leaves short modules to even out the end. Each module
# restores what it changes, so a module runs the same on either fleet and after any other.
# test_fleet.py is not here: it reboots hosts, so it goes before every deploy.
ORDER = (
    "test_deploy.py",  # ~9 min: the first deploy, idempotence, the collection, bad variables
    "test_rollout.py",  # ~4
    "test_nginx_ops.py",  # ~3
    "test_unix.py",  # ~3
    "test_loadbalancer.py",  # ~3
    "test_operations.py",  # ~3
    "test_security.py",  # ~2
    "test_acme.py",  # ~1.5
    "test_release_under_load.py",  # ~1.5
    "test_bus.py",  # ~1
    "test_browser.py",  # ~1
)


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/fleet as a fleet test. The tests that need no fleet go
    first (a fleet that fails to come up stops the session), then the fleet's own tests
    (they reboot a host, so they run before anything is deployed on it), then the modules
    in ORDER."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        if "/tests/fleet/" not in str(item.path):
            return (0, 0)
        if item.path.name == "test_fleet.py":
            return (1, 0)
        return (2, ORDER.index(item.path.name))

    for item in items:
        if "/tests/fleet/" in str(item.path):
            assert item.path.name == "test_fleet.py" or item.path.name in ORDER, (
                f"{item.path.name}: a fleet module missing from ORDER"
            )
            item.add_marker(pytest.mark.fleet)
    items.sort(key=rank)


KEEP = os.environ.get("WSFLEET_KEEP") == "1"

_images: threading.Thread | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """With fleet tests to run, build the hosts' images (when missing or stale) in the
    background while the tests that need no fleet run first: a build mostly waits on the
    mirror and on dpkg, about 80 s from a clean clone. The fleet fixture's ``up`` then
    finds them built, or waits on the build's lock (localfleet.image)."""
    global _images
    if session.config.option.collectonly or os.geteuid() != 0:
        return
    if not any(item.get_closest_marker("fleet") for item in session.items):
        return

    def build() -> None:
        # A failure is up()'s to report: it builds again, and stops the session saying why.
        with contextlib.suppress(Exception):
            build_images(MIX)

    _images = threading.Thread(target=build, name="images", daemon=True)
    _images.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A build still running (the session cut short) finishes before pytest exits."""
    if _images is not None:
        _images.join()


@pytest.fixture(scope="session")
def fleet() -> Iterator[localfleet.Fleet]:
    """The local fleet of three app servers of both releases, up for the whole session."""
    try:
        hosts = localfleet.up(hosts=3, releases=MIX)
    except localfleet.FleetError as error:
        print(error, file=sys.stderr)
        pytest.exit(f"the local fleet did not come up: {str(error).splitlines()[0]}", 1)
    try:
        yield hosts
    finally:
        if not KEEP:
            localfleet.down()
            left = localfleet.leftovers()
            assert not left, f"the fleet left state behind: {left}"


@pytest.fixture(scope="session")
def deployed(fleet: localfleet.Fleet) -> subprocess.CompletedProcess[str]:
    """site.yml applied once to the fleet, with Ansible's own strategy as operators run it
    (the later runs may use Mitogen's: docs/testing.md, Mitogen)."""
    result = ansible_playbook("site.yml", check=False, mitogen=False)
    if result.returncode != 0:
        print(result.stdout[-6000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
        pytest.exit(f"site.yml failed on the local fleet: {failure_summary(result.stdout)}", 1)
    return result
