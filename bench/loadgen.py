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
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from localfleet import load
from localfleet.load import Tally, client_context, open_counted

__all__ = ["Result", "echo_at_rate", "echo_closed_loop", "handshakes", "hold_idle", "in_workers"]


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

    def merge(self, other: Result) -> None:  # type: ignore[override]
        super().merge(other)
        self.seconds = max(self.seconds, other.seconds)
        self.client_cpu += other.client_cpu


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
) -> Result:
    """Open ``count`` connections and hold them, answering the server's pings, until released.

    Shared with the parent: ``opened`` counts connections open, ``ramped`` the processes
    done opening theirs; ``release`` (an event) ends the hold.
    """
    result = Result()
    context = client_context(ca_file)
    gate = asyncio.Semaphore(concurrency)
    held: list[ClientConnection] = []
    started = time.monotonic()

    async def one() -> None:
        async with gate:
            try:
                held.append(
                    await connect(
                        url,
                        ssl=context,
                        compression=compression,
                        open_timeout=30,
                        ping_interval=None,
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
    loop = asyncio.get_running_loop()
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


# --- processes --------------------------------------------------------------------------------


def _failed(error: BaseException) -> Result:
    result = Result()
    result.fail(error)
    return result


def in_workers(
    scenario: Callable[..., Coroutine[Any, Any, Result]],
    args_of: Callable[[int], tuple[Any, ...]],
    workers: int,
    timeout: float,
    while_running: Callable[[], None] | None = None,
) -> Result:
    """Run ``scenario(*args_of(i))`` in process i of ``workers``; the merged result.

    ``while_running`` is called once the processes started (the idle scenario measures the
    hosts there, then releases its clients).
    """
    merged = Result()
    for result, cpu in load.in_workers(scenario, args_of, workers, timeout, _failed, while_running):
        result.client_cpu = [cpu]
        merged.merge(result)
    return merged
