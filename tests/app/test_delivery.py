"""The room delivery rules (app.rooms.delivery), with no I/O: named cases, then the
invariants over interleavings that hypothesis generates and shrinks.

A stand-in history (a list of stored messages, the oldest expiring first) answers the
machine's reads; live copies are held in flight, where a rule may deliver them late, out
of order, twice or never. For every member, in every run: the ids it is sent strictly
increase and none comes twice; nothing is sent after it was closed; and every message
stored after its starting point is sent to it unless it was told (a close, or a resume
``complete: false``). With no message expired and every read answered, no one is told.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from app.rooms.delivery import (
    GAP_ATTEMPTS,
    SEND_BACK,
    SLOW,
    Action,
    Close,
    Incomplete,
    Message,
    Read,
    Resumed,
    RoomDelivery,
    Send,
)


@dataclass
class Seen:
    """What one member was sent and told."""

    start: int
    sent: list[int] = field(default_factory=list)
    closed: int | None = None
    resumed: Resumed[str] | None = None
    incomplete: bool = False
    left: bool = False

    @property
    def told(self) -> bool:
        return self.closed is not None or self.incomplete


class Room:
    """A room's history and one process's RoomDelivery, the actions carried out at once."""

    def __init__(self, log_bytes: int = 1 << 20) -> None:
        self.delivery: RoomDelivery[str] = RoomDelivery(log_bytes)
        self.stored: list[Message] = []  # every message ever stored, in order
        self.expired = 0  # how many of the oldest are gone
        self.reads: list[Read[str]] = []
        self.seen: dict[str, Seen] = {}
        self.in_flight: list[Message] = []
        self._next = 1

    # --- the history -------------------------------------------------------------------

    def store(self, data: bytes = b"m", step: int = 1) -> Message:
        """Store a message (ids skip ``step - 1`` for other rooms); its live copy is in flight."""
        prev = self.stored[-1].id if self.stored else 0
        message = Message(self._next + step - 1, data, True, prev)
        self._next = message.id + 1
        self.stored.append(message)
        self.in_flight.append(message)
        return message

    @property
    def kept(self) -> list[Message]:
        return self.stored[self.expired :]

    @property
    def first(self) -> int:
        """The stream's first sequence still stored (the oldest go first)."""
        return self.stored[self.expired - 1].id + 1 if self.expired else 1

    def nothing_expired_after(self, seq: int) -> bool:
        return self.first <= seq + 1

    def since_kept(self, since: int) -> bool:
        """Message ``since`` still stored (0: nothing ever expired)."""
        return self.first <= max(since, 1)

    @property
    def end(self) -> int:
        return self.stored[-1].id if self.stored else 0

    def answer(self, read: Read[str], batch: int = 1000, lag: int = 0) -> None:
        """Answer ``read`` as the history would; ``lag``: the newest so many not there yet."""
        self.reads.remove(read)
        visible = self.kept[: len(self.kept) - lag] if lag else self.kept
        found = [m for m in visible if read.after < m.id <= read.through]
        messages = [Message(m.id, m.data, m.text) for m in found[:batch]]
        exhausted = len(found) <= batch
        kept = self.nothing_expired_after(read.after)
        self.apply(self.delivery.read_done(read, messages, kept, exhausted))

    def fail(self, read: Read[str]) -> None:
        self.reads.remove(read)
        self.apply(self.delivery.read_failed(read))

    # --- the process ---------------------------------------------------------------------

    def anchor(self) -> None:
        self.apply(self.delivery.anchor(self.end))

    def join(self, member: str, since: int | None = None) -> None:
        last = self.delivery.last
        assert last is not None
        self.seen[member] = Seen(last if since is None else since)
        kept = since is None or self.since_kept(since)
        self.apply(self.delivery.join(member, since, kept))

    def leave(self, member: str) -> None:
        self.seen[member].left = True
        self.apply(self.delivery.leave(member))

    def live(self, message: Message) -> None:
        self.apply(self.delivery.live(message))

    def deliver_all(self) -> None:
        while self.in_flight:
            self.live(self.in_flight.pop(0))

    def settle(self) -> None:
        """What a quiet room comes to: the last id read back, every read answered."""
        self.apply(self.delivery.stored(self.end))
        for _ in range(10_000):
            if not self.reads:
                return
            self.answer(self.reads[0])
        raise AssertionError(f"reads never end: {self.reads}")

    def apply(self, actions: list[Action[str]]) -> None:
        for action in actions:
            if isinstance(action, Read):
                assert action.after < action.through, action
                self.reads.append(action)
                continue
            seen = self.seen[action.member]
            assert not seen.left, f"{action} after {action.member} left"
            assert seen.closed is None, f"{action} after {action.member} was closed"
            if isinstance(action, Send):
                assert not seen.sent or action.message.id > seen.sent[-1], (action, seen.sent)
                seen.sent.append(action.message.id)
            elif isinstance(action, Close):
                assert action.code in (SEND_BACK, SLOW)
                seen.closed = action.code
            elif isinstance(action, Incomplete):
                assert not seen.incomplete, "told twice"
                assert action.after == (seen.sent[-1] if seen.sent else seen.start), action
                seen.incomplete = True
            elif isinstance(action, Resumed):
                assert seen.resumed is None, "resumed twice"
                assert action.complete is not seen.incomplete, (action, seen)
                seen.resumed = action

    def check(self, member: str, whole: bool) -> None:
        """Every stored message after the member's start, up to the last it was sent (all of
        them when ``whole``), came to it, unless it was told. (A run with expiries has
        faults: a resume from an expired id is told incomplete, so ``since_kept`` counts.)"""
        seen = self.seen[member]
        if seen.told:
            return
        until = self.end if whole else (seen.sent[-1] if seen.sent else seen.start)
        expected = [m.id for m in self.stored if seen.start < m.id <= until]
        assert seen.sent == expected, (member, seen, expected)


# --- the named cases: each one a way the promise was broken before --------------------------


def test_a_resume_on_a_lagging_process_gets_each_id_once() -> None:
    """1. Back on a process whose live stream lags the history: the late live copies of
    what the resume sent are not sent again; and a member from a faster process, ahead
    of this one, is sent nothing it had."""
    room = Room()
    room.store(step=10)
    room.deliver_all()
    room.anchor()
    room.join("watcher")
    late = [room.store(), room.store()]  # 11, 12: stored, their copies late here
    room.join("back", since=10)
    room.join("ahead", since=12)
    for message in late:
        room.live(message)
    room.settle()
    assert room.seen["back"].sent == [11, 12]
    assert room.seen["back"].resumed == Resumed("back", 10, 0, True)
    assert room.seen["ahead"].sent == []
    assert room.seen["watcher"].sent == [11, 12]


def test_a_gap_the_history_cannot_fill_closes_before_anything_past_it() -> None:
    """2. A gap the history does not fill: its members are closed before the message after
    it reaches them, so their last id is before the gap and their resume says so."""
    room = Room()
    room.store(step=10)
    room.deliver_all()
    room.anchor()
    room.join("member")
    lost, after = room.store(), room.store()  # 11 never comes live; 12 does
    room.in_flight.clear()
    room.live(after)
    for _ in range(GAP_ATTEMPTS):
        (read,) = room.reads
        assert (read.after, read.through) == (10, 12)
        room.fail(read)
    assert room.seen["member"].closed == SEND_BACK
    assert room.seen["member"].sent == []
    # Back with its last id, on a process where 11 is gone by now: told so.
    room.expired = 1
    back = Room()
    back.stored, back.expired = room.stored, 2
    back.anchor()
    back.join("member", since=10)
    back.settle()
    assert back.seen["member"].resumed == Resumed("member", 10, 1, False)
    assert back.seen["member"].sent == [after.id]
    assert lost.id == 11


def test_a_gap_whose_start_expired_is_not_filled_in_silence() -> None:
    """3. The oldest messages of a gap left the history: the rest is not handed over as if
    nothing were missing; its members are sent back."""
    room = Room()
    room.store(step=10)
    room.deliver_all()
    room.anchor()
    room.join("member")
    for _ in range(4):
        room.store()  # 11..14, never live here
    room.in_flight.clear()
    room.expired = 3  # 10, 11, 12 gone
    room.live(room.store())  # 15, after 14
    (read,) = room.reads
    room.answer(read)
    assert room.seen["member"].closed == SEND_BACK
    assert room.seen["member"].sent == []
    room.join("newcomer")
    room.settle()
    assert room.seen["newcomer"].sent == []  # joined at 15: nothing before is owed


def test_a_store_that_lands_late_is_delivered_once_with_its_id() -> None:
    """4. A store whose acknowledgement never came but which did land later gets an id
    past the messages stored before it; it is delivered once, in the stream's order, and
    a second copy (the retry, deduplicated to the same id) is not sent again."""
    room = Room()
    room.anchor()
    room.join("member")
    room.store()  # 1
    room.deliver_all()
    slow = room.store()  # 2: landed after the sender was told it was not stored
    room.live(slow)
    room.live(slow)
    room.live(room.store())  # 3
    room.settle()
    assert room.seen["member"].sent == [1, 2, 3]


def test_a_late_copy_of_a_message_before_the_senders_is_not_dropped() -> None:
    """5. A sender's store acknowledged (7) before the live copy of an earlier message (6)
    reached this process: 6 is read or delivered late, never skipped as "delivered"."""
    room = Room()
    room.store(step=5)
    room.deliver_all()
    room.anchor()
    room.join("member")
    earlier = room.store()  # 6, its copy late
    own = room.store()  # 7, the sender's
    room.in_flight.clear()
    room.apply(room.delivery.stored(own.id))
    room.live(earlier)
    room.live(own)
    room.settle()
    assert room.seen["member"].sent == [6, 7]


def test_a_room_with_no_starting_point_takes_no_member() -> None:
    """5. Without its anchor (the read failed) a room invents none: a member cannot join,
    and live copies that came first are kept until the anchor is there."""
    room = Room()
    room.store(step=5)
    with pytest.raises(RuntimeError):
        room.delivery.join("member")
    early = room.store()  # 6
    room.live(early)
    room.apply(room.delivery.anchor(5))
    room.join("member")
    room.live(room.store())  # 7
    assert room.seen["member"].sent == [7]
    assert room.delivery.last == 7


def test_a_slow_member_is_closed_and_sent_nothing_more() -> None:
    """A member found slow is closed with SLOW; the others go on."""
    room = Room()
    room.anchor()
    room.join("slow")
    room.join("quick")
    room.live(room.store())
    room.apply(room.delivery.slow("slow"))
    room.live(room.store())
    assert room.seen["slow"] == Seen(0, [1], SLOW)
    assert room.seen["quick"].sent == [1, 2]


def test_a_resume_from_far_back_reads_in_ranges_then_goes_live() -> None:
    """A member back from before the log: read in batches up to the log, then sent the
    log, then live; restored counts what was stored before it came."""
    room = Room(log_bytes=3)
    room.anchor()
    room.join("watcher")
    for _ in range(10):
        room.live(room.store())
    room.join("back", since=2)
    (read,) = room.reads
    assert (read.after, read.through) == (2, 7)  # the log holds 8, 9, 10
    room.answer(read, batch=2)
    room.live(room.store())  # 11, while it reads
    while room.reads:
        room.answer(room.reads[0], batch=2)
    assert room.seen["back"].sent == list(range(3, 12))
    assert room.seen["back"].resumed == Resumed("back", 2, 8, True)


def test_an_expired_since_is_told_incomplete_and_gets_what_is_kept() -> None:
    """A member back with an id the history let go is told ``complete: false``."""
    room = Room(log_bytes=1)
    room.anchor()
    for _ in range(5):
        room.store()
    room.deliver_all()
    room.expired = 3
    room.join("back", since=2)
    room.settle()
    assert room.seen["back"].sent == [4, 5]
    assert room.seen["back"].resumed == Resumed("back", 2, 2, False)


# --- the invariants over generated interleavings --------------------------------------------


class Interleavings(RuleBasedStateMachine):
    """A room in one process: stores, live copies late, lost, twice or out of order, reads
    answered, lagging, failing or past an expired head, members joining, resuming, slow,
    leaving."""

    members = Bundle("members")

    @initialize(log_bytes=st.integers(1, 6), before=st.integers(0, 3))
    def start(self, log_bytes: int, before: int) -> None:
        self.room = Room(log_bytes)
        for _ in range(before):
            self.room.store()
        self.room.in_flight.clear()
        self.room.anchor()
        self.count = 0
        self.faults = False

    @rule(step=st.integers(1, 3))
    def store(self, step: int) -> None:
        self.room.store(step=step)

    @precondition(lambda self: self.room.in_flight)
    @rule(data=st.data(), twice=st.booleans())
    def live_copy(self, data: st.DataObject, twice: bool) -> None:
        flight = self.room.in_flight
        message = flight[data.draw(st.integers(0, len(flight) - 1))]
        if not twice:
            flight.remove(message)
        self.room.live(message)

    @precondition(lambda self: self.room.in_flight)
    @rule()
    def copy_lost(self) -> None:
        self.room.in_flight.pop(0)

    @rule()
    def store_acknowledged(self) -> None:
        self.room.apply(self.room.delivery.stored(self.room.end))

    @precondition(lambda self: self.room.reads)
    @rule(data=st.data(), batch=st.integers(1, 4), lag=st.integers(0, 2))
    def read_answered(self, data: st.DataObject, batch: int, lag: int) -> None:
        reads = self.room.reads
        read = reads[data.draw(st.integers(0, len(reads) - 1))]
        self.faults = self.faults or lag > 0
        self.room.answer(read, batch, lag)

    @precondition(lambda self: self.room.reads)
    @rule()
    def read_failed(self) -> None:
        self.faults = True
        self.room.fail(self.room.reads[0])

    @precondition(lambda self: len(self.room.kept) > 1)
    @rule(count=st.integers(1, 3))
    def oldest_expire(self, count: int) -> None:
        self.faults = True
        self.room.expired = min(len(self.room.stored) - 1, self.room.expired + count)

    @rule(target=members, since=st.none() | st.integers(0, 3) | st.just(-1))
    def join(self, since: int | None) -> str:
        self.count += 1
        member = f"m{self.count}"
        if since == -1:
            since = self.room.end + 1  # ahead of the room: from a faster process
        elif since is not None and since > 0:
            # Usually an id a member was sent; sometimes any number, stored or not.
            seen = [s.sent[-1] for s in self.room.seen.values() if s.sent]
            since = seen[-since] if len(seen) >= since else since
        self.room.join(member, since)
        return member

    @rule(member=consumes(members))
    def leave(self, member: str) -> None:
        self.room.check(member, whole=False)
        self.room.leave(member)

    @rule(member=members)
    def slow(self, member: str) -> None:
        if not self.room.seen[member].left:
            self.room.apply(self.room.delivery.slow(member))

    @invariant()
    def no_holes_so_far(self) -> None:
        for member, seen in self.room.seen.items():
            if not seen.left:
                self.room.check(member, whole=False)

    def teardown(self) -> None:
        if not hasattr(self, "room"):
            return
        room = self.room
        room.deliver_all()
        room.settle()
        for member, seen in room.seen.items():
            if seen.left:
                continue
            room.check(member, whole=True)
            if not self.faults:
                assert seen.closed in (None, SLOW), (member, seen)
                assert seen.resumed is None or seen.resumed.complete, (member, seen)


TestInterleavings = Interleavings.TestCase
TestInterleavings.settings = settings(
    max_examples=1000, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip


def test_the_latest_messages_are_told_from_the_log_or_left_to_the_history() -> None:
    """The start of a room's latest K, from the messages kept here: exact when the log
    holds K or more (or every one since the room's first), None when it holds fewer and
    older ones may exist (the history is then searched)."""
    room = Room()
    room.store(step=3)  # 3: before this process listened
    room.deliver_all()
    room.anchor()
    for _ in range(4):
        room.live(room.store())  # 4, 5, 6, 7
    assert room.delivery.start_of_last(2) == 5
    assert room.delivery.start_of_last(4) == 3
    assert room.delivery.start_of_last(0) == 7
    assert room.delivery.start_of_last(5) is None
    fresh = Room()
    fresh.anchor()
    for _ in range(3):
        fresh.live(fresh.store())
    assert fresh.delivery.start_of_last(10) == 0
