"""Operating the fleet: the deploy lock (two runs at once, a killed run) and status.yml.

The two runs at once are also the release through site.yml under load: while clients keep
connecting, the run that wins the lock restarts each host's instances one at a time (close
code 1012 to their clients, nginx sending new handshakes to the other instances), and no
connection attempt fails.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

import localfleet
from localfleet.ansible import ansible_playbook, kill_run, parse_recap, playbook_env
from localfleet.demo import ca_file
from localfleet.image import RELEASES
from localfleet.settings import INVENTORY, REPO
from tests.fleet.load import (
    LONG_LIVED_PER_HOST,
    assert_each_closed_at_most_once,
    assert_no_failures,
    load_on,
    summary,
)
from tests.fleet.releases import versions
from tests.fleet.test_deploy import active_instances, on_host
from tests.fleet.test_rollout import current_release

Fleet = localfleet.Fleet
LOCK = "/var/lib/wsfleet/deploy.lock"
HELD = "is locked by another run"


@pytest.fixture
def start_playbook() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ansible-playbook in the background, in a session of its own, with the
    environment of the session's other runs. A run still going when the test ends (it
    failed before its run's end) is killed with every process below it (kill_run): none
    outlives the test, holding the lock or the hosts."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        run = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "ansible-playbook"), "-i", str(INVENTORY.parent), *args],
            cwd=REPO, env=playbook_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        started.append(run)
        return run

    yield start
    for run in started:
        if run.poll() is None:
            kill_run(run.pid)
            run.communicate(timeout=60)


def locked(fleet: Fleet) -> dict[str, bool]:
    """Whether each app server has a deploy lock with its holder file written."""
    return {h.name: h.ssh(f"test -f {LOCK}/holder.json").returncode == 0 for h in fleet.app_servers}


def releases(fleet: Fleet) -> dict[str, str]:
    return {h.name: on_host(h, "ls /opt/wsapp/releases") for h in fleet.app_servers}


@dataclass
class Deploy:
    """What the module's tests leave: ``converged`` once a test's own run has put the
    fleet back as site.yml makes it, locks broken (the killed-run test, last)."""

    converged: bool = False


@pytest.fixture(scope="module")
def on_the_deploy(fleet: Fleet, deployed: object) -> Iterator[Deploy]:
    """The tests here change releases and leave locks; the fleet is back on site.yml after
    (a run of its own unless the last test's run did it)."""
    state = Deploy()
    try:
        yield state
    finally:
        if not state.converged:
            ansible_playbook("site.yml", "-e", "deploy_lock_break=true")


def test_two_runs_at_once_one_completes_the_other_stops_before_any_change(
    fleet: Fleet, on_the_deploy: Deploy, start_playbook: Callable[..., subprocess.Popen[str]]
) -> None:
    """Two site.yml runs of different releases started together, under load on hosts of
    both Debian releases: one installs its release everywhere with 0 failed handshakes,
    only 1012, 0 lost; the other fails at the lock naming the first and changes nothing."""
    assert {h.release for h in fleet.app_servers} == set(RELEASES)
    addresses = [h.address for h in fleet.app_servers]
    before = releases(fleet)
    with load_on(addresses) as load:
        runs = {
            version: start_playbook("site.yml", "-e", f"app_version={version}")
            for version in ("1.1.0-a", "1.1.0-b")
        }
        out = {version: run.communicate(timeout=900)[0] for version, run in runs.items()}
    codes = {version: run.returncode for version, run in runs.items()}
    winners = [v for v, code in codes.items() if code == 0]
    assert len(winners) == 1, {v: out[v][-3000:] for v in out}
    (winner,) = winners
    (loser,) = set(runs) - {winner}
    said = " ".join(out[loser].split())
    assert HELD in said, out[loser][-3000:]
    assert re.search(rf"site\.yml of release {re.escape(winner)} by \S+@\S+ \(run \w+\)", said)
    recap = parse_recap(out[loser])
    assert set(recap) == {h.name for h in fleet.app_servers}
    assert all(counts["changed"] == 0 for counts in recap.values()), recap
    for host in fleet.app_servers:
        assert current_release(host) == winner
        assert loser not in on_host(host, "ls /opt/wsapp/releases"), before
    assert locked(fleet) == {h.name: False for h in fleet.app_servers}
    assert_no_failures(load)
    assert load.closes, "no instance restarted: the release did not reach the hosts"
    assert_each_closed_at_most_once(load)
    assert load.handshakes.done > len(addresses) * LONG_LIVED_PER_HOST
    assert versions(fleet) == {h.name: {winner} for h in fleet.app_servers}
    print(f"\nrelease under load: {summary(load)}")


def test_a_failed_run_leaves_no_lock(fleet: Fleet, on_the_deploy: Deploy) -> None:
    """rollback.yml to a release no host has fails in its first batch, after the lock: the
    lock is released on every host, and a run after it goes ahead."""
    failed = ansible_playbook("playbooks/rollback.yml", "-e", "rollback_to=0.0.0-none", check=False)
    assert failed.returncode != 0
    assert "No complete release 0.0.0-none" in failed.stdout
    assert HELD not in failed.stdout
    assert locked(fleet) == {h.name: False for h in fleet.app_servers}


def test_status_shows_the_fleet_as_it_is(
    fleet: Fleet, on_the_deploy: Deploy, tmp_path: Path
) -> None:
    """status.yml, with an instance stopped on one host and connections open on another:
    releases, ready/total, connections, nginx, certificate, bus and lock as they are."""
    stopped_on, busy, *_ = fleet.app_servers
    port = active_instances(stopped_on)[-1]
    context = ssl.create_default_context(cafile=str(ca_file()))
    opened = 7
    document = tmp_path / "status.json"

    async def with_clients_open() -> tuple[subprocess.CompletedProcess[str], float]:
        clients = [
            await connect(f"wss://{busy.address}/ws/status", ssl=context) for _ in range(opened)
        ]
        try:
            started = time.monotonic()
            result = await asyncio.to_thread(
                ansible_playbook, "playbooks/status.yml", "--check",
                "-e", "status_format=json", "-e", f"status_file={document}",
            )  # fmt: skip
            return result, time.monotonic() - started
        finally:
            for ws in clients:
                await ws.close()

    on_host(stopped_on, f"systemctl stop wsapp@{port}")
    try:
        result, seconds = asyncio.run(with_clients_open())
        table_run = ansible_playbook("playbooks/status.yml")
    finally:
        on_host(stopped_on, f"systemctl start wsapp@{port}")
    print(f"\nstatus.yml --check on {len(fleet.app_servers)} hosts: {seconds:.1f} s")
    assert result.returncode == 0
    # Without status_file (whose write on the controller counts as a change): nothing.
    recap = parse_recap(table_run.stdout)
    assert set(recap) == {h.name for h in fleet.app_servers}
    assert all(counts["changed"] == 0 for counts in recap.values()), recap
    table = table_run.stdout

    hosts = json.loads(document.read_text())["hosts"]
    assert set(hosts) == {h.name for h in fleet.app_servers}
    for host in fleet.app_servers:
        status = hosts[host.name]
        assert status["release"] == current_release(host)
        assert status["previous"] == on_host(host, "cat /opt/wsapp/previous || true").strip()
        ready = {i["port"]: i["ready"] for i in status["instances"]}
        expected = set(active_instances(host)) | ({port} if host is stopped_on else set())
        assert set(ready) == expected
        assert ready == {p: not (host is stopped_on and p == port) for p in expected}
        assert status["nginx"]["state"] == "active"
        assert status["nginx"]["workers"] >= 1
        # Against the certificate on the host (an earlier test may have renewed it).
        end = on_host(host, "openssl x509 -enddate -noout -in /etc/ssl/wsfleet/server.crt")
        days = (ssl.cert_time_to_seconds(end.split("=", 1)[1].strip()) - time.time()) / 86400
        assert abs(status["certificate_days"] - days) < 0.2, (status["certificate_days"], days)
        assert status["bus"] == {"state": "active", "routes": len(fleet.app_servers) - 1}
        assert status["lock"]["state"] == "free"
    connections = {name: sum(i["connections"] for i in s["instances"]) for name, s in hosts.items()}
    assert connections[busy.name] == opened
    assert connections[stopped_on.name] == 0

    instances = len(hosts[busy.name]["instances"])
    row = next(line for line in table.splitlines() if line.strip().startswith(stopped_on.name))
    assert f" {instances - 1}/{instances} " in row, table
    assert "free" in row


def test_a_killed_run_leaves_a_lock_that_says_its_age_and_is_broken(
    fleet: Fleet, on_the_deploy: Deploy, start_playbook: Callable[..., subprocess.Popen[str]]
) -> None:
    """A run killed after taking the lock leaves it; the next run stops naming it with its
    age; unlock.yml breaks it on a host, -e deploy_lock_break=true on the rest. Last in the
    module: that run leaves the fleet as site.yml makes it."""
    run = start_playbook("site.yml", "-e", "app_version=1.0.0")
    deadline = time.monotonic() + 300
    while not all(locked(fleet).values()):
        assert run.poll() is None, f"the run ended before it held every lock: {run.stdout}"
        assert time.monotonic() < deadline, "the run never held every lock"
        time.sleep(0.5)
    kill_run(run.pid)
    run.communicate(timeout=60)

    second = ansible_playbook("site.yml", check=False)
    assert second.returncode != 0
    first = fleet.app_servers[0].name
    said = re.search(
        rf"{first} is locked by another run: site\.yml of release 1\.0\.0 by \S+@\S+ \(run \w+\),"
        r" since \S+Z, (\d+)h(\d\d)m(\d\d)s ago",
        " ".join(second.stdout.split()),
    )
    assert said, second.stdout[-3000:]
    assert all(counts["changed"] == 0 for counts in parse_recap(second.stdout).values())

    unlocked = ansible_playbook("playbooks/unlock.yml", "--limit", first)
    assert "Breaking the lock of site.yml of release 1.0.0" in unlocked.stdout
    assert locked(fleet) == {h.name: h.name != first for h in fleet.app_servers}

    broken = ansible_playbook("site.yml", "-e", "deploy_lock_break=true")
    for host in fleet.app_servers[1:]:
        assert f"Broke the lock on {host.name}" in broken.stdout
    assert locked(fleet) == {h.name: False for h in fleet.app_servers}
    assert {current_release(h) for h in fleet.app_servers} == {"1.0.0"}
    on_the_deploy.converged = True  # broken ran site.yml as the module's end would
