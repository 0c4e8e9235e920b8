"""site.yml on the local fleet: a real deploy, checked from outside and on the hosts."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess
import tarfile
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

import localfleet
from localfleet.ansible import ansible_playbook, parse_recap
from localfleet.demo import ca_file, round_trip
from localfleet.instances import live_ports
from localfleet.settings import INVENTORY, REPO
from tests.fleet.load import (
    assert_each_closed_at_most_once,
    assert_no_failures,
    load_on,
    summary,
)

Fleet = localfleet.Fleet


def on_host(host: localfleet.FleetHost, command: str) -> str:
    result = host.ssh(command)
    assert result.returncode == 0, f"{host.name}: {command}: {result.stderr}"
    return result.stdout


def active_instances(host: localfleet.FleetHost) -> list[int]:
    out = on_host(host, "systemctl list-units --plain --no-legend --state=active 'wsapp@*.service'")
    return sorted(int(p) for p in re.findall(r"wsapp@(\d+)\.service", out))


def upstream_ports(host: localfleet.FleetHost) -> list[int]:
    site = on_host(host, "cat /etc/nginx/sites-enabled/wsfleet.conf")
    upstream = site.split("upstream wsfleet_app {", 1)[1].split("}", 1)[0]
    return sorted(int(p) for p in re.findall(r"server 127\.0\.0\.1:(\d+)", upstream))


def test_fresh_deploy_succeeds_on_every_host(
    fleet: Fleet, deployed: subprocess.CompletedProcess[str]
) -> None:
    """The first run of site.yml converges every app server without a failure."""
    recap = parse_recap(deployed.stdout)
    assert set(recap) == {h.name for h in fleet.app_servers}
    assert all(counts["failed"] == 0 and counts["unreachable"] == 0 for counts in recap.values())


def test_second_run_changes_nothing(
    fleet: Fleet, deployed: subprocess.CompletedProcess[str]
) -> None:
    """Run again with the same variables: changed=0 on every host."""
    recap = parse_recap(ansible_playbook("site.yml").stdout)
    assert {name: counts["changed"] for name, counts in recap.items()} == {
        h.name: 0 for h in fleet.app_servers
    }


# An operator's project of its own: its ansible.cfg finds the installed collection, its
# playbook calls the kit's by FQCN. What a real project needs of ansible.cfg, nothing more.
PROJECT_CFG = """\
[defaults]
collections_path = ./collections
host_key_checking = true
interpreter_python = auto_silent
[ssh_connection]
pipelining = true
ssh_args = -o ControlMaster=auto -o ControlPersist=60s
"""
PROJECT_PLAYBOOK = """\
---
- name: Deploy our WebSocket fleet with the kit
  ansible.builtin.import_playbook: wsfleet.fleet.site
"""


def test_the_collection_deploys_from_a_project_of_its_own(
    fleet: Fleet, deployed: object, tmp_path: Path
) -> None:
    """The kit built as a collection (galaxy.yml) holds what a deploy needs and nothing of
    its own development; installed into a project with its own inventory and playbook, that
    playbook runs the collection's roles by FQCN to the host site.yml converged (no change
    on it), and a second run changes nothing at all; ansible-doc documents its roles. The
    runs are limited to the first host, which runs the controller's build steps: the other
    hosts' steps are the same roles', shown by test_second_run_changes_nothing."""
    venv = REPO / ".venv" / "bin"
    dist, project = tmp_path / "dist", tmp_path / "project"
    subprocess.run(
        [venv / "ansible-galaxy", "collection", "build", "--output-path", dist, REPO],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (tarball,) = dist.glob("wsfleet-fleet-*.tar.gz")
    with tarfile.open(tarball) as archive:
        tops = {name.split("/", 1)[0] for name in archive.getnames()}
    assert {"app", "roles", "playbooks", "templates", "pyproject.toml", "meta"} <= tops
    assert not tops & {"tests", "localfleet", "bench", "inventories", ".fleet", "Makefile"}
    # --no-deps: community.crypto and ansible.posix come with the pinned ansible package.
    subprocess.run(
        [venv / "ansible-galaxy", "collection", "install", "--no-deps",
         "-p", project / "collections", tarball],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    shutil.copytree(INVENTORY.parent, project / "inventory")
    (project / "ansible.cfg").write_text(PROJECT_CFG)
    (project / "fleet.yml").write_text(PROJECT_PLAYBOOK)

    first_host = fleet.app_servers[0].name
    first = ansible_playbook("fleet.yml", "--limit", first_host, project=project)
    assert "TASK [wsfleet.fleet.app : " in first.stdout, "the roles ran by another name"
    assert set(parse_recap(first.stdout)) == {first_host}
    # The collection builds its release in a folder of its own: only the controller's
    # build steps (delegated, counted on the first host) may change.
    built = [line for line in first.stdout.splitlines() if line.startswith("changed: [")]
    assert all("-> localhost]" in line for line in built), built
    # Again: the build in the collection's folder is found, not made again.
    second = ansible_playbook("fleet.yml", "--limit", first_host, project=project)
    assert {name: counts["changed"] for name, counts in parse_recap(second.stdout).items()} == {
        first_host: 0
    }

    doc = subprocess.run(
        [venv / "ansible-doc", "-t", "role", "wsfleet.fleet.app"], cwd=project,
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "app_instances" in doc.stdout
    assert "app_handler" in doc.stdout


@pytest.mark.parametrize("index", [0, 1, 2])
def test_wss_round_trip_verified_against_the_ca(fleet: Fleet, deployed: object, index: int) -> None:
    """From outside, wss:// to each host verifies against the demo CA and echoes."""
    host = fleet.app_servers[index]
    reply = asyncio.run(round_trip(host.address, ca_file(), f"ping {host.name}"))
    assert reply == f"ping {host.name}"


def test_tls_is_refused_without_the_ca(fleet: Fleet, deployed: object) -> None:
    """A client that does not trust the demo CA fails verification: the TLS is real."""
    address = fleet.app_servers[0].address

    async def attempt() -> None:
        async with connect(f"wss://{address}/ws/x", ssl=ssl.create_default_context()):
            pass

    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(attempt())


def test_every_instance_serves(fleet: Fleet, deployed: object) -> None:
    """Connections through nginx spread over all instances: each one's /metrics counts them."""
    context = ssl.create_default_context(cafile=str(ca_file()))

    async def open_many(address: str) -> None:
        clients = [await connect(f"wss://{address}/ws/spread", ssl=context) for _ in range(8)]
        for ws in clients:
            await ws.close()

    for host in fleet.app_servers:
        asyncio.run(open_many(host.address))
        # /metrics/<name>: an instance's name is its port in the first set (8001 and up),
        # whichever set the last handover left it on (a fleet kept up between sessions).
        for name in range(8001, 8001 + len(active_instances(host))):
            metrics = on_host(host, f"curl -sf http://127.0.0.1:9180/metrics/{name}")
            accepted = re.search(r'wsapp_handshakes_total\{result="accepted"\} (\d+)', metrics)
            assert accepted, f"{host.name}:{name} has accepted no handshake"
            assert float(accepted[1]) >= 1


def test_check_diff_shows_a_change_and_changes_nothing(fleet: Fleet, deployed: object) -> None:
    """A changed variable under --check --diff is shown as a diff and not applied (on the
    host looked at: the run is limited to it)."""
    host = fleet.app_servers[0]
    before = on_host(host, "cat /etc/wsapp/wsapp.env")
    result = ansible_playbook(
        "site.yml", "--limit", host.name, "--check", "--diff", "-e", "app_max_size=2097152"
    )
    assert "-APP_MAX_SIZE=1048576" in result.stdout
    assert "+APP_MAX_SIZE=2097152" in result.stdout
    assert on_host(host, "cat /etc/wsapp/wsapp.env") == before


def test_check_diff_of_a_new_release_changes_nothing(fleet: Fleet, deployed: object) -> None:
    """A new app_version under --check --diff shows its environment file; the host changes
    nothing (the run is limited to it: the other hosts' steps are the same roles')."""
    host = fleet.app_servers[0]
    state = (
        "ls /opt/wsapp/releases; readlink /opt/wsapp/current;"
        " systemctl show -p MainPID 'wsapp@*.service'"
    )
    before = on_host(host, state)
    result = ansible_playbook(
        "site.yml", "--limit", host.name, "--check", "--diff", "-e", "app_version=9.9.9-check"
    )
    assert "+APP_VERSION=9.9.9-check" in result.stdout
    assert on_host(host, state) == before


def test_check_mode_of_a_first_install_changes_nothing(
    fleet: Fleet, deployed: object, tmp_path: Path
) -> None:
    """--check for an app never installed, with a CA not yet made, succeeds and creates
    nothing (the run limited to the first host, the other hosts looked at all the same)."""
    ca_dir = tmp_path / "ca"
    result = ansible_playbook(
        "site.yml", "--limit", fleet.app_servers[0].name, "--check", "--diff",
        "-e", "app_name=wsfirst", "-e", f"tls_ca_dir={ca_dir}",
    )  # fmt: skip
    assert "+APP_HANDLER=" in result.stdout
    assert not ca_dir.exists()
    for host in fleet.app_servers:
        assert (
            on_host(host, "ls /opt /etc/systemd/system; getent passwd wsfirst || true").count(
                "wsfirst"
            )
            == 0
        ), host.name


def test_scaling_instances_up_and_back_down(fleet: Fleet, deployed: object) -> None:
    """app_instances 2 → 4 → 2 on a host (the runs limited to it: each host scales alone):
    exactly those units run and nginx's upstream matches. At 4, a rollout of the host under
    load hands all four over: each client closed once."""
    first = fleet.app_servers[0]
    for count in (2, 4, 2):
        # The fleet starts on the demo's 2: checked as it is, without a run changing nothing.
        if len(active_instances(first)) != count:
            ansible_playbook("site.yml", "--limit", first.name, "-e", f"app_instances={count}")
        ports = active_instances(first)
        # On whichever set the last handover left: 8001 and up, or 8101 and up.
        assert ports in (list(range(8001, 8001 + count)), list(range(8101, 8101 + count)))
        assert upstream_ports(first) == ports
        if count == 4:
            before = active_instances(first)
            with load_on([first.address]) as load:
                ansible_playbook(
                    "playbooks/rollout.yml", "--limit", first.name,
                    "-e", "app_instances=4", "-e", "app_version=1.0.2-four",
                )  # fmt: skip
            print(f"\nrollout of four instances under load: {summary(load)}")
            assert_no_failures(load)
            assert load.closes, "no instance was handed over"
            assert_each_closed_at_most_once(load)
            after = active_instances(first)
            assert len(after) == 4, after
            assert not set(after) & set(before), (before, after)
            assert upstream_ports(first) == after
    # Stopped and disabled, a unit may stay listed a while as "inactive dead".
    listed = on_host(first, "systemctl list-units --all --plain --no-legend 'wsapp@*'")
    assert not re.search(r"wsapp@(8003|8004|8103|8104)\.\S+ +loaded +(?!inactive +dead)", listed)


def test_socket_activation_switches_on_and_off(fleet: Fleet, deployed: object) -> None:
    """app_socket_activation on a running host: systemd holds each port; off again: it does not."""
    host = fleet.app_servers[0]
    ports = live_ports(host)
    sockets = "systemctl list-units --all --plain --no-legend 'wsapp@*.socket'"
    try:
        for _ in range(2):  # the second run changes nothing
            result = ansible_playbook(
                "site.yml", "--limit", host.name, "-e", '{"app_socket_activation": true}'
            )
        assert parse_recap(result.stdout)[host.name]["changed"] == 0
        assert (
            sorted(
                map(int, re.findall(r"wsapp@(\d+)\.socket +loaded +active", on_host(host, sockets)))
            )
            == ports
        )
        assert "systemd" in on_host(host, f"ss -ltnpH 'sport = :{ports[0]}'")
        assert active_instances(host) == ports
        assert asyncio.run(round_trip(host.address, ca_file(), "via socket")) == "via socket"
    finally:
        ansible_playbook("site.yml", "--limit", host.name)
    assert on_host(host, sockets) == ""
    assert (
        on_host(
            host, "ls /etc/systemd/system/sockets.target.wants/ | grep -c wsapp || true"
        ).strip()
        == "0"
    )
    assert active_instances(host) == ports
    assert asyncio.run(round_trip(host.address, ca_file(), "bound itself")) == "bound itself"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["app_instances=0"], "app_instances"),
        (["app_base_port=70000"], "app_base_port"),
        (["app_base_port=65535", "app_instances=2"], "app_instances"),
        (["app_base_port=442", "app_instances=2"], "nginx_https_port"),
        (["app_handler=nosuch.module:handler"], "app_handler"),
        (["app_handler=app.handlers:nosuch"], "app_handler"),
        # Found by the preflight's reading of the source, refused by the import in the release.
        (["app_handler=app.handlers:annotations"], "app_handler"),
        (["app_compression=brotli"], "app_compression"),
        (["app_ping_interval=15"], "app_ping_interval"),
        (['{"nginx_app_paths": ["ws"]}'], "nginx_app_paths"),
        (["nginx_limit_conn_per_ip=100000"], "nginx_limit_conn_per_ip"),
        # A listener on a spare port would pass, then break the next handover.
        (["nginx_metrics_listen=127.0.0.1:8101"], "nginx_metrics_listen"),
        # The bus: a port the app or nginx holds, or its own twice; an address not the host's.
        (["bus_client_port=8001"], "bus_client_port"),
        (["bus_route_port=443"], "bus_route_port"),
        (["bus_monitor_port=4222"], "bus_monitor_port"),
        (["bus_route_address=192.0.2.1"], "bus_route_address"),
        (["bus_max_payload=1000"], "bus_max_payload"),
        # The fleet's hosts run Debian 12 and 13: one nats-server for all, or none.
        (["bus_server_package="], "bus_server_package"),
        (["bus_server_package=/nonexistent/nats-server.deb"], "bus_server_package"),
    ],
)
def test_bad_variables_fail_before_any_change(
    fleet: Fleet, deployed: object, extra: list[str], named: str
) -> None:
    """A bad variable stops the play at its start, naming the variable; no host changes.
    (The run is limited to the first host: each host's preflight is the same.)"""
    options = ["--limit", fleet.app_servers[0].name]
    options += [arg for value in extra for arg in ("-e", value)]
    result = ansible_playbook("site.yml", *options, check=False)
    assert result.returncode != 0
    assert named in result.stdout
    recap = parse_recap(result.stdout)
    assert all(counts["changed"] == 0 for counts in recap.values()), recap


@pytest.mark.parametrize("tags", ["preflight", "configure", "service"])
def test_preflight_runs_whatever_the_tags(fleet: Fleet, deployed: object, tags: str) -> None:
    """--tags of one phase still checks every variable first (and that phase runs clean,
    on the first host: the runs are limited to it)."""
    first = ("--limit", fleet.app_servers[0].name)
    bad = ansible_playbook("site.yml", *first, "--tags", tags, "-e", "app_instances=0", check=False)
    assert bad.returncode != 0
    assert "app_instances must be at least 1" in bad.stdout
    recap = parse_recap(ansible_playbook("site.yml", *first, "--tags", tags).stdout)
    assert all(counts["changed"] == 0 for counts in recap.values()), recap


def test_certificate_not_matching_its_key_fails_first(
    fleet: Fleet, deployed: object, tmp_path: Path
) -> None:
    """tls_cert_file with another key's tls_key_file fails before any change, naming both;
    with its own key on a fleet of several hosts, naming the bus's route TLS variables."""
    folder = tmp_path
    for name in ("one", "two"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-subj", f"/CN={name}", "-days", "1",
             "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt")],
            check=True, capture_output=True,
        )  # fmt: skip
    # Each host's preflight checks the pair: the runs are limited to the first host.
    first = ("--limit", fleet.app_servers[0].name)
    result = ansible_playbook(
        "site.yml", *first, "-e", f"tls_cert_file={folder / 'one.crt'}",
        "-e", f"tls_key_file={folder / 'two.key'}", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "does not match tls_key_file" in result.stdout
    assert all(c["changed"] == 0 for c in parse_recap(result.stdout).values())
    # A pair that matches, with the bus's route certificate left on the tls role's files:
    # those would then hold this certificate, and the fleet's routes would never come up.
    result = ansible_playbook(
        "site.yml", *first, "-e", f"tls_cert_file={folder / 'one.crt'}",
        "-e", f"tls_key_file={folder / 'one.key'}", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "bus_tls_cert and bus_tls_key" in result.stdout
    assert all(c["changed"] == 0 for c in parse_recap(result.stdout).values())


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("nginx_limit_req_rate=lots", "invalid rate"),  # the site
        ("nginx_worker_processes=lots", '"worker_processes" directive invalid value'),  # nginx.conf
    ],
)
def test_config_nginx_rejects_leaves_the_old_one_serving(
    fleet: Fleet, deployed: object, extra: str, says: str
) -> None:
    """A variable nginx rejects fails the play; the live config and nginx are untouched (on
    the host looked at: the run is limited to it)."""
    host = fleet.app_servers[0]
    state = (
        "sha256sum /etc/nginx/sites-available/wsfleet.conf /etc/nginx/nginx.conf;"
        " systemctl show -p MainPID nginx; nginx -t -q && echo config ok"
    )
    before = on_host(host, state)
    result = ansible_playbook("site.yml", "--limit", host.name, "-e", extra, check=False)
    assert result.returncode != 0
    assert says in result.stdout
    assert on_host(host, state) == before
    assert on_host(host, "systemctl is-active nginx").strip() == "active"
    # The failure came after the deploy lock was taken: the rescue released it.
    for each in fleet.app_servers:
        assert each.ssh("test -e /var/lib/wsfleet/deploy.lock").returncode == 1, each.name
    reply = asyncio.run(round_trip(host.address, ca_file(), "still serving"))
    assert reply == "still serving"
