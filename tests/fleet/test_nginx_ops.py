"""nginx's own operation on the local fleet: it starts again after its master is killed,
old workers live no longer than worker_shutdown_timeout after reloads under 500 open
WebSockets, Prometheus's targets answer, and a certificate renewal under load fails no
handshake and restarts the bus servers in turn (new route certificates), losing no room
message. The play's certificate-expiry checks close the file.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import re
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import localfleet
from localfleet.ansible import ansible_playbook, parse_recap
from localfleet.demo import ca_file
from localfleet.history import assert_nothing_lost, room_traffic
from localfleet.load import Tally, client_context, in_background, open_counted
from localfleet.settings import GATEWAY
from tests.fleet.load import assert_no_failures, load_on, summary
from tests.fleet.restore import RESTORE
from tests.fleet.test_bus import SERVER_CURRENT, not_stored
from tests.fleet.tls import served

Fleet = localfleet.Fleet

SHUTDOWN_TIMEOUT = 15  # seconds; above app_drain_timeout (10), as the preflight wants
HELD = 500  # open WebSockets during the reloads
RELOADS = 5
RELOAD_GAP = 4.0  # seconds between two reloads


@pytest.fixture(scope="module")
def ops(fleet: Fleet, deployed: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fleet deployed with a short worker_shutdown_timeout, handshakes not rate-limited
    for one client address, and the metrics listener on each host's address allowing this
    machine; yields the folder of the Prometheus target files. The defaults are deployed
    back after it (RESTORE: by the next module, if it wants them)."""
    file_sd = tmp_path_factory.mktemp("file_sd")
    ansible_playbook(
        "site.yml",
        "-e", f"nginx_worker_shutdown_timeout={SHUTDOWN_TIMEOUT}",
        "-e", "nginx_limit_req_rate=5000r/s", "-e", "nginx_limit_req_burst=5000",
        "-e", "nginx_metrics_listen={{ ansible_host }}:9180",
        "-e", json.dumps({"nginx_metrics_allow": ["127.0.0.1", GATEWAY]}),
        "-e", f"monitoring_file_sd_dir={file_sd}",
    )  # fmt: skip
    try:
        yield file_sd
    finally:
        # What the module changed is configuration only: nginx, the monitoring files, and
        # the certificates (issued anew, the bus servers restarting in turn).
        RESTORE.leave("--tags", "configure")


def healthz(address: str, context: ssl.SSLContext) -> int:
    """The status of https://address/healthz, 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"https://{address}/healthz", context=context, timeout=2) as r:
            return int(r.status)
    except (urllib.error.URLError, OSError):
        return 0


def nginx_main(host: localfleet.FleetHost) -> tuple[int, int]:
    """nginx's main PID and systemd's count of its restarts."""
    out = host.ssh("systemctl show -p MainPID -p NRestarts nginx").stdout
    values = dict(line.split("=", 1) for line in out.split())
    return int(values["MainPID"]), int(values["NRestarts"])


def test_killed_master_serves_again_within_10_s(fleet: Fleet, ops: Path) -> None:
    """SIGKILL of nginx's master (and its workers, as systemd would): serving again in 10 s."""
    host = fleet.app_servers[0]
    context = client_context(ca_file())
    assert context is not None
    assert healthz(host.address, context) == 200
    pid, restarts = nginx_main(host)
    # The workers go too, at once, as systemd's KillMode=mixed does on a real host; in
    # these containers systemd cannot kill them itself (shared/design.md).
    killed = host.ssh(f"W=$(pgrep -P {pid}); kill -KILL {pid} && kill -KILL $W")
    assert killed.returncode == 0, killed.stderr
    started = time.monotonic()
    while healthz(host.address, context) != 200:
        assert time.monotonic() - started < 10, host.ssh("journalctl -u nginx -n 20").stdout
        time.sleep(0.1)
    print(f"\nnginx serving again {time.monotonic() - started:.2f} s after SIGKILL")
    new_pid, new_restarts = nginx_main(host)
    assert new_pid != pid
    assert new_restarts == restarts + 1


def test_nginx_runs_in_its_sandbox(fleet: Fleet, ops: Path) -> None:
    """The running nginx has the drop-in's sandbox (exposure below 3; Debian's is 9.6)."""
    host = fleet.app_servers[0]
    out = host.ssh("systemd-analyze security --no-pager nginx.service").stdout
    score = re.search(r"Overall exposure level for nginx\.service: ([\d.]+)", out)
    assert score, out
    assert float(score[1]) < 3.0, out
    assert host.ssh("systemctl show -p ProtectSystem --value nginx").stdout.strip() == "strict"


# Run on the host: reload nginx RELOADS times, RELOAD_GAP s apart, watching /proc for
# when each worker that a reload made old exits; prints {pid: [seconds old, exited]}.
WATCH_RELOADS = """
import json, os, subprocess, sys, time
timeout, reloads, gap = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def workers():
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"nginx: worker process"):
                    found.add(int(pid))
        except OSError:
            pass
    return found
old, gone = {}, {}
def watch(until):
    while time.monotonic() < until:
        alive, now = workers(), time.monotonic()
        for pid in old:
            if pid not in alive:
                gone.setdefault(pid, now)
        if len(gone) == len(old) and until > time.monotonic() + gap:
            return
        time.sleep(0.05)
for _ in range(reloads):
    before, at = workers(), time.monotonic()
    subprocess.run(["systemctl", "reload", "nginx"], check=True)
    for pid in before:
        old.setdefault(pid, at)
    watch(at + gap)
watch(time.monotonic() + timeout + 30)
now = time.monotonic()
print(json.dumps({pid: [gone.get(pid, now) - at, pid in gone] for pid, at in old.items()}))
"""


def test_old_workers_live_no_longer_than_the_bound(fleet: Fleet, ops: Path) -> None:
    """5 reloads under 500 open WebSockets: every old worker gone within the bound + 5 s."""
    host = fleet.app_servers[0]
    handshakes = Tally()
    closes: Counter[int] = Counter()
    open_now = [0]

    async def hold(stopping: asyncio.Event, ready: threading.Event) -> None:
        context = client_context(ca_file())
        gate = asyncio.Semaphore(50)

        async def one(number: int) -> None:
            # Open, wait for the close (an old worker past its bound), reconnect.
            while not stopping.is_set():
                async with gate:
                    ws = await open_counted(f"wss://{host.address}/ws/held-{number}", context,
                                            handshakes, open_timeout=10)  # fmt: skip
                if ws is None:
                    await asyncio.sleep(0.2)
                    continue
                open_now[0] += 1
                closed = asyncio.create_task(ws.wait_closed())
                stop = asyncio.create_task(stopping.wait())
                await asyncio.wait({closed, stop}, return_when=asyncio.FIRST_COMPLETED)
                open_now[0] -= 1
                if closed.done():
                    closes[ws.close_code if ws.close_code is not None else 1006] += 1
                stop.cancel()
                await ws.close()

        clients = [asyncio.create_task(one(n)) for n in range(HELD)]
        while open_now[0] < HELD:  # noqa: ASYNC110 - a count, not an event
            await asyncio.sleep(0.1)
        ready.set()
        await asyncio.gather(*clients)

    with in_background(hold, not_ready=lambda: f"{open_now[0]} open, {handshakes.failures[:3]}"):
        assert open_now[0] >= HELD
        run = host.ssh(
            f"python3 - {SHUTDOWN_TIMEOUT} {RELOADS} {RELOAD_GAP} <<'EOF'\n{WATCH_RELOADS}EOF",
            timeout=RELOADS * RELOAD_GAP + SHUTDOWN_TIMEOUT + 90,
        )
        assert run.returncode == 0, run.stderr
        lifetimes = {int(pid): value for pid, value in json.loads(run.stdout).items()}
    assert len(lifetimes) >= RELOADS  # every reload made old workers
    assert all(exited for _, exited in lifetimes.values()), lifetimes
    longest = max(seconds for seconds, _ in lifetimes.values())
    held = sorted(round(s, 1) for s, _ in lifetimes.values() if s > 1)
    print(
        f"\nold workers after {RELOADS} reloads under {HELD} WebSockets: {len(lifetimes)}, "
        f"longest {longest:.1f} s (bound {SHUTDOWN_TIMEOUT} s); those holding connections "
        f"lived {held} s; the clients saw closes {dict(closes)}, {handshakes.done} handshakes"
    )
    assert longest <= SHUTDOWN_TIMEOUT + 5, lifetimes
    # The bound did cut connections (it can fail): some workers held them until it.
    assert held, lifetimes


def test_prometheus_targets_answer_with_the_apps_metrics(fleet: Fleet, ops: Path) -> None:
    """Every file_sd target (each instance of each host) scraped from here: the app's metrics."""
    targets = json.loads((ops / "wsfleet-app_servers.json").read_text())
    instances = {group["labels"]["instance"] for group in targets}
    expected = {f"{host.name}:{port}" for host in fleet.app_servers for port in (8001, 8002)}
    assert instances == expected
    for group in targets:
        (address,) = group["targets"]
        url = f"http://{address}{group['labels']['__metrics_path__']}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
        assert "wsapp_connections_max" in body, url
        assert "wsapp_bus_connected 1.0" in body, url
    probes = json.loads((ops / "wsfleet-app_servers-tls.json").read_text())
    assert [p["targets"] for p in probes] == [
        [f"https://{host.address}:443/healthz"] for host in fleet.app_servers
    ]


def test_metrics_refuse_an_address_not_allowed(fleet: Fleet, ops: Path) -> None:
    """The listener on the host's address answers 403 to a client off its allow-list."""
    host = fleet.app_servers[1]
    # From another host of the fleet: its address is not in nginx_metrics_allow.
    other = fleet.app_servers[0]
    status = other.ssh(
        f"curl -s -o /dev/null -w '%{{http_code}}' http://{host.address}:9180/metrics/8001"
    )
    assert status.stdout == "403"


def served_certificate(address: str) -> x509.Certificate:
    """The certificate the host presents, verified against the fleet's CA."""
    return served(address, ca_file(), address)


def bus_started(fleet: Fleet) -> dict[str, float]:
    """When each host's nats-server started, in seconds of the kernel's monotonic clock
    (one clock for every container of the machine)."""
    show = "systemctl show -p ExecMainStartTimestampMonotonic --value nats-server"
    return {h.name: int(h.ssh(show).stdout) / 1e6 for h in fleet.app_servers}


def test_certificate_renewal_under_load_fails_no_handshake(fleet: Fleet, ops: Path) -> None:
    """Certificates within the renewal window are issued anew and nginx reloads under load:
    0 failed handshakes, only 1001/1012 closes, 0 lost replies; the hosts serve the new ones.
    The bus servers, whose route certificates changed, restart one host at a time, each in
    lame duck mode first, its instances moving to another host's server, and each server's
    streams current again before the next is touched: a room with members on every host
    gets every message once, stored with its id, throughout, and no broadcast is refused."""
    addresses = [h.address for h in fleet.app_servers]
    before = {a: served_certificate(a).serial_number for a in addresses}
    started = bus_started(fleet)
    refused = not_stored(fleet)
    try:
        # 365-day certificates are all within a 400-day window: each host gets a 500-day one.
        with load_on(addresses) as load, room_traffic(addresses, "renewal") as traffic:
            run = ansible_playbook(
                "site.yml", "-e", "tls_expiry_warn_days=400", "-e", "tls_cert_valid_days=500"
            )
        assert_no_failures(load)
        figures = assert_nothing_lost(traffic)
        assert not_stored(fleet) - refused == 0, "broadcasts refused while the servers restarted"
        restarts = sorted(bus_started(fleet).values())
        assert not set(restarts) & set(started.values()), "a bus server did not restart"
        # Each host's turn, in order: lame duck, restart, then its streams current, before
        # the next host's lame duck.
        steps = (
            "Put nats-server in lame duck mode", "Restart nats-server",
            "Wait until the restarted server's streams are current",
        )  # fmt: skip
        turns = re.findall(rf"TASK \[bus : ({'|'.join(steps)})[^\]]* on (\S+)\]", run.stdout)
        assert turns == [(step, h.name) for h in fleet.app_servers for step in steps], turns
        gaps = [b - a for a, b in itertools.pairwise(restarts)]
        assert min(gaps) > 0.5, gaps
        for host in fleet.app_servers:
            assert host.ssh(SERVER_CURRENT).returncode == 0, f"{host.name}'s server not current"
        print(f"\nbus servers restarted in turn under room traffic: {figures}")
        after = {a: served_certificate(a) for a in addresses}
        for address, cert in after.items():
            assert cert.serial_number != before[address], address
            days = (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).days
            assert days >= 498, (address, days)
        print(f"\ncertificate renewal under load: {summary(load)}")
    finally:
        # A 500-day certificate is past Mozilla's 366-day limit (sslyze's check) and would
        # outlive this session in the demo CA's folder: without the CA's copy, the
        # fixture's closing run issues each host a default one again.
        for host in fleet.app_servers:
            (ca_file().parent / "hosts" / f"{host.name}.crt").unlink(missing_ok=True)


def own_certificate(folder: Path, not_after: datetime.datetime) -> tuple[Path, Path]:
    """A self-signed certificate ending at ``not_after`` and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expiry-test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - datetime.timedelta(days=90))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "own.crt", folder / "own.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def unwrapped(output: str) -> str:
    """``output`` with its lines joined: the YAML callback wraps long messages."""
    return " ".join(output.split())


# The expiry checks' runs are limited to the first host: each host's preflight reads the
# same certificate.
FIRST = ("--limit", "app_servers[0]")


def preflight_with(cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
    """site.yml's checks alone, with the operator's certificate ``cert`` (and the bus's
    route certificates elsewhere, as an operator's inventory then has them)."""
    own = ["-e", f"tls_cert_file={cert}", "-e", f"tls_key_file={key}",
           "-e", "bus_tls_cert=/etc/ssl/wsfleet-routes/server.crt",
           "-e", "bus_tls_key=/etc/ssl/wsfleet-routes/server.key"]  # fmt: skip
    return ansible_playbook("site.yml", "--tags", "preflight", *own, *FIRST)


def test_certificate_expiring_soon_is_warned_about(
    fleet: Fleet, deployed: object, tmp_path: Path
) -> None:
    """An operator's certificate ending in 5 days: the preflight warns, naming it, and goes on."""
    now = datetime.datetime.now(datetime.UTC)
    cert, key = own_certificate(tmp_path, now + datetime.timedelta(days=5))
    result = preflight_with(cert, key)
    assert f"WARNING: tls_cert_file ({cert}) expires on" in unwrapped(result.stdout)
    assert all(c["changed"] == 0 for c in parse_recap(result.stdout).values())
    # 30 days left, outside the 21-day window: no warning.
    cert, key = own_certificate(tmp_path, now + datetime.timedelta(days=30))
    result = preflight_with(cert, key)
    assert "WARNING: tls_cert_file" not in unwrapped(result.stdout)


def test_expired_certificate_fails_before_any_change(
    fleet: Fleet, deployed: object, tmp_path: Path
) -> None:
    """An operator's certificate that expired yesterday stops the play first, naming it."""
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    cert, key = own_certificate(tmp_path, yesterday)
    result = ansible_playbook(
        "site.yml", *FIRST, "-e", f"tls_cert_file={cert}", "-e", f"tls_key_file={key}",
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"tls_cert_file ({cert}) expired on" in unwrapped(result.stdout)
    assert all(c["changed"] == 0 for c in parse_recap(result.stdout).values())
