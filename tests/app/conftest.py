"""Start real ``python -m app`` processes on free ports and stop them after each test."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class AppProcess:
    """A running server process and the lines it logged."""

    process: subprocess.Popen[str]
    port: int = 0
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for a log line matching ``pattern``; fail with what was logged."""
        regex = re.compile(pattern)
        for line in self.seen:
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if match := regex.search(line):
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{self.seen}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def spawn(*args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen[str]:
    """Start ``python -m app ARGS`` with its output on a pipe."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APP_")}
    environment.update(env or {})
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "app", *args],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def attach(process: subprocess.Popen[str]) -> AppProcess:
    """Follow the process's log and wait until it says it listens."""
    app = AppProcess(process)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            app.lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    app.port = int(app.wait_for_line(r"event=listening port=(\d+)")[1])
    return app


@pytest.fixture
def start_app() -> Iterator[Callable[..., AppProcess]]:
    """A factory: ``start_app("--max-size", "10")`` returns a listening AppProcess."""
    started: list[AppProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> AppProcess:
        app = attach(spawn("--port", "0", *args, env=env))
        started.append(app)
        return app

    yield start
    for app in started:
        if app.process.poll() is None:
            app.process.kill()
        app.process.wait(10)
