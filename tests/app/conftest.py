"""Start real ``python -m app`` and ``nats-server`` processes on free ports; stop them after
each test."""

from __future__ import annotations

import functools
import glob
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

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

    def output(self) -> list[str]:
        """Every line logged so far."""
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen


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


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _nats_server_binary() -> str:
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")
    if found is None:
        pytest.fail("nats-server is not installed: apt-get install nats-server (make apt-deps)")
    return found


@dataclass
class NatsServer:
    """A real ``nats-server`` on loopback, one of a cluster: it stands for one host's server."""

    args: list[str]
    directory: str
    process: subprocess.Popen[bytes] | None = None
    client_port: int = 0
    cluster_port: int = 0
    monitor_port: int = 0
    clustered: bool = True

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def cluster_url(self) -> str:
        return f"nats://127.0.0.1:{self.cluster_port}"

    def start(self) -> None:
        """Start it: on free ports the first time, on the same ports again after a stop."""
        ports = (self.client_port, self.cluster_port, self.monitor_port)
        client, cluster, monitor = (str(port or -1) for port in ports)
        for stale in glob.glob(os.path.join(self.directory, "*.ports")):
            os.unlink(stale)
        log = open(os.path.join(self.directory, "server.log"), "ab")  # noqa: SIM115
        with log:
            self.process = subprocess.Popen(
                [_nats_server_binary(), "-a", "127.0.0.1", "-p", client, "-m", monitor,
                 *(["--cluster", f"nats://127.0.0.1:{cluster}"] if self.clustered else []),
                 "--ports_file_dir", self.directory, *self.args],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        process = self.process
        ports_file = os.path.join(self.directory, f"nats-server_{process.pid}.ports")

        def listening() -> dict[str, list[str]] | None:
            if process.poll() is not None:
                raise AssertionError(f"nats-server exited {process.returncode}: {self.log()}")
            try:
                with open(ports_file) as file:
                    return json.load(file)  # type: ignore[no-any-return]
            except (FileNotFoundError, json.JSONDecodeError):
                return None

        found = wait_until(listening, 10, f"nats-server listening ({ports_file})")
        self.client_port = int(found["nats"][0].rsplit(":", 1)[1])
        if self.clustered:
            self.cluster_port = int(found["cluster"][0].rsplit(":", 1)[1])
        self.monitor_port = int(found["monitoring"][0].rsplit(":", 1)[1])

    def stop(self) -> None:
        """Stop it (SIGTERM, as systemd does) and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """A JSON page of its monitoring port, e.g. ``routez`` or ``connz?subs=1``."""
        url = f"http://127.0.0.1:{self.monitor_port}/{endpoint}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)  # type: ignore[no-any-return]

    def has_routes(self, count: int) -> bool:
        """Whether it has ``count`` routes to the other servers of its cluster."""
        return self.monitor("routez")["num_routes"] == count  # type: ignore[no-any-return]

    def log(self) -> str:
        with open(os.path.join(self.directory, "server.log"), errors="replace") as file:
            return file.read()


@pytest.fixture
def nats_cluster() -> Iterator[Callable[..., list[NatsServer]]]:
    """A factory: ``nats_cluster(3, token="t")`` returns 3 clustered servers, routes up
    (``jetstream=True``: with JetStream, as the bus role configures it)."""
    started: list[NatsServer] = []
    directories: list[tempfile.TemporaryDirectory[str]] = []

    def start(count: int, token: str = "", jetstream: bool = False) -> list[NatsServer]:
        servers: list[NatsServer] = []
        # JetStream in a cluster wants every server's routes from the start (its own
        # included, which it skips), as the bus role writes them: cluster ports chosen first.
        # A lone JetStream server runs without a cluster, as the bus role has it on one host.
        clustered = not (jetstream and count == 1)
        cluster_ports = [_free_port() for _ in range(count)] if jetstream and clustered else []
        for number in range(count):
            directory = tempfile.TemporaryDirectory(prefix="wsfleet-nats-")
            directories.append(directory)
            known = [f"nats://127.0.0.1:{port}" for port in cluster_ports]
            routes = ",".join(known or [server.cluster_url for server in servers])
            args = ["--name", f"nats{number}"]
            args += ["--cluster_name", "wsfleet-test"] if clustered else []
            args += ["--routes", routes] if routes else []
            args += ["--auth", token] if token else []
            # JetStream, storing in the server's own folder, as each host's server does.
            args += ["--jetstream", "--store_dir", directory.name] if jetstream else []
            server = NatsServer(args, directory.name, clustered=clustered)
            if cluster_ports:
                server.cluster_port = cluster_ports[number]
            started.append(server)
            server.start()
            servers.append(server)
        for server in servers:
            wait_until(
                functools.partial(server.has_routes, count - 1),
                10, f"{count - 1} routes on the server at {server.url}",
            )  # fmt: skip
        return servers

    yield start
    for server in started:
        server.kill()
    for directory in directories:
        directory.cleanup()
