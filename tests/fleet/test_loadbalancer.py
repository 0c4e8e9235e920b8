"""The optional load-balancer tier: one balancer (fleetlb) in front of the three app servers.

The balancer joins the session's fleet for this module and leaves it at its end; the app
servers are then deployed again without it.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect

import localfleet
from localfleet.ansible import ansible_playbook
from localfleet.demo import ca_file
from localfleet.instances import instance_get
from tests.fleet.load import assert_no_failures, load_on, summary
from tests.fleet.releases import ONE_THEN_THE_REST
from tests.fleet.test_release_under_load import versions


@pytest.fixture(scope="module")
def balancer(fleet: localfleet.Fleet, deployed: object) -> Iterator[localfleet.FleetHost]:
    """fleetlb booted and site.yml run with it in the inventory; afterwards gone again."""
    with_lb = localfleet.up(hosts=len(fleet.app_servers), lb=True)
    try:
        ansible_playbook("site.yml")
        yield with_lb.load_balancers[0]
    finally:
        localfleet.up(hosts=len(fleet.app_servers), lb=False)
        # The app servers' nginx trusts the balancer's X-Forwarded-For no longer: configuration.
        ansible_playbook("site.yml", "--tags", "configure")


def open_connections(host: localfleet.FleetHost) -> int:
    """Client connections the app instances of ``host`` hold now."""
    total = 0
    for port in (8001, 8002):
        health = instance_get(host, port, "/healthz").stdout
        total += json.loads(health)["connections"] if health else 0
    return total


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


# Its time counts the module's closing deploy too (the balancer leaves, the release of
# before comes back): two rolling restarts of the fleet in one test's time.
@pytest.mark.timeout(900)
def test_a_rollout_behind_the_balancer_fails_nothing(
    fleet: localfleet.Fleet, balancer: localfleet.FleetHost
) -> None:
    """Each app server is marked down in the balancer before it restarts, back up after;
    clients of the balancer see no failed handshake and no lost reply."""
    with load_on([balancer.address]) as load:
        result = ansible_playbook(
            "playbooks/rollout.yml", *ONE_THEN_THE_REST, "-e", "app_version=5.0.0-lb"
        )
    print(f"\nrollout behind the balancer: {summary(load)}")
    assert_no_failures(load)
    # Each batch (one host, then the rest) marked down, by name, and back in after.
    drained = re.findall(r"Reload nginx on the balancer, ([^\]]+)\]", result.stdout)
    for host in fleet.app_servers:
        assert any(host.name in batch.split(", ") for batch in drained), (host.name, drained)
    assert "every app server in" in drained
    upstream = balancer.ssh("cat /etc/nginx/wsfleet-backends.conf").stdout
    assert upstream.count(":443 max_fails=1") == len(fleet.app_servers)
    assert " down;" not in upstream
    assert versions(fleet) == {h.name: {"5.0.0-lb"} for h in fleet.app_servers}
