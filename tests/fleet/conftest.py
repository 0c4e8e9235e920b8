"""Fixtures for tests on the local fleet: real systemd hosts, reached over real SSH.

The fleet comes up once per session and is taken down at its end, leaving the machine as
it was (the teardown checks that nothing of it is left), unless WSFLEET_KEEP=1 (``make
test-fleet``): then a running fleet is used as it is and stays up for the next run. It
comes up, and the session's first site.yml runs on it, in the background while the
tests that need no fleet run (``pytest_collection_finish``). A fleet that cannot come up, or a
first deploy that fails, stops the session with one line saying why, instead of an error
for every fleet test. Under ``make test TEST_WORKERS=2`` each worker has a fleet of its
own (tests/conftest.py) and takes whole modules (ORDER below).

It is a mixed fleet, Debian 13 and Debian 12 in turn (the first host trixie, the second
bookworm, the third trixie): every test that spans the fleet spans both releases, and
``tests.fleet.releases`` picks a host of each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

import localfleet
from localfleet.ansible import ansible_playbook, failure_summary
from localfleet.image import MIX
from tests.fleet.restore import RESTORE

# The fleet modules, longest first (roughly their minutes in one process on 2 cores, from
# pytest --durations and the playbook log: docs/testing.md), but for the last three. Under
# ``make test TEST_WORKERS=2`` the two workers take whole modules in this order
# (pytest-xdist's loadfile, not reordered), each on a fleet of its own, the next module
# going to whichever finishes first: longest first leaves short modules to even out the
# end. Each module restores what it changes (itself, or through RESTORE below), so a module
# runs the same on either fleet and after any other. The last three leave their restores
# to the module after them, which needs none (NEEDS_DEFAULTS = False): three site.yml runs
# fewer in one process.
# test_fleet.py is not here: it kills and boots a host again, so it goes after them all.
ORDER = (
    "test_deploy.py",  # ~9 min: the first deploy, idempotence, the collection, bad variables
    "test_rollout.py",  # ~4
    "test_operations.py",  # ~3
    "test_security.py",  # ~2
    "test_acme.py",  # ~1.5
    "test_bus.py",  # ~1
    "test_browser.py",  # ~1
    "test_nginx_ops.py",  # ~3, its restore left to test_unix.py
    "test_unix.py",  # ~3, its restore left to test_loadbalancer.py
    "test_loadbalancer.py",  # ~3, its restore left to test_fleet.py
)


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/fleet as a fleet test. The tests that need no fleet go
    first (meanwhile the fleet comes up and is deployed), then the modules in ORDER, then
    the fleet's own tests (they kill a host's container and boot it again)."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        if "/tests/fleet/" not in str(item.path):
            return (0, 0)
        if item.path.name == "test_fleet.py":
            return (2, 0)
        return (1, ORDER.index(item.path.name))

    for item in items:
        if "/tests/fleet/" in str(item.path):
            assert item.path.name == "test_fleet.py" or item.path.name in ORDER, (
                f"{item.path.name}: a fleet module missing from ORDER"
            )
            item.add_marker(pytest.mark.fleet)
    items.sort(key=rank)


KEEP = os.environ.get("WSFLEET_KEEP") == "1"


@pytest.fixture(scope="module", autouse=True)
def defaults(request: pytest.FixtureRequest) -> None:
    """The defaults deployed back before a module's first test, if the module before left
    them (RESTORE), unless the module needs none (NEEDS_DEFAULTS = False)."""
    if getattr(request.module, "NEEDS_DEFAULTS", True):
        RESTORE.run()
    else:
        RESTORE.drop()


class _Preparation:
    """The fleet brought up, and site.yml run on it once, in a thread of their own."""

    def __init__(self, deploy: bool) -> None:
        self.deploy = deploy
        self.up = threading.Event()
        self.hosts: localfleet.Fleet | None = None
        self.error: str | None = None  # why the fleet did not come up
        self.result: subprocess.CompletedProcess[str] | None = None
        self.used = False  # the fleet fixture took it (and takes it down at its end)
        self.thread = threading.Thread(target=self._run, name="fleet", daemon=True)

    def _run(self) -> None:
        try:
            # Missing or stale images are built first (35-50 s from a clean clone;
            # `make test` starts that build before pytest, and this waits for it).
            self.hosts = localfleet.up(hosts=3, releases=MIX)
        except localfleet.FleetError as error:
            print(error, file=sys.stderr)
            self.error = str(error).splitlines()[0]
        except Exception as error:  # any other failure is reported the same way, once
            self.error = repr(error)
        finally:
            self.up.set()
        if self.hosts is not None and self.deploy:
            # Ansible's own strategy, as operators run it (the later runs may use
            # Mitogen's: docs/testing.md, Mitogen).
            self.result = ansible_playbook("site.yml", check=False, mitogen=False)


_preparation: _Preparation | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """With fleet tests to run, bring the fleet up (building its images if needed) and, if
    a test wants it deployed, run the session's first site.yml, in the background: the
    fixtures below then wait for it."""
    global _preparation
    if session.config.option.collectonly or os.geteuid() != 0:
        return
    fleet_items = [item for item in session.items if item.get_closest_marker("fleet")]
    if not fleet_items:
        return
    deploy = any("deployed" in getattr(item, "fixturenames", ()) for item in fleet_items)
    _preparation = _Preparation(deploy)
    # The tests that need no fleet (the app's, the templates', the controller's: about
    # 80 s) run meanwhile. The app's room tests join a member only once the server said
    # hello, so that a busy machine slows them down without breaking them.
    _preparation.thread.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A preparation still running (the session cut short) finishes before pytest exits;
    a fleet that no test took is taken down again."""
    if _preparation is None or _preparation.thread.ident is None:  # never started
        return
    _preparation.thread.join()
    if not _preparation.used and not KEEP and _preparation.hosts is not None:
        localfleet.down()


@pytest.fixture(scope="session")
def fleet() -> Iterator[localfleet.Fleet]:
    """The local fleet of three app servers of both releases, up for the whole session."""
    if _preparation is None:  # not root, or only collected: up() says why
        preparation = _Preparation(deploy=False)
        preparation.thread.run()
    else:
        preparation = _preparation
        if preparation.thread.ident is None:  # no test before started it
            preparation.thread.start()
    preparation.up.wait()
    if preparation.hosts is None:
        pytest.exit(f"the local fleet did not come up: {preparation.error}", 1)
    preparation.used = True
    try:
        yield preparation.hosts
    finally:
        if KEEP:  # the fleet stays up: with the defaults, as the next session expects it
            RESTORE.run()
        else:
            preparation.thread.join()
            localfleet.down()
            left = localfleet.leftovers()
            assert not left, f"the fleet left state behind: {left}"


@pytest.fixture(scope="session")
def deployed(fleet: localfleet.Fleet) -> subprocess.CompletedProcess[str]:
    """site.yml applied once to the fleet, with Ansible's own strategy as operators run it
    (the later runs may use Mitogen's: docs/testing.md, Mitogen)."""
    if _preparation is not None and _preparation.deploy:
        _preparation.thread.join()
        result = _preparation.result
        assert result is not None
    else:
        result = ansible_playbook("site.yml", check=False, mitogen=False)
    if result.returncode != 0:
        print(result.stdout[-6000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
        pytest.exit(f"site.yml failed on the local fleet: {failure_summary(result.stdout)}", 1)
    return result
