"""Benchmark of quiet rooms left behind by a bus restart: how long until the last catches up.

    .venv/bin/python -m bench.rooms_bench [--rooms 1000] [--deadline 120] [--max-age 300]

On loopback, no fleet: a cluster of 3 ``nats-server`` with JetStream and a token, as the
bus role deploys it (the rooms' history R3, so it takes messages with one server down),
and two chat processes (``python -m app --handler app.handlers:chat``), A on server 1 and
B on server 2. One client per room on A, ``/ws/q<i>?events=1``, all in one process on
uvloop. Then:

1. one message into every room through B: once every client on A has it, each room has
   its subscription and its place in the history on A;
2. server 1 stopped (SIGTERM, waited for), one message into every room through B (a
   member that sends it and reads its echo, with its id: stored), server 1 started again
   on the same ports and store.

Measured from that start: when server 1 listens, when A is connected to it again (its
``bus_connected reconnected=True``), when the first and the last of A's rooms had the
message, each room's p50/p99, and whether every client got each message once, under the
id B's member was given. A client the app closes to resume comes back with its last id,
as the page does. Ends with ``ratio quiet-rooms caught-up-last/target: X`` (TARGET s).
Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from bench.app_bench import cpu_seconds, run

REPO = Path(__file__).resolve().parent.parent
TOKEN = "rooms-bench-token-4d1f"  # noqa: S105 (a throwaway token of throwaway servers)
CHAT = ("--handler", "app.handlers:chat")
TARGET = 5.0
"""Seconds from the bus server's restart until the last quiet room has caught up."""
# Joins in flight at once: on A while its clients open, on B while its members send.
OPENING = 100
SENDERS = 50
# After the last room caught up, this long for a message delivered twice to show.
GRACE = 2.0
PROGRESS_EVERY = 30.0
# Past the history's max age, the messages sent during the outage are gone: the wait ends
# this long after the last of them would have expired.
EXPIRY_MARGIN = 30.0
# The two messages of a room (``% room``): before the outage, and sent during it.
BEFORE, DURING = "before %s", "during %s"

Record = tuple[int | None, str, float]
"""A chat message a client got: the id announced before it, its text, monotonic time."""


# --- the bus: a JetStream cluster of nats-server on loopback ---------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class NatsServer:
    """One ``nats-server`` of the cluster, on fixed ports so that it restarts on the same."""

    name: str
    directory: Path
    routes: list[str]
    client_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        binary = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")
        if binary is None:
            raise RuntimeError("nats-server is not installed: apt-get install nats-server")
        with open(self.directory / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [binary, "--name", self.name, "-a", "127.0.0.1", "-p", str(self.client_port),
                 "-m", str(self.monitor_port),
                 "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                 "--cluster_name", "rooms-bench", "--routes", ",".join(self.routes),
                 "--auth", TOKEN, "--jetstream", "--store_dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2),
            ):
                return
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} not listening within {timeout} s: {self.log_tail()}")

    def routes_up(self) -> int:
        self._alive()
        url = f"http://127.0.0.1:{self.monitor_port}/routez"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(json.load(response)["num_routes"])
        except OSError:
            return 0

    def _alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.process.returncode}: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, as systemd stops it, and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self) -> str:
        return (self.directory / "server.log").read_text(errors="replace")[-2000:]


def start_cluster(root: Path) -> list[NatsServer]:
    """Three servers, every route known from the start (JetStream in a cluster wants it)."""
    names = [f"nats{number}" for number in (1, 2, 3)]
    for name in names:
        (root / name).mkdir()
    servers = [NatsServer(name, root / name, []) for name in names]
    for server in servers:
        server.routes = [f"nats://127.0.0.1:{other.cluster_port}" for other in servers]
        server.start()
    deadline = time.monotonic() + 20
    while not all(server.routes_up() == len(servers) - 1 for server in servers):
        if time.monotonic() > deadline:
            raise RuntimeError("the three nats-server did not route to each other in 20 s")
        time.sleep(0.05)
    return servers


# --- the chat processes --------------------------------------------------------------------


class ChatProcess:
    """``python -m app`` with the chat handler on one bus server; each line of its log kept
    with the monotonic time it came (a pipe read all along: a full one would stall it)."""

    def __init__(self, name: str, server: NatsServer, max_age: float) -> None:
        self.name = name
        env = {key: value for key, value in os.environ.items() if not key.startswith("APP_")}
        env.update(APP_BUS_URL=server.url, APP_BUS_TOKEN=TOKEN,
                   APP_BUS_HISTORY_MAX_AGE=str(max_age), APP_BUS_HISTORY_REPLICAS="3")  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "--port", "0", *CHAT],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self._arrived = threading.Condition()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        self.port = int(self.wait_for(r"event=listening port=(\d+)")[1][1])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._arrived:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._arrived.notify_all()

    def wait_for(
        self, pattern: str, timeout: float = 10.0, after: float = 0.0
    ) -> tuple[float, re.Match[str]]:
        """The first line matching ``pattern`` logged at or after ``after``, and its time."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._arrived:
            while True:
                for at, line in self.lines[seen:]:
                    if at >= after and (match := regex.search(line)):
                        return at, match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    tail = "\n".join(line for _, line in self.lines[-20:])
                    raise RuntimeError(f"{self.name}: no {pattern!r} within {timeout} s:\n{tail}")
                self._arrived.wait(left)

    def count(self, pattern: str, after: float = 0.0) -> int:
        regex = re.compile(pattern)
        with self._arrived:
            return sum(1 for at, line in self.lines if at >= after and regex.search(line))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._pump.join(5)


# --- the clients on A: one per room, in a process of their own -------------------------------


class Awaited:
    """The messages A's clients are waiting for; set once every one has come."""

    def __init__(self) -> None:
        self.texts: set[str] = set()
        self.all_in = asyncio.Event()

    def expect(self, texts: set[str]) -> None:
        self.texts = texts
        if texts:
            self.all_in.clear()
        else:
            self.all_in.set()

    def got(self, text: str) -> None:
        if text in self.texts:
            self.texts.discard(text)
            if not self.texts:
                self.all_in.set()


class RoomClient:
    """A member of one room on A, ``?events=1``: keeps every chat message with its id."""

    def __init__(self, base: str, room: str, awaited: Awaited) -> None:
        self.base = base
        self.room = room
        self.received: list[Record] = []
        self.resumes = 0
        self.joined = asyncio.Event()
        self._awaited = awaited

    def has(self, text: str) -> bool:
        return any(got == text for _, got, _ in self.received)

    async def follow(self) -> None:
        """Read the room; when the app closes the connection (sent back to resume), come
        back with the last id seen, as the page does."""
        while True:
            ids = [number for number, _, _ in self.received if number is not None]
            since = f"&since={ids[-1]}" if ids else ""
            with contextlib.suppress(OSError, TimeoutError, WebSocketException):
                async with connect(
                    f"{self.base}/ws/{self.room}?events=1{since}", compression=None,
                    open_timeout=30,
                ) as ws:  # fmt: skip
                    announced: int | None = None
                    async for frame in ws:
                        if isinstance(frame, str):
                            self.received.append((announced, frame, time.monotonic()))
                            announced = None
                            self._awaited.got(frame)
                            continue
                        event = json.loads(frame)
                        if event.get("type") == "message":
                            announced = event["id"]
                        elif event.get("type") == "hello":
                            self.joined.set()
            self.resumes += 1
            await asyncio.sleep(0.5)


async def _follow_rooms(base: str, rooms: list[str], control: Connection) -> None:
    loop = asyncio.get_running_loop()
    awaited = Awaited()
    clients = [RoomClient(base, room, awaited) for room in rooms]
    tasks: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(OPENING)

    async def join(client: RoomClient) -> None:
        async with gate:
            tasks.append(asyncio.create_task(client.follow()))
            await asyncio.wait_for(client.joined.wait(), 60)

    try:
        await asyncio.gather(*(join(client) for client in clients))
        control.send(("joined",))
        while (command := await loop.run_in_executor(None, control.recv))[0] == "wait":
            _, text, until, grace = command
            started = time.process_time()
            awaited.expect({text % c.room for c in clients if not c.has(text % c.room)})
            next_progress = time.monotonic() + PROGRESS_EVERY
            while not awaited.all_in.is_set() and (now := time.monotonic()) < until:
                if now >= next_progress:
                    control.send(("progress", len(clients) - len(awaited.texts)))
                    next_progress += PROGRESS_EVERY
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(awaited.all_in.wait(), min(until, next_progress) - now)
            ended = time.monotonic()
            # A message delivered twice would come soon after: given the time to show.
            if awaited.all_in.is_set():
                await asyncio.sleep(grace)
            seen = {client.room: (client.received, client.resumes) for client in clients}
            control.send(("seen", seen, time.process_time() - started, ended))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def follow_rooms(base: str, rooms: list[str], control: Connection) -> None:
    """The client process: join every room, then answer ``("wait", text, until, grace)``
    with what each client got once all have ``text % room`` (or at ``until``)."""
    run(_follow_rooms(base, rooms, control))


# --- the members on B that send -------------------------------------------------------------


async def send_one(base: str, room: str, text: str) -> int | None:
    """Join ``room`` on B, send ``text`` and read its echo: the id it was stored under
    (None: the app could not store it and sent it at most once)."""
    async with asyncio.timeout(60), connect(f"{base}/ws/{room}?events=1", compression=None) as ws:
        announced: int | None = None
        async for frame in ws:
            if isinstance(frame, str):
                if frame == text:
                    return announced
                announced = None
                continue
            event = json.loads(frame)
            if event.get("type") == "hello":
                await ws.send(text)
            elif event.get("type") == "message":
                announced = event["id"]
    raise RuntimeError(f"{room}: closed before the echo of {text!r}")


async def send_all(base: str, rooms: list[str], text: str) -> dict[str, int | None]:
    """``text % room`` into every room through B, SENDERS at a time."""
    todo = list(reversed(rooms))
    ids: dict[str, int | None] = {}

    async def sender() -> None:
        while todo:
            room = todo.pop()
            ids[room] = await send_one(base, room, text % room)

    await asyncio.gather(*(sender() for _ in range(SENDERS)))
    return ids


# --- the run ------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def wait_seen(
    control: Connection, text: str, until: float, grace: float, since: float
) -> tuple[dict[str, tuple[list[Record], int]], float, float]:
    """What A's clients got once all have ``text`` or at ``until`` (``grace`` s later when
    all have), their process's CPU seconds, and when the wait ended; printing progress."""
    control.send(("wait", text, until, grace))
    while (answer := control.recv())[0] == "progress":
        print(f"  {time.monotonic() - since:5.0f} s: {answer[1]} rooms caught up", flush=True)
    return answer[1], answer[2], answer[3]


def check(
    seen: dict[str, tuple[list[Record], int]],
    before: dict[str, int | None],
    during: dict[str, int | None],
) -> dict[str, int]:
    """Count the rooms by what their client on A got of the two messages."""
    counts = {"once with its id": 0, "missing": 0, "twice": 0, "without id": 0, "other id": 0}
    for room, (received, _) in seen.items():
        got = [(number, text) for number, text, _ in received]
        expected = [(before[room], BEFORE % room), (during[room], DURING % room)]
        texts = [text for _, text in got]
        if got == expected:
            counts["once with its id"] += 1
        elif any(texts.count(text) > 1 for _, text in expected):
            counts["twice"] += 1
        elif any(texts.count(text) == 0 for _, text in expected):
            counts["missing"] += 1
        elif any(number is None for number, _ in got):
            counts["without id"] += 1
        else:
            counts["other id"] += 1
    return counts


def scenario(root: Path, rooms: list[str], deadline: float, max_age: float) -> None:
    """The cluster in ``root``, the two chat processes, A's clients; then the restart."""
    servers = start_cluster(root)
    apps: list[ChatProcess] = []
    context = multiprocessing.get_context("spawn")
    control, child_end = context.Pipe()
    clients = None
    try:
        a = ChatProcess("A", servers[0], max_age)
        apps.append(a)
        b = ChatProcess("B", servers[1], max_age)
        apps.append(b)
        for app in apps:
            app.wait_for(r"event=history_ready", timeout=30)
        clients = context.Process(target=follow_rooms, args=(a.url, rooms, child_end))
        clients.start()
        child_end.close()  # the child's now: its exit is an end of file here
        started = time.monotonic()
        if not control.poll(120):
            raise RuntimeError("A's clients did not join their rooms within 120 s")
        control.recv()
        print(f"{len(rooms)} clients joined their rooms on A in {time.monotonic() - started:.1f} s")

        started = time.monotonic()
        before = run(send_all(b.url, rooms, BEFORE))
        seen, _, _ = wait_seen(control, BEFORE, time.monotonic() + 60, 0.0, started)
        behind = [
            room for room, (got, _) in seen.items() if BEFORE % room not in (t for _, t, _ in got)
        ]
        if behind:
            raise RuntimeError(
                f"{len(behind)} rooms on A never got the first message: {behind[:5]}"
            )
        print(f"first message, through B, in every room on A: {time.monotonic() - started:.1f} s")

        stopped = time.monotonic()
        servers[0].stop()
        a.wait_for(r"event=bus_lost", after=stopped)
        print(f"server 1 stopped (SIGTERM) in {time.monotonic() - stopped:.1f} s; A lost its bus")
        sending = time.monotonic()
        during = run(send_all(b.url, rooms, DURING))
        sent = time.monotonic()
        stored = sum(number is not None for number in during.values())
        print(f"one message into every room through B while server 1 was down: "
              f"{sent - sending:.1f} s, {stored}/{len(rooms)} stored with an id")  # fmt: skip

        restart = time.monotonic()
        a_cpu = cpu_seconds(a.process.pid)
        servers[0].start()
        servers[0].wait_listening()
        listening = time.monotonic() - restart
        # Once the history no longer holds the messages, no room can catch up any more.
        expired = sent + max_age + EXPIRY_MARGIN
        until = min(restart + deadline, expired)
        ended = "the history let the messages go" if expired < restart + deadline else "--deadline"
        seen, client_cpu, ended_at = wait_seen(control, DURING, until, GRACE, restart)
        waited = ended_at - restart
        a_cpu = cpu_seconds(a.process.pid) - a_cpu
        reconnected = a.wait_for(r"event=bus_connected .*reconnected=True", 0, restart)[0]
        report(
            seen, before, during, restart, waited, ended,
            listening=listening, reconnected=reconnected - restart,
            cpu=(a_cpu, client_cpu),
            warnings={event: a.count(f"event={event}", restart)
                      for event in ("room_behind", "history_gap", "history_unreadable")},
        )  # fmt: skip
    finally:
        if clients is not None:
            with contextlib.suppress(OSError):
                control.send(("close",))
            clients.join(10)
            if clients.is_alive():
                clients.terminate()
                clients.join()
        for app in apps:
            app.stop()
        for server in servers:
            server.stop()


def report(
    seen: dict[str, tuple[list[Record], int]],
    before: dict[str, int | None],
    during: dict[str, int | None],
    restart: float,
    waited: float,
    ended: str,
    listening: float,
    reconnected: float,
    cpu: tuple[float, float],
    warnings: dict[str, int],
) -> None:
    times = [
        next(at for _, text, at in received if text == DURING % room) - restart
        for room, (received, _) in seen.items()
        if any(text == DURING % room for _, text, _ in received)
    ]
    total = len(seen)
    print(f"from server 1's restart: listening {listening:.2f} s, "
          f"A connected again (bus_connected reconnected=True) {reconnected:.2f} s")  # fmt: skip
    if times:
        print(f"rooms caught up: {len(times)}/{total} within {waited:.0f} s; of those: first "
              f"{min(times):.2f} s, p50 {quantile(times, 0.5):.2f} s, "
              f"p99 {quantile(times, 0.99):.2f} s, last {max(times):.2f} s")  # fmt: skip
    else:
        print(f"rooms caught up: 0/{total} within {waited:.0f} s")
    counts = check(seen, before, during)
    verdict = "yes" if counts["once with its id"] == total else "no"
    resumed = sum(resumes for _, resumes in seen.values())
    print(f"every message exactly once with its id: {verdict} "
          f"({', '.join(f'{what} {n}' for what, n in counts.items())}; "
          f"clients sent back to resume: {resumed})")  # fmt: skip
    print(f"A's log after the restart: {', '.join(f'{e} {n}' for e, n in warnings.items())}; "
          f"CPU over the wait: A {cpu[0] / waited:.0%}, "
          f"clients {cpu[1] / waited:.0%} of a core")  # fmt: skip
    if len(times) == total:
        print(f"ratio quiet-rooms caught-up-last/target: {max(times) / TARGET:.2f} "
              f"(target {TARGET:g} s, {total} rooms)")  # fmt: skip
    else:
        print(f"ratio quiet-rooms caught-up-last/target: >{waited / TARGET:.2f} (target "
              f"{TARGET:g} s; only {len(times)}/{total} rooms within {waited:.0f} s, "
              f"when the wait ended: {ended})")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rooms", type=int, default=1000, help="quiet rooms on A, one client each")
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="seconds after the restart to wait for the last room")  # fmt: skip
    parser.add_argument("--max-age", type=float, default=300.0,
                        help="the history's max age, s (APP_BUS_HISTORY_MAX_AGE)")  # fmt: skip
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # One descriptor per client in the client process and per member in A, inherited.
    if args.rooms + 1024 > hard:
        parser.error(
            f"--rooms {args.rooms} needs {args.rooms + 1024} descriptors; the limit is {hard}"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    print(
        f"{args.rooms} quiet rooms on A, a bus restart, target: the last caught up within "
        f"{TARGET:g} s (history max age {args.max_age:g} s: a room behind by then never is)"
    )
    rooms = [f"q{number}" for number in range(args.rooms)]
    with tempfile.TemporaryDirectory(prefix="rooms_bench-") as root:
        scenario(Path(root), rooms, args.deadline, args.max_age)
    return 0


if __name__ == "__main__":
    sys.exit(main())
