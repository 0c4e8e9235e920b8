"""playbooks/rollout.yml and rollback.yml on the live fleet, under load."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

import localfleet
from localfleet.ansible import ansible_playbook
from localfleet.history import assert_nothing_lost, reference_order, room_traffic
from localfleet.image import RELEASES
from localfleet.instances import live_ports
from tests.fleet.load import assert_each_closed_at_most_once, assert_no_failures, load_on, summary
from tests.fleet.releases import ONE_THEN_THE_REST, versions
from tests.fleet.test_browser import chromium
from tests.fleet.test_bus import spans_the_fleet

SITE = "/etc/nginx/sites-available/wsfleet.conf"


def current_release(host: localfleet.FleetHost) -> str:
    return host.ssh("readlink /opt/wsapp/current").stdout.strip().rsplit("/", 1)[-1]


@dataclass
class RolledOut:
    """The rollout's output, what a chat room's clients saw through it, and what two chat
    pages on two hosts showed: (messages, notes) each. ``converged``: the module's last
    test left the fleet as site.yml makes it (back on the deploy's release)."""

    stdout: str
    room: dict[str, object]
    reference: list[str]
    pages: list[tuple[list[str], list[str]] | str]
    sites: dict[str, str]  # each host's nginx site before the rollout
    converged: bool = False


# What a chat page shows: its messages, and its notes (the restore lines), as text.
SHOWN = (
    "const texts = (query) => [...document.querySelectorAll(query)].map(li => li.textContent);"
    "return [texts('#messages li:not(.note)'), texts('#messages li.note')];"
)
SHOWN_COUNT = "return document.querySelectorAll('#messages li:not(.note)').length;"


def shown(browser: WebDriver, expected: int) -> tuple[list[str], list[str]] | str:
    """What the page shows once it has caught up with the room (``expected`` messages, or
    60 s), or why it could not be read: a page that fails fails its own test only."""
    try:
        with contextlib.suppress(TimeoutException):
            WebDriverWait(browser, 60).until(lambda d: d.execute_script(SHOWN_COUNT) >= expected)
        messages, notes = browser.execute_script(SHOWN)
        return messages, notes
    except WebDriverException as error:
        return f"the chat page could not be read: {error.msg or error!r}"


# The warnings of a host's instances (logfmt on stdout, so journald's priority is info)
# and of its bus server in the last minutes, for a failure to show.
WARNINGS = (
    "journalctl -u 'wsapp@*' -u nats-server --since '-{minutes}min' --no-pager -o cat"
    " | grep -E 'level=(warning|error)|\\[(WRN|ERR)\\]' | tail -n 60"
)


@pytest.fixture(scope="module")
def rolled_out(fleet: localfleet.Fleet, deployed: object) -> Iterator[RolledOut]:
    """The fleet on release 2.0.0, rolled out under load; the deploy's release afterwards
    (a site.yml of its own unless the rollback, last in the module, brought it back).

    The load spans every host, so both Debian releases of the mixed fleet. Meanwhile a chat
    room has members on every host (coming back with the last id they saw), a publisher on
    each that sends under references and again what was not acknowledged, the bus server
    of the Debian 12 host is SIGKILLed early in the run (systemd starts it again; its
    instances move to another host's server meanwhile; its JetStream catches up from the
    Debian 13 servers), and an instance of the last host, not rolled out yet, is SIGKILLed
    (its members are cut, 1006, and come back)."""
    assert {h.release for h in fleet.app_servers} == set(RELEASES)
    addresses = [h.address for h in fleet.app_servers]
    bookworm = next(h for h in fleet.app_servers if h.release == "bookworm")
    last = fleet.app_servers[-1]
    sites = {h.name: h.ssh(f"cat {SITE}").stdout for h in fleet.app_servers}
    room = f"history-{time.monotonic_ns()}"  # new each run: the pages' latest start empty
    with contextlib.ExitStack() as stack:
        browsers = [stack.enter_context(contextlib.contextmanager(chromium)()) for _ in range(2)]
        for host, browser in zip(fleet.app_servers, browsers, strict=False):
            browser.get(f"https://{host.address}/?room={room}")
            WebDriverWait(browser, 20).until(
                lambda d: ":" in d.find_element(By.ID, "served-by").text
            )
        held: list[int] = []  # the clients of the instance killed
        with load_on(addresses) as load, room_traffic(addresses, room) as traffic:
            faults = [threading.Timer(5, kill_unit, (bookworm, "nats-server.service")),
                      threading.Timer(8, kill_instance, (last, held))]  # fmt: skip
            for fault in faults:
                fault.start()
            result = ansible_playbook(
                "playbooks/rollout.yml", *ONE_THEN_THE_REST, "-e", "app_version=2.0.0"
            )
            for fault in faults:
                fault.join()
        expected = len(reference_order(traffic))
        pages = [shown(browser, expected) for browser in browsers]
    print(f"\nrollout under load: {summary(load)}")
    rolled = RolledOut(result.stdout, {}, reference_order(traffic), pages, sites)
    try:
        assert held, "no instance was killed"
        assert_no_failures(load, killed=held[0])
        assert load.closes, "no instance restarted"
        assert_each_closed_at_most_once(load)
        try:
            rolled.room = assert_nothing_lost(traffic, frozenset({1001, 1012, 1006}))
            closes = rolled.room["closes"]
            assert isinstance(closes, dict)
            assert load.closes.get(1006, 0) + closes.get(1006, 0) <= held[0], (held, closes)
        except AssertionError:
            for host in fleet.app_servers:  # what the instances said went wrong
                print(f"{host.name}:", host.ssh(WARNINGS.format(minutes=15)).stdout)
            raise
        yield rolled
    finally:
        if not rolled.converged:
            ansible_playbook("site.yml")


def kill_unit(host: localfleet.FleetHost, unit: str) -> None:
    """SIGKILL a unit's processes, as a crash would; systemd starts it again."""
    host.ssh(f"systemctl kill --signal=SIGKILL {unit}")


def kill_instance(host: localfleet.FleetHost, held: list[int]) -> None:
    """SIGKILL one of ``host``'s instances, noting in ``held`` how many clients it had:
    those may be cut without a close frame (1006), no other."""
    port = live_ports(host)[0]
    # Counted and killed in one command on the host: a client that connects between the
    # two (ten new ones a second in the load) would be cut, yet not counted.
    # (This module's fleet listens on ports, app_listen tcp.)
    said = host.ssh(
        f"curl -sf http://127.0.0.1:{port}/healthz"
        f" && systemctl kill --signal=SIGKILL wsapp@{port}.service"
    )
    held.append(json.loads(said.stdout)["connections"])


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
    the rollout, a killed bus server and a killed instance: every message sent was
    acknowledged once, with one id, none refused; every member got every one once, in the
    room's order, coming back with the last id it saw (figures printed; the fixture
    asserts them all)."""
    assert rolled_out.room["missed"] == 0
    assert rolled_out.room["unacked"] == 0
    assert rolled_out.room["refused"] == 0
    assert rolled_out.room["restored"], "no member had anything to restore: no reconnect?"
    closes = rolled_out.room["closes"]
    assert isinstance(closes, dict)
    assert closes.get(1006), "no member was on the killed instance"


def test_two_chat_pages_miss_nothing_and_say_what_they_restored(rolled_out: RolledOut) -> None:
    """The chat page in two browsers on two hosts, through the rollout: each shows every
    message of the room once, in order, and a line saying what it restored on coming back."""
    for page in rolled_out.pages:
        assert not isinstance(page, str), page
        messages, notes = page
        assert messages == rolled_out.reference
        assert any(re.fullmatch(r"reconnected to \S+:\d+, \d+ missed messages? restored", n)
                   for n in notes), notes  # fmt: skip


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
            "playbooks/rollout.yml", *ONE_THEN_THE_REST, "-e", "app_version=3.0.0-broken",
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
        result = ansible_playbook("playbooks/rollback.yml", *ONE_THEN_THE_REST)
    print(f"\nrollback under load: {summary(load)}")
    assert_no_failures(load)
    assert_each_closed_at_most_once(load)
    assert versions(fleet) == {h.name: {"1.0.0"} for h in fleet.app_servers}
    for host in fleet.app_servers:
        assert re.search(rf"{host.name}\s+2\.0\.0\s+-> 1\.0\.0\s+[\d.]+s\s+ok", result.stdout)
    # rollback.yml writes nginx's site itself (its handovers move the upstream): the same
    # as the nginx role wrote it before the rollout, on the same ports again.
    for host in fleet.app_servers:
        assert host.ssh(f"cat {SITE}").stdout == rolled_out.sites[host.name], host.name
    # Back on the deploy's release and configuration, as site.yml leaves the fleet (the
    # wheels of the builds rolled back from stay until the next site.yml's cleanup).
    rolled_out.converged = True
