"""Room history: real chat processes on a real 3-server NATS cluster with JetStream (R3), as
the bus role deploys it. Messages get fleet-wide ids; a client that comes back with the last
id it saw gets what it missed, in order, once, then the live stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from app.bus import READ_DEADLINE, STORE_DEADLINE
from tests.app.conftest import AppProcess, NatsServer
from tests.app.test_rooms import CHAT, TOKEN, metric

StartApp = Callable[..., AppProcess]
NatsCluster = Callable[..., list[NatsServer]]


def start_chat(
    start_app: StartApp, server: NatsServer, max_age: float = 300, replicas: int = 3
) -> AppProcess:
    """A chat process on ``server`` keeping room history for ``max_age`` seconds."""
    env = {"APP_BUS_URL": server.url, "APP_BUS_TOKEN": TOKEN,
           "APP_BUS_HISTORY_MAX_AGE": str(max_age), "APP_BUS_HISTORY_REPLICAS": str(replicas)}
    app = start_app(*CHAT, env=env)
    app.wait_for_line(r"event=history_ready", timeout=20)
    return app


class Client:
    """A chat client with ``?events=1`` that pairs each message with the id before it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[tuple[int | None, str]] = []
        self.resumed: dict[str, Any] | None = None
        self.hello: dict[str, Any] | None = None
        self.acks: dict[str, int | None] = {}  # ref -> id
        self.refused: dict[str, str] = {}  # ref -> reason
        self.refs: dict[int, str] = {}  # id -> the reference its message event named
        self._next_id: int | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def join(
        cls, app: AppProcess, room: str, since: int | None = None, last: int = 0,
        timeout: float = 10,
    ) -> Client:  # fmt: skip
        query = "events=1" + (f"&since={since}" if since is not None else "")
        query += f"&last={last}" if last else ""
        client = cls(await connect(f"{app.url}/ws/{room}?{query}"))
        # The hello comes once the server has the client in the room (after its resume):
        # what is sent from then on reaches it. A busy server may take a while to join.
        await client.wait(lambda: client.hello is not None, "the hello event", timeout)
        if since is not None or last:
            assert client.resumed is not None
        return client

    async def send(self, text: str, ref: str) -> None:
        """Send ``text`` named ``ref``: its ack (or refusal) comes to :attr:`acks`."""
        await self.ws.send(json.dumps({"type": "message", "ref": ref}).encode())
        await self.ws.send(text)

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for frame in self.ws:
                if isinstance(frame, str):
                    self.received.append((self._next_id, frame))
                    self._next_id = None
                    continue
                event = json.loads(frame)
                if event["type"] == "message":
                    self._next_id = event["id"]
                    if "ref" in event:
                        self.refs[event["id"]] = event["ref"]
                elif event["type"] == "resumed":
                    self.resumed = event
                elif event["type"] == "hello":
                    self.hello = event
                elif event["type"] == "ack":
                    self.acks[event["ref"]] = event["id"]
                elif event["type"] == "refused" and "ref" in event:
                    self.refused[event["ref"]] = event["reason"]

    async def wait(self, condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what}; got {self.received[-5:]}")
            await asyncio.sleep(0.02)

    @property
    def last_id(self) -> int:
        ids = [number for number, _ in self.received if number is not None]
        assert ids, "no message with an id yet"
        return ids[-1]

    def texts(self) -> list[str]:
        return [text for _, text in self.received]

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def publish(app: AppProcess, room: str, texts: list[str], every: float = 0.0) -> None:
    """Send ``texts`` into the room from a client of its own on ``app``."""
    async with connect(f"{app.url}/ws/{room}") as ws:
        # A member too: what it gets back is read, so that its close is not held up.
        reader = asyncio.create_task(_read_all(ws))
        for text in texts:
            await ws.send(text)
            await asyncio.sleep(every)
        # The last one is stored (and republished) before this client leaves.
        await asyncio.sleep(0.3)
    await reader


async def _read_all(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):
        async for _ in ws:
            pass


def test_a_client_back_with_its_last_id_misses_nothing_and_gets_nothing_twice(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """Away while 20 messages go by, back on another process while 40 more are sent: the
    client gets all 60 in order, once each, and the ids are the same for every member."""
    servers = nats_cluster(3, token=TOKEN, jetstream=True)
    apps = [start_chat(start_app, server) for server in servers]

    async def scenario() -> None:
        watcher = await Client.join(apps[2], "seam")
        leaver = await Client.join(apps[0], "seam")
        first = [f"m{n}" for n in range(20)]
        await publish(apps[1], "seam", first)
        await leaver.wait(lambda: len(leaver.received) == 20, "the first 20")
        assert leaver.texts() == first
        seen = leaver.last_id
        await leaver.close()

        away = [f"m{n}" for n in range(20, 40)]
        await publish(apps[1], "seam", away)
        # Back on another process while the room goes on: the replay meets the live stream.
        live = asyncio.create_task(publish(apps[1], "seam", [f"m{n}" for n in range(40, 80)], 0.01))
        back = await Client.join(apps[2], "seam", since=seen)
        await live
        await back.wait(lambda: len(back.received) >= 60, "60 messages after the resume")
        await asyncio.sleep(0.3)
        assert back.texts() == [f"m{n}" for n in range(20, 80)]
        assert back.resumed is not None
        assert back.resumed["complete"] is True
        assert back.resumed["restored"] >= 20
        ids = [number for number, _ in back.received]
        assert all(number is not None for number in ids)
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        # Every member sees each message under the same id.
        await watcher.wait(lambda: len(watcher.received) == 80, "80 messages")
        assert dict(watcher.received[20:]) == dict(back.received)
        await asyncio.gather(watcher.close(), back.close())

    asyncio.run(scenario())
    assert metric(apps[2], 'wsapp_room_replayed_total{cause="resume"}') >= 20
    assert metric(apps[2], "wsapp_bus_history") == 1


def test_an_id_older_than_the_history_is_said_so(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """A client whose last id is no longer kept is told ``complete: false``; one that saw
    nothing yet (since=0) gets what is kept."""
    servers = nats_cluster(1, token=TOKEN, jetstream=True)
    app = start_chat(start_app, servers[0], max_age=1, replicas=1)

    async def scenario() -> None:
        client = await Client.join(app, "short")
        await publish(app, "short", ["old"])
        await client.wait(lambda: len(client.received) == 1, "the old message")
        seen = client.last_id
        await client.close()
        await asyncio.sleep(2.5)  # past max_age: the stream lets the message go
        await publish(app, "short", ["new"])
        back = await Client.join(app, "short", since=seen)
        assert back.resumed is not None
        assert back.resumed["complete"] is False
        assert back.texts() == ["new"]
        everything = await Client.join(app, "short", since=0)
        assert everything.texts() == ["new"]
        assert everything.resumed is not None
        await asyncio.gather(back.close(), everything.close())

    asyncio.run(scenario())


def test_one_server_down_the_room_goes_on_and_nothing_stored_is_lost(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """With one of 3 servers killed, messages are still stored (R3) and a member of the
    process on it, back on another process with its last id, misses nothing."""
    servers = nats_cluster(3, token=TOKEN, jetstream=True)
    apps = [start_chat(start_app, server) for server in servers]

    async def scenario() -> None:
        stranded = await Client.join(apps[0], "down")
        await publish(apps[1], "down", ["a0", "a1"])
        await stranded.wait(lambda: len(stranded.received) == 2, "two messages")
        servers[0].kill()
        await publish(apps[1], "down", [f"b{n}" for n in range(10)], 0.01)
        # The resume reads the stream's leader. When it was on the killed server, the others
        # elect another only after raft's election timeout (nats-server: 4 to 9 s, drawn at
        # random), and the meta group may have to as well: the app waits for its history as
        # long as READ_DEADLINE, and so does this member. The 10 are stored as soon as there
        # is a leader (each store is tried again for STORE_DEADLINE).
        back = await Client.join(apps[2], "down", since=stranded.last_id, timeout=READ_DEADLINE)
        assert back.resumed is not None
        assert back.resumed["complete"] is True
        await back.wait(lambda: len(back.received) == 10, "the 10 sent meanwhile", STORE_DEADLINE)
        assert back.texts() == [f"b{n}" for n in range(10)]
        await asyncio.gather(back.close(), stranded.close())

    asyncio.run(scenario())


def test_a_room_gone_quiet_gets_what_its_process_missed_meanwhile(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """A listening process's server is down while 5 messages are stored, then back, and the
    room goes quiet: no later message shows the gap, yet the process delivers the 5, in
    order, with their ids, within seconds (rooms.QUIET), and says it was behind."""
    servers = nats_cluster(3, token=TOKEN, jetstream=True)
    apps = [start_chat(start_app, server) for server in servers[:2]]

    async def scenario() -> None:
        listener = await Client.join(apps[1], "quiet")
        sender_side = await Client.join(apps[0], "quiet")
        await publish(apps[0], "quiet", ["before"])
        await listener.wait(lambda: len(listener.received) == 1, "the first message")
        servers[1].kill()
        texts = [f"q{n}" for n in range(5)]
        await publish(apps[0], "quiet", texts, 0.05)
        # Stored (the sender's members get each once it is) before the server is back.
        await sender_side.wait(lambda: len(sender_side.received) == 6, "its own 5", 20)
        servers[1].start()
        await listener.wait(lambda: len(listener.received) == 6, "the 5 sent meanwhile", 20)
        for client in (listener, sender_side):
            assert client.texts() == ["before", *texts]
        assert all(number is not None for number, _ in listener.received)
        assert dict(listener.received) == dict(sender_side.received)
        await asyncio.gather(listener.close(), sender_side.close())

    asyncio.run(scenario())
    apps[1].wait_for_line(r"event=room_behind", timeout=5)


def test_a_resume_replays_up_to_the_live_stream_not_after_it(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """Back after 3000 messages while the room goes on: the replay stops where the live
    stream took over. What comes live meanwhile is not read back too (a replay that chased
    the stream's end one read at a time would hold the member's live messages back for as
    long as the room is busier than the reads are fast); nothing is missed or doubled."""
    servers = nats_cluster(3, token=TOKEN, jetstream=True)
    apps = [start_chat(start_app, server) for server in servers]
    backlog = [f"m{n}" for n in range(3000)]
    going_on = [f"live{n}" for n in range(300)]
    sent: list[str] = []

    async def publisher() -> None:
        async with connect(f"{apps[1].url}/ws/busy") as ws:
            reader = asyncio.create_task(_read_all(ws))
            for text in going_on:
                await ws.send(text)
                sent.append(text)
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
        await reader

    async def scenario() -> None:
        watcher = await Client.join(apps[0], "busy")
        leaver = await Client.join(apps[0], "busy")
        await publish(apps[1], "busy", ["first"])
        await leaver.wait(lambda: len(leaver.received) == 1, "the first message")
        seen = leaver.last_id
        await leaver.close()
        await publish(apps[1], "busy", backlog)
        # Stored whole (its sender's process takes them one at a time) before the rest.
        await watcher.wait(lambda: len(watcher.received) == 3001, "the backlog stored", 60)
        live = asyncio.create_task(publisher())
        await asyncio.sleep(0.2)  # the room busy when the member comes back
        ws = await connect(f"{apps[2].url}/ws/busy?events=1&since={seen}")
        sent_at_join = len(sent)
        back = Client(ws)
        await live
        await back.wait(lambda: len(back.received) == 3300, "every message", 60)
        await back.wait(lambda: back.resumed is not None, "the resumed event")
        assert back.texts() == backlog + going_on
        ids = [number for number, _ in back.received]
        assert ids == sorted(set(ids))
        assert back.resumed is not None
        # The backlog, and what was stored before the process subscribed for the member
        # (sent before the handshake, or within the moment after it); the rest came live.
        assert 3000 <= back.resumed["restored"] <= 3000 + sent_at_join + 30, (
            back.resumed, sent_at_join)
        await asyncio.gather(back.close(), watcher.close())

    asyncio.run(scenario())
