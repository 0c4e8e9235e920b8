"""The deploy lock module's logic against a temporary directory standing for the lock's
path: what tests/fleet/test_operations.py asks of the lock on real hosts (two runs at
once, a lock left by a dead run, who holds it, breaking it), without a fleet."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from tests.plugins.loader import plugin

lock = plugin("modules", "deploy_lock")
filters = plugin("filter", "deploy_lock")

HOLDER = {
    "controller": "ctl1",
    "user": "deploy",
    "playbook": "site.yml",
    "release": "1.1.0",
    "since": "2025-01-01T00:00:00Z",
}


@pytest.fixture
def path(tmp_path: Path) -> str:
    """The lock's path, its parent not made yet (the module makes it)."""
    return str(tmp_path / "var/lib/wsfleet/deploy.lock")


def test_take_on_a_free_host_writes_the_run_and_its_holder(path: str) -> None:
    assert lock.read(path) == {"state": "free", "age": 0, "holder": None}
    assert lock.take(path, "r1", HOLDER) == {"state": "taken", "age": 0, "holder": None}
    assert Path(path, "run_id").read_text() == "r1"
    assert json.loads(Path(path, "holder.json").read_text()) == {**HOLDER, "run": "r1"}
    assert not Path(path, "holder.json.new").exists()
    assert os.stat(path).st_mode & 0o777 == 0o700


def test_a_second_run_finds_it_held_and_who_holds_it(path: str) -> None:
    lock.take(path, "r1", HOLDER)
    found = lock.take(path, "r2", {**HOLDER, "release": "1.2.0"})
    assert found["state"] == "held"
    assert found["holder"] == {**HOLDER, "run": "r1"}
    assert Path(path, "run_id").read_text() == "r1"
    assert lock.read(path)["state"] == "held"


def test_of_runs_taking_at_once_exactly_one_wins(path: str) -> None:
    """mkdir is the atomic step: of eight runs started together, one takes the lock."""
    start = threading.Barrier(8)
    states: dict[str, str] = {}

    def run(name: str) -> None:
        start.wait()
        states[name] = lock.take(path, name, HOLDER)["state"]

    threads = [threading.Thread(target=run, args=(f"r{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [name for name, state in states.items() if state == "taken"]
    assert len(winners) == 1, states
    assert set(states.values()) == {"taken", "held"}
    assert Path(path, "run_id").read_text() == winners[0]


def test_a_stale_lock_says_its_age(path: str) -> None:
    """A lock left by a run that died an hour ago: its age from the directory's time."""
    lock.take(path, "r1", HOLDER)
    hour_ago = time.time() - 3725
    os.utime(path, (hour_ago, hour_ago))
    found = lock.read(path)
    assert found["state"] == "held"
    assert 3725 <= found["age"] <= 3727
    sentence = filters.describe(found)
    assert sentence.startswith("site.yml of release 1.1.0 by deploy@ctl1 (run r1),")
    assert re.search(r", since 2025-01-01T00:00:00Z, 1h02m0[5-7]s ago$", sentence), sentence


def test_a_lock_without_a_holder_file_is_held_all_the_same(path: str) -> None:
    """A run that died between mkdir and writing its holder file still holds the lock."""
    os.makedirs(path)
    found = lock.take(path, "r2", HOLDER)
    assert (found["state"], found["holder"]) == ("held", None)
    assert filters.describe(found).startswith("a run that left no holder file, taken 0h00m0")


def test_break_takes_another_runs_lock_saying_whose_it_was(path: str) -> None:
    lock.take(path, "r1", HOLDER)
    hour_ago = time.time() - 3600
    os.utime(path, (hour_ago, hour_ago))
    broken = lock.take(path, "r2", {**HOLDER, "release": "1.2.0"}, breaking=True)
    assert broken["state"] == "broken"
    assert broken["holder"] == {**HOLDER, "run": "r1"}
    assert broken["age"] >= 3600
    assert Path(path, "run_id").read_text() == "r2"
    assert json.loads(Path(path, "holder.json").read_text())["release"] == "1.2.0"


def test_break_on_a_free_host_takes_it(path: str) -> None:
    assert lock.take(path, "r1", HOLDER, breaking=True)["state"] == "taken"


def test_release_removes_only_this_runs_lock(path: str) -> None:
    lock.take(path, "r1", HOLDER)
    assert lock.release(path, "r2") == {"state": "kept", "age": 0, "holder": None}
    assert os.path.isdir(path)
    assert lock.release(path, "r1", remove=False)["state"] == "released"
    assert os.path.isdir(path)
    assert lock.release(path, "r1")["state"] == "released"
    assert not os.path.exists(path)
    assert lock.release(path, "r1")["state"] == "kept"


def test_found_keeps_each_hosts_answer_and_drops_failures() -> None:
    """What acquire.yml reads of its loop over the hosts."""
    results = [
        {"item": "fleet1", "state": "taken", "age": 0, "holder": None, "changed": True},
        {"item": "fleet2", "state": "held", "age": 5, "holder": HOLDER},
        {"item": "fleet3", "failed": True, "msg": "deploy lock: Permission denied"},
        {"item": "fleet4", "unreachable": True, "msg": "no route"},
    ]
    assert filters.found(results) == [
        {"host": "fleet1", "state": "taken", "age": 0, "holder": None},
        {"host": "fleet2", "state": "held", "age": 5, "holder": HOLDER},
    ]


def test_describe_names_holder_and_age_as_the_fleet_tests_read_it() -> None:
    """The sentence tests/fleet/test_operations.py matches in a losing run's message."""
    sentence = filters.describe({"age": 3 * 3600 + 4 * 60 + 5, "holder": {**HOLDER, "run": "r9"}})
    assert sentence == (
        "site.yml of release 1.1.0 by deploy@ctl1 (run r9), since 2025-01-01T00:00:00Z,"
        " 3h04m05s ago"
    )


def test_a_file_in_the_locks_place_is_an_error_not_a_lock(path: str) -> None:
    os.makedirs(os.path.dirname(path))
    Path(path).write_text("")
    with pytest.raises(NotADirectoryError):
        lock.take(path, "r1", HOLDER)
