"""Members of one chat room on the live fleet, as browsers of the chat page are: each joins
``/ws/<room>?events=1`` on a host, learns which instance serves it and the room's member
count from the server's events (binary frames of JSON), and sends and receives text."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect

from localfleet.demo import ca_file
from localfleet.load import client_context

__all__ = ["Member", "members_on", "wait_for"]


@dataclass
class Member:
    """One client of the room: what it was told and what it received."""

    host: str
    ws: ClientConnection
    instance: str = ""
    members: int = -1  # the room's count across the fleet, as last told
    received: Counter[str] = field(default_factory=Counter)
    reader: asyncio.Task[None] | None = None
    on_text: Callable[[str], None] | None = None  # called with each text as it arrives

    async def read(self) -> None:
        async for frame in self.ws:
            if isinstance(frame, bytes):
                event = json.loads(frame)
                if event.get("type") == "hello":
                    self.instance = event["instance"]
                elif event.get("type") == "presence":
                    self.members = event["members"]
            else:
                self.received[frame] += 1
                if self.on_text is not None:
                    self.on_text(frame)


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until ``condition()`` holds; the seconds it took. AssertionError after timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@asynccontextmanager
async def members_on(addresses: list[str], room: str) -> AsyncIterator[list[Member]]:
    """One member of ``room`` per address given (repeat an address for more), all joined
    and told their instance; they leave at the end of the block."""
    context = client_context(ca_file())
    async with AsyncExitStack() as stack:
        joined = []
        for address in addresses:
            ws = await stack.enter_async_context(
                connect(f"wss://{address}/ws/{room}?events=1", ssl=context, open_timeout=10)
            )
            member = Member(address, ws)
            member.reader = asyncio.create_task(member.read())
            joined.append(member)
        await wait_for(lambda: all(m.instance for m in joined), 10, "each told its instance")
        try:
            yield joined
        finally:
            for member in joined:
                if member.reader:
                    member.reader.cancel()
