"""The controller's wheel fetch (roles/app/files/fetch_wheels.py) against real indexes:
the one pip is configured with, and a stalled one that accepts connections and never answers.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "roles/app/files/fetch_wheels.py"
DEFAULTS = yaml.safe_load((REPO / "roles/app/defaults/main.yml").read_text())
PLATFORMS = ["--platform=manylinux2014_x86_64", "--platform=manylinux_2_28_x86_64"]


@pytest.fixture
def stalled_index() -> Iterator[str]:
    """An index URL whose server accepts every connection and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/simple"
    finally:
        server.close()
        for connection in held:
            connection.close()


def fetch(
    cache: Path, dest: Path, index: str | None, *bounds: str
) -> subprocess.CompletedProcess[str]:
    """The role's call against ``index`` (None: pip's own), with the role's default bounds
    unless ``bounds`` gives others."""
    env = None if index is None else {"PIP_INDEX_URL": index, "PATH": "/usr/bin:/bin"}
    defaults = ["--timeout", str(DEFAULTS["app_download_timeout"]),
                "--retries", str(DEFAULTS["app_download_retries"])]  # fmt: skip
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--requirements", str(REPO / "requirements/app.txt"),
         "--python-version", "3.11", *PLATFORMS, "--cache", str(cache), "--dest", str(dest),
         *defaults, *bounds],
        capture_output=True, text=True, check=False, env=env, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("bounds", "within"),
    [
        # The network bounds: each read times out, is tried again, and the fetch gives up.
        (("--timeout", "2", "--retries", "1"), 20),
        # The deadline per package, whatever the network bounds (its default, 50 s, is what
        # keeps a deploy's stall under a minute).
        (("--timeout", "600", "--deadline", "4"), 10),
    ],
    ids=["timeout-and-retries", "deadline"],
)
def test_a_stalled_index_fails_in_bounded_time_naming_package_and_index(
    tmp_path: Path, stalled_index: str, bounds: tuple[str, ...], within: int
) -> None:
    """With no cached wheels, a stalled index fails the fetch in bounded time, saying which
    package it was fetching from which index, and leaves no cache entry behind."""
    started = time.monotonic()
    result = fetch(tmp_path / "cache", tmp_path / "dest", stalled_index, *bounds)
    took = time.monotonic() - started
    assert result.returncode != 0
    assert took < within, took
    assert f"no wheel of websockets==17.4 from {stalled_index}" in result.stderr
    assert not list((tmp_path / "cache").glob("*/.complete"))


def test_the_default_bounds_stay_under_a_minute() -> None:
    """The role's defaults and the script's deadline keep one stalled package under 60 s."""
    timeout, retries = DEFAULTS["app_download_timeout"], DEFAULTS["app_download_retries"]
    deadline = int(re.search(r'"--deadline", type=int, default=(\d+)', SCRIPT.read_text())[1])
    assert min(timeout * (retries + 1) + 1, deadline) < 60


def test_a_warm_cache_fetches_without_the_index(tmp_path: Path, stalled_index: str) -> None:
    """Once fetched, the same pins come from the cache, the index stalled or not."""
    first = fetch(tmp_path / "cache", tmp_path / "first", None)
    assert first.returncode == 0, first.stderr
    pins = [line for line in (REPO / "requirements/app.txt").read_text().splitlines()
            if line and not line.startswith("#")]  # fmt: skip
    assert len(list((tmp_path / "first").glob("*.whl"))) == len(pins)

    started = time.monotonic()
    again = fetch(tmp_path / "cache", tmp_path / "second", stalled_index)
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - started < 10
    assert "from the cache" in again.stdout
    assert sorted(p.name for p in (tmp_path / "second").glob("*.whl")) == sorted(
        p.name for p in (tmp_path / "first").glob("*.whl")
    )
