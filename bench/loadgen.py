"""The load generator of `make bench`: asyncio WebSocket clients in several processes.

Each scenario runs in ``workers`` processes on uvloop (when installed, as on the hosts),
and every process reports the CPU time it used, so a saturated client shows in the
figures instead of passing for a slow server. Latencies are measured from the moment a
message was due, not from when it was sent: a client that falls behind its schedule
counts the delay (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

__all__ = ["Result", "echo_at_rate", "echo_closed_loop", "handshakes", "hold_idle", "in_workers"]


@dataclass
class Result:
    """What one scenario measured, merged over its client processes."""

    seconds: float = 0.0
    done: int = 0  # replies received, handshakes completed or connections opened
    failed: int = 0  # replies lost, handshakes or connections refused
    latencies: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)  # share of one core, per process
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def quantile(self, q: float) -> float:
        """The q-quantile of the latencies, in milliseconds (nan when there are none)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def merge(self, other: Result) -> None:
        self.seconds = max(self.seconds, other.seconds)
        self.done += other.done
        self.failed += other.failed
        self.latencies += other.latencies
        self.client_cpu += other.client_cpu
        for error, count in other.errors.items():
            self.errors[error] = self.errors.get(error, 0) + count


def client_context(ca_file: str | None) -> ssl.SSLContext | None:
    """TLS that verifies the server against the fleet's CA (None for ws:// targets)."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else None


def _run(coroutine: Coroutine[Any, Any, Result]) -> Result:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _note(result: Result, error: BaseException) -> None:
    name = type(error).__name__
    result.errors[name] = result.errors.get(name, 0) + 1


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
                result.latencies.append(clock() - due_times.popleft())
                result.done += 1

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
            _note(result, error)  # what never came back counts as failed below

    outcomes = await asyncio.gather(
        *(one(ws, i * interval / connections) for i, ws in enumerate(sockets)),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            _note(result, outcome)
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
            result.latencies.append(time.monotonic() - sent)
            result.done += 1

    for outcome in await asyncio.gather(*(one(ws) for ws in sockets), return_exceptions=True):
        if isinstance(outcome, BaseException):
            _note(result, outcome)
            result.failed += 1
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return result


async def handshakes(url: str, ca_file: str | None, seconds: float, concurrency: int) -> Result:
    """New connections back to back: TCP, a full TLS handshake and the WebSocket upgrade."""
    result = Result(seconds=seconds)
    context = client_context(ca_file)
    deadline = time.monotonic() + seconds

    async def one() -> None:
        while (started := time.monotonic()) < deadline:
            try:
                ws = await connect(url, ssl=context, open_timeout=10, ping_interval=None)
            except Exception as error:  # every refusal is a figure
                _note(result, error)
                result.failed += 1
                continue
            result.latencies.append(time.monotonic() - started)
            result.done += 1
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
                _note(result, error)
                result.failed += 1
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


def _worker(
    scenario: Callable[..., Coroutine[Any, Any, Result]], args: tuple[Any, ...], out: Any
) -> None:
    started = time.process_time()
    wall = time.monotonic()
    try:
        result = _run(scenario(*args))
    except Exception as error:  # reported to the parent, which fails loudly
        result = Result(failed=1)
        _note(result, error)
    result.client_cpu = [(time.process_time() - started) / max(time.monotonic() - wall, 1e-9)]
    out.put(result)
    out.close()
    out.join_thread()
    os._exit(0)  # drop every connection at once, without closing handshakes


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
    queue: multiprocessing.Queue[Result] = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=_worker, args=(scenario, args_of(i), queue), daemon=True)
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    merged = Result()
    try:
        if while_running is not None:
            while_running()
        for _ in processes:
            merged.merge(queue.get(timeout=timeout))
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
    return merged
