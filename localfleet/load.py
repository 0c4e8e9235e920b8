"""WebSocket clients that load the fleet: the counters, connection loop and runners that the
release tests (tests/fleet/load.py) and the bench (bench/loadgen.py) share; each of those
keeps only its own scenarios.

- :class:`Tally` counts one kind of operation (handshakes, replies, ...): done, failed and
  why, and latencies with their percentiles.
- :func:`open_counted` opens one wss/ws connection and counts the handshake in a tally.
- :func:`run_async` runs a scenario on uvloop when it is installed (as on the hosts).
- :func:`in_workers` runs a scenario in several processes, each reporting its CPU, so a
  saturated client shows in the figures instead of passing for a slow server.
- :func:`in_background` keeps a scenario running in a thread for a ``with`` block.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

__all__ = [
    "Tally",
    "client_context",
    "in_background",
    "in_workers",
    "open_counted",
    "quantile",
    "run_async",
]

T = TypeVar("T")
TallyT = TypeVar("TallyT", bound="Tally")

# Failure messages kept per tally, for a test's assertion message (counts keep them all).
KEPT_FAILURES = 20


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank), nan when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Tally:
    """One kind of operation, counted: done, failed (by error type), latencies in seconds."""

    done: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the first few, with their context
    latencies: list[float] = field(default_factory=list)

    def ok(self, latency: float | None = None) -> None:
        self.done += 1
        if latency is not None:
            self.latencies.append(latency)

    def fail(self, error: BaseException | str, context: str = "") -> None:
        """Count a failure; ``error`` an exception (counted by type) or a reason."""
        name = error if isinstance(error, str) else type(error).__name__
        self.failed += 1
        self.errors[name] = self.errors.get(name, 0) + 1
        if len(self.failures) < KEPT_FAILURES:
            text = error if isinstance(error, str) else repr(error)
            self.failures.append(f"{context}: {text}" if context else text)

    def quantile(self, q: float) -> float:
        """The q-quantile of the latencies, in milliseconds (nan when there are none)."""
        return quantile(self.latencies, q) * 1000

    def merge(self: TallyT, other: TallyT) -> None:
        self.done += other.done
        self.failed += other.failed
        for error, count in other.errors.items():
            self.errors[error] = self.errors.get(error, 0) + count
        self.failures += other.failures[: max(0, KEPT_FAILURES - len(self.failures))]
        self.latencies += other.latencies


def client_context(ca_file: str | Path | None) -> ssl.SSLContext | None:
    """TLS that verifies the server against the fleet's CA (None for ws:// targets)."""
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file else None


async def open_counted(
    url: str, context: ssl.SSLContext | None, tally: Tally, context_label: str = "", **options: Any
) -> ClientConnection | None:
    """Open a connection, counting its handshake (and its time) in ``tally``; None if refused.

    Every failure is a figure, never an exception: refused, timed out, reset, bad status.
    """
    started = time.monotonic()
    try:
        ws = await connect(url, ssl=context, **options)
    except Exception as error:  # every refusal is counted, not raised
        tally.fail(error, context_label or url)
        return None
    tally.ok(time.monotonic() - started)
    return ws


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on uvloop when it is installed (as on the hosts), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _worker(
    scenario: Callable[..., Coroutine[Any, Any, Any]],
    args: tuple[Any, ...],
    failed: Callable[[BaseException], Any],
    out: Any,
) -> None:
    started = time.process_time()
    wall = time.monotonic()
    try:
        result = run_async(scenario(*args))
    except Exception as error:  # reported to the parent, which fails loudly
        result = failed(error)
    cpu = (time.process_time() - started) / max(time.monotonic() - wall, 1e-9)
    out.put((result, cpu))
    out.close()
    out.join_thread()
    os._exit(0)  # drop every connection at once, without closing handshakes


def in_workers(
    scenario: Callable[..., Coroutine[Any, Any, T]],
    args_of: Callable[[int], tuple[Any, ...]],
    workers: int,
    timeout: float,
    failed: Callable[[BaseException], T],
    while_running: Callable[[], None] | None = None,
) -> list[tuple[T, float]]:
    """Run ``scenario(*args_of(i))`` in process i of ``workers``.

    Args:
        scenario: a coroutine function; its result must pickle.
        args_of: the arguments of process i.
        workers: how many processes.
        timeout: seconds to wait for each process's result.
        failed: the result of a process whose scenario raised.
        while_running: called once the processes started (a scenario that holds its
            connections is measured there, then released).

    Returns:
        Each process's result with the share of one core its process used.
    """
    queue: multiprocessing.Queue[tuple[T, float]] = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(
            target=_worker, args=(scenario, args_of(i), failed, queue), daemon=True
        )
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    results = []
    try:
        if while_running is not None:
            while_running()
        for _ in processes:
            results.append(queue.get(timeout=timeout))
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
    return results


@contextmanager
def in_background(
    scenario: Callable[[asyncio.Event, threading.Event], Coroutine[Any, Any, None]],
    ready_timeout: float = 60.0,
    not_ready: Callable[[], str] = lambda: "",
) -> Iterator[None]:
    """Keep ``scenario(stopping, ready)`` running in a thread for the ``with`` block.

    The scenario sets ``ready`` once its clients are connected (the block starts then) and
    returns soon after ``stopping`` is set (when the block ends).
    """
    stop, ready = threading.Event(), threading.Event()

    async def main() -> None:
        stopping = asyncio.Event()
        task = asyncio.create_task(scenario(stopping, ready))
        await asyncio.to_thread(stop.wait)
        stopping.set()
        await task

    worker = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    worker.start()
    try:
        if not ready.wait(ready_timeout):
            raise AssertionError(f"the load did not start: {not_ready()}")
        yield
    finally:
        stop.set()
        worker.join(60)
