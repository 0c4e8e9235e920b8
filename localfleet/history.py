"""A chat room's traffic on the live fleet, as its users' browsers make it: members on every
host that come back with the last message id they saw whenever their connection closes,
and a publisher on each host sending numbered messages, each under a reference of its own,
and sending again after a reconnect what was not acknowledged. What every member received
is then compared with the room's one order (the ids), and with what was acknowledged.
The fleet tests (tests/fleet/) and the bench (bench/) share it."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from localfleet.demo import ca_file
from localfleet.load import Tally, client_context, in_background, open_counted

__all__ = ["RoomTraffic", "assert_nothing_lost", "reference_order", "room_traffic"]

MEMBERS_PER_HOST = 8
PUBLISH_EVERY = 0.05  # 20 messages a second per publisher, one publisher per host
CATCH_UP = 15.0  # seconds the members have, once the publishers stop, to get the last message
ACK_WAIT = 15.0
"""Seconds a publisher waits for the oldest ack before it takes its connection for dead
and comes back on a new one (as the chat page does): a sender's own frames keep nginx's
read timer going, so nginx never closes the connection of a sender to a host that
vanished."""
RECONNECT_CODES = {1001, 1012}


@dataclass
class Member:
    """One member: the host address it joins through, what it received, in order, with
    the id each message came with, how its connections closed, its ``resumed`` events."""

    address: str = ""
    received: list[tuple[int | None, str]] = field(default_factory=list)
    closes: Counter[int] = field(default_factory=Counter)
    resumed: list[dict[str, object]] = field(default_factory=list)
    # (monotonic time, instance) of each hello: where it was served, from when.
    hellos: list[tuple[float, str]] = field(default_factory=list)

    @property
    def last_id(self) -> int | None:
        return next((n for n, _ in reversed(self.received) if n is not None), None)


@dataclass
class RoomTraffic:
    """What the room's clients saw."""

    members: list[Member] = field(default_factory=list)
    handshakes: Tally = field(default_factory=Tally)
    sent: int = 0
    # What the publishers sent (each text is its own reference), and the id each ack gave
    # (every ack of a text, re-sends included); the refusals, as "text: reason".
    texts: list[str] = field(default_factory=list)
    acks: dict[str, list[int]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    # What each publisher's connections did, "<seconds from the start> <name>: <what>",
    # printed with the figures: where a publisher's messages went unacknowledged.
    publishing: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, name: str, what: str) -> None:
        self.publishing.append(f"{time.monotonic() - self.started:6.1f} {name}: {what}")


async def _member(
    address: str, room: str, context: ssl.SSLContext | None, member: Member,
    traffic: RoomTraffic, stop: asyncio.Event,
) -> None:  # fmt: skip
    """Stay in the room; after a 1001/1012 close, come back at once with the last id seen."""
    while not stop.is_set():
        since = member.last_id
        query = "events=1" + (f"&since={since}" if since is not None else "")
        # No pings of its own, as a browser: a connection to a host that vanished is
        # found by what stops coming (the instances' pings, nginx's read timeout).
        ws = await open_counted(f"wss://{address}/ws/{room}?{query}", context,
                                traffic.handshakes, address, open_timeout=10,
                                ping_interval=None)  # fmt: skip
        if ws is None:
            await asyncio.sleep(0.5)
            continue
        await _read(ws, member, stop)
        # As the chat page does: spread over a second, not all at once.
        await asyncio.sleep(random.uniform(0, 1))  # noqa: S311 (not a secret)


async def _read(ws: ClientConnection, member: Member, stop: asyncio.Event) -> None:
    """Read until the connection closes (or the traffic stops), noting how it closed."""
    closer = asyncio.create_task(_close_when(ws, stop))
    next_id: int | None = None
    try:
        async for frame in ws:
            if isinstance(frame, str):
                member.received.append((next_id, frame))
                next_id = None
                continue
            event = json.loads(frame)
            if event["type"] == "message":
                next_id = event["id"]
            elif event["type"] == "resumed":
                member.resumed.append(event)
            elif event["type"] == "hello":
                member.hellos.append((time.monotonic(), event["instance"]))
    except ConnectionClosed:
        pass
    finally:
        closer.cancel()
    if not stop.is_set() and ws.close_code is not None:
        member.closes[ws.close_code] += 1


async def _close_when(ws: ClientConnection, stop: asyncio.Event) -> None:
    await stop.wait()
    await ws.close()


async def _acks(
    ws: ClientConnection, unacked: dict[str, float], retry: list[str], traffic: RoomTraffic,
    name: str,
) -> None:  # fmt: skip
    """Read what comes (a publisher is a member too), taking in the acks and refusals of
    what it sent, so that its close is not held up."""
    try:
        async for frame in ws:
            if isinstance(frame, str):
                continue
            event = json.loads(frame)
            if event["type"] == "ack":
                traffic.acks.setdefault(event["ref"], []).append(event["id"])
                unacked.pop(event["ref"], None)
            elif event["type"] == "refused":
                traffic.refused.append(f"{event.get('ref')}: {event['reason']}")
                retry.append(event["ref"])
            elif event["type"] == "hello":
                traffic.note(name, f"served by {event['instance']}")
    except ConnectionClosed:
        traffic.note(name, f"closed {ws.close_code}, {len(unacked)} unacknowledged")


async def _send(ws: ClientConnection, text: str) -> None:
    """Send ``text`` under its own text as reference (the chat page's protocol)."""
    await ws.send(json.dumps({"type": "message", "ref": text}).encode())
    await ws.send(text)


async def _publisher(
    address: str, room: str, name: str, context: ssl.SSLContext | None,
    traffic: RoomTraffic, stop: asyncio.Event,
) -> None:  # fmt: skip
    """Send ``<name>-<n>`` every PUBLISH_EVERY seconds; after a reconnect, first send again
    what was not acknowledged (cut off before its ack), and a refused one at the next turn;
    a connection whose oldest message waited :data:`ACK_WAIT` for its ack is left for a
    new one; once stopped, go on until everything is acknowledged (or :data:`CATCH_UP`
    seconds). ``name`` is unique to the traffic: each text is its own reference."""
    counter = itertools.count()
    unacked: dict[str, float] = {}  # text -> when first sent, in the order sent
    loop = asyncio.get_running_loop()
    until: float | None = None

    def going_on() -> bool:
        """Until stopped; then while something is unacknowledged, CATCH_UP seconds from
        the stop at most (the stop may come while a connection closes, between turns)."""
        nonlocal until
        if not stop.is_set():
            return True
        if until is None:
            until = loop.time() + CATCH_UP
        return bool(unacked) and loop.time() < until

    while going_on():
        ws = await open_counted(f"wss://{address}/ws/{room}?events=1", context,
                                traffic.handshakes, address, open_timeout=10,
                                ping_interval=None)  # fmt: skip
        if ws is None:
            await asyncio.sleep(0.5)
            continue
        retry: list[str] = []
        opened = loop.time()
        reader = asyncio.ensure_future(_acks(ws, unacked, retry, traffic, name))
        traffic.note(name, f"connected, sending {len(unacked)} again")
        try:
            for text in list(unacked):
                await _send(ws, text)
            while not reader.done() and going_on():
                oldest = next(iter(unacked.values()), None)
                if oldest is not None and loop.time() - max(oldest, opened) > ACK_WAIT:
                    traffic.note(name, f"no ack for {ACK_WAIT:.0f} s, leaving")
                    break  # no answer: a connection to a host that is gone
                while retry:
                    await _send(ws, retry.pop(0))
                if not stop.is_set():
                    text = f"{name}-{next(counter)}"
                    traffic.texts.append(text)
                    unacked[text] = loop.time()
                    await _send(ws, text)
                    traffic.sent += 1
                await asyncio.sleep(PUBLISH_EVERY)
        except ConnectionClosed:
            pass
        finally:
            await ws.close()
            await reader
        if unacked:
            await asyncio.sleep(random.uniform(0, 1))  # noqa: S311 (not a secret)
    traffic.note(name, f"done, {len(unacked)} unacknowledged")


@contextmanager
def room_traffic(addresses: list[str], room: str) -> Iterator[RoomTraffic]:
    """Members on every address and a publisher on each, for the ``with`` block. At its end
    the publishers stop first; the members stay until each has the last message any of
    them got (or :data:`CATCH_UP` seconds), so one still on its way counts, not as missed."""
    count = MEMBERS_PER_HOST * len(addresses)
    traffic = RoomTraffic(members=[Member(addresses[n % len(addresses)]) for n in range(count)])

    def caught_up() -> bool:
        return len({m.last_id for m in traffic.members}) == 1

    # In every publisher's name: the texts are the references, and the room's stream
    # recognises a reference again for an hour (a kept fleet's next run).
    run = secrets.token_hex(3)

    async def scenario(stopping: asyncio.Event, ready: threading.Event) -> None:
        context = client_context(ca_file())
        leaving = asyncio.Event()
        members = [
            asyncio.create_task(_member(member.address, room, context, member, traffic, leaving))
            for member in traffic.members
        ]
        while traffic.handshakes.done < len(members):  # noqa: ASYNC110 - a count, not an event
            await asyncio.sleep(0.1)
        publishers = [
            asyncio.create_task(
                _publisher(address, room, f"p{n}-{run}", context, traffic, stopping)
            )
            for n, address in enumerate(addresses)
        ]
        ready.set()
        await stopping.wait()
        await asyncio.gather(*publishers)
        deadline = time.monotonic() + CATCH_UP
        while not caught_up() and time.monotonic() < deadline:  # noqa: ASYNC110 - ids, not an event
            await asyncio.sleep(0.1)
        leaving.set()
        await asyncio.gather(*members)

    with in_background(scenario, not_ready=lambda: str(traffic.handshakes.failures[:3])):
        yield traffic


def reference_order(traffic: RoomTraffic) -> list[str]:
    """The room's messages in their one order: every message any member got, by id."""
    order: dict[int, str] = {}
    for member in traffic.members:
        for number, text in member.received:
            assert number is not None, f"a message without an id: {text}"
            assert order.setdefault(number, text) == text, f"id {number} is two messages"
    return [order[number] for number in sorted(order)]


def _who_missed(traffic: RoomTraffic, reference: list[str]) -> Iterator[str]:
    """A line per member that missed messages: where, how many, the runs of the room's
    order it missed (by position), its closes and the instances it resumed on."""
    position = {text: n for n, text in enumerate(reference)}
    for n, member in enumerate(traffic.members):
        got = {text for _, text in member.received}
        gone = sorted(position[t] for t in set(reference) - got)
        if not gone:
            continue
        runs: list[list[int]] = []
        for index in gone:
            if runs and index == runs[-1][1] + 1:
                runs[-1][1] = index
            else:
                runs.append([index, index])
        shown = ", ".join(f"{a}-{b}" for a, b in runs[:6]) + (" ..." if len(runs) > 6 else "")
        resumed = [f"{e.get('instance')}@{e.get('since')}" for e in member.resumed]
        yield (f"member {n} via {member.address}: {len(gone)} of {len(reference)} missed "
               f"({len(runs)} runs: {shown}); closes {dict(member.closes)}; "
               f"resumed {resumed}")  # fmt: skip


def assert_nothing_lost(
    traffic: RoomTraffic, closes_allowed: frozenset[int] = frozenset(RECONNECT_CODES)
) -> dict[str, object]:
    """Every member got the room's every message once, in the one order; 0 failed
    handshakes; only 1001/1012 closes (or ``closes_allowed``). Returns the figures."""
    reference = reference_order(traffic)
    missed = duplicated = disordered = 0
    for member in traffic.members:
        texts = [text for _, text in member.received]
        ids = [number for number, _ in member.received]
        duplicated += len(texts) - len(set(texts))
        disordered += sum(1 for a, b in itertools.pairwise(ids) if a and b and b <= a)
        missed += len(set(reference) - set(texts))
    closes = Counter[int]()
    for member in traffic.members:
        closes.update(member.closes)
    # Each text sent was acknowledged, with one id (however often it was sent), the id
    # the members got it with.
    delivered = {text: n for member in traffic.members for n, text in member.received}
    unacked = [text for text in traffic.texts if text not in traffic.acks]
    acked_twice = {t: n for t, n in traffic.acks.items() if len(set(n)) > 1}
    ack_mismatch = [t for t, n in traffic.acks.items() if delivered.get(t) not in (None, n[0])]
    figures = {
        "published": len(reference), "sent": traffic.sent, "missed": missed,
        "unacked": len(unacked), "acked_with_two_ids": len(acked_twice),
        "ack_not_the_delivered_id": len(ack_mismatch), "refused": len(traffic.refused),
        "sent_again": sum(len(n) - 1 for n in traffic.acks.values()),
        "duplicated": duplicated, "out_of_order": disordered,
        "failed_handshakes": len(traffic.handshakes.failures), "closes": dict(closes),
        "max_closes_per_member": max(sum(m.closes.values()) for m in traffic.members),
        "restored": sum(int(str(e["restored"])) for m in traffic.members for e in m.resumed),
        "incomplete": sum(1 for m in traffic.members for e in m.resumed if not e["complete"]),
    }
    print(f"\nroom traffic: {figures}")
    if unacked:
        print("\n".join(traffic.publishing))
    for text in ack_mismatch[:5]:
        print(f"acked {text} as {traffic.acks[text]}, delivered as {delivered.get(text)}")
    for line in _who_missed(traffic, reference):
        print(line)
    assert traffic.handshakes.failures == []
    assert set(closes) <= closes_allowed, closes
    assert (unacked, acked_twice, ack_mismatch) == ([], {}, []), figures
    # Every acknowledged message reached the members (missed counts those that did).
    assert set(traffic.acks) <= set(reference), figures
    assert traffic.refused == [], traffic.refused[:5]
    assert (missed, duplicated, disordered) == (0, 0, 0), figures
    assert figures["incomplete"] == 0, figures
    assert len(reference) > 0
    return figures
