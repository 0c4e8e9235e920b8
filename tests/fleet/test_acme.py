"""The fleet's certificate from an ACME CA: Pebble on the controller (tests/fleet/pebble.py),
the fleet's names resolving to every host, validation at whichever host the CA asks.

One order for the fleet, the same certificate on every host; a second run asks the CA
nothing; a forced renewal under load fails no handshake; a directory that does not
answer, or a name that does not resolve, stops the run naming it, the certificate in
service unchanged. The module's fixture goes back to the private CA after.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from websockets.asyncio.client import connect

import localfleet
from localfleet.ansible import ansible_playbook, parse_recap
from localfleet.demo import ca_file
from tests.fleet import pebble
from tests.fleet.load import assert_no_failures, load_on, summary
from tests.fleet.tls import served

Fleet = localfleet.Fleet

# The fleet's public names: each resolves to every host, a different one first.
NAMES = ["chat.wsfleet.test", "www.wsfleet.test", "wsfleet.test"]
CHALLENGES = "/var/lib/wsfleet/acme-challenge"


def challenges_answered(host: localfleet.FleetHost) -> int:
    """The CA's challenge requests in the host's nginx access log so far."""
    log = host.ssh("grep -c 'GET /.well-known/acme-challenge/' /var/log/nginx/access.log")
    return int(log.stdout.strip() or 0)


@dataclass(frozen=True)
class Acme:
    ca: pebble.Pebble
    root: Path  # Pebble's root of this run, what clients trust
    options: tuple[str, ...]  # site.yml's extra variables for the ACME CA
    first: subprocess.CompletedProcess[str]  # the run that ordered the first certificate
    answered: dict[str, int]  # challenges each host answered in that run


@pytest.fixture(scope="module")
def acme(
    fleet: Fleet, deployed: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Acme]:
    """site.yml with Pebble as the fleet's ACME CA; back to the private CA after."""
    folder = tmp_path_factory.mktemp("acme")
    addresses = [h.address for h in fleet.app_servers]
    with pebble.run(folder) as ca:
        # Pebble validates a name at its first address: one name per host.
        for turn, name in enumerate(NAMES):
            pebble.resolve(name, addresses[turn:] + addresses[:turn])
        root = folder / "root.pem"
        root.write_text(ca.root())
        options = (
            "-e", f"tls_acme_directory={ca.directory}",
            "-e", f"tls_acme_directory_ca={ca.tls_ca}",
            "-e", f"tls_acme_dir={folder / 'controller'}",
            "-e", json.dumps({"nginx_server_names": NAMES}),
        )  # fmt: skip
        before = {h.name: challenges_answered(h) for h in fleet.app_servers}
        first = ansible_playbook("site.yml", *options)
        answered = {h.name: challenges_answered(h) - before[h.name] for h in fleet.app_servers}
        try:
            yield Acme(ca, root, options, first, answered)
        finally:
            ansible_playbook("site.yml", "--tags", "configure")
    for host in fleet.app_servers:
        assert served(host.address, ca_file(), host.address).serial_number, host.name
        assert host.ssh("test ! -e /etc/ssl/wsfleet/public.crt").returncode == 0, host.name


def serials(fleet: Fleet, acme: Acme) -> set[int]:
    return {served(h.address, acme.root, NAMES[0]).serial_number for h in fleet.app_servers}


async def round_trip(address: str, root: Path, text: str, name: str = NAMES[0]) -> str:
    """A wss round trip through ``address``, verified against ``root`` for ``name``."""
    context = ssl.create_default_context(cafile=str(root))
    async with connect(
        f"wss://{address}/ws/acme", ssl=context, server_hostname=name, open_timeout=10
    ) as ws:
        await ws.send(text)
        reply = await asyncio.wait_for(ws.recv(), timeout=10)
    return str(reply)


def test_one_order_puts_the_fleet_certificate_on_every_host(fleet: Fleet, acme: Acme) -> None:
    """One order for the fleet's names; each host answered the CA's challenge for the name
    that resolves to it first; every host serves the same certificate, which verifies
    against Pebble's root for each name, and a wss round trip goes through each host."""
    assert acme.ca.orders() == 1
    assert all(count >= 1 for count in acme.answered.values()), acme.answered
    for host in fleet.app_servers:
        for name in NAMES:
            cert = served(host.address, acme.root, name)
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert sorted(names.value.get_values_for_type(x509.DNSName)) == sorted(NAMES)
        reply = asyncio.run(round_trip(host.address, acme.root, f"via {host.name}"))
        assert reply == f"via {host.name}"
        assert host.ssh(f"test ! -e {CHALLENGES}").returncode == 0, "challenges left behind"
    assert len(serials(fleet, acme)) == 1


def test_a_second_run_changes_nothing_and_asks_the_ca_nothing(fleet: Fleet, acme: Acme) -> None:
    """With the certificate far from its end, site.yml again: changed=0, no request at all
    reaches the CA."""
    requests = acme.ca.requests()
    recap = parse_recap(ansible_playbook("site.yml", *acme.options).stdout)
    assert {name: counts["changed"] for name, counts in recap.items()} == {
        h.name: 0 for h in fleet.app_servers
    }
    assert acme.ca.requests() == requests


def test_a_forced_renewal_under_load_fails_no_handshake(fleet: Fleet, acme: Acme) -> None:
    """renew.yml -e tls_acme_force=true with clients on every host: one new order, the new
    certificate on every host, 0 failed handshakes, only 1001/1012 closes."""
    before, orders = serials(fleet, acme), acme.ca.orders()
    addresses = [h.address for h in fleet.app_servers]
    with load_on(addresses, acme.root, NAMES[0]) as load:
        ansible_playbook("playbooks/renew.yml", *acme.options, "-e", "tls_acme_force=true")
    assert_no_failures(load)
    after = serials(fleet, acme)
    assert len(after) == 1, after
    assert not after & before, (before, after)
    assert acme.ca.orders() == orders + 1
    print(f"\nACME renewal under load: {summary(load)}")


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        # Nothing listens there: the directory does not answer.
        (["-e", "tls_acme_directory=https://127.0.0.1:9/dir"], "https://127.0.0.1:9/dir"),
        # The CA finds no address for it.
        (["-e", json.dumps({"tls_acme_names": [*NAMES, "nowhere.wsfleet.test"]})],
         "nowhere.wsfleet.test"),
    ],
)  # fmt: skip
def test_a_failed_order_stops_naming_why_and_the_certificate_stays(
    fleet: Fleet, acme: Acme, extra: list[str], named: str
) -> None:
    """A directory that does not answer, or a name that does not resolve: renew.yml stops
    with a message naming it; every host serves the certificate it served, no challenge
    left on any."""
    before = serials(fleet, acme)
    result = ansible_playbook(
        "playbooks/renew.yml", *acme.options, *extra, "-e", "tls_acme_force=true", check=False
    )
    assert result.returncode != 0
    message = " ".join(result.stdout.split())
    assert "The ACME order at " in message, message[-3000:]
    assert named in message, message[-3000:]
    assert "The certificate in service stays." in message
    assert serials(fleet, acme) == before
    for host in fleet.app_servers:
        assert host.ssh(f"test ! -e {CHALLENGES}").returncode == 0, host.name
