"""The default deploy on the public internet: TLS, limits and sandbox, tested from outside."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import localfleet
from localfleet.ansible import ansible_playbook
from localfleet.demo import ca_file, round_trip
from localfleet.instances import instance_get, live_ports
from localfleet.settings import GATEWAY, REPO
from tests.fleet.releases import host_of, per_release

# sslyze lives in a venv of its own (requirements/sslyze.txt says why).
SSLYZE = REPO / ".venv-sslyze" / "bin" / "python"


def sslyze(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SSLYZE), "-m", "sslyze", *args, f"{target}:443"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def mozilla_check(address: str, profile: str, ca: Path, report: Path) -> dict[str, Any]:
    """sslyze's check against Mozilla's ``profile``, which must say compliant; its scan."""
    result = sslyze(
        address, f"--mozilla_config={profile}", f"--certinfo_ca_file={ca}",
        f"--json_out={report}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert "OK - Compliant." in result.stdout
    scan: dict[str, Any] = json.loads(report.read_text())["server_scan_results"][0]["scan_result"]
    return scan


def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file()))


@per_release
def test_sslyze_says_mozilla_intermediate_compliant(
    fleet: localfleet.Fleet, deployed: object, tmp_path: Path, release: str
) -> None:
    """sslyze's Mozilla check (intermediate) passes on each release's nginx and OpenSSL
    (Debian 12: 1.22 and 3.0, Debian 13: 1.26 and 3.5); TLS 1.0 and 1.1 are refused."""
    host = host_of(fleet, release)
    scan = mozilla_check(host.address, "intermediate", ca_file(), tmp_path / "sslyze.json")
    for old in ("ssl_3_0", "tls_1_0", "tls_1_1"):
        assert scan[f"{old}_cipher_suites"]["result"]["accepted_cipher_suites"] == [], old
    assert scan["tls_1_3_cipher_suites"]["result"]["accepted_cipher_suites"]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def modern_with_own_certificate(
    fleet: localfleet.Fleet, deployed: object, tmp_path: Path
) -> Iterator[tuple[localfleet.FleetHost, Path]]:
    """The last host on the modern profile, serving an operator's certificate that names an
    OCSP responder (issued here by a CA of the test); afterwards back to the demo's.

    Yields the host and the CA file that verifies its certificate.
    """
    host = fleet.app_servers[-1]
    ca_key, ca_crt = tmp_path / "ca.key", tmp_path / "ca.crt"
    key, csr, crt, chain = (tmp_path / f"server.{ext}" for ext in ("key", "csr", "crt", "pem"))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    # The extensions a public CA's certificates carry: sslyze validates the path strictly.
    openssl("req", "-x509", *ec, "-subj", "/CN=test operator CA", "-days", "2",
            "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", str(ca_key), "-out", str(ca_crt))  # fmt: skip
    openssl("req", "-new", *ec, "-subj", f"/CN={host.address}", "-keyout", str(key),
            "-out", str(csr))  # fmt: skip
    # The responder's address answers nothing: nginx tries, fails, and serves unstapled.
    extensions = tmp_path / "ext.cnf"
    extensions.write_text(
        f"subjectAltName=IP:{host.address}\n"
        f"authorityInfoAccess=OCSP;URI:http://{GATEWAY}:9/\n"
        "extendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
            "-days", "2", "-extfile", str(extensions), "-out", str(crt))  # fmt: skip
    chain.write_text(crt.read_text() + ca_crt.read_text())
    # The bus's routes keep certificates of the private CA that the other hosts' servers
    # trust, as an operator's inventory gives them (docs/rooms.md, The bus): a public
    # certificate neither allows client authentication nor names the route address.
    routes = "/etc/ssl/wsfleet-routes"
    copied = host.ssh(f"install -d -m 0700 {routes} && cp -p /etc/ssl/wsfleet/server.crt "
                      f"/etc/ssl/wsfleet/server.key {routes}/")  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    ansible_playbook(
        "site.yml", "--limit", host.name, "-e", "nginx_tls_profile=modern",
        "-e", f"tls_cert_file={chain}", "-e", f"tls_key_file={key}",
        "-e", f"bus_tls_cert={routes}/server.crt", "-e", f"bus_tls_key={routes}/server.key",
    )  # fmt: skip
    try:
        yield host, ca_crt
    finally:
        ansible_playbook("site.yml", "--limit", host.name)
        host.ssh(f"rm -r {routes}")


def test_modern_profile_and_ocsp_stapling_of_an_own_certificate(
    modern_with_own_certificate: tuple[localfleet.FleetHost, Path], tmp_path: Path
) -> None:
    """nginx_tls_profile=modern: sslyze's modern check passes, TLS 1.2 is refused; the
    operator's certificate names a responder, so nginx staples."""
    host, ca = modern_with_own_certificate
    scan = mozilla_check(host.address, "modern", ca, tmp_path / "modern.json")
    assert scan["tls_1_2_cipher_suites"]["result"]["accepted_cipher_suites"] == []
    site = host.ssh("cat /etc/nginx/sites-enabled/wsfleet.conf").stdout
    assert "ssl_stapling on;" in site
    assert asyncio.run(round_trip(host.address, ca, "modern")) == "modern"


def test_the_private_ca_certificate_is_not_stapled(
    fleet: localfleet.Fleet, deployed: object
) -> None:
    """The demo's certificates name no OCSP responder: no stapling configured."""
    site = fleet.app_servers[0].ssh("cat /etc/nginx/sites-enabled/wsfleet.conf").stdout
    assert "ssl_certificate " in site
    assert "ssl_stapling" not in site


def public_get(url: str) -> tuple[int, str]:
    """Status and body of a GET from this machine, as a stranger would send it."""
    context = ssl.create_default_context(cafile=str(ca_file()))
    try:
        with urllib.request.urlopen(url, context=context, timeout=5) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_public_listeners_show_nothing_of_the_processes(
    fleet: localfleet.Fleet, deployed: object
) -> None:
    """Through nginx, on 443 and 80: /healthz says up and nothing else (no pid, port,
    release or connections), /readyz and /metrics are not there; on the host, the
    instance's own port still tells everything."""
    host = fleet.app_servers[0]
    for scheme in ("https", "http"):
        assert public_get(f"{scheme}://{host.address}/healthz") == (200, '{"status": "ok"}\n')
    for path in ("/readyz", "/metrics"):
        assert public_get(f"https://{host.address}{path}")[0] == 404, path
    # Reaches an instance, which serves no metrics there (its own /metrics only).
    status, body = public_get(f"https://{host.address}/metrics/8001")
    assert status != 200, body
    assert "wsapp_" not in body
    local = json.loads(instance_get(host, live_ports(host)[0], "/healthz").stdout)
    assert {"pid", "port", "version", "connections"} <= set(local), local


def test_by_default_a_page_elsewhere_cannot_open_a_socket(
    fleet: localfleet.Fleet, deployed: object
) -> None:
    """With app_allowed_origins at its default: a handshake from a page of the fleet's own
    host is served, one from a page elsewhere gets 403 (no socket with its visitors'
    cookies); a client without an Origin is served."""
    address = fleet.app_servers[0].address

    async def opened(origin: str | None) -> int:
        try:
            async with connect(f"wss://{address}/ws/origin", ssl=tls_context(), origin=origin):
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    for origin, expected in ((f"https://{address}", 101), ("https://evil.example", 403),
                             (None, 101)):  # fmt: skip
        assert asyncio.run(opened(origin)) == expected, origin


def test_plain_http_redirects_to_https_but_health_answers(
    fleet: localfleet.Fleet, deployed: object
) -> None:
    """Port 80 answers 301 to https, except /healthz for load balancers."""
    address = fleet.app_servers[0].address
    for path, expected in (("/", "301"), ("/healthz", "200")):
        with socket.create_connection((address, 80), timeout=5) as raw:
            raw.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode()
            )
            head = raw.recv(4096).decode(errors="replace")
        assert head.split()[1] == expected, head
        if expected == "301":
            assert f"Location: https://{address}/" in head


def test_metrics_are_not_public(fleet: localfleet.Fleet, deployed: object) -> None:
    """/metrics answers 404 through the public listener; server_tokens hide the version."""
    address = fleet.app_servers[0].address
    request = f"GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    with (
        socket.create_connection((address, 443), timeout=5) as raw,
        tls_context().wrap_socket(raw, server_hostname=address) as tls,
    ):
        tls.sendall(request.encode())
        head = tls.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 404")
    assert re.search(r"^Server: nginx\r$", head, re.MULTILINE)


def test_a_2_mib_message_is_refused_with_1009(fleet: localfleet.Fleet, deployed: object) -> None:
    """Through nginx, a message over the app's max size closes with 1009; others unaffected."""
    address = fleet.app_servers[0].address

    async def scenario() -> tuple[int | None, str | bytes]:
        async with connect(f"wss://{address}/ws/big", ssl=tls_context()) as bystander:
            async with connect(f"wss://{address}/ws/big2", ssl=tls_context(), max_size=None) as ws:
                await ws.send(b"x" * (2 << 20))
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                code = ws.close_code
            await bystander.send("still here")
            return code, await asyncio.wait_for(bystander.recv(), 5)

    assert asyncio.run(scenario()) == (1009, "still here")


def test_a_trickling_handshake_is_cut_by_a_timeout(
    fleet: localfleet.Fleet, deployed: object
) -> None:
    """A slowloris client that never finishes its headers is closed by nginx's timeout."""
    address = fleet.app_servers[0].address
    with (
        socket.create_connection((address, 443), timeout=30) as raw,
        tls_context().wrap_socket(raw, server_hostname=address) as tls,
    ):
        tls.sendall(b"GET /ws/slow HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 25:
            try:
                tls.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            tls.settimeout(2)
            try:
                if tls.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        elapsed = time.monotonic() - started
    assert closed, "nginx kept a handshake that never ended"
    assert elapsed < 20
    assert asyncio.run(round_trip(address, ca_file(), "after slowloris")) == "after slowloris"


@pytest.fixture
def restricted(fleet: localfleet.Fleet, deployed: object) -> Iterator[localfleet.FleetHost]:
    """The first host redeployed with 5 connections per client and one allowed origin;
    then back."""
    host = fleet.app_servers[0]
    extra = json.dumps(
        {"nginx_limit_conn_per_ip": 5, "app_allowed_origins": ["https://good.example"]}
    )
    ansible_playbook("site.yml", "--limit", host.name, "-e", extra)
    try:
        yield host
    finally:
        ansible_playbook("site.yml", "--limit", host.name)


def test_limits_refuse_without_disturbing_others(restricted: localfleet.FleetHost) -> None:
    """Past the per-client connection limit, and from a foreign origin: refused; others served."""
    address = restricted.address

    async def scenario() -> tuple[int, int, list[str | bytes]]:
        clients = [await connect(f"wss://{address}/ws/limit", ssl=tls_context()) for _ in range(5)]
        try:
            with pytest.raises(InvalidStatus) as over:
                await connect(f"wss://{address}/ws/limit", ssl=tls_context(), open_timeout=10)
            for ws in clients:
                await ws.close()
            with pytest.raises(InvalidStatus) as foreign:
                await connect(
                    f"wss://{address}/ws/limit", ssl=tls_context(), origin="https://evil.example"
                )
            async with connect(
                f"wss://{address}/ws/limit", ssl=tls_context(), origin="https://good.example"
            ) as ok:
                await ok.send("welcome")
                reply = await ok.recv()
            return over.value.response.status_code, foreign.value.response.status_code, [reply]
        finally:
            for ws in clients:
                await ws.close()

    over, foreign, replies = asyncio.run(scenario())
    assert over in (429, 503)
    assert foreign == 403
    assert replies == ["welcome"]


@per_release
def test_deployed_unit_scores_at_most_1_5(
    fleet: localfleet.Fleet, deployed: object, release: str
) -> None:
    """systemd-analyze security rates the app unit 1.5 or below on each release's systemd
    (Debian 12: 252, Debian 13: 257, which knows more settings to score)."""
    host = host_of(fleet, release)
    unit = f"wsapp@{live_ports(host)[0]}.service"
    out = host.ssh(f"systemd-analyze security --no-pager {unit}").stdout
    score = re.search(rf"Overall exposure level for {re.escape(unit)}: ([\d.]+)", out)
    assert score, out
    assert float(score[1]) <= 1.5


def test_private_key_is_root_only(fleet: localfleet.Fleet, deployed: object) -> None:
    """The TLS key on the host is 0600 root:root."""
    out = fleet.app_servers[0].ssh("stat -c '%a %U %G' /etc/ssl/wsfleet/server.key").stdout.strip()
    assert out == "600 root root"
