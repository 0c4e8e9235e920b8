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
import json
import logging
import re
import socket
import string
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from nats.js import api as js_api
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from app.bus import READ_DEADLINE, STORE_DEADLINE, Bus
from app.metrics import BusMetrics, Metrics

__all__ = [
    "EXPIRY",
    "HEARTBEAT",
    "MAX_NAME_BYTES",
    "History",
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

# Headers JetStream adds to a stored message it republishes: the stream's sequence of the
# message, and the sequence of the message stored before it on the same subject (0: none).
SEQUENCE_HEADER = "Nats-Sequence"
LAST_SEQUENCE_HEADER = "Nats-Last-Sequence"

_PLAIN = frozenset(string.ascii_letters + string.digits + "-_")
# Until the stream is there (a cluster still electing its leaders), tried again this often.
_HISTORY_RETRY = 2.0
# A gap the history answered without (a server catching up): asked again this often, for
# this long, before its members are sent back to resume.
_GAP_RETRY = 0.5
_GAP_PATIENCE = 5.0
# The close reason of a member sent back to resume (a gap the history could not fill).
_SEND_BACK = "messages missed here: come back with your last id"
QUIET = 2.0
"""Seconds a room with members here may go without a stored message reaching this process
before the process asks the history whether it missed some (its server was down while
messages were stored, a subscription that brings nothing); the wait doubles while the
room stays quiet, up to a minute, and is back to this at the next message."""
_QUIET_MAX = 60.0
REPUBLISH_WAIT = 1.0
"""Seconds a sender's process waits for the stream to republish its stored message to it
before reading it back from the history (its server's route to the stream's leader down)."""


class _Unreadable(Exception):
    """The history did not answer a read (already logged)."""


@dataclass(frozen=True)
class History:
    """Where and how long the bus keeps the rooms' messages (a JetStream stream).

    Args:
        max_age: seconds a message is kept.
        max_bytes: bytes the stream holds at most; the oldest messages go first.
        replicas: servers holding each message (1..5; 3 survives one server down).
    """

    max_age: float
    max_bytes: int
    replicas: int = 1


@dataclass
class _Member:
    """How one member of a room is sent its messages."""

    ids: bool
    """Each message is preceded by a ``{"type": "message", "id": N}`` event."""
    catching_up: list[tuple[int | None, bytes, bool]] | None = None
    """While its history is replayed: the live messages held back (id, data, text)."""


def _live_from(member: _Member, seq: int) -> bool:
    """Whether the live messages held back for ``member`` start at or before ``seq`` (they
    are held in id order: the first with an id tells)."""
    held = member.catching_up or []
    first = next((held_id for held_id, _, _ in held if held_id is not None), None)
    return first is not None and first <= seq


def _message_event(seq: int) -> bytes:
    return json.dumps({"type": "message", "id": seq}).encode()
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


def _is_text(headers: Mapping[str, str], data: bytes) -> bool:
    """Whether a room message goes out as text: not marked binary, and valid UTF-8 (another
    publisher may send any bytes; a text frame that is not UTF-8 would make every browser
    in the room close with 1007)."""
    if headers.get(TYPE_HEADER) == "binary":
        return False
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


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
        self.last_id: int | None = None
        """The id of the last stored message delivered here (None: no starting point yet)."""
        self._members: dict[ServerConnection, _Member] = {}
        # Stored messages are delivered one at a time, in id order, whichever way they
        # come (republished live, read back to fill a gap); each delivery wakes whoever
        # waits for an id to be reached.
        self._order = asyncio.Lock()
        self._advanced = asyncio.Event()
        self._rooms = rooms
        # When to ask the history whether this process missed some of the room (QUIET),
        # and how long the wait after that one.
        self._check_at = time.monotonic() + QUIET
        self._quiet = QUIET
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

    def _reached(self, seq: int) -> None:
        self.last_id = seq
        self._advanced.set()
        self._check_at = time.monotonic() + QUIET
        self._quiet = QUIET

    def _deliver(self, data: bytes, text: bool, source: str, seq: int | None = None) -> None:
        """Write a message to every open member; one whose history is being replayed has
        it held back until the replay is done."""
        plain: list[ServerConnection] = []
        with_ids: list[ServerConnection] = []
        for ws in self.local:
            member = self._members.get(ws)
            if member is not None and member.catching_up is not None:
                member.catching_up.append((seq, data, text))
            elif ws.state is State.OPEN:
                (with_ids if member is not None and member.ids else plain).append(ws)
        if seq is not None and with_ids:
            broadcast(with_ids, _message_event(seq), text=False)
        broadcast(plain + with_ids, data, text=text)
        self._rooms._count_deliveries(source, len(plain) + len(with_ids))


class Rooms:
    """The rooms of one process, spanning the fleet when it has a bus.

    Args:
        instance: this process's label in presence, e.g. ``fleet1:8001``.
        metrics: the process's metrics (None: not counted).
        bus_servers: URLs of the bus servers; none: the rooms stay in this process.
        bus_token: auth token for the bus server, or empty.
        prefix: first tokens of the rooms' subjects, ``<prefix>.room.<token>``.
        history: keep the rooms' messages in the bus (None: at most once, no ids).
    """

    def __init__(
        self,
        instance: str,
        metrics: Metrics | None = None,
        bus_servers: Sequence[str] = (),
        bus_token: str = "",
        prefix: str = "wsapp",
        history: History | None = None,
    ) -> None:
        self.instance = instance
        self.prefix = prefix
        self.history = history
        self.stream = re.sub(r"[^A-Za-z0-9_-]", "_", prefix).upper() + "_ROOMS"
        """The JetStream stream holding the rooms' history."""
        self._history_ready = False
        self._history_set_up = asyncio.Event()
        self._history_overdue = False
        self._history_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        # Closes of members sent back to resume, kept until done (the loop holds weak refs).
        self._closing: set[asyncio.Task[None]] = set()
        self._metrics = metrics
        self._rooms: dict[str, Room] = {}  # by subject
        # Rooms whose subscription or count the bus has not been told about yet.
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._bus: Bus | None = None
        # Without the server's metrics (in-process rooms outside a server), uncounted.
        self._bus_metrics = (metrics.bus if metrics else None) or BusMetrics(CollectorRegistry())
        self._bus_metrics.history.set(0)
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
            if self.history is not None:
                self._watch_task = asyncio.create_task(self._keep_up(), name="keep-up")

    async def close(self) -> None:
        """Leave every room on the bus (announce 0 members) and disconnect from it."""
        if self._bus is None:
            return
        for task in (self._task, self._history_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._leave_bus(self._bus), _CLOSE_TIMEOUT)

    async def _leave_bus(self, bus: Bus) -> None:
        for room in list(self._rooms.values()):
            await self._announce(room, 0)
        await bus.close()

    @contextlib.asynccontextmanager
    async def _joined(
        self, name: str, ws: ServerConnection, since: int | None, ids: bool
    ) -> AsyncIterator[Room]:
        room = self._enter(name, ws)
        # A member coming back has its live messages held from the moment it is in the
        # room, not only once its replay starts: the anchor below may wait on the bus, and
        # a message delivered meanwhile would reach it before the replay sent it again.
        room._members[ws] = _Member(ids=ids, catching_up=None if since is None else [])
        try:
            await self._anchor(room)
            if since is not None:
                await self._resume(room, ws, since)
            yield room
        finally:
            room._members.pop(ws, None)
            self._leave(room, ws)

    def joined(
        self, name: str, ws: ServerConnection, since: int | None = None, ids: bool = False
    ) -> AbstractAsyncContextManager[Room]:
        """Make ``ws`` a member of room ``name`` for the duration of an ``async with``.

        With ``since``, the id of the last message the client saw in this room, the member
        first gets every later message the history still holds, in order, then the live
        ones, none twice; then a ``{"type": "resumed", ...}`` event (binary frame of JSON)
        says how many were restored and whether the history reached back to ``since``
        (``"complete": false``: some may be missing). This is done when the ``async with``
        is entered.

        Args:
            name: any string of at most :data:`MAX_NAME_BYTES` UTF-8 bytes.
            ws: the handler's connection.
            since: the last message id the client saw (None: live messages only).
            ids: precede each stored message with a ``{"type": "message", "id": N}`` event
                (a binary frame of JSON): the id to come back with.

        Raises:
            ValueError: when the name is too long or ``since`` negative.
        """
        if len(_utf8(name)) > MAX_NAME_BYTES:
            raise ValueError(f"room name longer than {MAX_NAME_BYTES} bytes")
        if since is not None and since < 0:
            raise ValueError("since must be a message id, 0 or more")
        return self._joined(name, ws, since, ids)

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

    def _history_subject(self, room: Room) -> str:
        """Where the room's messages are stored; JetStream republishes them, with their
        sequence, on the room's subject."""
        return f"{self.prefix}.hist.{room.subject.rsplit('.', 1)[1]}"

    async def _broadcast(self, room: Room, message: str | bytes) -> None:
        text = isinstance(message, str)
        data = message.encode() if isinstance(message, str) else bytes(message)
        headers = {} if text else {TYPE_HEADER: "binary"}
        if self._bus is not None and await self._history_within(STORE_DEADLINE):
            # Stored first: every member, here too, gets it as the stream republishes it,
            # in the stream's order and with its id.
            await self._anchor(room)
            seq = await self._bus.store(
                self._history_subject(room), data, headers, msg_id=uuid.uuid4().hex
            )
            if seq is not None:
                self._bus_metrics.messages.labels("out", "room").inc()
                await self._delivered_here(room, seq)
                return
        # At most once: the members here now, the others if the bus takes it.
        room._deliver(data, text, "local")
        if self._bus is None:
            return
        dropped = await self._bus.publish(room.subject, data, headers or None)
        if dropped is None:
            self._bus_metrics.messages.labels("out", "room").inc()
        else:
            self._bus_metrics.dropped.labels(dropped).inc()

    async def _received(self, subject: str, headers: Mapping[str, str], data: bytes) -> None:
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
        text = _is_text(headers, data)
        try:
            seq, last = int(headers[SEQUENCE_HEADER]), int(headers[LAST_SEQUENCE_HEADER])
        except (KeyError, ValueError):
            room._deliver(data, text, "bus")  # not stored: sent at most once
            return
        async with room._order:
            if room.last_id is not None:
                if seq <= room.last_id:
                    return  # delivered already (from a gap's fill)
                if last > room.last_id:
                    await self._fill_gap(room, until=seq, known=last)
            room._deliver(data, text, "bus", seq)
            room._reached(seq)

    async def _anchor(self, room: Room) -> None:
        """Give a room new to this process its starting point in the history: subscribed
        (and the server knows it), then the id of the room's last stored message. Every
        later one then reaches its members here, live or read back."""
        bus = self._bus
        if bus is None or room.last_id is not None or not await self._history_within(READ_DEADLINE):
            return
        async with room._order:
            if room.last_id is not None:
                return
            await bus.subscribe(room.subject)
            if not await bus.flush():
                return
            try:
                last = await bus.last_stored(self.stream, self._history_subject(room))
            except Exception as error:
                logger.warning("history_unreadable", extra={"fields": {"error": str(error)}})
                return
            if room.last_id is None:
                room._reached(last)

    async def _delivered_here(self, room: Room, seq: int) -> None:
        """Wait until the stored message ``seq`` reached this process's members; when the
        stream's republished copy is late (a route down), read it back from the history."""
        if await self._wait_reached(room, seq, REPUBLISH_WAIT):
            return
        async with room._order:
            if room.last_id is None:
                room.last_id = seq - 1  # nothing to deliver before it here
            if room.last_id < seq:
                await self._fill_gap(room, until=seq + 1, known=seq)

    async def _wait_reached(self, room: Room, seq: int, seconds: float) -> bool:
        """Whether message ``seq`` reaches this process's members within ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while room.last_id is None or room.last_id < seq:
            left = deadline - loop.time()
            if left <= 0:
                return False
            room._advanced.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(room._advanced.wait(), left)
        return True

    async def _fill_gap(self, room: Room, until: int, known: int) -> None:
        """Deliver what this process missed of the room, from the history, up to ``until``.

        ``known`` is a message the stream said it holds. A history that answers without it
        (a server still catching up, a leader just elected) is asked again for a few
        seconds. A gap it still cannot fill (that message gone since, or the history not
        answering) is never passed over in silence: the members here that take ids are
        closed with 1012, to come back with the last id they saw and be told by their
        resume what it restored and whether that is complete.
        """
        subject = self._history_subject(room)
        last = room.last_id
        assert last is not None
        deadline = asyncio.get_running_loop().time() + _GAP_PATIENCE
        while True:
            with contextlib.suppress(_Unreadable):
                while (stored := await self._stored_after(subject, last)) is not None:
                    seq, data, text = stored
                    if seq >= until:
                        break
                    room._deliver(data, text, "bus", seq)
                    room._reached(seq)
                    last = seq
                    self._bus_metrics.replayed.labels("gap").inc()
            if last >= known or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(_GAP_RETRY)
        if last < known:
            fields = {"room": room.name, "after": last, "through": known}
            logger.warning("history_gap", extra={"fields": fields})
            self._send_back(room)

    def _send_back(self, room: Room) -> None:
        """Close the room's members here that take ids with 1012: each comes back with the
        last id it saw, and its resume gets it what the history holds after it."""
        for ws, member in list(room._members.items()):
            if member.ids and ws.state is State.OPEN:
                task = asyncio.create_task(ws.close(CloseCode.SERVICE_RESTART, _SEND_BACK))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _stored_after(self, subject: str, seq: int) -> tuple[int, bytes, bool] | None:
        """The first message stored on ``subject`` after ``seq``: its id, payload and
        whether it is text; None when there is none.

        Raises:
            _Unreadable: the history did not answer (logged).
        """
        assert self._bus is not None
        try:
            stored = await self._bus.stored_after(self.stream, subject, seq)
        except Exception as error:
            logger.warning("history_unreadable", extra={"fields": {"error": str(error)}})
            raise _Unreadable from error
        if stored is None or stored.seq is None:
            return None
        data = stored.data or b""
        return stored.seq, data, _is_text(stored.headers or {}, data)

    async def _resume(self, room: Room, ws: ServerConnection, since: int) -> None:
        """Replay to ``ws`` the room's messages after ``since``, then let the live ones on."""
        member = room._members[ws]
        if member.catching_up is None:
            member.catching_up = []
        restored, complete, last = 0, False, since
        try:
            bus = self._bus
            if bus is not None and await self._history_within(READ_DEADLINE):
                # Subscribed (and the server knows it) before reading: a message stored
                # meanwhile comes live too, and the ids sort the two out.
                await bus.subscribe(room.subject)
                await bus.flush()
                complete = since == 0 or await self._still_stored(since, room)
                subject = self._history_subject(room)
                try:
                    # Up to the first message the subscription brought: from there on the
                    # live stream has it (held, sent below). Reading on would chase the
                    # stream's end one read at a time, holding the live messages back for
                    # as long as the room is busier than the reads are fast.
                    while not _live_from(member, last + 1) and (
                        stored := await self._stored_after(subject, last)
                    ) is not None:
                        seq, data, text = stored
                        if _live_from(member, seq):
                            break
                        if member.ids:
                            await ws.send(_message_event(seq))
                        await ws.send(data, text=text)
                        restored, last = restored + 1, seq
                except _Unreadable:
                    complete = False  # what followed ``last`` was not read
                self._bus_metrics.replayed.labels("resume").inc(restored)
            # Each send may wait on the client: what arrives meanwhile joins the queue, so
            # the member is let through to live delivery only once nothing is held.
            held = member.catching_up
            while held:
                held_id, data, text = held.pop(0)
                if held_id is None or held_id > last:
                    if held_id is not None and member.ids:
                        await ws.send(_message_event(held_id))
                    await ws.send(data, text=text)
            member.catching_up = None
            event = {"type": "resumed", "since": since, "restored": restored,
                     "complete": complete, "instance": self.instance}  # fmt: skip
            await ws.send(json.dumps(event).encode())
        except ConnectionClosed:
            pass
        finally:
            member.catching_up = None

    async def _still_stored(self, seq: int, room: Room) -> bool:
        """Whether message ``seq`` of the room is still in the history: then so is every
        later one (the oldest go first)."""
        assert self._bus is not None
        with contextlib.suppress(Exception):
            stored = await self._bus.stored(self.stream, seq)
            return stored is not None and stored.subject == self._history_subject(room)
        return False

    async def _history_within(self, seconds: float) -> bool:
        """Whether the history is in use, waiting up to ``seconds`` for a process that has
        just started (or reconnected) to set it up."""
        if self._bus is None or self.history is None:
            return False
        if not self._history_ready and not self._history_overdue:
            try:
                await asyncio.wait_for(self._history_set_up.wait(), seconds)
            except TimeoutError:
                # Not there yet (JetStream off, no quorum): no one else waits for it now;
                # at most once until it is.
                self._history_overdue = True
        return self._history_ready

    async def _keep_history(self) -> None:
        """Have the stream as configured, trying again until the cluster can make it."""
        assert self._bus is not None
        assert self.history is not None
        config = js_api.StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.hist.>"],
            storage=js_api.StorageType.FILE,
            num_replicas=self.history.replicas,
            max_age=self.history.max_age,
            max_bytes=self.history.max_bytes,
            discard=js_api.DiscardPolicy.OLD,
            duplicate_window=min(120.0, self.history.max_age),
            allow_direct=True,
            republish=js_api.RePublish(src=f"{self.prefix}.hist.>", dest=f"{self.prefix}.room.>"),
        )
        logged = False
        while True:
            try:
                await self._bus.ensure_stream(config)
            except Exception as error:
                if not logged:
                    logger.warning("history_unavailable", extra={"fields": {"error": str(error)}})
                    logged = True
                await asyncio.sleep(_HISTORY_RETRY)
                continue
            self._history_ready = True
            self._history_set_up.set()
            self._bus_metrics.history.set(1)
            logger.info("history_ready", extra={"fields": {"stream": self.stream}})
            return

    async def _keep_up(self) -> None:
        """Ask the history about every room that stayed quiet here (:data:`QUIET`): a
        message the subscription did not bring is delivered from the history, in order,
        a few seconds late rather than never."""
        assert self._bus is not None
        while True:
            await asyncio.sleep(HEARTBEAT)
            if not self._history_ready or not self._bus.connected:
                continue
            for room in list(self._rooms.values()):
                now = time.monotonic()
                if room.last_id is None or not room.local or now < room._check_at:
                    continue
                room._quiet = min(room._quiet * 2, _QUIET_MAX)
                room._check_at = now + room._quiet
                try:
                    last = await self._bus.last_stored(self.stream, self._history_subject(room))
                except Exception as error:
                    logger.warning("history_unreadable", extra={"fields": {"error": str(error)}})
                    continue
                if last <= room.last_id:
                    continue
                # Its republished copy may be on its way: given REPUBLISH_WAIT, as a sender's.
                await self._wait_reached(room, last, REPUBLISH_WAIT)
                async with room._order:
                    behind = room.last_id
                    if behind is None or last <= behind:
                        continue
                    fields = {"room": room.name, "after": behind, "through": last}
                    logger.warning("room_behind", extra={"fields": fields})
                    await self._fill_gap(room, until=last + 1, known=last)

    def _connected(self) -> None:
        """(Re)connected: subscribe and announce every room now, not at the next beat;
        make sure of the history's stream once."""
        self._pending.update(self._rooms)
        self._wake.set()
        if self.history is not None and self._history_task is None:
            self._history_task = asyncio.create_task(self._keep_history(), name="history")

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


def joined(
    name: str, ws: ServerConnection, since: int | None = None, ids: bool = False
) -> AbstractAsyncContextManager[Room]:
    """``current().joined(name, ws, since, ids)``: see :meth:`Rooms.joined`."""
    return current().joined(name, ws, since, ids)
