"""Rooms that span the fleet: the bus cluster site.yml deploys, and the chat rooms over it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import time

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import localfleet
from app.bus import STORE_DEADLINE
from app.rooms.delivery import SLOW
from localfleet.ansible import ansible_playbook
from localfleet.demo import ca_file
from localfleet.instances import instance_get, live_ports
from localfleet.load import client_context
from tests.fleet.rooms import Member, members_on, wait_for

Fleet = localfleet.Fleet
# Members per host: with least_conn over N=2 instances, every instance gets some.
PER_HOST = 8
# A window after the last expected delivery in which a duplicate would show.
LATE_DUPLICATES = 1.0


def on_host(host: localfleet.FleetHost, command: str) -> str:
    result = host.ssh(command)
    assert result.returncode == 0, f"{host.name}: {command}: {result.stdout}{result.stderr}"
    return result.stdout


async def every_message_once(members: list[Member], label: str, within: float = 10) -> None:
    """Each member sends one message; every member receives each exactly once, all of them
    within ``within`` seconds."""
    sent = [f"{label}-{i}" for i in range(len(members))]
    for member, text in zip(members, sent, strict=True):
        await member.ws.send(text)
    await wait_for(
        lambda: all(set(m.received) >= set(sent) for m in members),
        within,
        f"{len(members)}x{len(members)} deliveries of {label}",
    )
    await asyncio.sleep(LATE_DUPLICATES)
    for member in members:
        assert {text: member.received[text] for text in sent} == dict.fromkeys(sent, 1), (
            f"{member.host} {member.instance}: {member.received}"
        )


def spans_the_fleet(fleet: Fleet, room: str) -> None:
    """PER_HOST members on every host, on every instance of each, all reach each other."""
    addresses = [h.address for h in fleet.app_servers for _ in range(PER_HOST)]

    async def scenario() -> None:
        async with members_on(addresses, room) as members:
            serving = {m.instance for m in members}
            expected = {f"{h.name}:{p}" for h in fleet.app_servers for p in live_ports(h)}
            assert serving == expected
            await every_message_once(members, room)

    asyncio.run(scenario())


def test_the_bus_is_a_cluster_over_tls_on_every_host(fleet: Fleet, deployed: object) -> None:
    """Each host's server routes to both others over verified TLS and takes clients on its
    bus address only, over TLS with the token: every instance is connected, over TLS, and
    told every server, its own host's first. The hosts run Debian 12 and 13, and one
    nats-server version (bus_server_package): two side by side let replicas diverge."""
    addresses = [h.address for h in fleet.app_servers]
    versions = {h.name: json.loads(on_host(h, "curl -sf 127.0.0.1:8222/varz"))["version"]
                for h in fleet.app_servers}  # fmt: skip
    assert len(set(versions.values())) == 1, versions
    for host in fleet.app_servers:
        routes = json.loads(on_host(host, "curl -sf 127.0.0.1:8222/routez"))
        peers = {route["ip"] for route in routes["routes"]}
        assert peers == set(addresses) - {host.address}, routes
        varz = json.loads(on_host(host, "curl -sf 127.0.0.1:8222/varz"))
        assert varz["cluster"]["tls_required"], varz["cluster"]
        assert varz["cluster"]["tls_verify"], varz["cluster"]
        assert varz["tls_required"], varz
        assert varz["host"] == host.address, varz
        listening = on_host(host, "ss -Hltn")
        assert re.search(rf"{re.escape(host.address)}:4222\b", listening), listening
        assert not re.search(r"(127\.0\.0\.1|0\.0\.0\.0|\*|\[::\]):4222\b", listening), listening
        assert f"{host.address}:6222" in listening
        others = [a for a in addresses if a != host.address]
        servers = ",".join(f"tls://{a}:4222" for a in [host.address, *others])
        env = on_host(host, "cat /etc/wsapp/wsapp.env")
        assert f"APP_BUS_URL={servers}\n" in env
        assert "APP_BUS_CA=/etc/nats-server/ca.crt\n" in env
        # The CA is readable by the instances' user, the key by nats only.
        on_host(host, "runuser -u wsapp -- head -c1 /etc/nats-server/ca.crt >/dev/null")
        assert host.ssh("runuser -u wsapp -- head -c1 /etc/nats-server/route.key").returncode
        connz = json.loads(on_host(host, "curl -sf '127.0.0.1:8222/connz?limit=100'"))
        assert connz["connections"], connz
        assert all(c.get("tls_version") for c in connz["connections"]), connz["connections"]
        for port in live_ports(host):
            assert json.loads(instance_get(host, port, "/readyz").stdout)["bus"] == "connected"


def test_the_bus_secrets_are_not_readable_or_printed(fleet: Fleet, deployed: object) -> None:
    """The token and route password live in files only root (and nats) read; no play prints
    them, not even the diff of a change to the files that hold them (shown by --check
    --diff as a real run would show it, and nothing restarted for it)."""
    host = fleet.app_servers[0]
    assert on_host(host, "stat -c '%a %U %G' /etc/nats-server.conf").strip() == "640 root nats"
    assert on_host(host, "stat -c '%a %U %G' /etc/wsapp/secrets.env").strip() == "600 root root"
    token = on_host(host, "sed -n 's/^APP_BUS_TOKEN=//p' /etc/wsapp/secrets.env").strip()
    assert len(token) >= 32
    config = "sha256sum /etc/nats-server.conf /etc/wsapp/secrets.env"
    before = on_host(host, config)
    run = ansible_playbook(
        "site.yml", "--limit", host.name, "--check", "--diff", "-e", "bus_max_payload=1114113"
    )
    task = run.stdout.split("TASK [bus : Write the server's configuration]", 1)[1]
    assert f"changed: [{host.name}]" in task.split("TASK [", 1)[0], run.stdout[-3000:]
    assert token not in run.stdout
    assert on_host(host, config) == before


def test_the_bus_unit_scores_at_most_1_5(fleet: Fleet, deployed: object) -> None:
    """systemd-analyze security on a deployed host rates nats-server with its drop-in <= 1.5."""
    out = on_host(fleet.app_servers[0], "systemd-analyze security --no-pager nats-server.service")
    score = re.search(r"Overall exposure level for nats-server\.service: ([\d.]+)", out)
    assert score, out
    assert float(score[1]) <= 1.5


def test_a_room_spans_every_process_of_every_host(fleet: Fleet, deployed: object) -> None:
    """24 members over 3 hosts and every instance: 24x24 deliveries, each exactly once."""
    spans_the_fleet(fleet, "spans")


def test_presence_follows_joins_leaves_and_a_restart(fleet: Fleet, deployed: object) -> None:
    """The member count every member is told equals the true count within 2 s."""
    addresses = [h.address for h in fleet.app_servers for _ in range(4)]

    async def converged(members: list[Member], what: str) -> float:
        live = [m for m in members if m.ws.close_code is None]
        return await wait_for(lambda: all(m.members == len(live) for m in live), 2, what)

    async def scenario() -> None:
        async with members_on(addresses, "presence") as members:
            await converged(members, "12 members after the joins")
            for member in members[:4]:
                await member.ws.close()
            await converged(members, "8 members after 4 left")
            # An instance restarts: its members are closed (1012) and drop out.
            victim = fleet.app_servers[1]
            on_host(victim, f"systemctl restart wsapp@{live_ports(victim)[0]}.service")
            await wait_for(
                lambda: any(m.ws.close_code for m in members[4:]), 10, "the restart closed members"
            )
            await converged(members, "the count after an instance restarted")

    asyncio.run(scenario())


# Until the host's server answers its health check (its streams current), within 60 s.
SERVER_CURRENT = (
    "timeout 60 sh -c 'until curl -sf -o /dev/null http://127.0.0.1:8222/healthz;"
    " do sleep 0.2; done'"
)


def test_a_stopped_bus_server_cuts_off_no_one(fleet: Fleet, deployed: object) -> None:
    """With one host's server stopped, that host's instances move to the other hosts'
    servers: every member on every host, that host's too, still gets every message once,
    and its instances say they are on the bus. Its server started again and current, the
    room goes on."""
    third = fleet.app_servers[2]
    addresses = [h.address for h in fleet.app_servers for _ in range(4)]

    async def scenario() -> None:
        async with members_on(addresses, "outage") as members:
            on_host(third, "systemctl stop nats-server")
            try:
                # A stored publish may wait on a stream leader's election when the stopped
                # server led it: the app's own bound for that (STORE_DEADLINE), and a margin.
                await every_message_once(members, f"without-{third.name}", STORE_DEADLINE + 5)
                for port in live_ports(third):
                    ready = json.loads(instance_get(third, port, "/readyz").stdout)
                    assert ready["bus"] == "connected", ready
                    metrics = instance_get(third, port, "/metrics").stdout
                    assert re.search(r"^wsapp_bus_connected 1\.0$", metrics, re.MULTILINE)
            finally:
                on_host(third, "systemctl start nats-server")
            on_host(third, SERVER_CURRENT)
            await every_message_once(members, f"with-{third.name}")

    asyncio.run(scenario())


def test_a_killed_bus_server_is_restarted(fleet: Fleet, deployed: object) -> None:
    """SIGKILL of nats-server: systemd starts it again (Restart=on-failure)."""
    host = fleet.app_servers[0]
    before = on_host(host, "systemctl show -p MainPID --value nats-server").strip()
    on_host(host, f"kill -9 {before}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = host.ssh("systemctl show -p MainPID --value nats-server").stdout.strip()
        if now not in ("0", before) and host.ssh("curl -sf 127.0.0.1:8222/healthz").returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"nats-server not back within 10 s (MainPID was {before})")


# The slow member's test: publishers on every host send random (incompressible) text
# through nginx, enough that a member that stops reading fills the kernel's buffers on its
# host (nginx's socket to it and the app's to nginx take a few MiB each) and then the app's.
SLOW_ROOM_RATE = 50  # messages a second per publisher, one publisher per host
SLOW_MESSAGE_BYTES = 6144  # random bytes a message, sent as 8 KiB of base64
QUEUE_BOUND = 1 << 20  # app_max_queue_bytes, its default


async def _slow_reader(address: str, room: str, since: int | None = None) -> ClientConnection:
    """A member whose socket takes 32 KiB at most (as a slow mobile client's), and whose
    client stops reading after 4 frames it was not asked for."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (address, 443))
    query = "events=1" + (f"&since={since}" if since is not None else "")
    return await connect(
        f"wss://{address}/ws/{room}?{query}", ssl=client_context(ca_file()), sock=sock,
        server_hostname=address, max_queue=4, open_timeout=10,
    )  # fmt: skip


async def _frames(ws: ClientConnection, got: list[tuple[int | None, str]],
                  events: list[dict[str, object]], next_id: list[int | None]) -> None:  # fmt: skip
    """Read ``ws`` to its close: each text with the id before it, and the other events.
    ``next_id`` holds the id of a message event whose text has not come yet: a read
    cancelled between the two is taken up by the next."""
    with contextlib.suppress(ConnectionClosed):
        async for frame in ws:
            if isinstance(frame, str):
                got.append((next_id[0], frame))
                next_id[0] = None
                continue
            event = json.loads(frame)
            if event["type"] == "message":
                next_id[0] = event["id"]
            else:
                events.append(event)


def _peak_rss_since_reset(host: localfleet.FleetHost, port: int) -> tuple[int, int]:
    """(VmRSS now, in KiB) of the instance on ``port``, its peak reset to it; then read
    ``VmHWM`` for the peak since."""
    pid = on_host(host, f"systemctl show -p MainPID --value wsapp@{port}").strip()
    on_host(host, f"echo 5 > /proc/{pid}/clear_refs")
    status = on_host(host, f"cat /proc/{pid}/status")
    return int(pid), int(re.search(r"^VmRSS:\s+(\d+)", status, re.M)[1])  # type: ignore[index]


def test_a_member_that_stops_reading_costs_the_others_nothing_and_misses_nothing(
    fleet: Fleet, deployed: object
) -> None:
    """One member stops reading for 20 s while a publisher on every host sends 8 KiB
    messages (about 1 MB/s after compression): the other members' delivery p99 is the
    same as in the 5 s before, within noise; the process serving the slow member grows by
    no more than its bound (app_max_queue_bytes) and some slack; and when the member reads
    again, it has every message in order, or was closed as slow (4008, or its connection
    cut once the close timed out behind its backlog) and, back with its last id, gets the
    rest with a complete resume."""
    room = "slowreader"
    slow_host = fleet.app_servers[0]
    published: list[str] = []
    # text -> when it was sent, and when each of the others got it
    sent_at: dict[str, float] = {}
    latencies: dict[str, list[float]] = {"before": [], "slow": []}

    async def publisher(address: str, name: str, stop: asyncio.Event) -> None:
        context = client_context(ca_file())
        async with connect(f"wss://{address}/ws/{room}", ssl=context, open_timeout=10) as ws:
            drain = asyncio.ensure_future(_drain_quietly(ws))
            count = 0
            while not stop.is_set():
                noise = base64.b64encode(os.urandom(SLOW_MESSAGE_BYTES)).decode()
                text = f"{name}-{count}-{noise}"
                sent_at[text] = time.monotonic()
                published.append(text)
                await ws.send(text)
                count += 1
                await asyncio.sleep(1 / SLOW_ROOM_RATE)
            drain.cancel()

    async def scenario() -> None:
        phase = ["before"]
        async with members_on([h.address for h in fleet.app_servers for _ in range(2)],
                              room) as others:  # fmt: skip
            for member in others:
                member.on_text = lambda text: latencies[phase[0]].append(
                    time.monotonic() - sent_at[text]
                )
            slow = await _slow_reader(slow_host.address, room)
            got: list[tuple[int | None, str]] = []
            events: list[dict[str, object]] = []
            pending: list[int | None] = [None]
            hello = json.loads(await slow.recv())
            assert hello["type"] == "hello", hello
            port = int(str(hello["instance"]).rsplit(":", 1)[1])
            reader = asyncio.create_task(_frames(slow, got, events, pending))
            stop = asyncio.Event()
            publishers = [asyncio.create_task(publisher(h.address, h.name, stop))
                          for h in fleet.app_servers]  # fmt: skip
            await asyncio.sleep(5)  # the others' latency with every member reading
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            pid, rss_before = await asyncio.to_thread(_peak_rss_since_reset, slow_host, port)
            phase[0] = "slow"
            await asyncio.sleep(20)  # the slow member reads nothing
            status = await asyncio.to_thread(on_host, slow_host, f"cat /proc/{pid}/status")
            peak = int(re.search(r"^VmHWM:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
            stop.set()
            await asyncio.gather(*publishers)
            # It reads again: what its connection holds, then its close if it had one.
            reader = asyncio.create_task(_frames(slow, got, events, pending))
            await wait_for(lambda: len(got) >= len(published) or reader.done(), 60,
                           "the slow member read again")  # fmt: skip
            if reader.done():
                # Closed as slow: with 4008 when its client read the close frame within
                # the instance's close_timeout, else its connection was cut (1006) behind
                # the backlog. Either way it comes back with its last id.
                assert slow.close_code in (SLOW, 1006), slow.close_code
                closes = instance_get(slow_host, port, "/metrics").stdout
                assert re.search(r'^wsapp_room_closes_total\{reason="slow"\} [1-9]', closes, re.M)
                last = max(number for number, _ in got if number is not None)
                back = await _slow_reader(slow_host.address, room, since=last)
                back_events: list[dict[str, object]] = []
                rest = asyncio.create_task(_frames(back, got, back_events, [None]))
                await wait_for(lambda: len(got) >= len(published), 60, "the rest after 4008")
                resumed = [e for e in back_events if e["type"] == "resumed"]
                assert resumed, back_events
                assert resumed[0]["complete"] is True, back_events
                await back.close()
                await rest
            else:
                assert slow.close_code is None, slow.close_code
            await slow.close()
            ids = [number for number, _ in got]
            assert None not in ids
            assert ids == sorted(set(ids)), "ids out of order or twice"  # type: ignore[type-var]
            texts = [text for _, text in got]
            assert len(texts) == len(set(texts)) == len(published)
            assert set(texts) == set(published), f"{len(set(published) - set(texts))} missed"
            growth = (peak - rss_before) * 1024
            before, during = (sorted(latencies[p]) for p in ("before", "slow"))
            p99 = [values[int(len(values) * 0.99)] for values in (before, during)]
            print(f"\nslow member: closed {slow.close_code}, process grew {growth / 2**20:.1f} "
                  f"MiB (bound {QUEUE_BOUND / 2**20:.0f} MiB); others' p99 {p99[0] * 1e3:.0f} "
                  f"ms before, {p99[1] * 1e3:.0f} ms while it did not read; "
                  f"{len(published)} messages")  # fmt: skip
            assert growth <= QUEUE_BOUND + 3 * 2**20, growth
            assert p99[1] <= 2 * p99[0] + 0.05, p99

    asyncio.run(scenario())


async def _drain_quietly(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


def not_stored(fleet: Fleet) -> int:
    """Broadcasts refused across the fleet so far: each instance's not_stored drops."""
    total = 0
    for host in fleet.app_servers:
        for port in live_ports(host):
            metrics = instance_get(host, port, "/metrics").stdout
            found = re.search(r'^wsapp_bus_dropped_total\{reason="not_stored"\} ([\d.]+)$',
                              metrics, re.M)  # fmt: skip
            total += int(float(found[1])) if found else 0
    return total
