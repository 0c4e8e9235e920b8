"""The scenarios of `make bench`: what asyncio WebSocket clients do in each measurement.

The counters, the connection loop and the client processes are the shared ones of
:mod:`localfleet.load`: each scenario runs in ``workers`` processes on uvloop (when
installed, as on the hosts), and every process reports the CPU time it used, so a
saturated client shows in the figures instead of passing for a slow server. Latencies are
measured from the moment a message was due, not from when it was sent: a client that
falls behind its schedule counts the delay (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from localfleet import load
from localfleet.load import Tally, client_context, open_counted

__all__ = [
    "PATHS",
    "FanOut",
    "Result",
    "Rollout",
    "echo_at_rate",
    "echo_closed_loop",
    "fan_out",
    "handshakes",
    "hold_idle",
    "hold_through_rollout",
    "in_workers",
]


@dataclass
class Result(Tally):
    """What one scenario measured (done: replies received, handshakes completed or
    connections opened; failed: replies lost, handshakes or connections refused), merged
    over its client processes."""

    seconds: float = 0.0
    client_cpu: list[float] = field(default_factory=list)  # share of one core, per process

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def merge(self, other: Result) -> None:
        super().merge(other)
        self.seconds = max(self.seconds, other.seconds)
        self.client_cpu += other.client_cpu


# How a delivery reached its member, seen from the sender: its own process, another
# process on its host, or a process on another host (through the bus in both last cases).
PATHS = ("same process", "same host", "cross-host")
LINGER = 2.0  # seconds the fan-out's members wait for deliveries after the last send


@dataclass
class FanOut(Result):
    """What the fan-out measured (done and latencies: deliveries, whatever their path),
    merged over its client processes."""

    paths: dict[str, Tally] = field(default_factory=lambda: {path: Tally() for path in PATHS})
    joins: Tally = field(default_factory=Tally)  # the members' handshakes
    sent: Counter[str] = field(default_factory=Counter)  # messages, per sender's instance
    members: Counter[str] = field(default_factory=Counter)  # per instance

    @property
    def published(self) -> float:
        """Messages sent per second."""
        return self.sent.total() / self.seconds if self.seconds else 0.0

    def expected(self, bus: bool) -> int:
        """Deliveries owed: to every member with the bus, else to the sender's process's."""
        if bus:
            return self.sent.total() * self.members.total()
        return sum(count * self.members[instance] for instance, count in self.sent.items())

    def merge(self, other: Result) -> None:
        super().merge(other)
        if isinstance(other, FanOut):
            for path, tally in other.paths.items():
                self.paths[path].merge(tally)
            self.joins.merge(other.joins)
            self.sent.update(other.sent)
            self.members.update(other.members)


# --- scenarios (one process's share) --------------------------------------------------------


async def echo_at_rate(
    url: str, ca_file: str | None, size: int, rate: float, seconds: float, connections: int
) -> Result:
    """Offer ``rate`` messages/s of ``size`` bytes over ``connections``; time each reply."""
    result = Result(seconds=seconds)
    context = client_context(ca_file)
    payload = b"x" * size
    interval = connections / rate  # seconds between two messages of one connection
    count = int(seconds / interval)
    sockets = [
        await connect(url, ssl=context, compression=None, max_size=None, ping_interval=None)
        for _ in range(connections)
    ]
    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
    clock = time.perf_counter
    start = clock() + 0.2  # every connection open before the first message is due

    async def one(ws: ClientConnection, offset: float) -> None:
        due_times: deque[float] = deque()

        async def read() -> None:
            for _ in range(count):
                await ws.recv()
                result.ok(clock() - due_times.popleft())

        reader = asyncio.create_task(read())
        for k in range(count):
            due = start + offset + k * interval
            if (wait := due - clock()) > 0:
                await asyncio.sleep(wait)
            due_times.append(due)
            await ws.send(payload)
        try:
            await asyncio.wait_for(reader, timeout=10)
        except (TimeoutError, OSError) as error:
            result.fail(error)  # what never came back is counted as failed below

    outcomes = await asyncio.gather(
        *(one(ws, i * interval / connections) for i, ws in enumerate(sockets)),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            result.fail(outcome)
    result.failed = connections * count - result.done
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return result


async def echo_closed_loop(
    url: str, ca_file: str | None, size: int, seconds: float, connections: int
) -> Result:
    """Each connection sends the next message when the last reply came: the most it does."""
    result = Result(seconds=seconds)
    context = client_context(ca_file)
    payload = b"x" * size
    sockets = [
        await connect(url, ssl=context, compression=None, max_size=None, ping_interval=None)
        for _ in range(connections)
    ]
    deadline = time.monotonic() + seconds

    async def one(ws: ClientConnection) -> None:
        while (sent := time.monotonic()) < deadline:
            await ws.send(payload)
            await ws.recv()
            result.ok(time.monotonic() - sent)

    for outcome in await asyncio.gather(*(one(ws) for ws in sockets), return_exceptions=True):
        if isinstance(outcome, BaseException):
            result.fail(outcome)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return result


async def handshakes(url: str, ca_file: str | None, seconds: float, concurrency: int) -> Result:
    """New connections back to back: TCP, a full TLS handshake and the WebSocket upgrade."""
    result = Result(seconds=seconds)
    context = client_context(ca_file)
    deadline = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < deadline:
            ws = await open_counted(url, context, result, open_timeout=10, ping_interval=None)
            if ws is not None:
                await ws.close()

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return result


async def hold_idle(
    url: str,
    ca_file: str | None,
    count: int,
    compression: str | None,
    concurrency: int,
    opened: Any,
    ramped: Any,
    release: Any,
    source: str | None = None,
) -> Result:
    """Open ``count`` connections and hold them, answering the server's pings, until released.

    Shared with the parent: ``opened`` counts connections open, ``ramped`` the processes
    done opening theirs; ``release`` (an event) ends the hold. ``source``: the local
    address to connect from (one address has about 28,000 ports towards one server).
    """
    result = Result()
    context = client_context(ca_file)
    gate = asyncio.Semaphore(concurrency)
    held: list[ClientConnection] = []
    started = time.monotonic()
    target = urlsplit(url)
    loop = asyncio.get_running_loop()

    async def from_source() -> socket.socket | None:
        """A socket connected from ``source``, its port chosen at connect() for this one
        destination: a bind() to port 0 alone takes a port unique across every
        destination, searched for longer the more are taken (milliseconds each past
        8,000 here), and runs out at ~28,000."""
        if source is None:
            return None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.setblocking(False)
            port = target.port or (443 if target.scheme == "wss" else 80)
            await loop.sock_connect(sock, (target.hostname, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def one() -> None:
        async with gate:
            try:
                sock = await from_source()
                held.append(
                    await connect(
                        url,
                        ssl=context,
                        compression=compression,
                        open_timeout=30,
                        ping_interval=None,
                        sock=sock,
                    )
                )
            except Exception as error:  # every refusal is a figure
                result.fail(error)
                return
        result.latencies.append(time.monotonic() - started)
        with opened.get_lock():
            opened.value += 1

    await asyncio.gather(*(one() for _ in range(count)))
    result.done = len(held)
    result.seconds = time.monotonic() - started
    with ramped.get_lock():
        ramped.value += 1
    await loop.run_in_executor(None, release.wait)
    # Closing handshakes, so the server closes each TCP connection first and the
    # TIME_WAIT states land there: held here, 20,000 of them would take the client's
    # ports for a minute and the next ramp would run out.
    gate = asyncio.Semaphore(256)

    async def close(ws: ClientConnection) -> None:
        async with gate:
            await ws.close()

    await asyncio.gather(*(close(ws) for ws in held), return_exceptions=True)
    return result


@dataclass
class Rollout(Result):
    """What clients held through rollouts saw (done: connections opened by the ramp),
    merged over its client processes. Times are time.monotonic(), one clock for every
    process of the machine, so that the parent cuts them into one window per rollout."""

    # Per client, when each of its handshakes after the ramp completed.
    handshakes_at: list[list[float]] = field(default_factory=list)
    # Each reconnect: when its connection closed, and when the new one's handshake completed.
    reconnects: list[tuple[float, float]] = field(default_factory=list)
    closes: Counter[int] = field(default_factory=Counter)  # close codes after the ramp

    def merge(self, other: Result) -> None:
        super().merge(other)
        if isinstance(other, Rollout):
            self.handshakes_at += other.handshakes_at
            self.reconnects += other.reconnects
            self.closes.update(other.closes)


async def hold_through_rollout(
    url: str,
    ca_file: str | None,
    count: int,
    concurrency: int,
    opened: Any,
    ramped: Any,
    release: Any,
) -> Rollout:
    """Open ``count`` connections and hold them until released; a connection the server
    closes with 1001 or 1012 (a drain) reconnects at once, as a client of a restarting
    service does. Notes, after this process's ramp, when each client's handshakes
    completed and each reconnect's close and completion. ``opened`` (shared) counts the
    connections open now, ``ramped`` the processes done opening theirs; ``release`` (an
    event) ends the hold."""
    result = Rollout()
    context = client_context(ca_file)
    gate = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    stop = asyncio.Event()
    ramp_done = asyncio.Event()
    result.handshakes_at = [[] for _ in range(count)]
    current: list[ClientConnection | None] = [None] * count

    def counted(delta: int) -> None:
        with opened.get_lock():
            opened.value += delta

    async def client(number: int) -> None:
        closed_at: float | None = None
        while not stop.is_set():
            async with gate:
                try:
                    ws = await connect(url, ssl=context, compression=None, open_timeout=60,
                                       ping_interval=None)  # fmt: skip
                except Exception as error:  # every refusal is a figure
                    result.fail(error)
                    return
            now = time.monotonic()
            current[number] = ws
            counted(1)
            if ramp_done.is_set():
                result.handshakes_at[number].append(now)
            if closed_at is None:
                result.done += 1
            else:
                result.reconnects.append((closed_at, now))
            await ws.wait_closed()
            closed_at = time.monotonic()
            counted(-1)
            if stop.is_set():
                return
            result.closes[ws.close_code or 1006] += 1
            if ws.close_code not in (1001, 1012):
                return

    clients = [asyncio.create_task(client(n)) for n in range(count)]
    while result.done + result.failed < count:  # noqa: ASYNC110 - a count, not an event
        await asyncio.sleep(0.1)
    result.seconds = time.monotonic() - started
    with ramped.get_lock():
        ramped.value += 1
    ramp_done.set()
    await loop.run_in_executor(None, release.wait)
    stop.set()
    # Closing handshakes, so that the server closes each TCP connection first and the
    # TIME_WAIT states land there.
    gate = asyncio.Semaphore(256)

    async def close(ws: ClientConnection | None) -> None:
        if ws is not None:
            async with gate:
                await ws.close()

    await asyncio.gather(*(close(ws) for ws in current), return_exceptions=True)
    await asyncio.gather(*clients, return_exceptions=True)
    return result


@dataclass
class _Member:
    """One connection in the room: the host it went to, the instance nginx gave it."""

    ws: ClientConnection
    host: int
    instance: str = ""
    greeted: asyncio.Event = field(default_factory=asyncio.Event)
    counted: asyncio.Event = field(default_factory=asyncio.Event)


async def fan_out(
    urls: list[str],
    ca_file: str | None,
    members: int,
    publishers: int,
    rate: float,
    seconds: float,
    size: int,
    room_size: int | None,
    barrier: Any,
    phase: float,
) -> FanOut:
    """Join ``members`` to one room, member i through ``urls[i % len(urls)]`` (one per host,
    with ``events=1``); the first ``publishers`` of them offer ``rate`` messages/s of
    ``size`` bytes between them for ``seconds``; time each delivery to each member.

    Each message carries the time it was sent, its sender's host and instance; the member
    that gets it knows its own from the ``hello`` event, so each delivery is filed under
    one of :data:`PATHS`. The stamps are CLOCK_MONOTONIC, one clock for every process
    of this machine, so a delivery is timed whichever client process sent it.

    ``room_size``: with the bus, the members in the whole room (of every client process);
    sending starts once each member here was told that count (``presence``), i.e. once
    every process of the fleet holding members has subscribed. None: no bus, no wait.
    ``barrier`` (shared by the client processes, and by the parent if it measures the
    hosts while the messages go) starts them together, 0.2 s after it opens; ``phase``
    (0..1) staggers the publishers of this process between those of the others.
    """
    result = FanOut(seconds=seconds)
    context = client_context(ca_file)

    def clock() -> float:
        return time.clock_gettime(time.CLOCK_MONOTONIC)

    async def read(member: _Member) -> None:
        try:
            async for message in member.ws:
                if isinstance(message, bytes):  # an event
                    event = json.loads(message)
                    if event["type"] == "hello":
                        member.instance = event["instance"]
                        member.greeted.set()
                    elif event["type"] == "presence" and event["members"] >= (room_size or 0):
                        # (each message's id event, with the history on, is skipped too)
                        member.counted.set()
                    continue
                arrived = clock()
                due, host, instance, _rest = message.split(" ", 3)
                if instance == member.instance:
                    path = "same process"
                elif int(host) == member.host:
                    path = "same host"
                else:
                    path = "cross-host"
                result.paths[path].ok(arrived - float(due))
                result.ok(arrived - float(due))
        except ConnectionClosed as error:
            result.fail(error)

    joined: list[_Member] = []
    readers = []
    # One after the other, so nginx's least_conn spreads them evenly over a host's instances.
    for i in range(members):
        ws = await open_counted(
            urls[i % len(urls)], context, result.joins, compression=None, ping_interval=None
        )
        if ws is not None:
            joined.append(member := _Member(ws, i % len(urls)))
            readers.append(asyncio.create_task(read(member)))
    try:
        await asyncio.wait_for(asyncio.gather(*(m.greeted.wait() for m in joined)), timeout=10)
        result.members.update(m.instance for m in joined)
        if room_size is not None:
            await asyncio.wait_for(asyncio.gather(*(m.counted.wait() for m in joined)), 30)
    except TimeoutError:
        result.fail(f"the members were not all greeted, or not all told of {room_size}")
    await asyncio.to_thread(barrier.wait, 120)

    start = clock() + 0.2
    interval = publishers / rate  # seconds between two messages of one publisher

    async def publish(member: _Member, offset: float) -> None:
        for k in range(round(seconds / interval)):
            due = start + offset + k * interval
            if (wait := due - clock()) > 0:
                await asyncio.sleep(wait)
            # Late, the time it was due; early (uvloop's timers round to the millisecond),
            # the time it goes: never a delivery before its stamp.
            stamp = max(due, clock())
            await member.ws.send(
                f"{stamp:.6f} {member.host} {member.instance} {k} ".ljust(size, "x")
            )
            result.sent[member.instance] += 1

    senders = joined[:publishers]
    await asyncio.gather(
        *(publish(m, (k + phase) * interval / len(senders)) for k, m in enumerate(senders))
    )
    # What has not come LINGER seconds after the last message was due is counted as lost.
    await asyncio.sleep(max(0.0, start + seconds + LINGER - clock()))
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await asyncio.gather(*(m.ws.close() for m in joined), return_exceptions=True)
    return result


# --- processes --------------------------------------------------------------------------------


def _failed(kind: type[Result], error: BaseException) -> Result:
    result = kind()
    result.fail(error)
    return result


def in_workers(
    scenario: Callable[..., Coroutine[Any, Any, Result]],
    args_of: Callable[[int], tuple[Any, ...]],
    workers: int,
    timeout: float,
    while_running: Callable[[], None] | None = None,
    kind: type[Result] = Result,
) -> Result:
    """Run ``scenario(*args_of(i))`` in process i of ``workers``; the merged result.

    ``while_running`` is called once the processes started (the idle scenario measures the
    hosts there, then releases its clients). ``kind``: the scenario's result class.
    """
    failed = functools.partial(_failed, kind)  # a module function: it must pickle
    merged = kind()
    for result, cpu in load.in_workers(scenario, args_of, workers, timeout, failed, while_running):
        result.client_cpu = [cpu]
        merged.merge(result)
    return merged
