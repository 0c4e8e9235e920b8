"""The bus role's templates: the NATS config checked by `nats-server -t`, its unit drop-in by
`systemd-analyze` (no hosts needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.templates.test_templates import exposure, render, role_vars, root_with_dropin

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def bus_vars(
    host: str = "fleet1", peers: dict[str, str] | None = None, **overrides: Any
) -> dict[str, Any]:
    """The bus role's variables on ``host`` of a cluster of ``host`` and ``peers``."""
    peers = {"fleet2": "10.0.0.12", "fleet3": "10.0.0.13"} if peers is None else peers
    hosts = {host: "10.0.0.11", **peers}
    return role_vars(
        "bus",
        inventory_hostname=host,
        ansible_host=hosts[host],
        groups={"app_servers": list(hosts)},
        __bus_address=hosts[host],
        bus_max_message_size=1048576,  # the app role's app_max_size, as the playbooks set it
        # vars/main.yml's rule needs Ansible's hostvars: the fleet tests run it.
        __bus_peer_addresses=list(peers.values()),
        # Test values, not secrets; the password has characters a URL must escape.
        __bus_client_token="client-secret",  # noqa: S106
        __bus_route_password="route/secret+1",  # noqa: S106
        **overrides,
    )


def tls_files(folder: Path) -> None:
    """A CA and a certificate it issued, as route.crt, route.key and ca.crt in ``folder``."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl(
        "req", "-x509", *ec, "-subj", "/CN=ca", "-days", "1", "-keyout", "ca.key", "-out", "ca.crt"
    )
    openssl("req", "-new", *ec, "-subj", "/CN=fleet1", "-keyout", "route.key", "-out", "route.csr")
    openssl("x509", "-req", "-in", "route.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-days", "1",
            "-CAcreateserial", "-out", "route.crt")  # fmt: skip


def nats_check(config: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """`nats-server -t` on ``config`` with its TLS files in ``folder``."""
    path = folder / "nats-server.conf"
    path.write_text(config.replace("/etc/nats-server/", f"{folder}/"))
    return subprocess.run(
        [NATS_SERVER, "-t", "-c", str(path)], capture_output=True, text=True, check=False
    )


def test_nats_accepts_the_cluster_config(tmp_path: Path) -> None:
    """The rendered config passes nats-server -t: clients on the host's bus address over TLS
    with the token, routes to both peers, monitoring on loopback."""
    tls_files(tmp_path)
    config = render("etc/nats-server.conf.j2", bus_vars())
    result = nats_check(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    clients = config.split("cluster {", 1)[0]
    assert 'host: "10.0.0.11"\nport: 4222\ntls {\n' in clients
    assert 'cert_file: "/etc/nats-server/route.crt"' in clients
    assert 'token: "client-secret"' in clients
    assert "127.0.0.1:4222" not in config
    assert 'http: "127.0.0.1:8222"' in config
    assert "max_payload: 1114112\n" in config  # the largest message, and headers
    routes = re.findall(r'"nats-route://route:([^@]+)@([^"]+)"', config)
    # The password is URL-encoded in the route URLs; the host's own address is not a route.
    assert routes == [
        ("route%2Fsecret%2B1", "10.0.0.12:6222"),
        ("route%2Fsecret%2B1", "10.0.0.13:6222"),
    ]
    assert "verify: true" in config


def test_jetstream_keeps_the_history_within_set_limits(tmp_path: Path) -> None:
    """JetStream on, in its state folder, with the disk and memory ceilings set (unset they
    are 75 % of what is free)."""
    tls_files(tmp_path)
    config = render("etc/nats-server.conf.j2", bus_vars(bus_jetstream_max_file_store=123456789))
    jetstream = config.split("jetstream {", 1)[1].split("}", 1)[0]
    assert 'store_dir: "/var/lib/nats-server"' in jetstream
    assert "max_file_store: 123456789\n" in jetstream
    assert "max_memory_store: 67108864\n" in jetstream


def test_one_host_has_no_cluster(tmp_path: Path) -> None:
    """A fleet of one host: JetStream alone, no cluster block (a JetStream cluster without
    routes refuses to start) and no route to dial."""
    tls_files(tmp_path)
    config = render("etc/nats-server.conf.j2", bus_vars(peers={}))
    assert nats_check(config, tmp_path).returncode == 0
    assert "nats-route://" not in config
    assert "cluster {" not in config
    assert "jetstream {" in config


def test_nats_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check the role validates with fails on a config NATS cannot read."""
    tls_files(tmp_path)
    config = render("etc/nats-server.conf.j2", bus_vars()).replace("port: 4222", "port: {")
    assert nats_check(config, tmp_path).returncode != 0


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root with Debian's nats-server.service and the role's drop-in over it."""
    dropin = render("etc/systemd/system/nats-server.service.d/wsfleet.conf.j2", bus_vars())
    return root_with_dropin(tmp_path, "nats-server.service", dropin)


def test_bus_unit_exposure_is_at_most_1_5(unit_root: Path) -> None:
    """Debian's unit with the role's drop-in scores 1.5 or below, and restarts on failure."""
    assert exposure(unit_root, "nats-server.service") <= 1.5
    dropin = (unit_root / "etc/systemd/system/nats-server.service.d/wsfleet.conf").read_text()
    assert "Restart=on-failure" in dropin
    # The instances of this host reach their server on its bus address, the others' too.
    assert "IPAddressAllow=localhost 10.0.0.11 10.0.0.12 10.0.0.13\n" in dropin


def test_lame_duck_mode_is_set_within_what_nats_accepts(tmp_path: Path) -> None:
    """Lame duck mode is set within what nats-server accepts (a duration of 30 s or more, a
    grace period below it), and a shorter duration is refused, as 2.9 and 2.10 do."""
    tls_files(tmp_path)
    config = render("etc/nats-server.conf.j2", bus_vars())
    assert 'lame_duck_duration: "30s"\n' in config
    assert 'lame_duck_grace_period: "5s"\n' in config
    assert nats_check(config, tmp_path).returncode == 0
    shorter = config.replace('lame_duck_duration: "30s"', 'lame_duck_duration: "20s"')
    refused = nats_check(shorter, tmp_path)
    assert "minimum is 30 seconds" in refused.stdout + refused.stderr


def test_the_instances_may_reach_every_bus_server() -> None:
    """The app unit adds the servers of app_bus_url (IPv4, IPv6, with or without a user) to
    app_ip_address_allow, once each; a server named by a host name is left to the operator."""
    urls = ("tls://10.0.0.11:4222,tls://10.0.0.12:4222, tls://[fd00::13]:4222,"
            "nats://bus.example:4222,nats://u:p@10.0.0.12:4222")  # fmt: skip
    variables = role_vars(
        "app", app_version="1", app_bus_url=urls, app_ip_address_allow=["localhost", "10.0.0.12"]
    )
    unit = render("etc/systemd/system/app@.service.j2", variables)
    assert "IPAddressAllow=localhost 10.0.0.12 10.0.0.11 fd00::13\n" in unit
    alone = render("etc/systemd/system/app@.service.j2", {**variables, "app_bus_url": ""})
    assert "IPAddressAllow=localhost 10.0.0.12\n" in alone


def test_the_instances_are_told_every_server_and_the_ca() -> None:
    """app.env carries the bus role's list of servers and the CA the instances verify them
    with (the bus role's facts, through the app role's defaults)."""
    urls = "tls://10.0.0.11:4222,tls://10.0.0.12:4222,tls://10.0.0.13:4222"
    variables = role_vars(
        "app", app_version="1", bus_client_url=urls, bus_client_ca="/etc/nats-server/ca.crt"
    )
    env = render("opt/app/app.env.j2", variables)
    assert f"APP_BUS_URL={urls}\n" in env
    assert "APP_BUS_CA=/etc/nats-server/ca.crt\n" in env
