"""Benchmark of acknowledged publishing against plain broadcast, side by side in one run.

    .venv/bin/python -m bench.acks_bench [--rate 100] [--seconds 10] [--members 20]

On loopback, no fleet: a cluster of 3 ``nats-server`` with JetStream (the rooms' history
R3), as in ``bench.rooms_bench``, and two chat processes, A on server 1 and B on server 2.
One room; ``--members`` members on B (``?events=1``). Two senders on A, in turn, each
``--rate`` messages a second for ``--seconds``, at the same time (after a second of
warm-up): one names each message with a reference
(``{"type": "message", "ref": R}`` then the message: the chat
page's protocol), the other sends plain messages. Both are stored in the history: what
differs is the reference, its deduplication key and the ack.

Printed: for the acknowledged sender, publish-to-ack (its ack event) and for the plain
one publish-to-echo (its own copy back from the room, the nearest a plain sender comes
to knowing); publish-to-delivery at B's members for both; p50 and p99 of each, and
``ratio acked/plain ...`` lines. Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from bench.rooms_bench import ChatProcess, quantile, start_cluster

ROOM = "acks-bench"


class Timings:
    """When each message was sent, acked or echoed, and delivered at each member."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.answered: dict[str, float] = {}  # ack (acked sender) or own echo (plain)
        self.delivered: dict[str, list[float]] = {}

    def answer_ms(self, prefix: str) -> list[float]:
        return [(at - self.sent[text]) * 1000 for text, at in self.answered.items()
                if text.startswith(prefix)]  # fmt: skip

    def delivery_ms(self, prefix: str) -> list[float]:
        return [(at - self.sent[text]) * 1000 for text, ats in self.delivered.items()
                if text.startswith(prefix) for at in ats]  # fmt: skip


async def _member(url: str, timings: Timings, joined: asyncio.Event, stop: asyncio.Event) -> None:
    async with connect(f"{url}/ws/{ROOM}?events=1", compression=None) as ws:
        reader = asyncio.create_task(_read_member(ws, timings, joined))
        await stop.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _read_member(ws: ClientConnection, timings: Timings, joined: asyncio.Event) -> None:
    async for frame in ws:
        if isinstance(frame, str):
            timings.delivered.setdefault(frame, []).append(time.monotonic())
        elif json.loads(frame).get("type") == "hello":
            joined.set()


async def _sender(
    url: str, prefix: str, acked: bool, rate: float, seconds: float, timings: Timings
) -> int:
    """Send ``rate`` messages a second for ``seconds``; the answers are read meanwhile.
    Returns how many were not answered within 10 s of the last."""
    async with connect(f"{url}/ws/{ROOM}?events=1", compression=None) as ws:

        async def read() -> None:
            async for frame in ws:
                now = time.monotonic()
                if isinstance(frame, str):
                    if not acked and frame.startswith(prefix):
                        timings.answered.setdefault(frame, now)
                    continue
                event = json.loads(frame)
                if event.get("type") == "ack":
                    timings.answered.setdefault(event["ref"], now)

        reader = asyncio.create_task(read())
        loop = asyncio.get_running_loop()
        start = loop.time()
        count = int(rate * seconds)
        for number in range(count):
            await asyncio.sleep(max(0.0, start + number / rate - loop.time()))
            text = f"{prefix}{number}"
            timings.sent[text] = time.monotonic()
            if acked:
                await ws.send(json.dumps({"type": "message", "ref": text}).encode())
            await ws.send(text)
        deadline = loop.time() + 10
        mine = [f"{prefix}{number}" for number in range(count)]
        while loop.time() < deadline and any(text not in timings.answered for text in mine):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        return sum(1 for text in mine if text not in timings.answered)


async def _run(a: ChatProcess, b: ChatProcess, rate: float, seconds: float, members: int) -> None:
    timings = Timings()
    stop = asyncio.Event()
    joins = [asyncio.Event() for _ in range(members)]
    tasks = [asyncio.create_task(_member(b.url, timings, joined, stop)) for joined in joins]
    await asyncio.wait_for(asyncio.gather(*(joined.wait() for joined in joins)), 30)
    # Both at once, after a warm-up: the same moment's load and the same warm processes.
    await _sender(a.url, "warm-", True, rate, 1, timings)
    counts = await asyncio.gather(
        _sender(a.url, "acked-", True, rate, seconds, timings),
        _sender(a.url, "plain-", False, rate, seconds, timings),
    )
    unanswered = dict(zip(("acked-", "plain-"), counts, strict=True))
    stop.set()
    await asyncio.gather(*tasks)
    rows = {
        "acked: publish to ack": timings.answer_ms("acked-"),
        "plain: publish to own echo": timings.answer_ms("plain-"),
        "acked: publish to delivery (B)": timings.delivery_ms("acked-"),
        "plain: publish to delivery (B)": timings.delivery_ms("plain-"),
    }
    print(f"{'':34} {'count':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for what, values in rows.items():
        if values:
            print(f"{what:34} {len(values):7d} {quantile(values, 0.5):8.2f} "
                  f"{quantile(values, 0.99):8.2f}")  # fmt: skip
    owed = int(rate * seconds) * members
    for prefix in unanswered:
        delivered = len(timings.delivery_ms(prefix))
        print(f"{prefix.rstrip('-')}: {unanswered[prefix]} unanswered; "
              f"{delivered} of {owed} deliveries")  # fmt: skip
    pairs = {
        "publish-to-answer": ("acked: publish to ack", "plain: publish to own echo"),
        "publish-to-delivery": ("acked: publish to delivery (B)", "plain: publish to delivery (B)"),
    }
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        for label, (acked, plain) in pairs.items():
            if rows[acked] and rows[plain]:
                value = quantile(rows[acked], q) / quantile(rows[plain], q)
                print(f"ratio acked/plain {label} {name}: {value:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="messages a second per sender")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds each sender sends")
    parser.add_argument("--members", type=int, default=20, help="members of the room on B")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    print(f"one room, {args.members} members on B; each sender on A {args.rate:g} messages/s "
          f"for {args.seconds:g} s, both at once")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="acks_bench-") as root:
        servers = start_cluster(Path(root))
        chats: list[ChatProcess] = []
        try:
            chats.append(ChatProcess("A", servers[0], max_age=300))
            chats.append(ChatProcess("B", servers[1], max_age=300))
            for chat in chats:
                chat.wait_for(r"event=history_ready", timeout=30)
            asyncio.run(_run(chats[0], chats[1], args.rate, args.seconds, args.members))
        finally:
            for chat in chats:
                chat.stop()
            for server in servers:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
