"""The host_status module's reading of a host, against a temporary tree standing for the
host's / (the release links, the units enabled, nginx's processes) and answers standing
for systemctl's, openssl's and the servers': what status.yml shows of each host
(tests/fleet/test_operations.py checks the same on the fleet)."""

from __future__ import annotations

import http.server
import json
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from tests.plugins.loader import plugin

status = plugin("modules", "host_status")


def systemctl(states: dict[str, str]) -> status.Run:
    """A stand-in for run_command that answers systemctl is-active from ``states``."""

    def run(argv: list[str]) -> tuple[int, str, str]:
        assert argv[:2] == ["systemctl", "is-active"], argv
        state = states.get(argv[2], "inactive")
        return (0 if state == "active" else 3), state + "\n", ""

    return run


def real(argv: list[str]) -> tuple[int, str, str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A host's / with release 1.1.0 current after 1.0.0, two instances on TCP enabled
    (one as a service, one as a socket), a unit of another service, and nginx's master,
    two workers and one finishing its connections after a reload."""
    opt = tmp_path / "opt/wsapp"
    (opt / "releases/1.1.0").mkdir(parents=True)
    (opt / "current").symlink_to(opt / "releases/1.1.0")
    (opt / "previous").write_text("1.0.0\n")
    units = tmp_path / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / "sockets.target.wants").mkdir(parents=True)
    (units / "wsapp@.service").write_text("[Service]\nEnvironment=APP_PORT=%i\n")
    (units / "multi-user.target.wants/wsapp@8002.service").touch()
    (units / "sockets.target.wants/wsapp@8001.socket").touch()
    (units / "multi-user.target.wants/other@9001.service").touch()
    for pid, cmdline in {
        10: b"nginx: master process /usr/sbin/nginx -g daemon on;\0",
        11: b"nginx: worker process\0",
        12: b"nginx: worker process\0",
        13: b"nginx: worker process is shutting down\0",
        14: b"python3\0-m\0app\0--port\x008001\0",
    }.items():
        (tmp_path / f"proc/{pid}").mkdir(parents=True)
        (tmp_path / f"proc/{pid}/cmdline").write_bytes(cmdline)
    return tmp_path


def test_releases_current_and_previous(root: Path) -> None:
    assert status.current_release("wsapp", str(root)) == "1.1.0"
    assert status.previous_release("wsapp", str(root)) == "1.0.0"


def test_no_release_installed_reads_as_empty(tmp_path: Path) -> None:
    assert status.current_release("wsapp", str(tmp_path)) == ""
    assert status.previous_release("wsapp", str(tmp_path)) == ""


def test_the_enabled_instances_by_port_of_this_service_only(root: Path) -> None:
    assert status.enabled_ports("wsapp", str(root)) == [8001, 8002]
    assert status.enabled_ports("other", str(root)) == [9001]


def test_an_instances_unix_socket_from_its_unit(root: Path) -> None:
    assert status.unix_socket("wsapp", 8001, str(root)) == ""
    unit = root / "etc/systemd/system/wsapp@.service"
    unit.write_text("[Service]\nEnvironment=APP_UNIX_SOCKET=/run/wsapp/%i.sock\n")
    assert status.unix_socket("wsapp", 8001, str(root)) == "/run/wsapp/8001.sock"


def test_an_instance_ready_not_ready_or_silent() -> None:
    ready = json.dumps({"status": "ok", "port": 8001, "connections": 7, "version": "1.1.0"})
    assert status.instance(8001, "active", 200, ready) == {
        "port": 8001, "unit": "active", "ready": True, "connections": 7, "version": "1.1.0",
    }  # fmt: skip
    draining = json.dumps({"status": "draining", "connections": 2, "version": "1.1.0"})
    assert status.instance(8002, "active", 503, draining)["ready"] is False
    assert status.instance(8002, "active", 503, draining)["connections"] == 2
    assert status.instance(8003, "failed", 0, "") == {
        "port": 8003, "unit": "failed", "ready": False, "connections": 0, "version": "",
    }  # fmt: skip
    assert status.instance(8004, "active", 200, "not json")["connections"] == 0


def test_nginx_workers_and_those_shutting_down(root: Path) -> None:
    assert status.nginx_workers(str(root)) == (2, 1)
    assert status.nginx(systemctl({"nginx": "active"}), str(root)) == {
        "state": "active", "workers": 2, "shutting_down": 1,
    }  # fmt: skip


def test_bus_routes_count_peers_not_routes() -> None:
    """nats-server 2.10 pools routes (several per peer, each with its remote_id), 2.9 has
    one per peer (some without remote_id: counted by address)."""
    pooled = {"routes": [{"remote_id": "A", "ip": "a"}] * 3 + [{"remote_id": "B", "ip": "b"}]}
    assert status.routes(200, json.dumps(pooled)) == 2
    single = {"routes": [{"ip": "10.0.0.2"}, {"ip": "10.0.0.3"}]}
    assert status.routes(200, json.dumps(single)) == 2
    assert status.routes(200, json.dumps({"routes": []})) == 0
    assert status.routes(0, "") is None
    assert status.routes(200, "{") is None
    assert status.routes(200, json.dumps({"routes": [{}]})) is None


def test_certificate_days_from_openssl(tmp_path: Path) -> None:
    cert = tmp_path / "server.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=test", "-days", "30",
         "-keyout", str(tmp_path / "server.key"), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    days = status.certificate_days(real, str(cert))
    assert days is not None
    assert 29.9 <= days <= 30.0
    assert status.certificate_days(real, str(tmp_path / "missing.crt")) is None
    expired = status.certificate_days(real, str(cert), now=time.time() + 31 * 86400)
    assert expired is not None
    assert expired < 0


class _Answers(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[dict[str, tuple[int, str]]] = {}

    def do_GET(self) -> None:
        code, body = self.answers.get(self.path, (404, "not found"))
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    """A server on loopback answering _Answers.answers; its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_get_reads_answers_of_any_status_and_silence(server: str) -> None:
    _Answers.answers = {"/readyz": (200, '{"connections": 3}'), "/down": (503, "draining")}
    assert status.get(f"{server}/readyz") == (200, '{"connections": 3}')
    assert status.get(f"{server}/down") == (503, "draining")
    port = server.rsplit(":", 1)[1]
    assert status.get(f"http://127.0.0.1:{port}0/readyz")[0] == 0  # nothing listens there


class _UnixAnswers(_Answers):
    def address_string(self) -> str:  # a unix peer has no (host, port)
        return "unix"


def test_get_unix_reads_an_instance_on_its_socket(tmp_path: Path) -> None:
    """app_listen unix: /readyz over the instance's socket, as nginx reaches it."""
    path = str(tmp_path / "8001.sock")
    _Answers.answers = {"/readyz": (200, '{"connections": 4}')}
    httpd = socketserver.ThreadingUnixStreamServer(path, _UnixAnswers)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        assert status.get_unix(path, "/readyz") == (200, '{"connections": 4}')
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert status.get_unix(str(tmp_path / "none.sock"), "/readyz") == (0, "")
