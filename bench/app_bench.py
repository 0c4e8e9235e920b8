"""Benchmark of one app process on loopback: echo throughput and memory per connection.

    .venv/bin/python bench/app_bench.py [--seconds 5] [--idle 1000]

Prints, measured side by side in one run:
- echo messages/s of one process at 64 B and 16 KiB (clients in separate processes on
  uvloop, so the client is not the bottleneck; client CPU is printed too);
- RSS per 1,000 idle connections with permessage-deflate on and off.
Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import IO, Any, TypeAlias, TypeVar

from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")
# A string: multiprocessing's Queue is not subscriptable at run time.
Results: TypeAlias = "Queue[tuple[int, float]]"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run the clients on uvloop when it is there, as the server does: cheaper clients."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def start_server(logs: IO[str], *args: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``python -m app`` on a free port, logging to ``logs``; returns it and its port."""
    log = Path(logs.name)
    # Every server appends to the same file: read only what this one writes.
    offset = log.stat().st_size
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", "0", *args],
        cwd=REPO,
        stdout=logs,
        stderr=subprocess.STDOUT,
    )
    # A file, not a pipe: nobody reads the log while the bench runs, and a full pipe
    # would stall the server.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        if match := re.search(r"event=listening port=(\d+)", log.read_text()[offset:]):
            return process, int(match[1])
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"the app did not start listening: {log.read_text()[offset:]}")


def rss_kib(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE // 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- echo throughput -------------------------------------------------------------------


async def echo_client(url: str, size: int, seconds: float, connections: int) -> int:
    payload = b"x" * size
    deadline = time.monotonic() + seconds
    count = 0

    async def one() -> None:
        nonlocal count
        async with connect(url, compression=None, max_size=None) as ws:
            while time.monotonic() < deadline:
                await ws.send(payload)
                await ws.recv()
                count += 1

    await asyncio.gather(*(one() for _ in range(connections)))
    return count


def echo_worker(url: str, size: int, seconds: float, connections: int, out: Results) -> None:
    started = time.process_time()
    count = run(echo_client(url, size, seconds, connections))
    out.put((count, time.process_time() - started))


def echo_throughput(
    logs: IO[str], size: int, seconds: float, workers: int = 2, per_worker: int = 16
) -> None:
    server, port = start_server(logs, "--compression", "none")
    try:
        queue: Results = multiprocessing.Queue()
        cpu_before = cpu_seconds(server.pid)
        processes = [
            multiprocessing.Process(
                target=echo_worker,
                args=(f"ws://127.0.0.1:{port}", size, seconds, per_worker, queue),
            )
            for _ in range(workers)
        ]
        for p in processes:
            p.start()
        results = [queue.get(timeout=seconds + 60) for _ in processes]
        for p in processes:
            p.join()
        server_cpu = cpu_seconds(server.pid) - cpu_before
    finally:
        stop(server)
    messages = sum(r[0] for r in results)
    client_cpu = sum(r[1] for r in results)
    print(
        f"echo {size:>6} B: {messages / seconds:>9,.0f} messages/s "
        f"({workers * per_worker} connections; server CPU {server_cpu / seconds:.0%}, "
        f"clients CPU {client_cpu / seconds:.0%} over {workers} processes)"
    )


# --- memory per idle connection ------------------------------------------------------------


async def hold_idle(url: str, count: int, compression: str | None, ready: Event) -> None:
    clients = []
    for _ in range(count):
        clients.append(await connect(url, compression=compression, ping_interval=None))
    ready.set()
    await asyncio.sleep(3600)


def idle_worker(url: str, count: int, compression: str | None, ready: Event) -> None:
    run(hold_idle(url, count, compression, ready))


def rss_per_thousand(logs: IO[str], compression: str, idle: int) -> float:
    server, port = start_server(logs, "--compression", compression)
    try:
        # Let the process warm up (first connection imports and allocates once).
        run(echo_client(f"ws://127.0.0.1:{port}", 64, 0.2, 4))
        time.sleep(0.5)
        before = rss_kib(server.pid)
        ready = multiprocessing.Event()
        holder = multiprocessing.Process(
            target=idle_worker,
            args=(f"ws://127.0.0.1:{port}", idle, "deflate" if compression == "deflate" else None,
                  ready),
        )  # fmt: skip
        holder.start()
        if not ready.wait(120):
            raise RuntimeError("idle connections did not open")
        time.sleep(1)
        after = rss_kib(server.pid)
        holder.terminate()
        holder.join()
    finally:
        stop(server)
    per_thousand = (after - before) / idle * 1000 / 1024
    print(f"idle {compression:>7}: RSS {before} KiB -> {after} KiB with {idle} connections: "
          f"{per_thousand:.1f} MiB per 1,000 connections")  # fmt: skip
    return per_thousand


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections to open")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    # Figures from a busy machine are not comparable with a quiet one's: say which it was.
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.NamedTemporaryFile("w", prefix="app_bench-", suffix=".log") as logs:
        for size in (64, 16 * 1024):
            echo_throughput(logs, size, args.seconds)
        deflate = rss_per_thousand(logs, "deflate", args.idle)
        none = rss_per_thousand(logs, "none", args.idle)
    print(f"ratio rss_per_1k deflate/none: {deflate / none:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
