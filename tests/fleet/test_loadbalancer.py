"""The optional load-balancer tier: one balancer (fleetlb) in front of the three app servers.

The balancer joins the session's fleet for this module and leaves it at its end; the app
servers are then deployed again without it, by the next module that wants the defaults,
or at the session's end when the fleet is kept up (tests/fleet/restore.py). Its last test
gives the balancer a certificate from an ACME CA (Pebble, tests/fleet/pebble.py).

The app servers run as test_unix.py, before it in ORDER, leaves them: their instances on
unix sockets that systemd holds (its LEFT). The balancer reaches each host's nginx on 443
whatever the instances listen on, so its module's rollout is also the rollout on unix
sockets, under load straight to the hosts as well as through the balancer; and the
balancer's run hands no instance over (a module before that left TCP: this run converges
the fleet to unix sockets).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from websockets.asyncio.client import connect

import localfleet
from localfleet import hosts
from localfleet.ansible import ansible_playbook
from localfleet.demo import ca_file
from localfleet.history import Member, assert_nothing_lost, room_traffic
from localfleet.instances import instance_get, live_ports
from tests.fleet import pebble
from tests.fleet.load import assert_each_closed_at_most_once, assert_no_failures, load_on, summary
from tests.fleet.releases import ONE_THEN_THE_REST, versions
from tests.fleet.restore import RESTORE
from tests.fleet.test_acme import round_trip
from tests.fleet.test_bus import spans_the_fleet
from tests.fleet.test_unix import LEFT, check_reached_over_unix
from tests.fleet.tls import served

# Old nginx workers live this long after a reload (nginx_worker_shutdown_timeout, 300 s by
# default): the rollout behind the balancer lasts longer, so that an old worker of the
# balancer's, if a rollout reloaded it, would end its clients without a close frame.
SHUTDOWN_TIMEOUT = 15
# Every run of the module: the app servers as test_unix.py leaves them, the bound above.
SETTINGS = (*LEFT, "-e", f"nginx_worker_shutdown_timeout={SHUTDOWN_TIMEOUT}")
HOLD = "/run/wsfleet-balancer-hold"
# The balancer's site.yml run deploys the module's SETTINGS over whatever the module
# before left (tests/fleet/restore.py).
NEEDS_DEFAULTS = False
# The whole /healthz of a host's bus server: up, and every stream it holds current.
BUS_CURRENT = "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8222/healthz"


@pytest.fixture(scope="module")
def balancer(fleet: localfleet.Fleet, deployed: object) -> Iterator[localfleet.FleetHost]:
    """fleetlb booted and site.yml run with it in the inventory; afterwards gone again."""
    with_lb = localfleet.up(hosts=len(fleet.app_servers), lb=True)
    try:
        ansible_playbook("site.yml", *SETTINGS)
        yield with_lb.load_balancers[0]
    finally:
        localfleet.up(hosts=len(fleet.app_servers), lb=False)
        RESTORE.leave()


def open_connections(host: localfleet.FleetHost) -> int:
    """Client connections the app instances of ``host`` hold now."""
    total = 0
    for port in live_ports(host):
        health = instance_get(host, port, "/healthz").stdout
        total += json.loads(health)["connections"] if health else 0
    return total


def serving_workers(host: localfleet.FleetHost) -> set[int]:
    """The pids of nginx's workers of the current configuration (not those shutting down
    after a reload): a reload replaces every one of them."""
    out = host.ssh("ps -C nginx -o pid=,args=").stdout
    listed = [line.split(None, 1) for line in out.splitlines()]
    return {int(pid) for pid, args in listed if args == "nginx: worker process"}


def test_the_balancer_spreads_wss_over_every_app_server(
    fleet: localfleet.Fleet, balancer: localfleet.FleetHost
) -> None:
    """wss to the balancer, verified against the CA, reaches every app server."""
    context = ssl.create_default_context(cafile=str(ca_file()))

    async def hold() -> tuple[list[str | bytes], dict[str, int]]:
        url = f"wss://{balancer.address}/ws/balanced"
        clients = [await connect(url, ssl=context, open_timeout=10) for _ in range(30)]
        try:
            await clients[0].send("through the balancer")
            reply = await asyncio.wait_for(clients[0].recv(), 10)
            spread = {host.name: open_connections(host) for host in fleet.app_servers}
            return [reply], spread
        finally:
            await asyncio.gather(*(ws.close() for ws in clients))

    replies, spread = asyncio.run(hold())
    assert replies == ["through the balancer"]
    assert all(count >= 5 for count in spread.values()), spread
    assert sum(spread.values()) >= 30


def served_from(member: Member, host: localfleet.FleetHost, after: float = 0.0) -> bool:
    """Whether ``member``'s latest hello (after ``after``) came from ``host``."""
    hellos = [instance for at, instance in member.hellos if at >= after]
    return bool(hellos) and hellos[-1].startswith(f"{host.name}:")


@pytest.mark.timeout(300)
def test_members_of_a_host_lost_under_traffic_are_back_within_30_s_missing_nothing(
    fleet: localfleet.Fleet, balancer: localfleet.FleetHost
) -> None:
    """24 members and 3 publishers of a room, all through the balancer; one app host's
    machine killed, its link cut first (no close frame, no FIN: its clients send no pings,
    as browsers don't). Its members are closed by the balancer once nothing came for
    nginx_proxy_read_timeout, and back on the other hosts within 30 s with their last id:
    nothing missed, nothing twice, every message acknowledged once. Booted again, the
    host rejoins the bus and its streams are current again."""
    victim = fleet.app_servers[-1]
    room = f"host-lost-{time.monotonic_ns()}"
    try:
        with room_traffic([balancer.address] * 3, room) as traffic:
            deadline = time.monotonic() + 10
            while not any(served_from(m, victim) for m in traffic.members):
                assert time.monotonic() < deadline, "no member on the host to lose"
                time.sleep(0.1)
            time.sleep(2)
            lost = [m for m in traffic.members if served_from(m, victim)]
            lost_at = time.monotonic()
            hosts.kill_machine(victim)
            deadline = lost_at + 45
            while not all(m.hellos[-1][0] > lost_at for m in lost):
                assert time.monotonic() < deadline, "members not back within 45 s"
                time.sleep(0.2)
            back = max(next(at for at, _ in m.hellos if at > lost_at) for m in lost) - lost_at
            assert not any(served_from(m, victim, lost_at) for m in lost)
            time.sleep(3)  # traffic on the remaining hosts, for the figures
        print(f"\n{len(lost)} members of the lost host back after {back:.1f} s")
        print("\n".join(traffic.publishing))
        assert back < 30
        assert_nothing_lost(traffic, frozenset({1001, 1012, 1006}))
    finally:
        hosts.boot_again(victim)
    deadline = time.monotonic() + 90
    while victim.ssh(BUS_CURRENT).stdout.strip() != "200":
        assert time.monotonic() < deadline, f"{victim.name}'s bus server not current in 90 s"
        time.sleep(1)
    # Rooms span the fleet again, the returned host included.
    spans_the_fleet(fleet, f"host-back-{time.monotonic_ns()}")


# Its time counts the module's closing deploy too (the balancer leaves, the release of
# before comes back): two rolling restarts of the fleet in one test's time.
@pytest.mark.timeout(900)
def test_a_rollout_behind_the_balancer_fails_nothing(
    fleet: localfleet.Fleet, balancer: localfleet.FleetHost
) -> None:
    """The balancer is left alone (each app server hands its instances over, never without
    a ready one): its nginx is not reloaded, so no old worker of its could end a client
    when nginx_worker_shutdown_timeout runs out, however long the rollout; clients of the
    balancer see no failed handshake, no lost reply, only 1001/1012. Each is closed once:
    the hosts whose turn has not come hold the balancer's handshakes off (503, tried on
    another host), so a closed client comes back to a host already done. The instances
    listen on unix sockets that systemd holds: clients straight to each host's nginx see
    the same (0 failed handshakes, only 1001/1012, each closed once), and the new
    instances are reached over their sockets as before."""
    before = serving_workers(balancer)
    balanced, direct = [balancer.address], [h.address for h in fleet.app_servers]
    with load_on(balanced) as load, load_on(direct) as straight:
        started = time.monotonic()
        result = ansible_playbook(
            "playbooks/rollout.yml", *ONE_THEN_THE_REST, *SETTINGS, "-e", "app_version=5.0.0-lb"
        )
        lasted = time.monotonic() - started
    print(f"\nrollout behind the balancer ({lasted:.0f} s): {summary(load)}")
    print(f"rollout on unix sockets, straight to the hosts: {summary(straight)}")
    assert lasted > SHUTDOWN_TIMEOUT
    for each in (load, straight):
        assert_no_failures(each)
        assert each.closes, "no instance was handed over"
        assert_each_closed_at_most_once(each)
    for host in fleet.app_servers:
        check_reached_over_unix(host, socket_mode="660")
    assert before
    assert serving_workers(balancer) == before, "the balancer's nginx was reloaded"
    for host in fleet.app_servers:  # every hold lifted
        assert host.ssh(f"test -e {HOLD} && echo held || true").stdout.strip() == "", host.name
    assert "on the balancer" not in result.stdout
    upstream = balancer.ssh("cat /etc/nginx/wsfleet-backends.conf").stdout
    assert upstream.count(":443 max_fails=1") == len(fleet.app_servers)
    assert " down;" not in upstream
    assert versions(fleet) == {h.name: {"5.0.0-lb"} for h in fleet.app_servers}


def test_behind_a_balancer_the_acme_certificate_is_the_balancers(
    fleet: localfleet.Fleet, balancer: localfleet.FleetHost, tmp_path: Path
) -> None:
    """With an ACME CA and a balancer tier, the public name resolves to the balancer: the
    CA's challenge is answered there, the balancer serves the certificate, and the app
    servers behind it keep the private CA's, which the balancer verifies. Last in the
    module: the balancer leaves with it."""
    name = "lb.wsfleet.test"
    with pebble.run(tmp_path) as ca:
        pebble.resolve(name, [balancer.address])
        root = tmp_path / "root.pem"
        root.write_text(ca.root())
        ansible_playbook(
            "site.yml", "--tags", "configure", *SETTINGS,
            "-e", f"tls_acme_directory={ca.directory}", "-e", f"tls_acme_directory_ca={ca.tls_ca}",
            "-e", f"tls_acme_dir={tmp_path / 'controller'}",
            "-e", json.dumps({"tls_acme_names": [name]}),
        )  # fmt: skip
        assert ca.orders() == 1
    names = served(balancer.address, root, name).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == [name]
    assert asyncio.run(round_trip(balancer.address, root, "via the balancer", name)) == (
        "via the balancer"
    )
    for host in fleet.app_servers:
        assert served(host.address, ca_file(), host.address).issuer == served(
            fleet.app_servers[0].address, ca_file(), fleet.app_servers[0].address
        ).issuer, host.name
        assert host.ssh("test ! -e /etc/ssl/wsfleet/public.crt").returncode == 0, host.name
