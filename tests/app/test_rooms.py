"""Rooms across the fleet: real ``python -m app --handler app.handlers:chat`` processes on a
real cluster of ``nats-server`` processes (each server stands for one host's)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from app.rooms import EXPIRY, HEARTBEAT, subject_token
from tests.app.conftest import AppProcess, NatsServer, wait_until
from tests.app.test_server import http_get

StartApp = Callable[..., AppProcess]
NatsCluster = Callable[..., list[NatsServer]]

CHAT = ("--handler", "app.handlers:chat")
TOKEN = "test-token-b7f3e9"  # noqa: S105 (a throwaway token of a throwaway server)
# What the brief promises: a join or leave is seen everywhere within 2 s.
CONVERGE = 2.0


def start_chat(start_app: StartApp, server: NatsServer | None, token: str = "") -> AppProcess:
    """A chat process on ``server`` (None: without a bus)."""
    env = {"APP_BUS_URL": server.url, "APP_BUS_TOKEN": token} if server else {}
    return start_app(*CHAT, env=env)


class Member:
    """A chat client with ``?events=1``: it sorts chat messages from the server's events."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.instance: str | None = None
        self.members: int | None = None
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def join(cls, app: AppProcess, room: str) -> Member:
        """A member once the server has it in the room: its hello comes after the join, so
        a message sent from then on reaches it (a busy server may take a while to join)."""
        member = cls(await connect(f"{app.url}/ws/{room}?events=1"))
        await member._until(lambda: member.instance is not None, 10, f"a hello from {app.url}")
        return member

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for frame in self.ws:
                event = _event(frame)
                if event is None:
                    await self.messages.put(frame)
                    continue
                if event["type"] == "hello":
                    self.instance = event["instance"]
                if event["type"] == "presence":
                    self.members = event["members"]
                self._changed.set()

    async def wait_members(self, count: int, timeout: float) -> None:
        """Wait until the room's count, as told to this client, is ``count``."""
        await self._until(lambda: self.members == count, timeout, f"members {count}")

    async def _until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait, event by event, until ``condition`` holds; fail naming ``what`` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not within {timeout}s: {what} (members {self.members})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def receive(self, count: int, timeout: float = 5) -> list[str | bytes]:
        """The next ``count`` chat messages."""
        return [await asyncio.wait_for(self.messages.get(), timeout) for _ in range(count)]

    async def drain(self, within: float = 0.5) -> list[str | bytes]:
        """The chat messages that come within ``within`` seconds, stopping at a pause."""
        messages = []
        with contextlib.suppress(TimeoutError):
            while True:
                messages.append(await asyncio.wait_for(self.messages.get(), within))
        return messages

    async def nothing_more(self, within: float = 0.5) -> bool:
        """True when no further chat message comes within ``within`` seconds."""
        try:
            extra = await asyncio.wait_for(self.messages.get(), within)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected message {extra!r}")

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


def _event(frame: str | bytes) -> dict[str, Any] | None:
    """The server's event in a binary frame of JSON; None for a chat message."""
    if isinstance(frame, str):
        return None
    try:
        event = json.loads(frame)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "type" in event else None


async def wait_all(members: list[Member], count: int, timeout: float = CONVERGE) -> None:
    await asyncio.gather(*(member.wait_members(count, timeout) for member in members))


def status(app: AppProcess, path: str = "/readyz") -> tuple[int, dict[str, object]]:
    code, body = http_get(app.http + path)
    return code, json.loads(body)


def metric(app: AppProcess, name: str) -> float:
    """The value of one series of ``/metrics``, e.g. ``wsapp_bus_connected``."""
    text = http_get(app.http + "/metrics")[1]
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"no {name} in /metrics"
    return float(found[1])


def no_subscription(server: NatsServer) -> bool:
    """Whether the one client of ``server`` (an app process) holds no subscription."""
    (connection,) = server.monitor("connz")["connections"]
    return connection["subscriptions"] == 0  # type: ignore[no-any-return]


def test_without_a_bus_rooms_stay_in_the_process(start_app: StartApp) -> None:
    """No APP_BUS_URL: rooms work in-process as before, the log and /healthz say bus none."""
    first, second = start_chat(start_app, None), start_chat(start_app, None)
    first.wait_for_line(r"event=listening .* bus=none")
    assert status(first, "/healthz")[1]["bus"] == "none"
    assert "wsapp_bus_" not in http_get(first.http + "/metrics")[1]
    page = http_get(first.http + "/?room=blue")[1]
    assert 'id="served-by"' in page
    assert 'id="members"' in page

    async def scenario() -> None:
        alice, bob = await Member.join(first, "blue"), await Member.join(first, "blue")
        carol = await Member.join(second, "blue")
        async with connect(first.url + "/ws/blue") as plain:
            await wait_all([alice, bob], 3)
            await carol.wait_members(1, CONVERGE)
            assert alice.instance == f"{socket.gethostname()}:{first.port}"
            await alice.ws.send("hi")
            assert await bob.receive(1) == ["hi"]
            assert await alice.receive(1) == ["hi"]
            # Without ?events=1, the wire is as it always was: the messages, nothing else.
            assert await asyncio.wait_for(plain.recv(), 5) == "hi"
            assert await carol.nothing_more()
        await bob.close()
        await alice.wait_members(1, CONVERGE)
        await asyncio.gather(alice.close(), carol.close())

    asyncio.run(scenario())


def test_a_room_across_servers_delivers_each_message_once_to_each_member(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """Members on 3 processes on 3 clustered servers: K x K deliveries, no duplicate."""
    servers = nats_cluster(3, token=TOKEN)
    apps = [start_chat(start_app, server, TOKEN) for server in servers]
    room = "fleet.room*1~x"  # '.', '*' and '~' in a name: encoded into one subject token
    path = urllib.parse.quote(room, safe="*~")

    async def scenario() -> None:
        members = [await Member.join(app, path) for app in apps for _ in range(2)]
        # And a client without ?events=1, as the release-under-load clients are.
        plain = await connect(f"{apps[1].url}/ws/{path}")
        await wait_all(members, len(members) + 1, timeout=5)
        for number, member in enumerate(members):
            await member.ws.send(f"message {number}")
        await members[0].ws.send(b"\xffbinary")
        # Each message exactly once per member: as a multiset, no more, no less.
        expected = Counter([*(f"message {n}" for n in range(len(members))), b"\xffbinary"])
        for member in members:
            assert Counter(await member.receive(len(expected))) == expected
            assert await member.nothing_more()
        got = [await asyncio.wait_for(plain.recv(), 5) for _ in range(len(expected))]
        assert Counter(got) == expected
        with contextlib.suppress(TimeoutError):
            raise AssertionError(f"unexpected {await asyncio.wait_for(plain.recv(), 0.5)!r}")
        assert {member.instance for member in members} == {
            f"{socket.gethostname()}:{app.port}" for app in apps
        }
        # One subscription per room per process, whatever its number of members there.
        subject = f"wsapp.room.{subject_token(room)}"
        for server in servers:
            pages = await asyncio.to_thread(server.monitor, "connz?subs=1")
            (connection,) = pages["connections"]
            assert connection["subscriptions_list"] == [subject]
        await asyncio.gather(plain.close(), *(member.close() for member in members))

    asyncio.run(scenario())
    for server in servers:  # the last member gone, the process's subscription goes
        wait_until(partial(no_subscription, server), CONVERGE, f"no subscription on {server.url}")
    # Per process: (room messages published, deliveries to its members from itself and
    # from the bus). apps[0] sent 2 texts and the binary to its 2 members; apps[1] has
    # 3 members (one plain); 7 messages in all.
    expected_counts = [(3, 3 * 2, 4 * 2), (2, 2 * 3, 5 * 3), (2, 2 * 2, 5 * 2)]
    for app, (published, local, from_bus) in zip(apps, expected_counts, strict=True):
        assert metric(app, 'wsapp_bus_messages_total{direction="out",kind="room"}') == published
        assert metric(app, 'wsapp_room_deliveries_total{source="local"}') == local
        assert metric(app, 'wsapp_room_deliveries_total{source="bus"}') == from_bus
        assert metric(app, "wsapp_bus_connected") == 1
        assert 0 < metric(app, "wsapp_bus_rtt_seconds") < 1
        assert TOKEN not in "\n".join(app.output())


def test_presence_converges_after_joins_leaves_a_drain_and_a_killed_process(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """The count of a room across processes follows joins and leaves within 2 s; a
    drained process's members leave at once, a killed one's after the expiry."""
    first, second = nats_cluster(2)
    apps = [start_chat(start_app, first), start_chat(start_app, second)]
    apps.append(start_chat(start_app, second))

    async def scenario() -> None:
        one = await Member.join(apps[0], "green")
        await one.wait_members(1, CONVERGE)
        two = await Member.join(apps[1], "green")
        await wait_all([one, two], 2)
        three, four = await Member.join(apps[2], "green"), await Member.join(apps[2], "green")
        await wait_all([one, two, three, four], 4)
        await three.close()
        await wait_all([one, two, four], 3)
        # A drain: the process tells the fleet its members left before it exits.
        apps[1].process.terminate()
        await wait_all([one, four], 2)
        assert await asyncio.to_thread(apps[1].process.wait, 10) == 0
        # Killed: nobody says goodbye, its count expires.
        apps[2].process.kill()
        started = time.monotonic()
        await one.wait_members(1, EXPIRY + HEARTBEAT + CONVERGE)
        assert time.monotonic() - started > EXPIRY - HEARTBEAT
        await one.close()

    asyncio.run(scenario())


def test_losing_the_bus_keeps_local_members_then_the_fleet_is_reached_again(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """A process whose server stops serves its own members, stays ready, says so once;
    after the server restarts on the same port its members are reached within 5 s."""
    first, second = nats_cluster(2)
    near, far = start_chat(start_app, first), start_chat(start_app, second)

    async def scenario() -> None:
        alice, bob = await Member.join(near, "red"), await Member.join(near, "red")
        carol = await Member.join(far, "red")
        await wait_all([alice, bob, carol], 3)

        first.stop()
        await asyncio.to_thread(near.wait_for_line, "event=bus_lost")
        assert status(near) == (200, status(near)[1])
        assert status(near)[1]["bus"] == "disconnected"
        assert metric(near, "wsapp_bus_connected") == 0
        await alice.ws.send("while away")
        assert await bob.receive(1) == ["while away"]
        assert await alice.receive(1) == ["while away"]
        assert await carol.nothing_more()  # at most once: not replayed later either
        # Each side's count of the other expires: it can no longer reach it.
        await wait_all([alice, bob], 2, timeout=EXPIRY + HEARTBEAT + CONVERGE)
        await carol.wait_members(1, CONVERGE)

        first.start()
        deadline = time.monotonic() + 5
        # Until the routes between the servers are back too, a message may be lost (at
        # most once): carol says it again until it gets through, within the 5 s.
        sent, got_through = 0, None
        while got_through is None:
            assert time.monotonic() < deadline, "the restarted server's members not reached"
            await carol.ws.send(f"back {sent}")
            sent += 1
            with contextlib.suppress(TimeoutError):
                got_through = await asyncio.wait_for(alice.messages.get(), 0.2)
        assert await bob.receive(1) == [got_through]
        assert await carol.receive(sent) == [f"back {n}" for n in range(sent)]
        late = [*await alice.drain(), *await bob.drain()]
        assert set(late) <= {f"back {n}" for n in range(sent)}
        assert len(late) == 2 * len(set(late))  # each later one once per member
        await alice.ws.send("hello again")
        assert await carol.receive(1) == ["hello again"]
        await wait_all([alice, bob, carol], 3)
        await asyncio.gather(alice.close(), bob.close(), carol.close())

    asyncio.run(scenario())
    assert metric(near, "wsapp_bus_connected") == 1
    assert metric(near, 'wsapp_bus_dropped_total{reason="disconnected"}') == 1
    lines = near.output()
    assert len([line for line in lines if "event=bus_lost" in line]) == 1
    assert any("event=bus_connected" in line and "reconnected=True" in line for line in lines)
    assert near.stop() == 0


def test_a_bus_down_at_start_is_waited_for_in_the_background(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """The server is not up yet: the process serves anyway, ready, and joins it once it is."""
    (server,) = nats_cluster(1)
    server.stop()
    app = start_chat(start_app, server)
    app.wait_for_line("event=bus_unreachable")
    assert status(app) == (200, {**status(app)[1], "bus": "disconnected"})

    async def scenario() -> None:
        alice = await Member.join(app, "lobby")
        await alice.ws.send("alone")
        assert await alice.receive(1) == ["alone"]
        server.start()
        await asyncio.to_thread(
            wait_until, lambda: status(app)[1]["bus"] == "connected", 5, "bus connected"
        )
        (connection,) = (await asyncio.to_thread(server.monitor, "connz?subs=1"))["connections"]
        assert connection["subscriptions_list"] == ["wsapp.room.lobby"]
        await alice.close()

    asyncio.run(scenario())
    assert len([line for line in app.output() if "event=bus_unreachable" in line]) == 1
