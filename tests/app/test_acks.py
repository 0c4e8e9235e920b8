"""The edges of the rooms' promise, on real chat processes and a real 3-server NATS cluster
with JetStream (R3): a sender's message acknowledged with its id and stored once however
often it is sent again under its reference, from whichever process; a joiner given the
room's latest messages; a process moving to another server when its own is about to stop
(lame duck mode) or is killed, with nothing refused and nothing missed."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError
from websockets.frames import CloseCode

from tests.app.conftest import AppProcess, NatsServer
from tests.app.test_history import Client, NatsCluster, StartApp
from tests.app.test_rooms import CHAT, TOKEN


def start_on(start_app: StartApp, servers: list[NatsServer], replicas: int = 3) -> AppProcess:
    """A chat process whose bus URLs are ``servers``, the first its own."""
    env = {"APP_BUS_URL": ",".join(server.url for server in servers), "APP_BUS_TOKEN": TOKEN,
           "APP_BUS_HISTORY_MAX_AGE": "300", "APP_BUS_HISTORY_REPLICAS": str(replicas)}  # fmt: skip
    app = start_app(*CHAT, env=env)
    app.wait_for_line(r"event=history_ready", timeout=20)
    return app


def test_a_message_sent_again_under_its_reference_is_stored_once_and_acked_with_its_id(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """A sender gets an ack naming its reference and the message's id, after the message
    itself; the same reference sent again from another process (its client back through
    another host) is acked with the first id and reaches no member a second time; every
    member is told each message's reference with its id, live and replayed; the same
    reference in another room is another message."""
    servers = nats_cluster(3, token=TOKEN, jetstream=True)
    first, second = start_on(start_app, servers), start_on(start_app, servers[1:])

    async def scenario() -> None:
        watcher = await Client.join(second, "acks")
        sender = await Client.join(first, "acks")
        await sender.send("hello", "ref-1")
        await sender.wait(lambda: "ref-1" in sender.acks, "the ack")
        stored = sender.acks["ref-1"]
        assert isinstance(stored, int)
        # The message came before its ack, with the same id.
        assert sender.received == [(stored, "hello")]
        await sender.close()

        again = await Client.join(second, "acks", since=stored)
        await again.send("hello", "ref-1")
        await again.send("after", "ref-2")
        await again.wait(lambda: "ref-2" in again.acks, "the second ack")
        assert again.acks["ref-1"] == stored
        await watcher.wait(lambda: "after" in watcher.texts(), "the message after")
        assert watcher.received == [(stored, "hello"), (again.acks["ref-2"], "after")]
        assert again.texts() == ["after"]

        # Every member is told the reference with the id, in a replay too: a sender back
        # from a cut finds there what of its own was stored.
        replayed = await Client.join(first, "acks", since=0)
        for client in (watcher, replayed):
            assert client.refs == {stored: "ref-1", again.acks["ref-2"]: "ref-2"}
        await replayed.close()

        elsewhere = await Client.join(first, "acks-other")
        await elsewhere.send("hello", "ref-1")
        await elsewhere.wait(lambda: "ref-1" in elsewhere.acks, "the ack in another room")
        assert elsewhere.acks["ref-1"] != stored
        await asyncio.gather(watcher.close(), again.close(), elsewhere.close())

    asyncio.run(scenario())


def test_a_message_event_with_a_bad_reference_closes_with_1008(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """A reference that is not 1 to 64 printable characters is a protocol error: 1008."""
    (server,) = nats_cluster(1, token=TOKEN, jetstream=True)
    app = start_on(start_app, [server], replicas=1)

    async def scenario() -> None:
        async with connect(f"{app.url}/ws/bad?events=1") as ws:
            await ws.send(b'{"type": "message", "ref": "has space"}')

            async def read_to_the_close() -> None:
                async for _ in ws:
                    pass

            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(read_to_the_close(), 10)
            assert ws.close_code == CloseCode.POLICY_VIOLATION

    asyncio.run(scenario())


def test_a_joiner_asking_for_the_latest_gets_them_in_order_then_the_live_ones(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    """``last=10`` after 30 messages (another room's between them): the last 10, in order,
    with their ids, then a ``resumed`` event, then what comes next; the same from a
    process that never had the room (searched in the history) as from one that did; a
    room with fewer gives all it has."""
    servers = nats_cluster(3, token=TOKEN, jetstream=True)
    busy, fresh = start_on(start_app, servers), start_on(start_app, servers[1:])
    texts = [f"m{n:02d}" for n in range(30)]

    async def scenario() -> None:
        member = await Client.join(busy, "recent")
        noise = await Client.join(busy, "noise")
        for text in texts:
            await member.ws.send(text)
            await noise.ws.send(f"noise {text}")
        await member.wait(lambda: len(member.received) == 30, "every message")
        await noise.wait(lambda: len(noise.received) == 30, "every other message")
        here = await Client.join(busy, "recent", last=10)
        there = await Client.join(fresh, "recent", last=10)
        for joiner in (here, there):
            assert joiner.received == member.received[-10:]
            assert joiner.resumed is not None
            assert joiner.resumed["restored"] == 10
            assert joiner.resumed["complete"] is True
        await member.ws.send("live")
        for joiner in (here, there):
            await joiner.wait(lambda j=joiner: j.texts()[-1:] == ["live"], "the live one")
            assert joiner.texts() == [*texts[-10:], "live"]
        few = await Client.join(fresh, "noise", last=50)
        assert few.texts() == [f"noise {text}" for text in texts]
        await asyncio.gather(*(c.close() for c in (member, noise, here, there, few)))

    asyncio.run(scenario())


def _lame_duck_config(server: NatsServer) -> None:
    """Give ``server`` a lame duck period of 30 s (nats-server's least) that starts at once."""
    path = os.path.join(server.directory, "lame-duck.conf")
    with open(path, "w") as file:
        file.write('lame_duck_duration: "30s"\nlame_duck_grace_period: "0s"\n')
    server.args += ["-c", path]


async def _publish_acked(
    app: AppProcess, room: str, count: int, every: float, refused: list[str]
) -> Client:
    """A member of ``room`` on ``app`` that sends ``count`` messages with references,
    ``every`` seconds; each is sent again under its reference until acked (the client's
    side of the protocol)."""
    sender = await Client.join(app, room)
    for number in range(count):
        ref = f"p{number}"
        await sender.send(f"msg {number}", ref)
        await asyncio.sleep(every)
    deadline = time.monotonic() + 30
    while len(sender.acks) < count and time.monotonic() < deadline:
        for ref, reason in list(sender.refused.items()):
            refused.append(f"{ref}: {reason}")
            del sender.refused[ref]
            await sender.send(f"msg {ref[1:]}", ref)
        await asyncio.sleep(0.05)
    return sender


@pytest.mark.parametrize("how", ["lame duck", "killed"])
def test_a_process_moves_to_another_server_when_its_own_leaves_and_nothing_is_refused(
    start_app: StartApp, nats_cluster: NatsCluster, how: str
) -> None:
    """A process whose own server enters lame duck mode (the bus role's restarts) or is
    killed is on another server of its list within 2 s; the messages sent meanwhile are
    every one acked, none refused, and a member elsewhere gets each once, in order."""
    servers = nats_cluster(3, token=TOKEN, jetstream=True)
    if how == "lame duck":
        servers[0].stop()
        _lame_duck_config(servers[0])
        servers[0].start()
        for server in servers:
            assert server.process is not None
            deadline = time.monotonic() + 10
            while not server.has_routes(2):
                assert time.monotonic() < deadline, "routes back"
                time.sleep(0.1)
    app = start_on(start_app, servers)
    app.wait_for_line(rf"event=bus_connected .*url=nats://127\.0\.0\.1:{servers[0].client_port}")
    watching = start_on(start_app, servers[1:])
    refused: list[str] = []

    async def scenario() -> None:
        member = await Client.join(watching, "move")
        publishing = asyncio.create_task(_publish_acked(app, "move", 150, 0.02, refused))
        await asyncio.sleep(1)
        process = servers[0].process
        assert process is not None
        left = time.monotonic()
        os.kill(process.pid, signal.SIGUSR2 if how == "lame duck" else signal.SIGKILL)
        moved = await asyncio.to_thread(
            app.wait_for_line, r"event=bus_connected .*reconnected=True", 10
        )
        assert time.monotonic() - left < 2, "moved after more than 2 s"
        if how == "lame duck":
            await asyncio.to_thread(app.wait_for_line, r"event=bus_server_leaving", 1)
        assert f":{servers[0].client_port}" not in moved.group(0)
        sender = await publishing
        assert len(sender.acks) == 150, f"{150 - len(sender.acks)} never acked"
        ids = [sender.acks[f"p{n}"] for n in range(150)]
        assert all(isinstance(i, int) for i in ids)
        assert ids == sorted(ids)
        assert len(set(ids)) == 150
        await member.wait(lambda: len(member.received) >= 150, "every message", 30)
        assert member.received == [(i, f"msg {n}") for n, i in enumerate(ids)]
        await asyncio.gather(member.close(), sender.close())

    asyncio.run(scenario())
    assert refused == []
