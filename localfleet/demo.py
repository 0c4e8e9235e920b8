"""What `make demo` prints last: where the demo fleet answers, and one real round trip."""

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
