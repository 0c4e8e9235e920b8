"""The rooms of one process, carried out on asyncio and the NATS bus.

Each process keeps the members of each room that it serves. With a bus (``--bus-url``),
it also holds one subscription per room that has members here, on
``<prefix>.room.<token>`` (:func:`subject_token`).

With the history on (the deploy's default), a message is stored in the bus's stream
first; the stream republishes it, with its id, on the room's subject, and every process
with members there delivers it. What each member is sent, and when the history is read,
is decided by :mod:`app.rooms.delivery` (no I/O); this module feeds it what the bus
brings and carries its actions out: writes to the members' connections (bounded per
member, :data:`SLOW` past ``max_queue_bytes``), reads of the history (ranges, a few at a
time), closes. A message the stream does not store reaches no one, and its sender gets
:class:`NotStored`.

Without the history, a process publishes each message on the room's subject once and
delivers what the other processes publish to its own members, at most once (``no_echo``:
never its own back). While the bus is away, the members of one process still reach each
other.

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
import hashlib
import json
import logging
import re
import socket
import string
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.js import api as js_api
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.protocol import State

from app.bus import READ_DEADLINE, STORE_DEADLINE, Bus, StreamMissing
from app.metrics import BusMetrics, Metrics
from app.rooms.delivery import (
    SEND_BACK,
    SLOW,
    Action,
    Close,
    Incomplete,
    Message,
    Read,
    RoomDelivery,
    Send,
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

logger = logging.getLogger(__name__)

HEARTBEAT = 1.0
"""Seconds between two presence announcements of a room by a process."""
EXPIRY = 3.0
"""Seconds after which a process's count of a room, not heard again, drops out."""
MAX_NAME_BYTES = 255
"""Longest room name, in UTF-8 bytes (its subject token is at most three times that)."""
MAX_REF = 64
"""Longest message reference a sender may give (:meth:`Room.broadcast`)."""
MAX_RECENT = 100
"""Most of a room's latest messages a joining member may ask for (``last``)."""

TYPE_HEADER = "Wsapp-Type"
REF_HEADER = "Wsapp-Ref"
MEMBERS_HEADER = "Wsapp-Members"
INSTANCE_HEADER = "Wsapp-Instance"

# Headers JetStream adds to a stored message it republishes: the stream's sequence of the
# message, and the sequence of the message stored before it on the same subject (0: none).
SEQUENCE_HEADER = "Nats-Sequence"
LAST_SEQUENCE_HEADER = "Nats-Last-Sequence"

_PLAIN = frozenset(string.ascii_letters + string.digits + "-_")
# Until the stream is there (a cluster still electing its leaders), tried again this often.
_HISTORY_RETRY = 2.0
# A read the history answered without what it holds (a server catching up) is asked again
# after this long (app.rooms.delivery.GAP_ATTEMPTS times at most).
_GAP_RETRY = 0.5
# Reads of the history out at once, for every room of the process: a burst (a bus restart
# that left a thousand rooms behind) is spread, and one stuck read stalls no other room.
_READS_AT_ONCE = 32
# A room's starting point is waited for this long (the bus back after its server's
# restart, the history answering) before its joiner is refused; as long as a resume's reads.
_ANCHOR_DEADLINE = READ_DEADLINE
# While the bus is away, a joiner's wait looks again this often.
_ANCHOR_RETRY = 0.2
QUIET = 2.0
"""Seconds a room with members here may go without a stored message reaching this process
before the process asks the history whether it missed some (its server was down while
messages were stored, a subscription that brings nothing); the wait doubles while the
room stays quiet, up to a minute, and is back to this at the next message."""
_QUIET_MAX = 60.0
REPUBLISH_WAIT = 1.0
"""Seconds a sender's process waits for the stream to republish its stored message to it
before reading it back from the history (its server's route to the stream's leader down)."""
# A sender is answered once its message reached this process's members, or after this.
_DELIVERED_WAIT = 5.0
# The payload bytes of a room's latest messages each process keeps (app.rooms.delivery):
# a member back from within them is sent them without a read.
LOG_BYTES = 1 << 20
# After this long without a word from the bus task, the stop goes on without it.
_CLOSE_TIMEOUT = 2.0


class NotStored(Exception):
    """A broadcast the history did not store: no member got it. The bus is away, the
    stream has no quorum or no leader within the store deadline, or the message is over
    the server's ``max_payload``. (A store that timed out may still land later: it is
    then delivered, once, in its place in the room's order.)"""


class HistoryUnavailable(Exception):
    """A room could not be joined: the history did not give the room's starting point (its
    last id), without which no member can be promised every message."""


@dataclass(frozen=True)
class History:
    """Where and how long the bus keeps the rooms' messages (a JetStream stream).

    Args:
        max_age: seconds a message is kept.
        max_bytes: bytes the stream holds at most; the oldest messages go first.
        replicas: servers holding each message (1..5; 3 survives one server down).
        apply: bring an existing stream to these settings; else only make it if missing
            (the deploy has one host's instances apply them).
    """

    max_age: float
    max_bytes: int
    replicas: int = 1
    apply: bool = False

    @property
    def duplicate_window(self) -> float:
        """Seconds within which the stream recognises a message stored again under the
        same key: a retried store, a client's re-send under its reference (at most
        ``max_age``, which JetStream requires). Kept short: a replica that caught up
        while a server restarted may not know the keys of what it caught up, and one
        that stores a duplicate the others refuse is a stream whose ids mean different
        messages on different servers. A client away longer finds its own message in its
        resume instead (its reference comes with its id)."""
        return min(120.0, self.max_age)

    @property
    def store_deadline(self) -> float:
        """Seconds a store keeps trying: within the duplicate window, so that every try of
        a message is stored once, whatever ``max_age``."""
        return min(STORE_DEADLINE, self.duplicate_window / 2)


def valid_ref(ref: str) -> bool:
    """Whether ``ref`` can name a message: 1 to :data:`MAX_REF` printable ASCII characters,
    no space."""
    return 0 < len(ref) <= MAX_REF and all("!" <= char <= "~" for char in ref)


def _store_id(room: Room, ref: str | None) -> str:
    """The message's key in the stream's deduplication: the room and the sender's
    reference (the same from any process or host), or a fresh one (no reference: only
    the store's own retries are recognised)."""
    if ref is None:
        return uuid.uuid4().hex
    key = hashlib.blake2b(f"{room.subject}\0{ref}".encode(), digest_size=16)
    return "ref-" + key.hexdigest()


def _message_event(message: Message) -> bytes:
    event: dict[str, object] = {"type": "message", "id": message.id}
    if message.ref is not None:
        event["ref"] = message.ref
    return json.dumps(event).encode()


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
        self._rooms = rooms
        self._delivery: RoomDelivery[ServerConnection] = RoomDelivery(LOG_BYTES)
        self._ids: dict[ServerConnection, bool] = {}  # members that take id events
        # Members whose resume is under way: set once it is told, or they are closed.
        self._resuming: dict[ServerConnection, asyncio.Future[None]] = {}
        self._anchoring = asyncio.Lock()
        # Senders waiting for an id to reach this process: (id, future), each its own.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._last_seen: int | None = None
        # When to ask the history whether this process missed some of the room (QUIET),
        # and how long the wait after that one.
        self._check_at = time.monotonic() + QUIET
        self._quiet = QUIET
        self._checking = False
        # instance -> (members there, monotonic time at which that count expires)
        self._remote: dict[str, tuple[int, float]] = {}

    @property
    def last_id(self) -> int | None:
        """The id of the last stored message delivered here (None: no starting point yet)."""
        return self._delivery.last

    async def broadcast(self, message: str | bytes, ref: str | None = None) -> int | None:
        """Send ``message`` to every member of the room in the fleet, the sender included.

        A ``str`` goes in a text frame, ``bytes`` in a binary frame. With the history on,
        the message is stored first and every member, here too, gets it in the room's one
        order, once; this returns its id once the members in this process have it in
        their write buffers. Without it, the members here get it at once and the others
        through the bus, at most once; this returns None.

        Args:
            message: the message, as a handler receives it from ``ws``.
            ref: the sender's own reference for the message (:func:`valid_ref`),
                stored with it and told to every member with its id. A message broadcast
                again with the same reference, in the same room, from any process,
                within the stream's ``duplicate_window`` (2 min), is stored once: the
                second call returns the first one's id and sends nothing.

        Raises:
            NotStored: the history is on and did not store the message; no one got it.
            ValueError: ``ref`` is not a valid reference.
        """
        if ref is not None and not valid_ref(ref):
            raise ValueError(f"a message reference is 1 to {MAX_REF} printable ASCII characters")
        return await self._rooms._broadcast(self, message, ref)

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

    def _advanced(self) -> None:
        """When the room's last id here moved on: wake the senders waiting for it; the
        room is not quiet."""
        last = self._delivery.last
        if last is None or last == self._last_seen:
            return
        self._last_seen = last
        self._check_at = time.monotonic() + QUIET
        self._quiet = QUIET
        waiting = []
        for seq, future in self._waiters:
            if seq <= last:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((seq, future))
        self._waiters = waiting

    async def _reached(self, seq: int, seconds: float) -> bool:
        """Whether message ``seq`` reaches this process's members within ``seconds``."""
        last = self._delivery.last
        if last is not None and last >= seq:
            return True
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, future))
        try:
            await asyncio.wait_for(future, seconds)
        except TimeoutError:
            return False
        finally:
            self._waiters = [(s, f) for s, f in self._waiters if f is not future]
        return True


class Rooms:
    """The rooms of one process, spanning the fleet when it has a bus.

    Args:
        instance: this process's label in presence, e.g. ``fleet1:8001``.
        metrics: the process's metrics (None: not counted).
        bus_servers: URLs of the bus servers; none: the rooms stay in this process.
        bus_token: auth token for the bus servers, or empty.
        bus_ca: CA file that verifies the bus servers of ``tls://`` URLs (empty: the
            system's).
        prefix: first tokens of the rooms' subjects, ``<prefix>.room.<token>``.
        history: keep the rooms' messages in the bus (None: at most once, no ids).
        max_queue_bytes: bytes a member's outgoing queue (its connection's write buffer)
            may hold before it is closed with :data:`SLOW`; 0: no bound.
    """

    def __init__(
        self,
        instance: str,
        metrics: Metrics | None = None,
        bus_servers: Sequence[str] = (),
        bus_token: str = "",
        bus_ca: str = "",
        prefix: str = "wsapp",
        history: History | None = None,
        max_queue_bytes: int = 0,
    ) -> None:
        self.instance = instance
        self.prefix = prefix
        self.history = history
        self.max_queue_bytes = max_queue_bytes
        self.stream = re.sub(r"[^A-Za-z0-9_-]", "_", prefix).upper() + "_ROOMS"
        """The JetStream stream holding the rooms' history."""
        self._history_ready = False
        self._history_set_up = asyncio.Event()
        self._history_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        # Reads, checks and closes under way, kept until done (the loop holds weak refs).
        self._tasks: set[asyncio.Task[None]] = set()
        self._reads = asyncio.Semaphore(_READS_AT_ONCE)
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
                on_message=self._received, on_connected=self._connected, ca_file=bus_ca,
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
        for task in (self._task, self._history_task, self._watch_task, *self._tasks):
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

    @property
    def _stored(self) -> bool:
        """Whether room messages are stored in the history (configured, with a bus)."""
        return self._bus is not None and self.history is not None

    @contextlib.asynccontextmanager
    async def _joined(
        self, name: str, ws: ServerConnection, since: int | None, ids: bool, last: int
    ) -> AsyncIterator[Room]:
        room = self._enter(name, ws)
        try:
            if self._stored:
                await self._admit(room, ws, since, ids, last)
            elif since is not None:
                # No history: nothing to restore, and nothing to say it is complete.
                self._tell_resumed(room, ws, since, 0, complete=False)
            yield room
        finally:
            self._apply(room, room._delivery.leave(ws))
            room._ids.pop(ws, None)
            room._resuming.pop(ws, None)
            self._leave(room, ws)

    async def _admit(
        self, room: Room, ws: ServerConnection, since: int | None, ids: bool, last: int
    ) -> None:
        """Make ``ws`` a member of the room's order here; with ``since`` (or ``last``),
        once it was sent what it missed (the room's latest) and told so (or closed)."""
        await self._anchor(room)
        if since is None and last > 0:
            # The room's latest, sent as a resume from just before them would be.
            since = await self._start_of_last(room, last)
            kept = True
        else:
            kept = since is None or await self._since_kept(since)
        room._ids[ws] = ids
        if since is None:
            self._apply(room, room._delivery.join(ws))
            return
        resumed = room._resuming[ws] = asyncio.get_running_loop().create_future()
        self._apply(room, room._delivery.join(ws, since, kept))
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            await asyncio.wait({resumed, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()

    def joined(
        self, name: str, ws: ServerConnection, since: int | None = None, ids: bool = False,
        last: int = 0,
    ) -> AbstractAsyncContextManager[Room]:  # fmt: skip
        """Make ``ws`` a member of room ``name`` for the duration of an ``async with``.

        With ``since``, the id of the last message the client saw in this room, the member
        first gets every later message the history still holds, in order, then the live
        ones, none twice; then a ``{"type": "resumed", ...}`` event (binary frame of JSON)
        says how many were restored and whether nothing before them is missing
        (``"complete": false``: the history no longer reaches back to ``since``, or some
        could not be read). This is done when the ``async with`` is entered.

        Args:
            name: any string of at most :data:`MAX_NAME_BYTES` UTF-8 bytes.
            ws: the handler's connection.
            since: the last message id the client saw (None: live messages only).
            ids: precede each stored message with a ``{"type": "message", "id": N}`` event
                (a binary frame of JSON): the id to come back with.
            last: without ``since``, first send the room's latest ``last`` messages (at
                most :data:`MAX_RECENT`) from the history, in order, then the
                ``resumed`` event, as a resume from just before them would (a client
                opening a chat sees its recent past, and resumes from there later).

        Raises:
            ValueError: when the name is too long, ``since`` negative or ``last`` out of
                range.
            HistoryUnavailable: (on entering) the history is on and did not answer.
        """
        if len(_utf8(name)) > MAX_NAME_BYTES:
            raise ValueError(f"room name longer than {MAX_NAME_BYTES} bytes")
        if since is not None and since < 0:
            raise ValueError("since must be a message id, 0 or more")
        if not 0 <= last <= MAX_RECENT:
            raise ValueError(f"last must be between 0 and {MAX_RECENT}")
        return self._joined(name, ws, since, ids, last)

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

    # --- carrying out what app.rooms.delivery decides -------------------------------------

    def _apply(self, room: Room, actions: list[Action[ServerConnection]]) -> None:
        """Carry out ``actions`` in order: writes at once (consecutive sends of one message
        in one ``broadcast()``), reads and closes in the background."""
        index = 0
        while index < len(actions):
            action = actions[index]
            index += 1
            if isinstance(action, Send):
                targets = [action.member]
                while index < len(actions):
                    following = actions[index]
                    if not isinstance(following, Send) or following.message is not action.message:
                        break
                    targets.append(following.member)
                    index += 1
                self._send(room, action.message, targets)
            elif isinstance(action, Read):
                self._spawn(self._read(room, action))
            elif isinstance(action, Close):
                self._close_member(room, action.member, action.code, action.reason)
            elif isinstance(action, Incomplete):
                event = {"type": "incomplete", "after": action.after}
                broadcast([action.member], json.dumps(event).encode(), text=False)
            else:
                self._tell_resumed(room, action.member, action.since, action.restored,
                                   action.complete)  # fmt: skip
        room._advanced()

    def _send(self, room: Room, message: Message, targets: list[ServerConnection]) -> None:
        """Write a stored message, after its id event where wanted, to ``targets``."""
        open_ = self._within_bound(room, targets)
        with_ids = [ws for ws in open_ if room._ids.get(ws)]
        if with_ids:
            broadcast(with_ids, _message_event(message), text=False)
        broadcast(open_, message.data, text=message.text)
        self._count_deliveries("bus", len(open_))

    def _within_bound(self, room: Room, targets: list[ServerConnection]) -> list[ServerConnection]:
        """The open ``targets`` whose outgoing queue is within its bound; the others are
        closed as slow. A member being sent what it missed is not held to it: its replay
        waits for its queue to drain between two reads instead."""
        bound = self.max_queue_bytes
        open_ = []
        for ws in targets:
            if ws.state is not State.OPEN:
                continue
            if bound and ws not in room._resuming and ws.transport.get_write_buffer_size() > bound:
                if self._stored and ws in room._ids:
                    self._apply(room, room._delivery.slow(ws))
                else:
                    self._close_member(room, ws, SLOW, "slow")
                continue
            open_.append(ws)
        return open_

    def _close_member(self, room: Room, ws: ServerConnection, code: int, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.room_closes.labels("slow" if code == SLOW else "send_back").inc()
        if code == SEND_BACK:
            logger.warning("history_gap", extra={"fields": {"room": room.name}})
        self._resolve(room, ws)
        if ws.state is State.OPEN:
            self._spawn(ws.close(code, reason))

    def _tell_resumed(
        self, room: Room, ws: ServerConnection, since: int, restored: int, complete: bool
    ) -> None:
        event = {"type": "resumed", "since": since, "restored": restored,
                 "complete": complete, "instance": self.instance}  # fmt: skip
        broadcast([ws], json.dumps(event).encode(), text=False)
        self._bus_metrics.replayed.labels("resume").inc(restored)
        self._resolve(room, ws)

    def _resolve(self, room: Room, ws: ServerConnection) -> None:
        resuming = room._resuming.pop(ws, None)
        if resuming is not None and not resuming.done():
            resuming.set_result(None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, room: Room, read: Read[ServerConnection]) -> None:
        """Read a range of the room's history and hand the answer back to the room."""
        assert self._bus is not None
        if read.attempt:
            await asyncio.sleep(_GAP_RETRY)
        member = read.member
        if member is not None and member.state is State.OPEN:
            # What it was sent last is on its way first: its replay is bounded by its pace.
            with contextlib.suppress(Exception):
                await member.drain()
        async with self._reads:
            try:
                first = await self._bus.first_stored(self.stream)
                found, exhausted = await self._bus.read_range(
                    self.stream, self._history_subject(room), read.after, read.through
                )
            except (nats.errors.Error, TimeoutError, StreamMissing) as error:
                fields = {"room": room.name, "error": str(error) or type(error).__name__}
                logger.warning("history_unreadable", extra={"fields": fields})
                self._apply(room, room._delivery.read_failed(read))
                return
        messages = [
            Message(seq, data, _is_text(headers, data), ref=headers.get(REF_HEADER))
            for seq, headers, data in found
        ]
        if member is None and messages:
            self._bus_metrics.replayed.labels("gap").inc(len(messages))
        # Nothing expired after ``read.after`` (the oldest go first): the first read is the
        # one after it.
        kept = first <= read.after + 1
        self._apply(room, room._delivery.read_done(read, messages, kept, exhausted))

    async def _start_of_last(self, room: Room, count: int) -> int:
        """The ``since`` after which the room holds its latest ``count`` messages: from the
        messages kept here when they tell it, else searched in the history (by halves,
        counting what it holds after a point: JetStream reads forward only).

        Raises:
            HistoryUnavailable: the history did not answer.
        """
        found = room._delivery.start_of_last(count)
        if found is not None:
            return found
        assert self._bus is not None
        subject = self._history_subject(room)
        try:
            async with self._reads:
                # The answer is in [first - 1, last]: the smallest point with at most
                # ``count`` of the room's messages after it.
                low = await self._bus.first_stored(self.stream, READ_DEADLINE) - 1
                high = room._delivery.last or 0
                if await self._bus.count_after(self.stream, subject, low) <= count:
                    return low
                while high - low > 1:
                    middle = (low + high) // 2
                    if await self._bus.count_after(self.stream, subject, middle) <= count:
                        high = middle
                    else:
                        low = middle
        except (nats.errors.Error, TimeoutError, StreamMissing) as error:
            fields = {"room": room.name, "error": str(error) or type(error).__name__}
            logger.warning("history_unreadable", extra={"fields": fields})
            raise HistoryUnavailable(str(error)) from error
        return high

    async def _since_kept(self, since: int) -> bool:
        """Whether message ``since`` is still stored (0: nothing ever expired); False when
        the history does not say (the member is then told its resume is incomplete)."""
        assert self._bus is not None
        try:
            return await self._bus.first_stored(self.stream, READ_DEADLINE) <= max(since, 1)
        except (nats.errors.Error, TimeoutError):
            return False

    # --- the bus ------------------------------------------------------------------------

    def _history_subject(self, room: Room) -> str:
        """Where the room's messages are stored; JetStream republishes them, with their
        sequence, on the room's subject."""
        return f"{self.prefix}.hist.{room.subject.rsplit('.', 1)[1]}"

    async def _broadcast(self, room: Room, message: str | bytes, ref: str | None) -> int | None:
        text = isinstance(message, str)
        data = message.encode() if isinstance(message, str) else bytes(message)
        headers = {} if text else {TYPE_HEADER: "binary"}
        if ref is not None:
            headers[REF_HEADER] = ref
        if self._bus is None:
            self._deliver_plain(room, data, text, "local")
            return None
        if self.history is None:
            # At most once: the members here now, the others if the bus takes it.
            self._deliver_plain(room, data, text, "local")
            dropped = await self._bus.publish(room.subject, data, headers or None)
            if dropped is None:
                self._bus_metrics.messages.labels("out", "room").inc()
            else:
                self._bus_metrics.dropped.labels(dropped).inc()
            return None
        seq = None
        if self._history_ready:
            seq = await self._bus.store(
                self._history_subject(room), data, headers, msg_id=_store_id(room, ref),
                deadline=self.history.store_deadline,
            )  # fmt: skip
        if seq is None:
            self._bus_metrics.dropped.labels("not_stored").inc()
            raise NotStored("the room's history did not store the message")
        self._bus_metrics.messages.labels("out", "room").inc()
        # Its republished copy is usually here first; when it is late (the route to the
        # stream's leader down), it is read back.
        if not await room._reached(seq, REPUBLISH_WAIT):
            self._apply(room, room._delivery.stored(seq))
            await room._reached(seq, _DELIVERED_WAIT)
        return seq

    def _deliver_plain(self, room: Room, data: bytes, text: bool, source: str) -> None:
        """Write a message that has no id (no history) to every open member here."""
        open_ = self._within_bound(room, list(room.local))
        broadcast(open_, data, text=text)
        self._count_deliveries(source, len(open_))

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
        if self.history is None:
            self._deliver_plain(room, data, text, "bus")
            return
        try:
            seq, prev = int(headers[SEQUENCE_HEADER]), int(headers[LAST_SEQUENCE_HEADER])
        except (KeyError, ValueError):
            # Not stored (a process without history on the same subjects): a member that
            # takes ids never gets a message without one, nor one others may not get.
            return
        message = Message(seq, data, text, prev, headers.get(REF_HEADER))
        self._apply(room, room._delivery.live(message))

    async def _anchor(self, room: Room) -> None:
        """Give a room new to this process its starting point in the history: subscribed
        (and the server knows it), then the id of the room's last stored message. Every
        later one then reaches its members here, live or read back.

        Waits up to :data:`_ANCHOR_DEADLINE` for the bus and the history (a server
        restarting on this host).

        Raises:
            HistoryUnavailable: the bus or the history did not answer in that time.
        """
        bus = self._bus
        assert bus is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ANCHOR_DEADLINE
        async with room._anchoring:
            while not room._delivery.anchored:
                left = deadline - loop.time()
                if left <= 0:
                    raise HistoryUnavailable("the bus or its history did not answer")
                if not await self._history_within(left) or not bus.connected:
                    await asyncio.sleep(_ANCHOR_RETRY)
                    continue
                await bus.subscribe(room.subject)
                if not await bus.flush():
                    continue
                try:
                    last = await bus.last_stored(self.stream, self._history_subject(room), left)
                except (nats.errors.Error, TimeoutError, StreamMissing) as error:
                    fields = {"room": room.name, "error": str(error) or type(error).__name__}
                    logger.warning("history_unreadable", extra={"fields": fields})
                    raise HistoryUnavailable(str(error)) from error
                self._apply(room, room._delivery.anchor(last))

    async def _history_within(self, seconds: float) -> bool:
        """Whether the history is set up, waiting up to ``seconds`` for a process that has
        just started to set it up."""
        if not self._history_ready:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._history_set_up.wait(), seconds)
        return self._history_ready

    async def _keep_history(self) -> None:
        """Have the stream, trying again until the cluster can make it. An existing stream
        keeps its settings unless this process applies them (``History.apply``: the deploy
        has one host's instances do it), so that instances of two releases, or of two
        settings, do not flip them at each start."""
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
            duplicate_window=self.history.duplicate_window,
            allow_direct=True,
            republish=js_api.RePublish(src=f"{self.prefix}.hist.>", dest=f"{self.prefix}.room.>"),
        )
        logged = False
        while True:
            try:
                matches = await self._bus.ensure_stream(config, update=self.history.apply)
            except Exception as error:
                if not logged:
                    logger.warning("history_unavailable", extra={"fields": {"error": str(error)}})
                    logged = True
                await asyncio.sleep(_HISTORY_RETRY)
                continue
            if not matches:
                fields = {"stream": self.stream, "hint": "set by APP_BUS_HISTORY_APPLY=1"}
                logger.warning("history_settings_differ", extra={"fields": fields})
            self._history_ready = True
            self._history_set_up.set()
            self._bus_metrics.history.set(1)
            logger.info("history_ready", extra={"fields": {"stream": self.stream}})
            return

    async def _keep_up(self) -> None:
        """Ask the history about every room that stayed quiet here (:data:`QUIET`), a few
        rooms at a time and never waiting inline: a message the subscription did not bring
        is read and delivered, in order, a few seconds late rather than never."""
        assert self._bus is not None
        while True:
            await asyncio.sleep(HEARTBEAT)
            if not self._history_ready or not self._bus.connected:
                continue
            now = time.monotonic()
            for room in list(self._rooms.values()):
                if room._checking or not room.local or now < room._check_at:
                    continue
                if not room._delivery.anchored:
                    continue
                room._quiet = min(room._quiet * 2, _QUIET_MAX)
                room._check_at = now + room._quiet
                room._checking = True
                self._spawn(self._check(room))

    async def _check(self, room: Room) -> None:
        """Whether the history holds more of the room than reached this process."""
        assert self._bus is not None
        try:
            async with self._reads:
                last = await self._bus.last_stored(
                    self.stream, self._history_subject(room), REPUBLISH_WAIT * 2
                )
        except (nats.errors.Error, TimeoutError, StreamMissing) as error:
            fields = {"room": room.name, "error": str(error) or type(error).__name__}
            logger.warning("history_unreadable", extra={"fields": fields})
            return
        finally:
            room._checking = False
        here = room._delivery.last
        if here is not None and last > here:
            logger.warning(
                "room_behind", extra={"fields": {"room": room.name, "after": here, "through": last}}
            )
            self._apply(room, room._delivery.stored(last))

    def _connected(self) -> None:
        """(Re)connected: subscribe and announce every room now, not at the next beat, and
        ask the history about each soon (what was stored meanwhile); make sure of the
        history's stream once."""
        self._pending.update(self._rooms)
        self._wake.set()
        for room in self._rooms.values():
            room._check_at, room._quiet = 0.0, QUIET
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
    name: str, ws: ServerConnection, since: int | None = None, ids: bool = False, last: int = 0
) -> AbstractAsyncContextManager[Room]:
    """``current().joined(name, ws, since, ids, last)``: see :meth:`Rooms.joined`."""
    return current().joined(name, ws, since, ids, last)
