"""The bench's load client (bench/peer_loadgen.py) against a real chat process with room
history: a member that comes back with its last id keeps what the resume sent it, which
the kit sends before its hello (workload 5 counts those as got, not missed)."""

from __future__ import annotations

import asyncio

from bench import peer_loadgen
from tests.app.test_history import NatsCluster, StartApp, publish, start_chat
from tests.app.test_rooms import TOKEN


async def _texts(member: peer_loadgen.Member, count: int) -> list[str]:
    got: list[str] = []
    async with asyncio.timeout(10):
        async for text in member.messages():
            got.append(text)
            if len(got) == count:
                break
    return got


def test_a_member_back_with_its_last_id_keeps_what_its_resume_sent(
    start_app: StartApp, nats_cluster: NatsCluster
) -> None:
    servers = nats_cluster(1, token=TOKEN, jetstream=True)
    app = start_chat(start_app, servers[0], replicas=1)

    async def scenario() -> None:
        member = await peer_loadgen.open_member(peer_loadgen.KIT, app.url, "bench", None)
        await publish(app, "bench", ["a0"])
        assert await _texts(member, 1) == ["a0"]
        await member.close()
        await publish(app, "bench", ["b0", "b1"])  # while it is away
        back = await peer_loadgen.open_member(peer_loadgen.KIT, app.url, "bench", None, member)
        assert await _texts(back, 2) == ["b0", "b1"]
        await back.close()

    asyncio.run(scenario())
