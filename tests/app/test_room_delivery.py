"""Room delivery carried out on asyncio and real nats-servers: what the state machine's tests
(test_delivery.py) cannot show. A broadcast the history did not store reaches no one and is
refused at once; a member that stops reading is closed at its bound and misses nothing; a
hundred quiet rooms left behind by a bus restart catch up together; two joins make one
subscription; two waiting senders both wake."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time

from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from app.bus import BUS_RETURN_WAIT, Bus
from app.metrics import BusMetrics
from app.rooms import Rooms
from app.rooms.delivery import SLOW, Message
from app.rooms.process import Room
from tests.app.test_history import Client, NatsCluster, StartApp, publish, start_chat
from tests.app.test_rooms import CHAT, TOKEN, metric


def test_a_broadcast_not_stored_is_refused_soon_and_reaches_no_one(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """With the bus away, a message is refused to its sender once the bus has stayed away
    for BUS_RETURN_WAIT (not held for the store deadline) and no member gets it, then or
    later; back on the bus, the next one reaches every member with an id."""
    (server,) = nats_cluster(1, token=TOKEN, jetstream=True)
    app = start_chat(start_app, server, replicas=1)

    async def scenario() -> None:
        other = await Client.join(app, "refuse")
        sender = await connect(f"{app.url}/ws/refuse?events=1")
        refused: list[dict[str, object]] = []
        server.stop()
        await asyncio.to_thread(app.wait_for_line, "event=bus_lost")
        started = time.monotonic()
        await sender.send("lost")
        while not refused:
            frame = await asyncio.wait_for(sender.recv(), BUS_RETURN_WAIT + 1)
            if isinstance(frame, bytes) and json.loads(frame)["type"] == "refused":
                refused.append(json.loads(frame))
        assert BUS_RETURN_WAIT <= time.monotonic() - started < BUS_RETURN_WAIT + 1
        server.start()
        await asyncio.to_thread(app.wait_for_line, "reconnected=True")
        await publish(app, "refuse", ["after"])
        await other.wait(lambda: len(other.received) == 1, "the message after")
        assert other.received[0][1] == "after"
        assert other.received[0][0] is not None
        assert [text for _, text in other.received] == ["after"]
        await asyncio.gather(sender.close(), other.close())

    asyncio.run(scenario())
    assert metric(app, 'wsapp_bus_dropped_total{reason="not_stored"}') == 1


def test_a_member_that_stops_reading_is_closed_at_its_bound_and_resumes_complete(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """A member with a 32 KiB receive buffer stops reading while 3,000 messages of 4 KiB go
    by (random, so that permessage-deflate leaves them about 9 MB: past what the kernel's
    buffers take): it is closed with 4008 once its queue passes 64 KiB, the other member
    gets every message meanwhile, and back with its last id it gets the rest, in order,
    complete."""
    (server,) = nats_cluster(1, token=TOKEN, jetstream=True)
    env = {"APP_BUS_URL": server.url, "APP_BUS_TOKEN": TOKEN, "APP_BUS_HISTORY_MAX_AGE": "300",
           "APP_MAX_QUEUE_BYTES": "65536"}  # fmt: skip
    app = start_app(*CHAT, env=env)
    app.wait_for_line(r"event=history_ready", timeout=20)
    texts = [f"{n:04d}" + base64.b64encode(os.urandom(3069)).decode() for n in range(3000)]

    async def scenario() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        sock.connect(("127.0.0.1", app.port))
        # max_queue: the client's own read stops after 4 messages it was not asked for.
        slow = await connect(f"{app.url}/ws/slow?events=1", sock=sock, max_queue=4)
        quick = await Client.join(app, "slow")
        await publish(app, "slow", texts)
        await quick.wait(lambda: len(quick.received) == 3000, "every message", 60)
        received: list[tuple[int | None, str]] = []
        next_id = None

        async def read_to_the_close() -> None:
            nonlocal next_id
            with contextlib.suppress(ConnectionClosedError):  # 4008: not a normal close
                async for frame in slow:  # what reached it before the close
                    if isinstance(frame, str):
                        received.append((next_id, frame))
                    elif json.loads(frame)["type"] == "message":
                        next_id = json.loads(frame)["id"]

        await asyncio.wait_for(read_to_the_close(), 30)
        assert slow.close_code == SLOW
        assert 0 < len(received) < 3000
        last = max(number for number, _ in received if number is not None)
        back = await Client.join(app, "slow", since=last)
        await back.wait(lambda: len(received) + len(back.received) == 3000, "the rest", 30)
        assert [text for _, text in received] + back.texts() == texts
        assert back.resumed is not None
        assert back.resumed["complete"] is True
        await asyncio.gather(back.close(), quick.close())

    asyncio.run(scenario())
    assert metric(app, 'wsapp_room_closes_total{reason="slow"}') == 1


def test_quiet_rooms_left_behind_by_a_bus_restart_catch_up_together(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """100 rooms, one member each on a process whose server is down while one message is
    stored in each: once it is back, every room has its message within 5 s (checked a
    few at a time, none waiting on another)."""
    servers = nats_cluster(3, token=TOKEN, jetstream=True)
    listening, sending = start_chat(start_app, servers[0]), start_chat(start_app, servers[1])
    rooms = [f"q{n}" for n in range(100)]

    async def scenario() -> None:
        members = await asyncio.gather(*(Client.join(listening, room) for room in rooms))
        servers[0].stop()
        await asyncio.gather(*(publish(sending, room, [f"in {room}"]) for room in rooms))
        servers[0].start()
        started = time.monotonic()
        for member in members:
            await member.wait(lambda m=member: len(m.received) == 1, "its room's message", 10)
        took = time.monotonic() - started
        assert took < 5, f"the last room caught up after {took:.1f} s"
        for room, member in zip(rooms, members, strict=True):
            assert member.texts() == [f"in {room}"]
            assert member.received[0][0] is not None
        await asyncio.gather(*(member.close() for member in members))

    asyncio.run(scenario())


def test_two_joins_at_once_make_one_subscription(nats_cluster: NatsCluster) -> None:
    """Two subscribes of one subject at once leave one subscription on the server, also when
    each waits on the client's buffer (full under load: forced here by a bound of 1 byte,
    so that every command waits for a flush)."""
    (server,) = nats_cluster(1)

    async def scenario() -> None:
        connected = asyncio.Event()
        bus = Bus([server.url], "", "test", BusMetrics(CollectorRegistry()),
                  on_message=_ignore, on_connected=connected.set)  # fmt: skip
        bus.start()
        await asyncio.wait_for(connected.wait(), 10)
        bus._client._max_pending_size = 1
        await asyncio.gather(bus.subscribe("wsapp.room.x"), bus.subscribe("wsapp.room.x"))
        await bus.flush()
        (connection,) = (await asyncio.to_thread(server.monitor, "connz?subs=1"))["connections"]
        assert connection["subscriptions_list"] == ["wsapp.room.x"]
        await bus.close()

    asyncio.run(scenario())


async def _ignore(subject: str, headers: object, data: bytes) -> None:
    return None


def test_senders_waiting_for_ids_each_wake_when_theirs_arrives() -> None:
    """Two senders wait for their ids; the room reaching each wakes each at once (no shared
    event one of them could clear before the other waits)."""

    async def scenario() -> None:
        rooms = Rooms("test")
        room = Room(rooms, "r", "wsapp.room.r")
        rooms._apply(room, room._delivery.anchor(0))
        first = asyncio.create_task(room._reached(1, 5))
        second = asyncio.create_task(room._reached(2, 5))
        await asyncio.sleep(0)
        started = time.monotonic()
        rooms._apply(room, room._delivery.live(Message(1, b"a", True, 0)))
        await asyncio.sleep(0)
        rooms._apply(room, room._delivery.live(Message(2, b"b", True, 1)))
        assert await first
        assert await second
        assert time.monotonic() - started < 0.1

    asyncio.run(scenario())


def test_the_streams_settings_are_applied_by_one_process_not_flipped_by_each(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """An instance that does not apply the settings (APP_BUS_HISTORY_APPLY=0) makes the
    stream if it is missing and keeps an existing one's, saying they differ; one that
    applies them brings the stream to its own."""
    (server,) = nats_cluster(1, token=TOKEN, jetstream=True)

    def chat(max_age: int, apply: int) -> None:
        env = {"APP_BUS_URL": server.url, "APP_BUS_TOKEN": TOKEN,
               "APP_BUS_HISTORY_MAX_AGE": str(max_age), "APP_BUS_HISTORY_APPLY": str(apply)}
        app = start_app(*CHAT, env=env)
        app.wait_for_line(r"event=history_ready", timeout=20)
        if apply == 0 and max_age != 300:
            assert any("event=history_settings_differ" in line for line in app.output())

    def max_age() -> float:
        (account,) = server.monitor("jsz?streams=true&config=true")["account_details"]
        (stream,) = account["stream_detail"]
        return float(stream["config"]["max_age"]) / 1e9

    chat(300, apply=0)
    assert max_age() == 300
    chat(600, apply=0)
    assert max_age() == 300
    chat(900, apply=1)
    assert max_age() == 900
