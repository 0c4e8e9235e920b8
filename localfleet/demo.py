"""What `make demo` prints last: where the demo fleet answers, a real round trip, and a
message heard across two hosts of one room."""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path

from websockets.asyncio.client import connect

from localfleet.ansible import inventory_var
from localfleet.inventory import read_fleet

__all__ = ["CHAT_ROOM", "ca_file", "main", "round_trip"]

CHAT_ROOM = "lobby"


def ca_file() -> Path:
    """The demo CA's certificate, read from the demo inventory's ``tls_ca_dir``."""
    return Path(inventory_var("tls_ca_dir")) / "ca.crt"


async def round_trip(address: str, ca: Path, text: str) -> str:
    """Open wss://ADDRESS/ws/ROOM trusting only the demo CA, send text, return the reply."""
    context = ssl.create_default_context(cafile=str(ca))
    async with connect(f"wss://{address}/ws/{CHAT_ROOM}", ssl=context, open_timeout=10) as ws:
        await ws.send(text)
        reply = await asyncio.wait_for(ws.recv(), timeout=10)
    return reply if isinstance(reply, str) else reply.decode()


async def across(listener: str, speaker: str, ca: Path, text: str) -> str:
    """A member of the room on ``listener`` receives what one on ``speaker`` sends."""
    context = ssl.create_default_context(cafile=str(ca))
    async with (
        connect(f"wss://{listener}/ws/{CHAT_ROOM}", ssl=context, open_timeout=10) as ear,
        connect(f"wss://{speaker}/ws/{CHAT_ROOM}", ssl=context, open_timeout=10) as mouth,
    ):
        # The listener's process subscribes as it joins; until its interest has reached
        # the speaker's host, a message has nowhere to go there: say it again shortly.
        for _ in range(30):
            await mouth.send(text)
            try:
                heard = await asyncio.wait_for(ear.recv(), timeout=0.3)
                break
            except TimeoutError:
                continue
        else:
            raise TimeoutError(f"nothing heard on {listener} from {speaker} within 9 s")
    return heard if isinstance(heard, str) else heard.decode()


def main() -> int:
    fleet = read_fleet()
    if not fleet.app_servers:
        print("no demo fleet: run `make demo`", file=sys.stderr)
        return 1
    ca = ca_file()
    print("\nThe demo fleet is up. Open a page in a browser that trusts the CA below:\n")
    for host in fleet.app_servers:
        print(f"  {host.name:<8} https://{host.address}/   wss://{host.address}/ws/{CHAT_ROOM}")
    print(f"\n  CA to trust: {ca}")
    print(f"  e.g.: curl --cacert {ca} https://{fleet.app_servers[0].address}/healthz\n")
    first = fleet.app_servers[0]
    reply = asyncio.run(round_trip(first.address, ca, "hello from make demo"))
    print(f"  round trip through {first.name}: sent 'hello from make demo', got {reply!r}")
    if len(fleet.app_servers) > 1:
        second = fleet.app_servers[1]
        heard = asyncio.run(across(first.address, second.address, ca, f"hello from {second.name}"))
        print(f"  the room spans the fleet: a member on {first.name} heard {heard!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
