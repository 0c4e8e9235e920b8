"""roles/app/files/instance_ready.py, the role's gate after an instance (re)starts, run
as the role runs it (a Python with websockets) against real server processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.app.conftest import AppProcess

SCRIPT = Path(__file__).resolve().parents[2] / "roles" / "app" / "files" / "instance_ready.py"


def ready(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, check=False, timeout=60
    )


def test_a_ready_instance_passes_over_tcp_and_unix(start_app: Callable[..., AppProcess]) -> None:
    """An instance that answers /readyz and a WebSocket round trip passes, on a port and
    on its unix socket."""
    app = start_app()
    result = ready("--port", str(app.port), "--timeout", "5")
    assert result.returncode == 0, result.stdout
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/8001.sock"
        start_app("--unix-socket", path, "--port", "8001")
        result = ready("--port", "8001", "--unix-socket", path, "--timeout", "5")
        assert result.returncode == 0, result.stdout


def test_nothing_listening_fails_within_the_timeout_saying_what_it_saw() -> None:
    """No instance on the port: it gives up after --timeout, naming the port and the error."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    result = ready("--port", str(port), "--timeout", "1")
    assert result.returncode == 1
    assert time.monotonic() - started < 5
    assert f"port {port}: /readyz not 200 within 1 s: ConnectionRefusedError" in result.stdout


def test_a_draining_instance_is_not_ready(start_app: Callable[..., AppProcess]) -> None:
    """/readyz answering 503 (the instance draining, here: at capacity) is not ready."""
    app = start_app("--max-connections", "1")
    with socket.create_connection(("127.0.0.1", app.port)) as held:
        held.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert held.recv(1024).startswith(b"HTTP/1.1 101")
        result = ready("--port", str(app.port), "--timeout", "1")
    assert result.returncode == 1
    assert "/readyz not 200 within 1 s: 503" in result.stdout
