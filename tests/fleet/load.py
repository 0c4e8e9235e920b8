"""The load of the release tests: clients on a live fleet while a release goes out.

Long-lived clients exchange numbered messages on every host (resending, after a
reconnect, what a 1001/1012 close left unanswered, as a client of a restarting service
does); others open a fresh wss connection about ten times a second, each for one
message (sent again on a new connection after a 1001/1012 close, once).

The demo's handler is the chat room, whose messages the bus stores: a message that the
closing instance had received and stored, but whose copy did not reach the client before
the close, is in the room once more when the client sends it again. That one extra copy
of a resent message is the client's own doing and counted apart (``Load.resent_twice``);
any other reply that is not the one awaited is a failure. The counters and the
connection loop are the shared ones of :mod:`localfleet.load`.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed

from localfleet.demo import ca_file
from localfleet.load import Tally, client_context, in_background, open_counted, quantile

__all__ = ["Load", "assert_each_closed_at_most_once", "assert_no_failures", "load_on", "summary"]

LONG_LIVED_PER_HOST = 30
NEW_PER_SECOND = 10
RECONNECT_CODES = {1001, 1012}
_LOADS = itertools.count()  # tells apart the rooms of loads running at once


@dataclass
class Load:
    """What the clients saw."""

    handshakes: Tally = field(default_factory=Tally)
    replies: Tally = field(default_factory=Tally)  # failed: lost or wrong replies
    closes: Counter[int] = field(default_factory=Counter)
    closed: Counter[str] = field(default_factory=Counter)  # each long-lived client's closes
    reconnects: list[float] = field(default_factory=list)
    resent_twice: int = 0  # resent messages whose first copy came back too


async def long_lived(
    address: str,
    name: str,
    context: ssl.SSLContext | None,
    load: Load,
    stop: asyncio.Event,
    **options: Any,
) -> None:
    """Send a numbered message every 0.3 s; after a 1001/1012 close, reconnect and resend."""
    pending: str | None = None
    # Sent again after a close: each may come back once more (its first copy, stored).
    resent: set[str] = set()
    counter = itertools.count()
    while not stop.is_set():
        started = time.monotonic()
        ws = await open_counted(f"wss://{address}/ws/{name}", context, load.handshakes, name,
                                open_timeout=10, **options)  # fmt: skip
        if ws is None:
            await asyncio.sleep(0.5)
            continue
        if load.closes:
            load.reconnects.append(time.monotonic() - started)
        if pending is not None:
            resent.add(pending)
        try:
            while not stop.is_set():
                pending = pending or f"{name}-{next(counter)}"
                await ws.send(pending)
                reply = await asyncio.wait_for(ws.recv(), 10)
                while reply != pending and reply in resent:
                    resent.discard(reply)
                    load.resent_twice += 1
                    reply = await asyncio.wait_for(ws.recv(), 10)
                if reply == pending:
                    load.replies.ok()
                else:
                    load.replies.fail(f"got {reply!r}", pending)
                pending = None
                await asyncio.sleep(0.3)
            await ws.close()
            return
        except ConnectionClosed:
            code = ws.close_code if ws.close_code is not None else 1006
            load.closes[code] += 1
            load.closed[name] += 1
            if code not in RECONNECT_CODES:
                return
        except TimeoutError:
            load.replies.fail("no reply within 10 s", pending or name)
            await ws.close()


async def new_connections(
    addresses: list[str],
    context: ssl.SSLContext | None,
    load: Load,
    stop: asyncio.Event,
    tag: str = "",
    **options: Any,
) -> None:
    """Open a fresh connection NEW_PER_SECOND times a second, round robin over the hosts
    (paths /ws/new<tag>-<number>)."""

    async def one(address: str, number: int) -> None:
        # A connection opened just as its instance began to drain is closed with 1012
        # before its reply, like every other: the client sends again on a new one, once.
        # So does one whose instance was killed (1006, which assert_no_failures allows
        # only for the clients of an instance killed on purpose).
        for attempt in range(2):
            ws = await open_counted(f"wss://{address}/ws/new{tag}-{number}", context,
                                    load.handshakes, f"new {address}", open_timeout=10,
                                    **options)  # fmt: skip
            if ws is None:
                return
            try:
                async with ws:
                    await ws.send("hello")
                    reply = await asyncio.wait_for(ws.recv(), 10)
                    if reply == "hello":
                        load.replies.ok()
                    else:
                        load.replies.fail(f"got {reply!r}", f"new {address}")
                return
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd is not None else 1006
                load.closes[code] += 1
                if code not in RECONNECT_CODES | {1006} or attempt:
                    load.replies.fail(closed, f"new {address}")
                    return
            except Exception as error:  # every failure is counted, not raised
                load.replies.fail(error, f"new {address}")
                return

    tasks = []
    for number in itertools.count():
        if stop.is_set():
            break
        tasks.append(asyncio.create_task(one(addresses[number % len(addresses)], number)))
        await asyncio.sleep(1 / NEW_PER_SECOND)
    await asyncio.gather(*tasks)


@contextmanager
def load_on(
    addresses: list[str], ca: Path | None = None, server_name: str | None = None
) -> Iterator[Load]:
    """Keep the load running on the hosts for the duration of the with block, verifying
    them against ``ca`` (the private CA's by default) for ``server_name`` (their address)."""
    load = Load()
    options = {"server_hostname": server_name} if server_name else {}
    # Each path is a chat room of its own (the demo's handler): two loads at once (through
    # a balancer and straight to the hosts) must not share one, or each client would get
    # the other's messages as replies.
    tag = f"{next(_LOADS)}"

    async def scenario(stopping: asyncio.Event, ready: threading.Event) -> None:
        context = client_context(ca or ca_file())
        clients = [
            asyncio.create_task(
                long_lived(address, f"{tag}-{i}-{n}", context, load, stopping, **options)
            )
            for i, address in enumerate(addresses)
            for n in range(LONG_LIVED_PER_HOST)
        ]
        opener = asyncio.create_task(
            new_connections(addresses, context, load, stopping, tag, **options)
        )
        while load.handshakes.done < len(clients):  # noqa: ASYNC110 - a count, not an event
            await asyncio.sleep(0.1)
        ready.set()
        await stopping.wait()
        await asyncio.gather(opener, *clients)

    with in_background(scenario, not_ready=lambda: str(load.handshakes.failures[:3])):
        yield load
        time.sleep(2)  # some traffic after the last restart


def assert_no_failures(load: Load, killed: int = 0) -> None:
    """0 failed handshakes, only 1001/1012 closes (and 1006 for at most ``killed`` clients:
    those of an instance killed on purpose), 0 lost replies."""
    assert load.handshakes.failures == []
    assert set(load.closes) - {1006} <= RECONNECT_CODES, load.closes
    assert load.closes.get(1006, 0) <= killed, load.closes
    assert load.replies.failed == 0, load.replies.failures


def assert_each_closed_at_most_once(load: Load) -> None:
    """No long-lived client was closed twice: a release reached each once (a handover,
    roles/app/tasks/handover.yml), never an instance after another on the same host."""
    twice = {name: count for name, count in load.closed.items() if count > 1}
    assert not twice, f"clients closed more than once: {twice}"


def summary(load: Load) -> str:
    waits = load.reconnects or [0.0]
    return (
        f"{load.handshakes.done} handshakes, closes {dict(load.closes)} "
        f"(at most {max(load.closed.values(), default=0)} per client), reconnect "
        f"p50 {quantile(waits, 0.5):.3f}s max {max(waits):.3f}s, "
        f"{load.resent_twice} resent messages back twice"
    )
