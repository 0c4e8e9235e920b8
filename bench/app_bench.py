"""Benchmark of one app process on loopback: echo throughput and memory per connection.

    .venv/bin/python bench/app_bench.py [--seconds 5] [--idle 1000]

Prints, measured side by side in one run:
- echo messages/s of one process at 64 B and 16 KiB (clients in separate processes on
  uvloop, so the client is not the bottleneck; client CPU is printed too);
- RSS per 1,000 idle connections with permessage-deflate on and off;
- a table over permessage-deflate settings (window bits, memLevel) and none: KiB per
  connection just opened and again after each one echoed a few chat events (zlib
  allocates on first use), and bytes on the wire per payload byte of a chat stream.
Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
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

from websockets.asyncio.client import ClientConnection, connect

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


# --- permessage-deflate settings: memory after traffic, compression ratio ---------------

# (window bits, memLevel): zlib's default, websockets' default, then smaller.
DEFLATE_POINTS = [(15, 8), (12, 5), (11, 4), (10, 3), (9, 1)]
NAMES = ("alice", "bob", "chen", "dmitri", "eva", "farah", "gus", "hana", "ivan", "jo",
         "kemal", "lena", "mo", "nadia", "oscar", "priya")  # fmt: skip
USERS = [f"{name}{n}" for name in NAMES for n in (7, 42)]
ROOMS = ["lobby", "general", "random", "support", "dev-backend", "dev-frontend",
         "release-2.4", "ops-oncall", "design", "sales-emea"]  # fmt: skip
# Most frequent first: words are drawn with weight 1/rank (Zipf), as in real chat text.
VOCABULARY_TEXT = """
the I to you a and it is that for we on in this of be do not have with can just so it's
but are what was at if ok me now will get my yes no i'm one all about there up from
thanks out think see know like did should could would need time today back go sure
good let's when how why yeah still also more look check try fix deploy build test
review merge ship release branch main prod staging server client error logs latency
timeout retry cache queue metrics dashboard alert ticket meeting lunch tomorrow later
week morning afternoon anyone someone update issue bug patch hotfix rollback version
config nginx websocket json payload memory cpu disk network database query index slow
fast broken works working done pushed approved waiting blocked customer team call
sync doc docs link PR CI pipeline failing green red flaky rerun locally reproduce
please great nice agreed thank cool sorry wait hmm interesting weird strange exactly
maybe probably definitely actually already again first last next before after while
"""
VOCABULARY = VOCABULARY_TEXT.split()


def chat_events(count: int, seed: int = 20261129) -> list[str]:
    """``count`` JSON events of a chat service, the same ones on every run.

    Mostly messages of 1 to 60 words (most short, a few long), some typing and presence
    events; each with its room, user, id and an ISO timestamp, compact as servers send them.
    """
    rng = random.Random(seed)  # noqa: S311 (a repeatable stream, not a secret)
    weights = [1 / rank for rank in range(1, len(VOCABULARY) + 1)]
    clock = 1_795_000_000.0
    events = []
    for number in range(count):
        clock += rng.expovariate(1 / 3)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(clock))
        event: dict[str, object] = {
            "type": rng.choices(["message", "typing", "join", "leave"], [80, 12, 4, 4])[0],
            "room": rng.choice(ROOMS),
            "user": rng.choice(USERS),
            "ts": f"{stamp}.{int(clock * 1000) % 1000:03d}Z",
        }
        if event["type"] == "message":
            length = min(60, 1 + int(rng.expovariate(1 / 9)))
            text = " ".join(rng.choices(VOCABULARY, weights, k=length))
            if rng.random() < 0.15:
                text = f"@{rng.choice(USERS)} {text}"
            event.update(id=100_000 + number, text=text[0].upper() + text[1:])
        events.append(json.dumps(event, separators=(",", ":")))
    return events


class CountingConnection(ClientConnection):
    """A client connection that counts the bytes it reads off its socket."""

    wire = 0

    def data_received(self, data: bytes) -> None:
        self.wire += len(data)
        super().data_received(data)


async def open_counting(url: str, compression: str | None) -> CountingConnection:
    ws = await connect(
        url, compression=compression, ping_interval=None, create_connection=CountingConnection
    )
    assert isinstance(ws, CountingConnection)
    # Only frames from here on: the server sends nothing before the first message.
    ws.wire = 0
    return ws


async def echo_events(ws: ClientConnection, events: list[str]) -> int:
    """Send each event and read its echo; returns the payload bytes that came back."""
    for event in events:
        await ws.send(event)
        await ws.recv()
    return sum(len(event.encode()) for event in events)


async def hold_after_traffic(
    url: str, count: int, messages: int, compression: str | None,
    opened: Event, go: Event, done: Event, out: Results,
) -> None:  # fmt: skip
    clients = [await open_counting(url, compression) for _ in range(count)]
    opened.set()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    events = chat_events(count * messages)
    payload = 0
    for n, ws in enumerate(clients):
        payload += await echo_events(ws, events[n * messages : (n + 1) * messages])
    out.put((sum(ws.wire for ws in clients), float(payload)))
    done.set()
    await asyncio.sleep(3600)


def traffic_worker(
    url: str, count: int, messages: int, compression: str | None,
    opened: Event, go: Event, done: Event, out: Results,
) -> None:  # fmt: skip
    run(hold_after_traffic(url, count, messages, compression, opened, go, done, out))


async def stream_ratio(url: str, compression: str | None, events: list[str]) -> float:
    ws = await open_counting(url, compression)
    async with ws:
        payload = await echo_events(ws, events)
        return ws.wire / payload


def deflate_point(
    logs: IO[str], setting: tuple[int, int] | None, connections: int, messages: int,
    stream: list[str],
) -> tuple[float, float, float, float, float]:  # fmt: skip
    """KiB per connection opened and after traffic, the two ratios, server µs per message."""
    if setting is None:
        args, compression = ["--compression", "none"], None
    else:
        args = ["--compression", "deflate", "--compression-window-bits", str(setting[0]),
                "--compression-memlevel", str(setting[1])]  # fmt: skip
        compression = "deflate"
    # No keepalive pings during the run: only the echoed events are on the wire.
    server, port = start_server(logs, *args, "--ping-interval", "3600")
    url = f"ws://127.0.0.1:{port}"
    try:
        run(echo_client(url, 64, 0.2, 4))
        # The stream first, so the heap it leaves behind is in the baseline of both points.
        cpu_before = cpu_seconds(server.pid)
        ratio_stream = run(stream_ratio(url, compression, stream))
        cpu_us = (cpu_seconds(server.pid) - cpu_before) / len(stream) * 1e6
        time.sleep(0.5)
        before = rss_kib(server.pid)
        opened, go, done = multiprocessing.Event(), multiprocessing.Event(), multiprocessing.Event()
        queue: Results = multiprocessing.Queue()
        holder = multiprocessing.Process(
            target=traffic_worker,
            args=(url, connections, messages, compression, opened, go, done, queue),
        )
        holder.start()
        try:
            if not opened.wait(120):
                raise RuntimeError("connections did not open")
            time.sleep(1)
            at_open = rss_kib(server.pid)
            go.set()
            if not done.wait(120):
                raise RuntimeError("connections did not exchange their events")
            wire, payload = queue.get(timeout=10)
            time.sleep(1)
            after = rss_kib(server.pid)
        finally:
            holder.terminate()
            holder.join()
    finally:
        stop(server)
    return ((at_open - before) / connections, (after - before) / connections,
            wire / payload, ratio_stream, cpu_us)  # fmt: skip


def deflate_table(logs: IO[str], connections: int, messages: int, length: int) -> None:
    stream = chat_events(length, seed=1)
    sizes = [len(event.encode()) for event in stream]
    print(f"deflate: {connections} connections per setting, each then echoes {messages} "
          f"chat events; stream: {length} events on one connection "
          f"({min(sizes)}-{max(sizes)} B, mean {sum(sizes) / len(sizes):.0f} B); "
          "wire = server-to-client bytes incl. frame headers; server CPU per echoed event "
          "of the stream, from /proc (10 ms ticks)")  # fmt: skip
    print(f"{'setting':<18}{'KiB/conn open':>14}{'KiB/conn used':>14}{'wire/payload first':>20}"
          f"{'wire/payload stream':>21}{'server us/msg':>15}")  # fmt: skip
    rows: dict[str, tuple[float, float, float, float, float]] = {}
    for setting in [*DEFLATE_POINTS, None]:
        name = "none" if setting is None else f"{setting[0]} bits, memLevel {setting[1]}"
        rows[name] = row = deflate_point(logs, setting, connections, messages, stream)
        print(f"{name:<18}{row[0]:>14.1f}{row[1]:>14.1f}{row[2]:>20.3f}{row[3]:>21.3f}"
              f"{row[4]:>15.0f}", flush=True)  # fmt: skip
    none = rows["none"][1]
    for name, row in rows.items():
        if name != "none":
            print(f"ratio wire/payload stream {name}: {row[3]:.3f}")
            print(f"ratio kib_per_conn_used {name}/none: {row[1] / none:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections to open")
    parser.add_argument("--only", choices=("echo", "idle", "deflate"), help="one part alone")
    parser.add_argument("--deflate-connections", type=int, default=1500,
                        help="connections per deflate setting")  # fmt: skip
    parser.add_argument("--deflate-messages", type=int, default=5,
                        help="chat events each echoes before the second measure")  # fmt: skip
    parser.add_argument("--stream", type=int, default=5000,
                        help="chat events of the one-connection ratio stream")  # fmt: skip
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    # Figures from a busy machine are not comparable with a quiet one's: say which it was.
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.NamedTemporaryFile("w", prefix="app_bench-", suffix=".log") as logs:
        if args.only in (None, "echo"):
            for size in (64, 16 * 1024):
                echo_throughput(logs, size, args.seconds)
        if args.only in (None, "idle"):
            deflate = rss_per_thousand(logs, "deflate", args.idle)
            none = rss_per_thousand(logs, "none", args.idle)
            print(f"ratio rss_per_1k deflate/none: {deflate / none:.2f}")
        if args.only in (None, "deflate"):
            deflate_table(logs, args.deflate_connections, args.deflate_messages, args.stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
