"""Rooms of WebSocket connections that span the fleet, as a handler uses them.

A handler joins its connection to a room by name and broadcasts to the room; it never
sees the bus::

    from app import rooms

    async def handler(ws):
        async with rooms.joined("lobby", ws) as room:
            async for message in ws:
                await room.broadcast(message)

Two modules, in the manner of websockets' ``protocol.py`` beside its
``asyncio/connection.py``: :mod:`app.rooms.delivery` holds the rules that decide what
each member is sent (a state machine with no I/O), :mod:`app.rooms.process` carries
them out in one process on asyncio and the NATS bus.
"""

from app.rooms.process import (
    EXPIRY,
    HEARTBEAT,
    MAX_NAME_BYTES,
    MAX_RECENT,
    MAX_REF,
    History,
    HistoryUnavailable,
    NotStored,
    Room,
    Rooms,
    current,
    joined,
    set_current,
    subject_token,
    valid_ref,
)

__all__ = [
    "EXPIRY",
    "HEARTBEAT",
    "MAX_NAME_BYTES",
    "MAX_RECENT",
    "MAX_REF",
    "History",
    "HistoryUnavailable",
    "NotStored",
    "Room",
    "Rooms",
    "current",
    "joined",
    "set_current",
    "subject_token",
    "valid_ref",
]
