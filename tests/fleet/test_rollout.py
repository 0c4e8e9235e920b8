"""playbooks/rollout.yml and rollback.yml on the live fleet, under load."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import localfleet
from localfleet.ansible import ansible_playbook
from localfleet.image import RELEASES
from tests.fleet.history import assert_nothing_lost, room_traffic
from tests.fleet.load import assert_no_failures, load_on, summary
from tests.fleet.test_bus import spans_the_fleet
from tests.fleet.test_release_under_load import versions


def current_release(host: localfleet.FleetHost) -> str:
    return host.ssh("readlink /opt/wsapp/current").stdout.strip().rsplit("/", 1)[-1]


@dataclass
class RolledOut:
    """The rollout's output, and what a chat room's clients saw through it."""

    stdout: str
    room: dict[str, object]


@pytest.fixture(scope="module")
def rolled_out(fleet: localfleet.Fleet, deployed: object) -> Iterator[RolledOut]:
    """The fleet on release 2.0.0, rolled out under load; the deploy's release afterwards.

    The load spans every host, so both Debian releases of the mixed fleet. Meanwhile a chat
    room has members on every host (coming back with the last id they saw), a publisher on
    each, and faults a rollout must ride out: an instance SIGKILLed on the last host and
    the bus server SIGKILLed on the Debian 12 host (its JetStream catching up from the
    Debian 13 servers), both early in the run."""
    assert {h.release for h in fleet.app_servers} == set(RELEASES)
    addresses = [h.address for h in fleet.app_servers]
    bookworm = next(h for h in fleet.app_servers if h.release == "bookworm")
    with load_on(addresses) as load, room_traffic(addresses, "history") as traffic:
        faults = threading.Timer(5, inject_faults, (fleet.app_servers[-1], bookworm))
        faults.start()
        result = ansible_playbook("playbooks/rollout.yml", "-e", "app_version=2.0.0")
        faults.join()
    print(f"\nrollout under load: {summary(load)}")
    assert_no_failures(load)
    assert load.closes, "no instance restarted"
    try:
        yield RolledOut(result.stdout, assert_nothing_lost(traffic))
    finally:
        ansible_playbook("site.yml")


def inject_faults(instance_host: localfleet.FleetHost, bus_host: localfleet.FleetHost) -> None:
    """SIGKILL one app instance and one bus server; systemd starts both again."""
    instance_host.ssh("systemctl kill --signal=SIGKILL wsapp@8002.service")
    bus_host.ssh("systemctl kill --signal=SIGKILL nats-server.service")


def test_rollout_reaches_every_instance_and_summarises(
    fleet: localfleet.Fleet, rolled_out: RolledOut
) -> None:
    """After the rollout every instance reports 2.0.0; the summary lists each host."""
    assert versions(fleet) == {h.name: {"2.0.0"} for h in fleet.app_servers}
    for host in fleet.app_servers:
        line = rf"{host.name}\s+1\.0\.0\s+-> 2\.0\.0\s+[\d.]+s\s+ok"
        assert re.search(line, rolled_out.stdout), rolled_out.stdout


def test_no_room_message_is_lost_across_the_rollout(rolled_out: RolledOut) -> None:
    """24 members of one room on every host and instance, a publisher on each host, through
    the rollout, a killed instance and a killed bus server: every member got every message
    once, in the room's order, coming back with the last id it saw (figures printed)."""
    assert rolled_out.room["missed"] == 0
    assert rolled_out.room["restored"], "no member had anything to restore: no reconnect?"


def test_a_room_spans_the_fleet_after_the_rollout(
    fleet: localfleet.Fleet, rolled_out: RolledOut
) -> None:
    """On the new release (instances restarted, members joining anew), every member of a
    room on every instance of every host still gets every message exactly once."""
    spans_the_fleet(fleet, "after-rollout")


def test_a_broken_release_stops_at_the_first_batch(
    fleet: localfleet.Fleet, rolled_out: RolledOut
) -> None:
    """A release that exits at start: the first host returns to 2.0.0, the rest untouched."""
    first, *others = fleet.app_servers
    with load_on([h.address for h in fleet.app_servers]) as load:
        result = ansible_playbook(
            "playbooks/rollout.yml", "-e", "app_version=3.0.0-broken",
            "-e", '{"app_env": {"APP_PING_INTERVAL": "-5"}}', check=False,
        )  # fmt: skip
    print(f"\nbroken rollout under load: {summary(load)}")
    assert result.returncode != 0
    assert f"{first.name}: FAILED at" in result.stdout
    assert "back on 2.0.0" in result.stdout
    assert_no_failures(load)
    assert current_release(first) == "2.0.0"
    for host in others:
        assert current_release(host) == "2.0.0"
        assert "3.0.0-broken" not in host.ssh("ls /opt/wsapp/releases").stdout
    assert versions(fleet) == {h.name: {"2.0.0"} for h in fleet.app_servers}
    # The gate failed after the deploy lock was taken: the rescue released it everywhere.
    for host in fleet.app_servers:
        assert host.ssh("test -e /var/lib/wsfleet/deploy.lock").returncode == 1, host.name


def test_rollback_under_load_returns_to_the_previous_release(
    fleet: localfleet.Fleet, rolled_out: RolledOut
) -> None:
    """rollback.yml takes every host back to the release before 2.0.0, failing nothing."""
    with load_on([h.address for h in fleet.app_servers]) as load:
        result = ansible_playbook("playbooks/rollback.yml")
    print(f"\nrollback under load: {summary(load)}")
    assert_no_failures(load)
    assert versions(fleet) == {h.name: {"1.0.0"} for h in fleet.app_servers}
    for host in fleet.app_servers:
        assert re.search(rf"{host.name}\s+2\.0\.0\s+-> 1\.0\.0\s+[\d.]+s\s+ok", result.stdout)
