"""Benchmark of one app process on loopback: echo throughput and memory per connection.

    .venv/bin/python bench/app_bench.py [--seconds 5] [--idle 1000]

Prints, measured side by side in one run:
- echo messages/s of one process at 64 B and 16 KiB (clients in separate processes, so
  the client is not the bottleneck; client CPU is printed too);
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
import time
from pathlib import Path

from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def start_server(*args: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", "0", "--log-level", "warning", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # At warning level the "listening" line is not logged: find the port in /proc.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        port = listening_port(process.pid)
        if port:
            return process, port
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the app did not start listening")


def listening_port(pid: int) -> int | None:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if match := re.match(r"socket:\[(\d+)\]", target):
            inodes.add(match[1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                return int(fields[1].rsplit(":", 1)[1], 16)
    return None


def rss_kib(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE // 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def stop(process: subprocess.Popen[str]) -> None:
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


def echo_worker(url: str, size: int, seconds: float, connections: int, out: object) -> None:
    started = time.process_time()
    count = asyncio.run(echo_client(url, size, seconds, connections))
    out.put((count, time.process_time() - started))  # type: ignore[attr-defined]


def echo_throughput(size: int, seconds: float, workers: int = 2, per_worker: int = 16) -> None:
    server, port = start_server("--compression", "none", "--max-size", str(1 << 20))
    try:
        queue: multiprocessing.Queue[tuple[int, float]] = multiprocessing.Queue()
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


async def hold_idle(url: str, count: int, compression: str | None, ready: object) -> None:
    clients = []
    for _ in range(count):
        clients.append(await connect(url, compression=compression, ping_interval=None))
    ready.set()  # type: ignore[attr-defined]
    await asyncio.sleep(3600)


def idle_worker(url: str, count: int, compression: str | None, ready: object) -> None:
    asyncio.run(hold_idle(url, count, compression, ready))


def rss_per_thousand(compression: str, idle: int) -> float:
    server, port = start_server("--compression", compression)
    try:
        # Let the process warm up (first connection imports and allocates once).
        asyncio.run(echo_client(f"ws://127.0.0.1:{port}", 64, 0.2, 4))
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
    for size in (64, 16 * 1024):
        echo_throughput(size, args.seconds)
    deflate = rss_per_thousand("deflate", args.idle)
    none = rss_per_thousand("none", args.idle)
    print(f"ratio rss_per_1k deflate/none: {deflate / none:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
