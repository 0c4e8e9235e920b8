"""What each member of a room is sent: the rules as a state machine with no I/O.

One :class:`RoomDelivery` per room that has members in a process. It takes events (a
live copy of a stored message, the answer to a read of the history, a join, a resume,
a leave, a member found slow, a message known to be stored) and returns actions (send
message N to member X, read a range of the history, close member X with a code, tell
member X how its resume went). The asyncio and NATS layer (:mod:`app.rooms.process`)
carries the actions out and feeds back what happened; nothing here waits, reads a
clock or touches a socket, so every rule is tested without a network and its
invariants are checked over generated interleavings (``tests/app/test_delivery.py``).

The promise it keeps, for every member: the ids it is sent strictly increase, none
comes twice, and every message stored after its starting point (its ``since``, or the
room's position here when it joined) is sent to it, unless it is told otherwise: a
``Incomplete`` before anything after the hole is sent (and a ``Resumed`` with
``complete=False``), or a close with :data:`SEND_BACK` or :data:`SLOW`, after which it is
sent nothing more.

Ids are the stream's sequence numbers: they grow in the room's order but not by one
(the stream counts every room). A live copy carries the id of the room's message
stored before it (``prev``, JetStream's ``Nats-Last-Sequence``), so a gap shows; a read
of the history returns each message after the one before it on the room's subject.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

__all__ = [
    "GAP_ATTEMPTS",
    "SEND_BACK",
    "SLOW",
    "Action",
    "Close",
    "Incomplete",
    "Message",
    "Read",
    "Resumed",
    "RoomDelivery",
    "Send",
]

SEND_BACK = 1012
"""Close code of a member whose messages this process cannot get (a gap the history no
longer holds, or does not answer for): it comes back with its last id, and its resume
says whether that is complete."""
SLOW = 4008
"""Close code of a member whose outgoing queue passed its bound: it comes back with its
last id and the history fills what it missed."""
GAP_ATTEMPTS = 10
"""Reads of a range the history answers without messages known to be stored (a server
catching up, a leader just elected), before the gap counts as lost."""

_SEND_BACK_REASON = "messages missed here: come back with your last id"

M = TypeVar("M", bound=Hashable)


@dataclass(frozen=True)
class Message:
    """A stored message of the room.

    Args:
        id: its id, the stream's sequence.
        data: its payload.
        text: whether it goes out as text (else binary).
        prev: the id of the room's message stored before it (0: none); None when not
            known (a message read back from the history).
        ref: the reference its sender gave it, if any (told to every member with its id,
            so that the sender, back from a cut, finds it stored).
    """

    id: int
    data: bytes
    text: bool = True
    prev: int | None = None
    ref: str | None = None


@dataclass(frozen=True)
class Send(Generic[M]):
    """Send ``message`` to ``member`` (with its id event first if it takes ids)."""

    member: M
    message: Message


@dataclass(frozen=True)
class Read(Generic[M]):
    """Read the room's stored messages with ids in (``after``, ``through``].

    ``member`` None: for the room (a gap in what reached this process); else for that
    member's resume. ``attempt`` > 0: the history answered without messages it holds;
    ask again after a pause. Answer with :meth:`RoomDelivery.read_done` or
    :meth:`RoomDelivery.read_failed`, passing this action back.
    """

    member: M | None
    after: int
    through: int
    attempt: int = 0


@dataclass(frozen=True)
class Close(Generic[M]):
    """Close ``member``'s connection with ``code``: it is sent nothing more."""

    member: M
    code: int
    reason: str


@dataclass(frozen=True)
class Resumed(Generic[M]):
    """Tell ``member`` its resume from ``since`` is done: ``restored`` messages it had
    missed were sent, and whether nothing before them is missing (``complete``)."""

    member: M
    since: int
    restored: int
    complete: bool


@dataclass(frozen=True)
class Incomplete(Generic[M]):
    """Tell ``member`` that messages after ``after`` (the last id it was sent, or its
    ``since``) may be missing: they expired before it could be sent them. Comes before
    anything after them, so a client cut off mid-replay knows too."""

    member: M
    after: int


Action = Send[M] | Read[M] | Close[M] | Resumed[M] | Incomplete[M]


class _State(enum.Enum):
    LIVE = "live"  # sent each message as it is appended here
    CATCHING_UP = "catching up"  # being sent what it missed, from the log or the history
    CLOSED = "closed"  # told to go: sent nothing more


@dataclass
class _Cursor:
    """Where one member is in the room."""

    sent: int
    """The last id it was sent, or its starting point."""
    state: _State
    since: int | None = None
    joined_at: int = 0
    """The room's position here when it joined: what it is sent up to there is restored."""
    restored: int = 0
    complete: bool = True
    reading: bool = False


@dataclass
class _Log:
    """The room's latest messages here, every one after ``base`` through the last."""

    base: int
    messages: deque[Message] = field(default_factory=deque)
    size: int = 0

    @property
    def last(self) -> int:
        return self.messages[-1].id if self.messages else self.base

    def after(self, seq: int) -> Iterable[Message]:
        """The messages after ``seq`` (which is at or past ``base``)."""
        return (message for message in self.messages if message.id > seq)


class RoomDelivery(Generic[M]):
    """One room's order in one process, and each member's place in it.

    Args:
        log_bytes: payload bytes of the latest messages kept here; a member that comes
            back from further behind, or falls further behind, is read the rest from the
            history. Also the bound on the live copies held while a gap is read.
    """

    def __init__(self, log_bytes: int) -> None:
        self._log_bytes = log_bytes
        self._log: _Log | None = None  # None: no starting point yet
        self._members: dict[M, _Cursor] = {}
        # Live copies that came ahead of a gap, by the id before them.
        self._early: dict[int, Message] = {}
        self._early_size = 0
        self._known = 0  # the highest id known to be stored
        self._reading: Read[M] | None = None  # the room's read, while one is out

    # --- what the runtime asks ------------------------------------------------------------

    @property
    def last(self) -> int | None:
        """The id of the room's last message here (None: no starting point yet)."""
        return self._log.last if self._log is not None else None

    @property
    def anchored(self) -> bool:
        """Whether the room has its starting point here (members may join)."""
        return self._log is not None

    def start_of_last(self, count: int) -> int | None:
        """The ``since`` from which a member is sent the room's last ``count`` messages,
        when the latest messages kept here tell it; None when they do not (the history
        must be asked)."""
        log = self._log
        if log is None or count < 0:
            return None
        if count == 0:
            return log.last
        if len(log.messages) > count:
            return log.messages[-count - 1].id
        if len(log.messages) == count or log.base == 0:
            # All of them here, or fewer but every one since the room's first.
            return log.base
        return None

    # --- events -----------------------------------------------------------------------------

    def anchor(self, last: int) -> list[Action[M]]:
        """The room's last stored message was ``last`` (0: none) once this process listened:
        every later one reaches it live, or is read. Live copies that came first are kept."""
        if self._log is not None:
            return []
        self._log = _Log(base=last)
        self._known = max(self._known, last)
        return self._settle()

    def join(
        self, member: M, since: int | None = None, since_kept: bool = True
    ) -> list[Action[M]]:
        """``member`` joins: from ``since`` (the last id it saw) or, without, from now.

        Args:
            member: the member.
            since: the last id it saw; None: it is sent what comes from now on.
            since_kept: message ``since`` is still stored (or ``since`` is 0); False: what
                came after it may have expired, and its resume is told incomplete.

        Raises:
            RuntimeError: before :meth:`anchor`.
        """
        if self._log is None:
            raise RuntimeError("a member joined a room with no starting point")
        last = self._log.last
        if since is None:
            self._members[member] = _Cursor(sent=last, state=_State.LIVE, joined_at=last)
            return []
        cursor = _Cursor(sent=since, state=_State.CATCHING_UP, since=since, joined_at=last)
        self._members[member] = cursor
        told = [] if since_kept else self._incomplete(member, cursor)
        return [*told, *self._catch_up(member, cursor)]

    def leave(self, member: M) -> list[Action[M]]:
        """``member`` left (its connection closed)."""
        self._members.pop(member, None)
        return []

    def slow(self, member: M) -> list[Action[M]]:
        """``member``'s outgoing queue passed its bound."""
        cursor = self._members.get(member)
        if cursor is None or cursor.state is _State.CLOSED:
            return []
        return [self._close(member, cursor, SLOW, "slow: come back with your last id")]

    def live(self, message: Message) -> list[Action[M]]:
        """A live copy of a stored message (``prev`` known) reached this process."""
        assert message.prev is not None
        self._known = max(self._known, message.id)
        if self._log is not None and message.id <= self._log.last:
            return []  # here already (read, or a copy before it)
        if self._log is not None and message.prev <= self._log.last:
            return [*self._append(message), *self._settle()]
        if message.prev not in self._early:
            self._early[message.prev] = message
            self._early_size += len(message.data)
            # Past the bound, the newest copy goes: the gap's read brings it back.
            while self._early_size > self._log_bytes and len(self._early) > 1:
                dropped = self._early.pop(max(self._early))
                self._early_size -= len(dropped.data)
        return self._settle()

    def stored(self, seq: int) -> list[Action[M]]:
        """Message ``seq`` is stored (a sender's store acknowledged, the room's last id
        read back): what is missing here up to it is read."""
        self._known = max(self._known, seq)
        return self._settle()

    def read_done(
        self, read: Read[M], messages: list[Message], start_kept: bool, exhausted: bool
    ) -> list[Action[M]]:
        """The history answered ``read``.

        Args:
            read: the action answered.
            messages: in order, each the next one stored on the room's subject after the
                one before it, all within (``read.after``, ``read.through``].
            start_kept: message ``read.after`` is still stored (or is 0): the first of
                ``messages`` is the one after it. False: some may have expired.
            exhausted: the history holds nothing more in the range after the last of
                ``messages``.
        """
        chained: list[Message] = []
        prev = read.after if start_kept else None
        for message in messages:
            chained.append(replace(message, prev=prev))
            prev = message.id
        if read.member is None:
            return self._room_read(read, chained, start_kept, exhausted)
        return self._member_read(read.member, read, chained, start_kept, exhausted)

    def read_failed(self, read: Read[M]) -> list[Action[M]]:
        """The history did not answer ``read`` in time."""
        if read.member is None:
            self._reading = None
            return self._room_short(read)
        cursor = self._members.get(read.member)
        if cursor is None or cursor.state is not _State.CATCHING_UP:
            return []
        cursor.reading = False
        return self._member_short(read.member, cursor, read)

    # --- the rules ----------------------------------------------------------------------------

    def _append(self, message: Message) -> list[Action[M]]:
        """Add the room's next message here and send it to every member live on it."""
        log = self._log
        assert log is not None
        assert message.prev is not None
        assert message.id > log.last
        log.messages.append(message)
        log.size += len(message.data)
        while log.size > self._log_bytes and len(log.messages) > 1:
            gone = log.messages.popleft()
            log.size -= len(gone.data)
            log.base = gone.id
        actions: list[Action[M]] = []
        for member, cursor in self._members.items():
            if cursor.state is _State.LIVE and cursor.sent < message.id:
                # A live member has every message up to the last here (or is ahead).
                assert cursor.sent >= message.prev
                actions.append(Send(member, message))
                cursor.sent = message.id
        return actions

    def _settle(self) -> list[Action[M]]:
        """Take in the live copies that now follow on, and read what is missing."""
        log = self._log
        if log is None:
            return []
        actions: list[Action[M]] = []
        while True:
            message = self._early.pop(log.last, None)
            if message is None:
                # A copy whose prev is behind the last here (a copy already here, or a
                # starting point that is not one of the room's ids) follows on too.
                behind = [prev for prev in self._early if prev < log.last]
                if not behind:
                    break
                message = self._early.pop(min(behind))
            self._early_size -= len(message.data)
            if message.id > log.last:
                actions += self._append(message)
        if self._known > log.last and self._reading is None:
            self._reading = Read(None, log.last, self._known)
            actions.append(self._reading)
        return actions

    def _room_read(
        self, read: Read[M], messages: list[Message], start_kept: bool, exhausted: bool
    ) -> list[Action[M]]:
        self._reading = None
        log = self._log
        assert log is not None
        actions: list[Action[M]] = []
        if not start_kept and messages and messages[0].id > log.last:
            # What came between the last here and the first still stored is gone: the
            # members live here lack it. The room goes on from what is stored.
            actions += self._send_back_below(messages[0].id)
            first = messages[0]
            messages[0] = replace(first, prev=log.last)
        for message in messages:
            if message.id <= log.last:
                continue
            if message.prev is None or message.prev > log.last:
                break  # an expired start behind what came live meanwhile: read again
            actions += self._append(message)
        if not messages and read.after == log.last:
            # Nothing stored after a start that is gone: lost now, not late.
            gone = exhausted and not start_kept
            return [*actions, *self._room_short(read, give_up=gone)]
        return [*actions, *self._settle()]

    def _room_short(self, read: Read[M], give_up: bool = False) -> list[Action[M]]:
        """The history answered ``read`` without what it holds, or not at all: asked again
        a few times, then what is missing up to ``read.through`` counts as lost here."""
        log = self._log
        assert log is not None
        assert self._reading is None
        if read.through <= log.last:
            return self._settle()
        if read.attempt + 1 < GAP_ATTEMPTS and not give_up:
            self._reading = Read(None, log.last, max(read.through, self._known), read.attempt + 1)
            return [self._reading]
        # Its members that lack it are sent back (each resumes from its own last id, and
        # is told whether that is complete); members still here have it all.
        actions = self._send_back_below(read.through)
        self._log = _Log(base=read.through)
        return [*actions, *self._settle()]

    def _send_back_below(self, seq: int) -> list[Action[M]]:
        """Close the live members that lack messages before ``seq``."""
        return [
            self._close(member, cursor, SEND_BACK, _SEND_BACK_REASON)
            for member, cursor in list(self._members.items())
            if cursor.state is _State.LIVE and cursor.sent < seq
        ]

    def _close(self, member: M, cursor: _Cursor, code: int, reason: str) -> Close[M]:
        cursor.state = _State.CLOSED
        return Close(member, code, reason)

    def _catch_up(self, member: M, cursor: _Cursor) -> list[Action[M]]:
        """Send ``member`` what it missed from the log, or read it from the history; once
        it has everything here, it is live and told so."""
        log = self._log
        assert log is not None
        if cursor.state is not _State.CATCHING_UP or cursor.reading:
            return []
        actions: list[Action[M]] = []
        if cursor.sent < log.base:
            cursor.reading = True
            return [Read(member, cursor.sent, log.base)]
        for message in log.after(cursor.sent):
            actions.append(Send(member, message))
            cursor.sent = message.id
            if message.id <= cursor.joined_at:
                cursor.restored += 1
        cursor.state = _State.LIVE
        assert cursor.since is not None
        actions.append(Resumed(member, cursor.since, cursor.restored, cursor.complete))
        return actions

    def _member_read(
        self, member: M, read: Read[M], messages: list[Message], start_kept: bool,
        exhausted: bool,
    ) -> list[Action[M]]:  # fmt: skip
        cursor = self._members.get(member)
        if cursor is None or cursor.state is not _State.CATCHING_UP:
            return []
        cursor.reading = False
        # What came between its last id and the first still kept may be gone.
        actions: list[Action[M]] = [] if start_kept else self._incomplete(member, cursor)
        for message in messages:
            if message.id > cursor.sent:
                actions.append(Send(member, message))
                cursor.sent = message.id
                if message.id <= cursor.joined_at:
                    cursor.restored += 1
        if cursor.sent < read.through and (exhausted or not messages):
            gone = exhausted and not start_kept
            return [*actions, *self._member_short(member, cursor, read, give_up=gone)]
        return [*actions, *self._catch_up(member, cursor)]

    def _member_short(
        self, member: M, cursor: _Cursor, read: Read[M], give_up: bool = False
    ) -> list[Action[M]]:
        """The history answered a resume's read without what it holds, or not at all:
        asked again a few times; then, if what it lacks has expired, it is told so and
        goes on, else it is sent back (the history may answer elsewhere)."""
        if read.attempt + 1 < GAP_ATTEMPTS and not give_up:
            cursor.reading = True
            return [Read(member, cursor.sent, read.through, read.attempt + 1)]
        if cursor.complete and not give_up:
            return [self._close(member, cursor, SEND_BACK, "history unreadable")]
        told = self._incomplete(member, cursor)
        cursor.sent = read.through
        return [*told, *self._catch_up(member, cursor)]

    def _incomplete(self, member: M, cursor: _Cursor) -> list[Action[M]]:
        """Tell ``member``, once, that what follows its last id may be missing."""
        if not cursor.complete:
            return []
        cursor.complete = False
        return [Incomplete(member, cursor.sent)]
