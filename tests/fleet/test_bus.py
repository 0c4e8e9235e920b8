"""Rooms that span the fleet: the bus cluster site.yml deploys, and the chat rooms over it."""

from __future__ import annotations

import asyncio
import json
import re
import time

import localfleet
from app.bus import STORE_DEADLINE
from localfleet.ansible import ansible_playbook
from localfleet.instances import instance_get, live_ports
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
    """Each host's server routes to both others over verified TLS; clients on loopback only."""
    for host in fleet.app_servers:
        routes = json.loads(on_host(host, "curl -sf 127.0.0.1:8222/routez"))
        peers = {route["ip"] for route in routes["routes"]}
        assert peers == {h.address for h in fleet.app_servers} - {host.address}, routes
        cluster = json.loads(on_host(host, "curl -sf 127.0.0.1:8222/varz"))["cluster"]
        assert cluster["tls_required"], cluster
        assert cluster["tls_verify"], cluster
        listening = on_host(host, "ss -Hltn")
        assert re.search(r"127\.0\.0\.1:4222\b", listening)
        assert not re.search(r"(0\.0\.0\.0|\*|\[::\]):4222\b", listening), listening
        assert f"{host.address}:6222" in listening


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


def test_a_stopped_bus_server_cuts_off_only_its_own_host(fleet: Fleet, deployed: object) -> None:
    """With one host's server stopped, the others still reach each other and that host keeps
    serving; its server started again and current, its members are reached within 5 s."""
    third = fleet.app_servers[2]
    addresses = [h.address for h in fleet.app_servers for _ in range(4)]

    async def scenario() -> None:
        async with members_on(addresses, "outage") as members:
            on_third = [m for m in members if m.host == third.address]
            others = [m for m in members if m.host != third.address]
            on_host(third, "systemctl stop nats-server")
            try:
                # A stored publish may wait on a stream leader's election when the stopped
                # server led it: the app's own bound for that (STORE_DEADLINE), and a margin.
                await every_message_once(others, f"without-{third.name}", STORE_DEADLINE + 5)
                reached = [m.instance for m in on_third if m.received]
                assert not reached, f"{third.name} was reached without its bus: {reached}"
                for port in live_ports(third):
                    ready = json.loads(instance_get(third, port, "/readyz").stdout)
                    assert ready["bus"] == "disconnected", ready
                    metrics = instance_get(third, port, "/metrics").stdout
                    assert re.search(r"^wsapp_bus_connected 0\.0$", metrics, re.MULTILINE)
            finally:
                on_host(third, "systemctl start nats-server")
            # From its server back with its streams current (as the bus role waits for after
            # a restart): how long that takes grows with what the streams hold.
            on_host(third, SERVER_CURRENT)
            started = time.monotonic()
            probe = 0
            while not all(m.received for m in on_third):
                late = time.monotonic() - started >= 5
                assert not late, f"{third.name}'s members not reached within 5 s"
                await others[0].ws.send(f"probe-{probe}")
                probe += 1
                await asyncio.sleep(0.25)
            print(f"\n{third.name}'s members reached {time.monotonic() - started:.1f} s after")

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
