"""A load generator outside the hosts, for tests of releases on a live fleet.

Long-lived clients exchange numbered messages on every host (resending, after a
reconnect, what a 1001/1012 close left unanswered, as a client of a restarting service
does); others open a fresh wss connection about ten times a second.
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

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.demo import ca_file

__all__ = ["Load", "assert_no_failures", "load_on", "summary"]

LONG_LIVED_PER_HOST = 30
NEW_PER_SECOND = 10
RECONNECT_CODES = {1001, 1012}


@dataclass
class Load:
    """What the clients saw."""

    handshakes: int = 0
    failed_handshakes: list[str] = field(default_factory=list)
    closes: Counter[int] = field(default_factory=Counter)
    replies: int = 0
    lost_replies: int = 0
    reconnects: list[float] = field(default_factory=list)


async def long_lived(
    address: str, name: str, context: ssl.SSLContext, load: Load, stop: asyncio.Event
) -> None:
    """Send a numbered message every 0.3 s; after a 1001/1012 close, reconnect and resend."""
    pending: str | None = None
    counter = itertools.count()
    while not stop.is_set():
        started = time.monotonic()
        try:
            ws: ClientConnection = await connect(
                f"wss://{address}/ws/{name}", ssl=context, open_timeout=10
            )
        except Exception as error:  # every failure is counted, not raised
            load.failed_handshakes.append(f"{name}: {error!r}")
            await asyncio.sleep(0.5)
            continue
        load.handshakes += 1
        if load.closes:
            load.reconnects.append(time.monotonic() - started)
        try:
            while not stop.is_set():
                pending = pending or f"{name}-{next(counter)}"
                await ws.send(pending)
                reply = await asyncio.wait_for(ws.recv(), 10)
                if reply != pending:
                    load.lost_replies += 1
                load.replies += 1
                pending = None
                await asyncio.sleep(0.3)
            await ws.close()
            return
        except ConnectionClosed:
            code = ws.close_code if ws.close_code is not None else 1006
            load.closes[code] += 1
            if code not in RECONNECT_CODES:
                return
        except TimeoutError:
            load.lost_replies += 1
            await ws.close()


async def new_connections(
    addresses: list[str], context: ssl.SSLContext, load: Load, stop: asyncio.Event
) -> None:
    """Open a fresh connection NEW_PER_SECOND times a second, round robin over the hosts."""

    async def one(address: str, number: int) -> None:
        try:
            async with connect(
                f"wss://{address}/ws/new-{number}", ssl=context, open_timeout=10
            ) as ws:
                load.handshakes += 1
                await ws.send("hello")
                if await asyncio.wait_for(ws.recv(), 10) != "hello":
                    load.lost_replies += 1
        except Exception as error:  # every failure is counted, not raised
            load.failed_handshakes.append(f"new {address}: {error!r}")

    tasks = []
    for number in itertools.count():
        if stop.is_set():
            break
        tasks.append(asyncio.create_task(one(addresses[number % len(addresses)], number)))
        await asyncio.sleep(1 / NEW_PER_SECOND)
    await asyncio.gather(*tasks)


def run_load(
    addresses: list[str], load: Load, stop: threading.Event, ready: threading.Event
) -> None:
    async def main() -> None:
        context = ssl.create_default_context(cafile=str(ca_file()))
        stopping = asyncio.Event()
        clients = [
            asyncio.create_task(long_lived(address, f"{i}-{n}", context, load, stopping))
            for i, address in enumerate(addresses)
            for n in range(LONG_LIVED_PER_HOST)
        ]
        opener = asyncio.create_task(new_connections(addresses, context, load, stopping))
        while load.handshakes < len(clients):  # noqa: ASYNC110 - a count, not an event
            await asyncio.sleep(0.1)
        ready.set()
        await asyncio.to_thread(stop.wait)
        stopping.set()
        await asyncio.gather(opener, *clients)

    asyncio.run(main())


@contextmanager
def load_on(addresses: list[str]) -> Iterator[Load]:
    """Keep the load running on the hosts for the duration of the with block."""
    load = Load()
    stop, ready = threading.Event(), threading.Event()
    worker = threading.Thread(target=run_load, args=(addresses, load, stop, ready), daemon=True)
    worker.start()
    try:
        assert ready.wait(60), f"the load did not start: {load.failed_handshakes[:3]}"
        yield load
        time.sleep(2)  # some traffic after the last restart
    finally:
        stop.set()
        worker.join(60)


def assert_no_failures(load: Load) -> None:
    """0 failed handshakes, only 1001/1012 closes, 0 lost replies."""
    assert load.failed_handshakes == []
    assert set(load.closes) <= RECONNECT_CODES, load.closes
    assert load.lost_replies == 0


def summary(load: Load) -> str:
    waits = sorted(load.reconnects) or [0.0]
    return (
        f"{load.handshakes} handshakes, closes {dict(load.closes)}, reconnect "
        f"p50 {waits[len(waits) // 2]:.3f}s max {waits[-1]:.3f}s"
    )
