"""The server process, started for real and spoken to by real WebSocket and HTTP clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from tests.app.conftest import REPO, AppProcess, attach, spawn

StartApp = Callable[..., AppProcess]


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (http only, our own URLs)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def handshake_status(url: str, **kwargs: object) -> int:
    """101 when the handshake succeeds, else the HTTP status of the refusal."""
    try:
        async with connect(url, open_timeout=5, **kwargs):  # type: ignore[arg-type]
            return 101
    except InvalidStatus as refusal:
        return refusal.response.status_code


def test_echo_text_and_binary_up_to_max_size(start_app: StartApp) -> None:
    """Text comes back as text, binary as binary, including a message of exactly max size."""
    app = start_app("--max-size", "65536")

    async def exchange() -> None:
        async with connect(app.url, max_size=None) as ws:
            await ws.send("héllo")
            assert await ws.recv() == "héllo"
            await ws.send(b"\x00\x01\xff")
            assert await ws.recv() == b"\x00\x01\xff"
            await ws.send(b"x" * 65536)
            assert await ws.recv() == b"x" * 65536

    asyncio.run(exchange())


def test_message_past_max_size_closes_1009(start_app: StartApp) -> None:
    """One byte over the limit: the server closes with 1009 (message too big)."""
    app = start_app("--max-size", "1024")

    async def oversize() -> int | None:
        async with connect(app.url) as ws:
            await ws.send(b"x" * 1025)
            await ws.wait_closed()
            return ws.close_code

    assert asyncio.run(oversize()) == 1009


def test_health_ready_and_metrics(start_app: StartApp) -> None:
    """/healthz and /readyz report the process in JSON (?brief: only its status); /metrics
    counts traffic."""
    app = start_app("--version-label", "v42")
    status, body = http_get(app.http + "/healthz")
    assert status == 200
    health = json.loads(body)
    assert health["version"] == "v42"
    assert health["state"] == "running"
    assert health["port"] == app.port
    assert health["pid"] == app.process.pid
    assert http_get(app.http + "/readyz")[0] == 200
    # What nginx's public /healthz asks for: up or not, nothing of the process.
    assert http_get(app.http + "/healthz?brief") == (200, '{"status": "ok"}\n')
    assert 'wsapp_messages_total{direction="out"} 0.0' in http_get(app.http + "/metrics")[1]

    async def traffic() -> str:
        async with connect(app.url) as ws:
            await ws.send("12345")
            await ws.recv()
            return http_get(app.http + "/metrics")[1]

    metrics = asyncio.run(traffic())
    assert "wsapp_connections_open 1.0" in metrics
    assert "wsapp_connections_max 10000.0" in metrics  # what the capacity alert divides by
    assert 'wsapp_handshakes_total{result="accepted"} 1.0' in metrics
    assert 'wsapp_messages_total{direction="in"} 1.0' in metrics
    assert 'wsapp_bytes_total{direction="out"} 5.0' in metrics
    assert 'wsapp_info{version="v42"} 1.0' in metrics
    after = http_get(app.http + "/metrics")[1]
    assert 'wsapp_closes_total{code="1000"} 1.0' in after


def test_sigterm_with_100_connections_drains_with_1001(start_app: StartApp) -> None:
    """SIGTERM: every open client sees 1001, no new handshake, exit 0 within the drain timeout."""
    app = start_app("--drain-timeout", "5")

    async def scenario() -> tuple[list[int | None], int, float]:
        clients = [await connect(app.url) for _ in range(100)]
        assert json.loads(http_get(app.http + "/healthz")[1])["connections"] == 100
        started = time.monotonic()
        app.process.terminate()
        codes = []
        for ws in clients:
            await ws.wait_closed()
            codes.append(ws.close_code)
        try:
            refused = await handshake_status(app.url)
        except OSError:
            refused = 0  # nothing listens any more: refused too
        await asyncio.to_thread(app.process.wait, 10)
        return codes, refused, time.monotonic() - started

    codes, after_signal, elapsed = asyncio.run(scenario())
    assert codes == [1001] * 100
    assert after_signal in (0, 503)
    assert app.process.returncode == 0
    assert elapsed < 5
    app.wait_for_line("event=draining connections=100 close_code=1001")


def test_drain_spread_closes_a_few_connections_at_a_time(start_app: StartApp) -> None:
    """--drain-spread 2: no handshake after the SIGTERM, and the 60 open clients closed
    (1001, each once) over the 2 s, about a fifth of them in each 0.4 s, not in one wave."""
    app = start_app("--drain-timeout", "5", "--drain-spread", "2")

    async def scenario() -> tuple[list[float], list[int | None], int]:
        clients = [await connect(app.url) for _ in range(60)]
        started = time.monotonic()
        app.process.terminate()
        await asyncio.sleep(0.2)
        try:
            refused = await handshake_status(app.url)
        except OSError:
            refused = 0  # nothing listens any more: refused too

        async def closed_at(ws: ClientConnection) -> float:
            await ws.wait_closed()
            return time.monotonic() - started

        times = await asyncio.gather(*map(closed_at, clients))
        await asyncio.to_thread(app.process.wait, 10)
        return sorted(times), [ws.close_code for ws in clients], refused

    times, codes, refused = asyncio.run(scenario())
    assert codes == [1001] * 60
    assert refused in (0, 503)
    assert app.process.returncode == 0
    assert 1.6 < times[-1] < 3.0, times
    # Evenly: each 0.4 s of the spread closes about 12 of the 60.
    per_slice = Counter(min(int(t / 0.4), 4) for t in times)
    assert all(6 <= per_slice[k] <= 18 for k in range(5)), per_slice
    app.wait_for_line("event=draining connections=60 close_code=1001 spread=2.0")


def test_restart_file_turns_the_close_code_into_1012(start_app: StartApp) -> None:
    """With the rollout's restart file present, clients are told 1012 (service restart)."""
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "restarting"
        app = start_app("--restart-file", str(marker))

        async def scenario() -> int | None:
            async with connect(app.url) as ws:
                marker.touch()
                app.process.terminate()
                await ws.wait_closed()
                return ws.close_code

        assert asyncio.run(scenario()) == 1012
        assert app.process.wait(10) == 0


def test_drain_timeout_bounds_a_handler_that_never_returns(start_app: StartApp) -> None:
    """A handler deaf to the close does not keep the process past --drain-timeout."""
    app = start_app("--handler", "tests.app.handlers:ignore_closing", "--drain-timeout", "1")

    async def scenario() -> float:
        async with connect(app.url):
            started = time.monotonic()
            app.process.terminate()
            await asyncio.to_thread(app.process.wait, 10)
            return time.monotonic() - started

    assert asyncio.run(scenario()) < 3
    assert app.process.returncode == 0
    app.wait_for_line("event=drain_timeout left=1")


def test_second_signal_exits_at_once(start_app: StartApp) -> None:
    """A second SIGTERM during a long drain ends the process at once, non-zero."""
    app = start_app("--handler", "tests.app.handlers:ignore_closing", "--drain-timeout", "30")

    async def scenario() -> float:
        async with connect(app.url):
            app.process.terminate()
            await asyncio.to_thread(app.wait_for_line, "event=draining")
            started = time.monotonic()
            app.process.terminate()
            await asyncio.to_thread(app.process.wait, 10)
            return time.monotonic() - started

    assert asyncio.run(scenario()) < 2
    assert app.process.returncode != 0


def test_handler_that_returns_closes_the_connection_1000(start_app: StartApp) -> None:
    """When the operator's handler returns, the client is closed with 1000 and it is logged."""
    app = start_app("--handler", "tests.app.handlers:greet_and_leave")

    async def scenario() -> tuple[str | bytes, int | None]:
        async with connect(app.url) as ws:
            greeting = await ws.recv()
            await asyncio.wait_for(ws.wait_closed(), 5)
            return greeting, ws.close_code

    assert asyncio.run(scenario()) == ("hello", 1000)
    app.wait_for_line(r"event=connection_closed client=127\.0\.0\.1 path=/ code=1000")


@pytest.mark.parametrize(
    ("trusted", "client"), [("127.0.0.1,::1", "203.0.113.7"), ("10.0.0.0/8", "127.0.0.1")]
)
def test_json_logs_name_the_forwarded_client_only_from_a_trusted_proxy(
    trusted: str, client: str
) -> None:
    """JSON log lines; X-Forwarded-For is the client only when the peer is a trusted proxy."""
    process = spawn("--port", "0", "--log-format", "json", "--trusted-proxies", trusted)
    try:
        assert process.stdout is not None
        start = json.loads(process.stdout.readline())
        assert start["event"] == "listening"
        assert start["pid"] == process.pid

        async def visit() -> None:
            url = f"ws://127.0.0.1:{start['port']}/room"
            async with connect(url, additional_headers={"X-Forwarded-For": "203.0.113.7"}):
                pass

        asyncio.run(visit())
        process.terminate()
        output, _ = process.communicate(timeout=15)
    finally:
        process.kill()
        process.wait(10)
    events = [json.loads(line) for line in output.splitlines()]
    opened = next(event for event in events if event["event"] == "connection_open")
    assert (opened["client"], opened["path"]) == (client, "/room")
    assert process.returncode == 0


def test_origin_not_allowed_is_refused_403(start_app: StartApp) -> None:
    """Only the configured origins may open a connection; others get 403; a client
    without an Origin (not a browser) connects."""
    app = start_app("--allowed-origins", "https://good.example,https://also.example")
    good = asyncio.run(handshake_status(app.url, origin="https://good.example"))
    bad = asyncio.run(handshake_status(app.url, origin="https://evil.example"))
    none = asyncio.run(handshake_status(app.url))
    assert (good, bad, none) == (101, 403, 101)
    assert 'wsapp_handshakes_total{result="refused"} 1.0' in http_get(app.http + "/metrics")[1]


def test_by_default_only_pages_of_the_host_itself_may_connect(start_app: StartApp) -> None:
    """No origins configured: a page of the host the handshake is sent to (its Host, as
    nginx passes it) connects; a page elsewhere, a sandboxed page (null) or a look-alike
    does not; a client without an Origin (not a browser) does."""
    app = start_app()

    def status(origin: str | None, host: str = "chat.example") -> int:
        # The URI's host goes in the Host header; the connection goes to the app.
        url = f"ws://{host}/"
        return asyncio.run(handshake_status(url, origin=origin, host="127.0.0.1", port=app.port))

    assert status("https://chat.example") == 101
    assert status("https://CHAT.example:443") == 101
    assert status("https://chat.example", host="chat.example:8443") == 101
    assert status("https://[::1]", host="[::1]:8443") == 101
    for foreign in ("https://evil.example", "null", "https://chat.example.evil.example"):
        assert status(foreign) == 403, foreign
    assert status(None) == 101
    assert 'wsapp_handshakes_total{result="refused"} 3.0' in http_get(app.http + "/metrics")[1]


def test_capacity_refuses_with_503_and_readyz_says_so(start_app: StartApp) -> None:
    """Past --max-connections a handshake gets 503 and /readyz turns 503."""
    app = start_app("--max-connections", "2")

    async def scenario() -> tuple[int, int]:
        async with connect(app.url), connect(app.url):
            return await handshake_status(app.url), http_get(app.http + "/readyz")[0]

    assert asyncio.run(scenario()) == (503, 503)
    assert http_get(app.http + "/readyz")[0] == 200


def test_capacity_holds_under_concurrent_handshakes(start_app: StartApp) -> None:
    """Fifty handshakes at once against --max-connections 5: exactly five get through."""
    app = start_app("--max-connections", "5")

    async def attempt(clients: list[ClientConnection]) -> int:
        try:
            clients.append(await connect(app.url, open_timeout=10))
        except InvalidStatus as refusal:
            return refusal.response.status_code
        return 101

    async def scenario() -> list[int]:
        clients: list[ClientConnection] = []
        try:
            return await asyncio.gather(*(attempt(clients) for _ in range(50)))
        finally:
            await asyncio.gather(*(ws.close() for ws in clients))

    statuses = asyncio.run(scenario())
    assert sorted(statuses) == [101] * 5 + [503] * 45


def test_socket_activation_and_ready_notification() -> None:
    """A socket handed over as fd 3 (LISTEN_FDS) is served; READY=1 reaches NOTIFY_SOCKET."""
    with tempfile.TemporaryDirectory() as tmp:
        notify_path = os.path.join(tmp, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(10)
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        # What systemd does: the socket as fd 3, LISTEN_PID naming the process it execs.
        launcher = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3);"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1');"
            "os.execv(sys.executable, [sys.executable, '-m', 'app', '--port', '1'])"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", launcher, str(listener.fileno())],
            cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": notify_path},
            pass_fds=(listener.fileno(),), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            app = attach(process)
            assert app.port == port
            message = notify.recv(1024).decode()
            assert "READY=1" in message.splitlines()

            async def echo() -> str | bytes:
                async with connect(f"ws://127.0.0.1:{port}") as ws:
                    await ws.send("activated")
                    return await ws.recv()

            assert asyncio.run(echo()) == "activated"
            assert app.stop() == 0
            assert "STOPPING=1" in notify.recv(1024).decode().splitlines()
        finally:
            process.kill()
            process.wait(10)
            listener.close()
            notify.close()


def test_chat_page_and_broadcast_within_a_room(start_app: StartApp) -> None:
    """GET / serves the chat page; a message reaches both clients of its room, not others."""
    app = start_app("--handler", "app.handlers:chat")
    status, page = http_get(app.http + "/?room=blue")
    assert status == 200
    assert 'id="message"' in page
    assert 'location.protocol === "https:"' in page
    assert '"blue"' in page

    async def scenario() -> tuple[str | bytes, str | bytes, bool]:
        async with (
            connect(app.url + "/ws/blue") as alice,
            connect(app.url + "/ws/blue") as bob,
            connect(app.url + "/ws/red") as carol,
        ):
            await alice.send("hi bob")
            to_bob = await asyncio.wait_for(bob.recv(), 5)
            to_alice = await asyncio.wait_for(alice.recv(), 5)
            try:
                await asyncio.wait_for(carol.recv(), 0.3)
                carol_heard = True
            except TimeoutError:
                carol_heard = False
            return to_bob, to_alice, carol_heard

    assert asyncio.run(scenario()) == ("hi bob", "hi bob", False)
    # broadcast() bypasses send(): the two copies are counted all the same.
    metrics = http_get(app.http + "/metrics")[1]
    assert 'wsapp_messages_total{direction="in"} 1.0' in metrics
    assert 'wsapp_messages_total{direction="out"} 2.0' in metrics
    assert 'wsapp_bytes_total{direction="out"} 12.0' in metrics


def test_chat_page_runs_only_its_own_script_and_style(start_app: StartApp) -> None:
    """The chat page's Content-Security-Policy lets its one script and style run, by a
    nonce new in each response, its WebSockets reach only its own host, nothing frame it;
    every HTTP answer says nosniff and sends no Referer (the browser tests run it so)."""
    app = start_app("--handler", "app.handlers:chat")
    nonces = []
    for _ in range(2):
        with urllib.request.urlopen(app.http + "/?room=csp", timeout=5) as response:  # noqa: S310
            policy = response.headers["Content-Security-Policy"]
            page = response.read().decode()
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["Referrer-Policy"] == "no-referrer"
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        nonce = re.fullmatch(r"'nonce-([\w-]{16,})'", directives["script-src"])
        assert nonce, policy
        assert directives["style-src"] == directives["script-src"]
        assert (directives["default-src"], directives["connect-src"]) == ("'none'", "'self'")
        assert directives["frame-ancestors"] == "'none'"
        tags = re.findall(r"<(script|style)\b([^>]*)>", page)
        assert tags == [("style", f' nonce="{nonce[1]}"'), ("script", f' nonce="{nonce[1]}"')]
        nonces.append(nonce[1])
    assert nonces[0] != nonces[1]
    status, _ = http_get(app.http + "/healthz")
    with urllib.request.urlopen(app.http + "/healthz", timeout=5) as response:  # noqa: S310
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert status == 200


def negotiated_extensions(url: str, offer: ClientPerMessageDeflateFactory | None) -> str | None:
    """The server's Sec-WebSocket-Extensions answer to ``offer`` (None: no offer at all).

    A chat line is echoed through the connection first: what was agreed also works.
    """

    async def handshake() -> str | None:
        extensions = [offer] if offer else None
        async with connect(url, compression=None, extensions=extensions) as ws:
            line = '{"type": "message", "room": "lobby", "text": "hello hello hello"}'
            await ws.send(line)
            assert await ws.recv() == line
            assert ws.response is not None
            return ws.response.headers.get("Sec-WebSocket-Extensions")

    return asyncio.run(handshake())


def test_deflate_negotiates_the_configured_window(start_app: StartApp) -> None:
    """APP_COMPRESSION_WINDOW_BITS bounds both windows; a client may ask for a smaller one."""
    app = start_app(env={"APP_COMPRESSION_WINDOW_BITS": "11", "APP_COMPRESSION_MEMLEVEL": "4"})
    # websockets' client, like browsers, offers client_max_window_bits without a value.
    browser_like = ClientPerMessageDeflateFactory()
    assert negotiated_extensions(app.url, browser_like) == (
        "permessage-deflate; server_max_window_bits=11; client_max_window_bits=11"
    )
    # A client without client_max_window_bits keeps its 15 bits: the server must accept.
    no_client_bits = ClientPerMessageDeflateFactory(client_max_window_bits=None)
    assert negotiated_extensions(app.url, no_client_bits) == (
        "permessage-deflate; server_max_window_bits=11"
    )
    smaller = ClientPerMessageDeflateFactory(server_max_window_bits=9, client_max_window_bits=9)
    assert negotiated_extensions(app.url, smaller) == (
        "permessage-deflate; server_max_window_bits=9; client_max_window_bits=9"
    )


def test_no_compression_declines_deflate_whatever_the_window(start_app: StartApp) -> None:
    """--compression none answers a deflate offer without the extension."""
    app = start_app("--compression", "none", "--compression-window-bits", "10")
    offer = ClientPerMessageDeflateFactory(client_max_window_bits=True)
    assert negotiated_extensions(app.url, offer) is None


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--compression-window-bits", "8", "must be between 9 and 15, got 8"),
        ("--compression-window-bits", "16", "must be between 9 and 15, got 16"),
        ("--compression-memlevel", "0", "must be between 1 and 9, got 0"),
        ("--compression-memlevel", "high", "invalid int value: 'high'"),
    ],
)
def test_bad_deflate_setting_exits_2_naming_it(option: str, value: str, message: str) -> None:
    """A window or memLevel zlib cannot use is refused before listening, the option named."""
    process = spawn("--port", "0", option, value)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert f"{option}" in output
    assert message in output
    assert "event=listening" not in output


def test_plain_get_on_the_websocket_path_gets_426(start_app: StartApp) -> None:
    """A browser-style GET without Upgrade gets 426 Upgrade Required, not a crash."""
    app = start_app()
    assert http_get(app.http + "/")[0] == 426


def test_malformed_http_is_answered_and_the_server_keeps_serving(start_app: StartApp) -> None:
    """Garbage instead of HTTP gets a 400 or a closed socket; the next client is served."""
    app = start_app()
    with socket.create_connection(("127.0.0.1", app.port), timeout=5) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\x00\xff\r\n\r\n")
        answer = raw.recv(1024)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400")
    assert asyncio.run(handshake_status(app.url)) == 101


def test_invalid_utf8_in_a_text_frame_closes_1007(start_app: StartApp) -> None:
    """A text frame that is not UTF-8 is closed with 1007; the server keeps serving."""
    app = start_app()

    async def scenario() -> int | None:
        async with connect(app.url) as ws:
            await ws.send(b"\xff\xfe\xfd", text=True)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return ws.close_code

    assert asyncio.run(scenario()) == 1007
    assert asyncio.run(handshake_status(app.url)) == 101


@pytest.mark.parametrize(
    ("handler", "problem"),
    [
        ("nosuch.module:handler", "No module named 'nosuch'"),
        ("tests.app.handlers:nosuch", "no callable 'nosuch'"),
    ],
)
def test_unknown_handler_exits_2_naming_it_and_listens_nowhere(handler: str, problem: str) -> None:
    """An unknown handler is named on stderr, exit code 2, and the port stays closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = spawn("--port", str(port), "--handler", handler)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert f"error: cannot load handler {handler!r}: {problem}" in output
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_port_in_use_exits_1_with_one_line() -> None:
    """A port already taken is reported in one log line, no traceback, exit code 1."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        process = spawn("--port", str(taken.getsockname()[1]))
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 1
    assert "event=listen_failed" in output
    assert "address already in use" in output
    assert "Traceback" not in output


def test_bad_environment_value_is_named() -> None:
    """A malformed APP_* value fails like a bad option: exit 2, the option named."""
    process = spawn(env={"APP_PORT": "eighty"})
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "--port" in output
    assert "eighty" in output
