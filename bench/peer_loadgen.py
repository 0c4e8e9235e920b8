"""The comparison's workloads, one client code for both stacks: the kit's chat
(``/ws/<room>?events=1``) and the peer's (Socket.IO, bench/sio.py).

A :class:`Member` is one connection in a room, whichever the stack: it sends text, reads
the room's text messages, and knows the process that serves it (the ``hello`` both send
first). The scenarios below run on it alone, and count with the bench's own measuring
code (:class:`bench.loadgen.Result` and :class:`~bench.loadgen.FanOut`, the tallies of
:mod:`localfleet.load`), each in client processes by :func:`bench.loadgen.in_workers`,
so a figure of one stack and the same figure of the other come from the same loop.

Both stacks' members come back after a close as their own users' clients do: the kit's
with the last message id it saw (``since=``), after up to 1 s (the chat page's spread);
the peer's with its session and last offset (connection state recovery), after
socket.io-client's first reconnection delay (1 s, randomised by half: 0.5 to 1.5 s).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import ssl
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench import sio
from bench.loadgen import LINGER, FanOut, Result
from localfleet.load import Tally, client_context

__all__ = [
    "KIT",
    "PEER",
    "Member",
    "RoomTraffic",
    "fan_out",
    "handshakes",
    "hold_idle",
    "open_member",
    "room_traffic",
    "traffic_figures",
]

KIT = "wsfleet"
PEER = "socketio"
IDLE_ROOM_SIZE = 10  # idle members per room: the kit tells each member of every join


@dataclass
class Member:
    """One member of a room on either stack; ``last`` is what it resumes from: the kit's
    last message id, or the peer's session (pid and offset)."""

    stack: str
    instance: str = ""
    ws: ClientConnection | None = None
    conn: sio.SioConnection | None = None
    last_id: int | None = None
    session: sio.Session = field(default_factory=sio.Session)
    room_size: int = 0  # the kit's presence: members of the room in the fleet
    # The kit's: what its resume sent before the hello (the messages it missed), for
    # messages() to give first, as the peer's connection holds its recovered events.
    held: list[str] = field(default_factory=list)

    async def send(self, text: str) -> None:
        if self.conn is not None:
            await self.conn.emit("message", text)
        elif self.ws is not None:
            await self.ws.send(text)

    async def messages(self) -> AsyncIterator[str]:
        """The room's text messages until the connection closes (pings answered)."""
        if self.conn is not None:
            async for name, args in self.conn.events():
                if name == "message" and args and isinstance(args[0], str):
                    yield args[0]
            return
        assert self.ws is not None
        while self.held:
            yield self.held.pop(0)
        try:
            async for frame in self.ws:
                if isinstance(frame, str):
                    yield frame
                    continue
                event = json.loads(frame)
                if event["type"] == "message":
                    self.last_id = event["id"]
                elif event["type"] == "presence":
                    self.room_size = event["members"]
        except ConnectionClosed:
            return

    @property
    def close_code(self) -> int | None:
        ws = self.conn.ws if self.conn is not None else self.ws
        return ws.close_code if ws is not None else None

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        elif self.ws is not None:
            await self.ws.close()


def room_url(stack: str, base: str, room: str, since: int | None = None) -> str:
    """Where a member of ``room`` connects, at ``base`` (``wss://host``)."""
    if stack == PEER:
        return sio.url_of(base, room)
    return f"{base.rstrip('/')}/ws/{room}?events=1" + (f"&since={since}" if since else "")


async def open_member(
    stack: str,
    base: str,
    room: str,
    context: ssl.SSLContext | None,
    member: Member | None = None,
    open_timeout: float = 10.0,
) -> Member:
    """Join ``room`` (again, resuming, when ``member`` was in it): returns once the
    server said which process serves it (``hello``), i.e. once the member is in."""
    member = member if member is not None else Member(stack)
    url = room_url(stack, base, room, member.last_id)
    async with asyncio.timeout(open_timeout):
        if stack == PEER:
            member.conn = await sio.SioConnection.open(
                url, context, member.session, open_timeout=open_timeout
            )
            # The hello follows the CONNECT; a recovery's missed messages may come before.
            while True:
                frame = sio.decode(await member.conn.ws.recv())
                if frame.engine == sio.PING:
                    await member.conn.ws.send("3")
                elif (event := frame.event) is not None:
                    if event[0] == "hello":
                        member.instance = event[1][0]["instance"]
                        return member
                    member.conn.held.append(event)
        member.ws = await connect(
            url, ssl=context, compression=None, ping_interval=None, open_timeout=open_timeout
        )
        # A resume's messages come before the hello (the member is in the room once it has
        # what it missed): held for messages(), not dropped.
        member.held = []
        while True:
            data = await member.ws.recv()
            if isinstance(data, str):
                member.held.append(data)
                continue
            event = json.loads(data)
            if event["type"] == "hello":
                member.instance = event["instance"]
                return member
            if event["type"] == "message":
                member.last_id = event["id"]


async def open_counted(
    stack: str, base: str, room: str, context: ssl.SSLContext | None, tally: Tally, **kw: Any
) -> Member | None:
    """:func:`open_member`, its time and failure counted in ``tally``; None if refused."""
    started = time.monotonic()
    try:
        member = await open_member(stack, base, room, context, **kw)
    except Exception as error:  # every refusal is a figure
        tally.fail(error, base)
        return None
    tally.ok(time.monotonic() - started)
    return member


# --- 1. idle connections --------------------------------------------------------------------


async def hold_idle(
    stack: str,
    bases: list[str],
    ca_file: str | None,
    count: int,
    concurrency: int,
    first_room: int,
    opened: Any,
    ramped: Any,
    release: Any,
) -> Result:
    """Join ``count`` members to rooms of IDLE_ROOM_SIZE (numbered from ``first_room``),
    member n through ``bases[n % len(bases)]``, and hold them, answering pings, until
    ``release`` (an event) is set. ``opened`` counts members in, ``ramped`` the
    processes done joining theirs (both shared)."""
    result = Result()
    context = client_context(ca_file)
    gate = asyncio.Semaphore(concurrency)
    held: list[Member] = []
    readers: list[asyncio.Task[None]] = []
    started = time.monotonic()

    async def drain(member: Member) -> None:
        async for _ in member.messages():
            pass

    async def one(n: int) -> None:
        room = f"bench-idle-{first_room + n // IDLE_ROOM_SIZE}"
        async with gate:
            base = bases[n % len(bases)]
            member = await open_counted(stack, base, room, context, result, open_timeout=30)
        if member is not None:
            held.append(member)
            readers.append(asyncio.create_task(drain(member)))
            with opened.get_lock():
                opened.value += 1

    await asyncio.gather(*(one(n) for n in range(count)))
    result.seconds = time.monotonic() - started
    with ramped.get_lock():
        ramped.value += 1
    await asyncio.get_running_loop().run_in_executor(None, release.wait)
    gate = asyncio.Semaphore(256)

    async def close(member: Member) -> None:
        async with gate:
            await member.close()

    await asyncio.gather(*(close(m) for m in held), return_exceptions=True)
    for reader in readers:
        reader.cancel()
    return result


# --- 2 and 3. fan-out -----------------------------------------------------------------------


async def fan_out(
    stack: str,
    bases: list[str],
    ca_file: str | None,
    room: str,
    members: int,
    publishers: int,
    rate: float,
    seconds: float,
    size: int,
    room_size: int,
    barrier: Any,
    phase: float,
) -> FanOut:
    """Join ``members`` to ``room``, member i through ``bases[i % len(bases)]``; the
    first ``publishers`` offer ``rate`` messages/s of ``size`` bytes between them for
    ``seconds``; time each delivery to each member. As bench.loadgen.fan_out for the kit
    (the same stamps, paths and lateness rule), on either stack: each message carries its
    due time, its sender's host and process; ``room_size`` is the room's members over
    every client process, which the kit's members wait to be told (its bus carries a room
    to a process once that process subscribed); the peer's adapter reads every message of
    the namespace in every process, so its members are in once greeted."""
    result = FanOut(seconds=seconds)
    context = client_context(ca_file)

    def clock() -> float:
        return time.clock_gettime(time.CLOCK_MONOTONIC)

    joined: list[tuple[Member, int]] = []

    async def read(member: Member, host: int) -> None:
        async for message in member.messages():
            arrived = clock()
            due, sender_host, instance, _rest = message.split(" ", 3)
            if instance == member.instance:
                path = "same process"
            elif int(sender_host) == host:
                path = "same host"
            else:
                path = "cross-host"
            result.paths[path].ok(arrived - float(due))
            result.ok(arrived - float(due))

    readers = []
    # One after the other, so nginx's least_conn spreads them evenly over the processes.
    for i in range(members):
        member = await open_counted(stack, bases[i % len(bases)], room, context, result.joins)
        if member is not None:
            joined.append((member, i % len(bases)))
            readers.append(asyncio.create_task(read(member, i % len(bases))))
    result.members.update(m.instance for m, _ in joined)
    if stack == KIT:
        deadline = time.monotonic() + 30
        while min((m.room_size for m, _ in joined), default=room_size) < room_size:
            if time.monotonic() > deadline:
                result.fail(f"the members were not all told of {room_size}")
                break
            await asyncio.sleep(0.05)
    await asyncio.to_thread(barrier.wait, 120)

    start = clock() + 0.2
    interval = publishers / rate

    async def publish(member: Member, host: int, offset: float) -> None:
        for k in range(round(seconds / interval)):
            due = start + offset + k * interval
            if (wait := due - clock()) > 0:
                await asyncio.sleep(wait)
            stamp = max(due, clock())
            await member.send(f"{stamp:.6f} {host} {member.instance} {k} ".ljust(size, "x"))
            result.sent[member.instance] += 1

    senders = joined[:publishers]
    await asyncio.gather(
        *(publish(m, h, (k + phase) * interval / len(senders)) for k, (m, h) in enumerate(senders))
    )
    await asyncio.sleep(max(0.0, start + seconds + LINGER - clock()))
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await asyncio.gather(*(m.close() for m, _ in joined), return_exceptions=True)
    return result


# --- 4. handshakes --------------------------------------------------------------------------


async def handshakes(
    stack: str, base: str, ca_file: str | None, seconds: float, concurrency: int
) -> Result:
    """New members back to back, each timed from TCP connect to its ``hello`` (TLS, the
    upgrade, and for the peer Engine.IO's open and Socket.IO's CONNECT), then closed."""
    result = Result(seconds=seconds)
    context = client_context(ca_file)
    deadline = time.monotonic() + seconds

    async def one(worker: int) -> None:
        for n in itertools.count():
            if time.monotonic() >= deadline:
                return
            room = f"bench-hs-{worker}-{n % 4}"
            member = await open_counted(stack, base, room, context, result)
            if member is not None:
                await member.close()

    await asyncio.gather(*(one(w) for w in range(concurrency)))
    return result


# --- 5. a room's traffic through restarts -----------------------------------------------------


@dataclass
class Seen:
    """What one member of the room traffic received, and how often it came back."""

    base: str
    received: list[str] = field(default_factory=list)
    connections: int = 0
    closes: Counter[int] = field(default_factory=Counter)
    member: Member | None = None  # its connection now


@dataclass
class RoomTraffic:
    """What a room's members and publishers saw while its processes restarted."""

    stack: str
    members: list[Seen] = field(default_factory=list)
    handshakes: Tally = field(default_factory=Tally)
    sent: list[str] = field(default_factory=list)
    recovered: int = 0  # peer: reconnects whose session the server recovered
    not_recovered: int = 0  # peer: reconnects that started a new session


def reconnect_delay(stack: str) -> float:
    """How long a closed client waits before it comes back, as its users' clients do."""
    if stack == PEER:
        return random.uniform(0.5, 1.5)  # noqa: S311 - socket.io-client's default backoff
    return random.uniform(0.0, 1.0)  # noqa: S311 - the chat page's spread


async def _member_loop(
    stack: str, room: str, context: ssl.SSLContext | None, seen: Seen,
    traffic: RoomTraffic, leaving: asyncio.Event,
) -> None:  # fmt: skip
    member = seen.member = Member(stack)
    while not leaving.is_set():
        joined = await open_counted(stack, seen.base, room, context, traffic.handshakes,
                                    member=member)  # fmt: skip
        if joined is None:
            await asyncio.sleep(reconnect_delay(stack))
            continue
        seen.connections += 1
        if stack == PEER and seen.connections > 1:
            if member.conn is not None and member.conn.recovered:
                traffic.recovered += 1
            else:
                traffic.not_recovered += 1
        reader = asyncio.ensure_future(_collect(member, seen))
        done, _ = await asyncio.wait(
            [reader, asyncio.ensure_future(leaving.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if reader not in done:
            await member.close()
            await reader
            return
        seen.closes[member.close_code or 1006] += 1
        await asyncio.sleep(reconnect_delay(stack))


async def _collect(member: Member, seen: Seen) -> None:
    async for text in member.messages():
        seen.received.append(text)


async def _publisher(
    stack: str, base: str, room: str, name: str, context: ssl.SSLContext | None,
    traffic: RoomTraffic, every: float, stop: asyncio.Event,
) -> None:  # fmt: skip
    """Send ``<name>-<n>`` every ``every`` seconds, coming back after a close."""
    counter = itertools.count()
    while not stop.is_set():
        member = await open_counted(stack, base, room, context, traffic.handshakes)
        if member is None:
            await asyncio.sleep(reconnect_delay(stack))
            continue
        drain = asyncio.ensure_future(_collect(member, Seen(base)))
        try:
            while not stop.is_set() and not drain.done():
                text = f"{name}-{next(counter)}"
                await member.send(text)
                traffic.sent.append(text)
                await asyncio.sleep(every)
        except ConnectionClosed:
            pass
        if stop.is_set():
            await member.close()
        await drain
        if not stop.is_set():
            await asyncio.sleep(reconnect_delay(stack))


def room_traffic(
    stack: str,
    bases: list[str],
    ca_file: str | None,
    room: str,
    members_per_base: int,
    every: float,
    catch_up: float = 15.0,
) -> tuple[RoomTraffic, Any]:
    """Members on every base and a publisher on each, in a thread, until the returned
    ``stop()`` is called: then the publishers stop, and the members stay until each has
    every message any of them got (or ``catch_up`` seconds). ``stop()`` returns once all
    have left; the traffic's figures are then final."""
    traffic = RoomTraffic(stack, [Seen(b) for b in bases for _ in range(members_per_base)])
    stopping, ready, done = threading.Event(), threading.Event(), threading.Event()

    async def main() -> None:
        context = client_context(ca_file)
        leaving, publishing = asyncio.Event(), asyncio.Event()
        members = [
            asyncio.create_task(_member_loop(stack, room, context, s, traffic, leaving))
            for s in traffic.members
        ]
        while traffic.handshakes.done < len(members):  # noqa: ASYNC110 - a count
            await asyncio.sleep(0.05)
        if stack == KIT:
            # Every member's process subscribed to the room (each is told the room's
            # count in the fleet) before the first message goes.
            deadline = time.monotonic() + 30
            while any(s.member and s.member.room_size < len(members) for s in traffic.members):
                if time.monotonic() > deadline:
                    raise RuntimeError("the kit's members were not all told the room's size")
                await asyncio.sleep(0.05)
        publishers = [
            asyncio.create_task(
                _publisher(stack, b, room, f"p{n}", context, traffic, every, publishing)
            )
            for n, b in enumerate(bases)
        ]
        ready.set()
        await asyncio.to_thread(stopping.wait)
        publishing.set()
        await asyncio.gather(*publishers)
        deadline = time.monotonic() + catch_up
        while time.monotonic() < deadline:
            everything = set().union(*(set(s.received) for s in traffic.members))
            if all(len(set(s.received)) == len(everything) for s in traffic.members):
                break
            await asyncio.sleep(0.1)
        leaving.set()
        await asyncio.gather(*members)

    thread = threading.Thread(target=lambda: (asyncio.run(main()), done.set()), daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError(f"the room traffic did not start: {traffic.handshakes.failures[:3]}")

    def stop() -> RoomTraffic:
        stopping.set()
        thread.join(catch_up + 60)
        return traffic

    return traffic, stop


def traffic_figures(traffic: RoomTraffic) -> dict[str, float]:
    """Workload 5's figures: messages missed per member (of those any member got),
    duplicates, reconnects per client, failed handshakes, and messages sent that no
    member got (a sender is not told, on the peer)."""
    got_by_anyone = set().union(*(set(s.received) for s in traffic.members))
    members = max(len(traffic.members), 1)
    missed = sum(len(got_by_anyone - set(s.received)) for s in traffic.members)
    duplicates = sum(len(s.received) - len(set(s.received)) for s in traffic.members)
    return {
        "messages": len(got_by_anyone),
        "missed per member": missed / members,
        "duplicates": duplicates,
        "reconnects per client": sum(max(s.connections - 1, 0) for s in traffic.members) / members,
        "failed handshakes": traffic.handshakes.failed,
        "sent, got by no member": len(set(traffic.sent) - got_by_anyone),
        "sessions recovered": traffic.recovered,
        "sessions not recovered": traffic.not_recovered,
    }
