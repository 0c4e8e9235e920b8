"""The server process on a unix socket: one it binds itself, and one systemd passes it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import pytest
from websockets.asyncio.client import unix_connect

from tests.app.conftest import REPO, AppProcess, attach, spawn

StartApp = Callable[..., AppProcess]


@pytest.fixture
def folder() -> Iterator[str]:
    """A fresh folder for the socket files (short: sun_path holds 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="wsu") as tmp:
        yield tmp


def unix_get(path: str, target: str) -> tuple[int, dict[str, object]]:
    """Status and JSON body of a GET over the unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def echo(path: str, text: str, **headers: str) -> str | bytes:
    async with unix_connect(path, uri="ws://localhost/", additional_headers=headers) as ws:
        await ws.send(text)
        return await ws.recv()


def test_binds_its_socket_replacing_a_stale_one(start_app: StartApp, folder: str) -> None:
    """A socket file left by a crashed process is replaced; the new one is anyone's to
    connect to (its folder decides who), and is gone after a clean stop."""
    path = os.path.join(folder, "8001.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nothing listens: what a SIGKILLed instance leaves
    app = start_app("--unix-socket", path, "--port", "8001")
    assert app.port == 8001
    assert f"unix_socket={path}" in app.wait_for_line("event=listening").string
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    code, body = unix_get(path, "/readyz")
    assert (code, body["port"], body["status"]) == (200, 8001, "ok")
    assert asyncio.run(echo(path, "over unix")) == "over unix"
    assert app.stop() == 0
    assert not os.path.exists(path)


def test_umask_does_not_close_the_socket_to_its_folder(folder: str) -> None:
    """With the unit's UMask=0077 the socket is still 0666."""
    path = os.path.join(folder, "8002.sock")
    process = spawn("--unix-socket", path, preexec_fn=lambda: os.umask(0o077))
    try:
        app = attach(process)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        assert app.stop() == 0
    finally:
        process.kill()
        process.wait(10)


def test_unix_socket_from_the_environment_and_forwarded_client(
    start_app: StartApp, folder: str
) -> None:
    """APP_UNIX_SOCKET is read like every option; nginx's X-Forwarded-For is believed."""
    path = os.path.join(folder, "8003.sock")
    app = start_app(env={"APP_UNIX_SOCKET": path})
    assert asyncio.run(echo(path, "env", **{"X-Forwarded-For": "192.0.2.7"})) == "env"
    assert "client=192.0.2.7" in app.wait_for_line("event=connection_open").string


def test_a_path_that_is_not_a_socket_is_left_alone(folder: str) -> None:
    """A regular file at the path is not removed: exit 1 with one log line."""
    path = os.path.join(folder, "8004.sock")
    with open(path, "w") as f:
        f.write("keep me\n")
    process = spawn("--unix-socket", path)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 1
    assert f"event=listen_failed unix_socket={path}" in output
    assert "Traceback" not in output
    with open(path) as f:
        assert f.read() == "keep me\n"


def test_too_long_a_path_is_refused(folder: str) -> None:
    """A path past sun_path's 107 bytes exits 2 naming the option."""
    process = spawn("--unix-socket", os.path.join(folder, "x" * 110))
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "--unix-socket" in output


def test_serves_a_passed_unix_socket(folder: str) -> None:
    """A unix socket handed over as fd 3 (systemd's ListenStream=/path) is served as is:
    the process neither binds --unix-socket nor removes the file systemd owns."""
    path = os.path.join(folder, "8005.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3);"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1');"
        "os.execv(sys.executable, [sys.executable, '-m', 'app', '--port', '8005',"
        f" '--unix-socket', {os.path.join(folder, 'unused.sock')!r}])"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", launcher, str(listener.fileno())],
        cwd=REPO, pass_fds=(listener.fileno(),), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        app = attach(process)
        assert app.port == 8005
        line = app.wait_for_line("event=listening").string
        assert "socket_activated=True" in line
        assert f"unix_socket={path}" in line
        assert asyncio.run(echo(path, "passed")) == "passed"
        assert unix_get(path, "/healthz")[0] == 200
        assert app.stop() == 0
        assert os.path.exists(path)
        assert not os.path.exists(os.path.join(folder, "unused.sock"))
    finally:
        process.kill()
        process.wait(10)
        listener.close()
