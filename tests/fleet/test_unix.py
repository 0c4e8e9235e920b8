"""app_listen unix on the live fleet: nginx reaches the instances over unix sockets.

The module switches the session's fleet from TCP to unix sockets (bound by the instances,
then held by systemd). It leaves the fleet on them: test_loadbalancer.py, next in ORDER,
rolls a release out on them behind its balancer, with load through the balancer and
straight to the hosts. The defaults are deployed again after that, by the next module
that wants them (tests/fleet/restore.py); the switch here converges the fleet from
whatever the module before left.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

import localfleet
from localfleet.ansible import ansible_playbook
from localfleet.demo import ca_file
from localfleet.instances import instance_get, live_ports
from tests.fleet.load import assert_no_failures, load_on, summary
from tests.fleet.restore import RESTORE

# Setup (the session's fleet and deploy, this module's) and teardown ride on the tests.
pytestmark = pytest.mark.timeout(1200)
# The switch to unix sockets is a site.yml run: it deploys whatever settings the module
# before left back to the defaults too (RESTORE); the preflight test runs on any.
NEEDS_DEFAULTS = False

# The instances' names (their ports in the first set: /metrics/<name>); they serve on
# those or on the spare ones, whichever the last handover left (live_ports).
NAMES = (8001, 8002)
UNIX = ("-e", "app_listen=unix")
ACTIVATED = ("-e", "app_socket_activation=true")
# What the module leaves the fleet on (its last switch), for test_loadbalancer.py's runs.
LEFT = (*UNIX, *ACTIVATED)


def on_host(host: localfleet.FleetHost, command: str) -> str:
    result = host.ssh(command)
    assert result.returncode == 0, f"{host.name}: {command}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def on_unix(fleet: localfleet.Fleet, deployed: object) -> Iterator[localfleet.Fleet]:
    """The fleet switched to app_listen unix; the defaults deployed back after the module."""
    try:
        ansible_playbook("site.yml", *UNIX)
        yield fleet
    finally:
        RESTORE.leave()


async def echo_through_nginx(address: str, text: str) -> str | bytes:
    context = ssl.create_default_context(cafile=str(ca_file()))
    async with connect(f"wss://{address}/ws/unix", ssl=context, open_timeout=10) as ws:
        await ws.send(text)
        return await asyncio.wait_for(ws.recv(), 10)


def listening(host: localfleet.FleetHost, ports: list[int]) -> tuple[str, str]:
    """The unix sockets listening on the host, and TCP listeners on the instances' ports."""
    unix = on_host(host, "ss -xlnH")
    tcp = on_host(host, f"ss -tlnH '( {' or '.join(f'sport = :{port}' for port in ports)} )'")
    return unix, tcp


def check_reached_over_unix(host: localfleet.FleetHost, socket_mode: str) -> None:
    """nginx proxies wss through the sockets; only nginx's group (and root) may connect."""
    ports = live_ports(host)
    unix, tcp = listening(host, ports)
    for port in ports:
        assert f"/run/wsapp/{port}.sock" in unix, f"{host.name}: {unix}"
    assert tcp.strip() == "", f"{host.name}: TCP listeners on the instances' ports: {tcp}"
    assert on_host(host, "stat -c '%a %U %G' /run/wsapp").split() == ["750", "wsapp", "www-data"]
    first = f"/run/wsapp/{ports[0]}.sock"
    assert on_host(host, f"stat -c '%a' {first}").strip() == socket_mode
    as_user = "setpriv --reuid={0} --regid={0} --init-groups curl -sf --unix-socket"
    www = f"{as_user.format('www-data')} {first} http://localhost/healthz"
    assert json.loads(on_host(host, www))["port"] == ports[0]
    nobody = host.ssh(f"{as_user.format('nobody')} {first} http://localhost/healthz")
    assert nobody.returncode != 0, f"{host.name}: nobody reached the instance"
    assert asyncio.run(echo_through_nginx(host.address, host.name)) == host.name
    for name, port in zip(NAMES, ports, strict=True):
        ready = json.loads(instance_get(host, port, "/readyz").stdout)
        assert (ready["status"], ready["port"]) == ("ok", port), ready
        metrics = on_host(host, f"curl -sf http://127.0.0.1:9180/metrics/{name}")
        assert "wsapp_connections_open" in metrics


def test_a_bad_app_listen_fails_in_preflight(fleet: localfleet.Fleet, deployed: object) -> None:
    """An unknown value stops site.yml before any host changes, naming the variable."""
    result = ansible_playbook("site.yml", "-e", "app_listen=udp", check=False)
    assert result.returncode != 0
    assert "app_listen" in result.stdout
    assert "Take the deploy lock" not in result.stdout


def test_nginx_reaches_the_instances_over_unix_sockets(
    on_unix: localfleet.Fleet, tmp_path: Path
) -> None:
    """Each host: the instances listen on /run/wsapp/<port>.sock, nothing on their ports;
    wss through nginx, /metrics/<port> and status.yml all reach them."""
    for host in on_unix.app_servers:
        check_reached_over_unix(host, socket_mode="666")
    document = tmp_path / "status.json"
    ansible_playbook(
        "playbooks/status.yml", "--check", "-e", "status_format=json",
        "-e", f"status_file={document}",
    )  # fmt: skip
    hosts = json.loads(document.read_text())["hosts"]
    for host in on_unix.app_servers:
        ready = {i["port"]: i["ready"] for i in hosts[host.name]["instances"]}
        assert ready == dict.fromkeys(live_ports(host), True), (host.name, ready)


def test_socket_activation_on_unix_sockets(on_unix: localfleet.Fleet) -> None:
    """With app_socket_activation, systemd holds each socket (0660, nginx's group) and
    the instances serve it; the switch from self-bound sockets fails no handshake."""
    addresses = [h.address for h in on_unix.app_servers]
    with load_on(addresses) as load:
        ansible_playbook("site.yml", *LEFT)
    print(f"\nto socket activation under load: {summary(load)}")
    assert_no_failures(load)
    for host in on_unix.app_servers:
        check_reached_over_unix(host, socket_mode="660")
        for port in live_ports(host):
            assert on_host(host, f"systemctl is-active wsapp@{port}.socket").strip() == "active"
