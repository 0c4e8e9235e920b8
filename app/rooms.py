"""Rooms of WebSocket connections that span the fleet, as a handler uses them.

A handler joins its connection to a room by name and broadcasts to the room; it never
sees the bus::

    from app import rooms

    async def handler(ws):
        async with rooms.joined("lobby", ws) as room:
            async for message in ws:
                await room.broadcast(message)

Each process keeps the members of each room that it serves and fans a message out to
them with websockets' ``broadcast()``. With a bus (``--bus-url``), the process also
holds one subscription per room that has members here, on ``<prefix>.room.<token>``
(:func:`subject_token`), publishes each message there once and delivers what the other
processes publish to its own members. It never gets its own publications back
(``no_echo``): each member gets each message once. While the bus is away, the members
of one process still reach each other; what is sent meanwhile is not replayed to the
others (at most once).

Presence: every process announces on the room's subject how many members it holds,
at once after a change and every second (:data:`HEARTBEAT`). A count not heard again
within :data:`EXPIRY` drops out: the members of a process or host that vanished.
A process that stops announces 0 for its rooms before it exits.

On the subject, a message is its payload (UTF-8 for text), with the header
``Wsapp-Type: binary`` for a binary one; a presence announcement is an empty payload
with the headers ``Wsapp-Members`` and ``Wsapp-Instance``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import string
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager

from prometheus_client import CollectorRegistry
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.protocol import State

from app.bus import Bus
from app.metrics import BusMetrics, Metrics

__all__ = [
    "EXPIRY",
    "HEARTBEAT",
    "MAX_NAME_BYTES",
    "Room",
    "Rooms",
    "current",
    "joined",
    "set_current",
    "subject_token",
]

logger = logging.getLogger(__name__)

HEARTBEAT = 1.0
"""Seconds between two presence announcements of a room by a process."""
EXPIRY = 3.0
"""Seconds after which a process's count of a room, not heard again, drops out."""
MAX_NAME_BYTES = 255
"""Longest room name, in UTF-8 bytes (its subject token is at most three times that)."""

TYPE_HEADER = "Wsapp-Type"
MEMBERS_HEADER = "Wsapp-Members"
INSTANCE_HEADER = "Wsapp-Instance"

_PLAIN = frozenset(string.ascii_letters + string.digits + "-_")
# After this long without a word from the bus task, the stop goes on without it.
_CLOSE_TIMEOUT = 2.0


def subject_token(name: str) -> str:
    """The NATS subject token of a room name; distinct names give distinct tokens.

    Letters, digits, ``-`` and ``_`` stay as they are; every other character becomes
    ``~XX`` per byte of its UTF-8 (``a.b`` is ``a~2Eb``); the empty name is ``~``.
    """
    if not name:
        return "~"
    return "".join(
        char if char in _PLAIN else "".join(f"~{byte:02X}" for byte in _utf8(char)) for char in name
    )


def _utf8(text: str) -> bytes:
    # A lone surrogate (from a badly encoded path) still gets a token of its own.
    return text.encode("utf-8", "surrogatepass")


class Room:
    """A room, as its members' handlers see it: :meth:`Rooms.joined` yields it.

    Args:
        rooms: the rooms of the process.
        name: the room's name.
        subject: its subject on the bus.
    """

    def __init__(self, rooms: Rooms, name: str, subject: str) -> None:
        self.name = name
        self.subject = subject
        self.local: set[ServerConnection] = set()
        """The members in this process."""
        self._rooms = rooms
        # instance -> (members there, monotonic time at which that count expires)
        self._remote: dict[str, tuple[int, float]] = {}

    async def broadcast(self, message: str | bytes) -> None:
        """Send ``message`` to every member of the room in the fleet, the sender included.

        A ``str`` goes in a text frame, ``bytes`` in a binary frame. The members in this
        process have it in their write buffers when this returns; the bus gets it next,
        waiting only while the bus client's buffer is full. While the bus is away only
        the members in this process get it.

        Args:
            message: the message, as a handler receives it from ``ws``.
        """
        await self._rooms._broadcast(self, message)

    def members(self) -> int:
        """How many members the room has in the whole fleet.

        Exact for this process; for each other process, its last announced count
        (within :data:`EXPIRY`). Converges within a heartbeat or two of a change.
        """
        now = time.monotonic()
        for instance in [i for i, (_, until) in self._remote.items() if until <= now]:
            del self._remote[instance]
        return len(self.local) + sum(count for count, _ in self._remote.values())

    def _heard(self, instance: str, count: int) -> bool:
        """Take in an announced count; True when ``instance`` was not counted yet."""
        known = instance in self._remote
        if count > 0:
            self._remote[instance] = (count, time.monotonic() + EXPIRY)
        else:
            self._remote.pop(instance, None)
        return not known and count > 0

    def _deliver(self, data: bytes, text: bool, source: str) -> None:
        targets = [ws for ws in self.local if ws.state is State.OPEN]
        broadcast(targets, data, text=text)
        self._rooms._count_deliveries(source, len(targets))


class Rooms:
    """The rooms of one process, spanning the fleet when it has a bus.

    Args:
        instance: this process's label in presence, e.g. ``fleet1:8001``.
        metrics: the process's metrics (None: not counted).
        bus_servers: URLs of the bus servers; none: the rooms stay in this process.
        bus_token: auth token for the bus server, or empty.
        prefix: first tokens of the rooms' subjects, ``<prefix>.room.<token>``.
    """

    def __init__(
        self,
        instance: str,
        metrics: Metrics | None = None,
        bus_servers: Sequence[str] = (),
        bus_token: str = "",
        prefix: str = "wsapp",
    ) -> None:
        self.instance = instance
        self.prefix = prefix
        self._metrics = metrics
        self._rooms: dict[str, Room] = {}  # by subject
        # Rooms whose subscription or count the bus has not been told about yet.
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._bus: Bus | None = None
        # Without the server's metrics (in-process rooms outside a server), uncounted.
        self._bus_metrics = (metrics.bus if metrics else None) or BusMetrics(CollectorRegistry())
        if bus_servers:
            self._bus = Bus(
                bus_servers, bus_token, instance, self._bus_metrics,
                on_message=self._received, on_connected=self._connected,
            )  # fmt: skip

    @property
    def bus_state(self) -> str:
        """``"connected"``, ``"disconnected"`` or ``"none"`` (no bus configured)."""
        if self._bus is None:
            return "none"
        return "connected" if self._bus.connected else "disconnected"

    def start(self) -> None:
        """Connect to the bus and keep presence, in the background; returns at once."""
        if self._bus is not None and self._task is None:
            self._bus.start()
            self._task = asyncio.create_task(self._keep_presence(), name="presence")

    async def close(self) -> None:
        """Leave every room on the bus (announce 0 members) and disconnect from it."""
        if self._bus is None:
            return
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._leave_bus(self._bus), _CLOSE_TIMEOUT)

    async def _leave_bus(self, bus: Bus) -> None:
        for room in list(self._rooms.values()):
            await self._announce(room, 0)
        await bus.close()

    @contextlib.asynccontextmanager
    async def _joined(self, name: str, ws: ServerConnection) -> AsyncIterator[Room]:
        room = self._enter(name, ws)
        try:
            yield room
        finally:
            self._leave(room, ws)

    def joined(self, name: str, ws: ServerConnection) -> AbstractAsyncContextManager[Room]:
        """Make ``ws`` a member of room ``name`` for the duration of an ``async with``.

        Args:
            name: any string of at most :data:`MAX_NAME_BYTES` UTF-8 bytes.
            ws: the handler's connection.

        Raises:
            ValueError: when the name is too long.
        """
        if len(_utf8(name)) > MAX_NAME_BYTES:
            raise ValueError(f"room name longer than {MAX_NAME_BYTES} bytes")
        return self._joined(name, ws)

    def _enter(self, name: str, ws: ServerConnection) -> Room:
        subject = f"{self.prefix}.room.{subject_token(name)}"
        room = self._rooms.get(subject)
        if room is None:
            room = self._rooms[subject] = Room(self, name, subject)
        room.local.add(ws)
        self._mark(room)
        return room

    def _leave(self, room: Room, ws: ServerConnection) -> None:
        room.local.discard(ws)
        if self._bus is None:
            if not room.local and self._rooms.get(room.subject) is room:
                del self._rooms[room.subject]
            return
        self._mark(room)

    def _mark(self, room: Room) -> None:
        """Have the room's subscription and count brought up to date on the bus soon."""
        if self._bus is not None:
            self._pending.add(room.subject)
            self._wake.set()

    # --- the bus ------------------------------------------------------------------------

    async def _broadcast(self, room: Room, message: str | bytes) -> None:
        text = isinstance(message, str)
        data = message.encode() if isinstance(message, str) else bytes(message)
        room._deliver(data, text, "local")
        if self._bus is None:
            return
        headers = None if text else {TYPE_HEADER: "binary"}
        dropped = await self._bus.publish(room.subject, data, headers)
        if dropped is None:
            self._bus_metrics.messages.labels("out", "room").inc()
        else:
            self._bus_metrics.dropped.labels(dropped).inc()

    def _received(self, subject: str, headers: Mapping[str, str], data: bytes) -> None:
        room = self._rooms.get(subject)
        if room is None:  # still in flight when this process left the room
            return
        announced = headers.get(MEMBERS_HEADER)
        if announced is not None:
            self._bus_metrics.messages.labels("in", "presence").inc()
            instance = headers.get(INSTANCE_HEADER, "")
            with contextlib.suppress(ValueError):
                # A newcomer hears from this process at once, not at the next heartbeat.
                if room._heard(instance, int(announced)) and room.local:
                    self._mark(room)
            return
        self._bus_metrics.messages.labels("in", "room").inc()
        text = headers.get(TYPE_HEADER) != "binary"
        if text:
            # Another publisher on the subject may send any bytes; a text frame that
            # is not UTF-8 would make every browser in the room close (1007).
            try:
                data.decode()
            except UnicodeDecodeError:
                text = False
        room._deliver(data, text, "bus")

    def _connected(self) -> None:
        """(Re)connected: subscribe and announce every room now, not at the next beat."""
        self._pending.update(self._rooms)
        self._wake.set()

    async def _announce(self, room: Room, count: int) -> None:
        assert self._bus is not None
        headers = {MEMBERS_HEADER: str(count), INSTANCE_HEADER: self.instance}
        if await self._bus.publish(room.subject, b"", headers) is None:
            self._bus_metrics.messages.labels("out", "presence").inc()

    async def _keep_presence(self) -> None:
        """Keep subscriptions and announcements in step with the local members.

        The only task that subscribes, unsubscribes and announces, so these stay in
        order; handlers only mark a room changed and wake it. A burst of joins or
        leaves (a drain) becomes one announcement per room.
        """
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        while True:
            delay = next_beat - loop.time()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            beat = loop.time() >= next_beat
            if beat:
                next_beat = loop.time() + HEARTBEAT
            try:
                await self._sync(everyone=beat)
            # Whatever went wrong with one round, presence must not stop for good: the
            # next heartbeat goes over every room again.
            except Exception:
                logger.exception("presence_sync_failed")

    async def _sync(self, everyone: bool) -> None:
        assert self._bus is not None
        if everyone:
            self._pending.update(self._rooms)
        pending, self._pending = self._pending, set()
        # Subscribe first, so that the answers to an announcement reach this process.
        for subject in pending:
            room = self._rooms.get(subject)
            if room is not None and room.local:
                await self._bus.subscribe(subject)
        for subject in pending:
            room = self._rooms.get(subject)
            if room is not None:
                await self._announce(room, len(room.local))
        # An empty room goes once its 0 is announced; one joined meanwhile is pending
        # again and stays.
        for subject in pending:
            room = self._rooms.get(subject)
            if room is None or room.local or subject in self._pending:
                continue
            await self._bus.unsubscribe(subject)
            if not room.local and subject not in self._pending:
                del self._rooms[subject]

    def _count_deliveries(self, source: str, count: int) -> None:
        if self._metrics is not None:
            self._metrics.deliveries.labels(source).inc(count)


_current: Rooms | None = None


def current() -> Rooms:
    """The rooms of this process: the server's, or in-process rooms outside a server."""
    global _current
    if _current is None:
        _current = Rooms(socket.gethostname())
    return _current


def set_current(rooms: Rooms) -> None:
    """Make ``rooms`` what :func:`current` returns (the server does, at start)."""
    global _current
    _current = rooms


def joined(name: str, ws: ServerConnection) -> AbstractAsyncContextManager[Room]:
    """``current().joined(name, ws)``: see :meth:`Rooms.joined`."""
    return current().joined(name, ws)
