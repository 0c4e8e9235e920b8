"""Operator handlers that the tests load with ``--handler tests.app.handlers:<name>``."""

from __future__ import annotations

import asyncio

from websockets.asyncio.server import ServerConnection

__all__ = ["greet_and_leave", "ignore_closing"]


async def greet_and_leave(ws: ServerConnection) -> None:
    """Send one message and return without closing: the server must close with 1000."""
    await ws.send("hello")


async def ignore_closing(ws: ServerConnection) -> None:
    """Never read nor return: only the drain timeout can end this handler."""
    await asyncio.sleep(3600)
