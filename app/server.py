"""The server process: the operator's handler behind health, metrics, limits and a drain.

HTTP routes answered on the WebSocket port, before any handshake (``process_request``):

- ``GET /healthz``: 200 while the process runs.
- ``GET /readyz``: 200 while it accepts connections; 503 while draining or at capacity.
- ``GET /metrics``: Prometheus text.
- anything the handler's own ``process_request`` hook answers (see :mod:`app.handlers`).

Every other request is a WebSocket handshake for the handler; without ``Upgrade`` it gets
the library's own 426.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import DATA_OPCODES, CloseCode, Frame
from websockets.http11 import Request, Response
from websockets.protocol import Event, State
from websockets.server import ServerProtocol
from websockets.typing import Origin

from app import rooms, systemd
from app.bus import redact
from app.config import Network, Settings
from app.metrics import Metrics

__all__ = [
    "Handler",
    "HttpHook",
    "Server",
    "bind_unix",
    "client_address",
    "deflate_extensions",
    "http_response",
]

logger = logging.getLogger(__name__)

Handler = Callable[[ServerConnection], Awaitable[None]]
HttpHook = Callable[[ServerConnection, Request], Response | None]

RUNNING = "running"
DRAINING = "draining"


def http_response(
    status: HTTPStatus, body: bytes, content_type: str, extra: Sequence[tuple[str, str]] = ()
) -> Response:
    """A complete HTTP response to send instead of a handshake, with ``extra`` headers.

    A browser is told to take the content type as given (``nosniff``) and to send no
    Referer from it to elsewhere.
    """
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("Connection", "close"),
            *extra,
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def client_address(
    peer: str, forwarded_for: str | None, trusted: tuple[Network, ...], trust_peer: bool = False
) -> str:
    """The client's address: X-Forwarded-For is believed only from a trusted proxy.

    The right-most address in the header that is not itself a trusted proxy is the
    client; anything left of it could have been written by the client. ``trust_peer``
    believes the peer whatever its address (a unix socket's peer has none).
    """
    if not forwarded_for or not (trust_peer or _is_trusted(peer, trusted)):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if not _is_trusted(hop, trusted):
            return hop
    return peer


def bind_unix(path: str) -> socket.socket:
    """A unix socket bound at ``path``, replacing the stale socket file a crashed process left.

    The file is made connectable by anyone (the process's umask would make it its own
    alone): who reaches it is decided by its folder, e.g. one only nginx's group may enter.

    Raises:
        OSError: when ``path`` is something else than a socket, or cannot be bound.
    """
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)  # noqa: S103 (the folder grants access, see above)
    except OSError:
        sock.close()
        raise
    return sock


def deflate_extensions(settings: Settings) -> list[ServerExtensionFactory]:
    """The permessage-deflate offer of ``settings``; none when compression is off.

    Built like websockets' own default (``compression="deflate"``: 12 bits, memLevel 5),
    with the window and memLevel taken from the settings instead.
    """
    if settings.compression == "none":
        return []
    bits = settings.compression_window_bits
    return [
        ServerPerMessageDeflateFactory(
            server_max_window_bits=bits,
            # Bounds the window of the server's decompressor too, for clients that offer
            # client_max_window_bits (browsers do); others keep their own 15 bits.
            client_max_window_bits=bits,
            compress_settings={"memLevel": settings.compression_memlevel},
        )
    ]


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class Server:
    """One server process around ``handler``.

    Args:
        settings: the process's configuration.
        handler: the operator's websockets handler; it may carry a ``process_request``
            attribute (an :data:`HttpHook`) to answer plain HTTP requests itself.
    """

    def __init__(self, settings: Settings, handler: Handler) -> None:
        self.settings = settings
        self.handler = handler
        self.http_hook: HttpHook | None = getattr(handler, "process_request", None)
        self.state = RUNNING
        self.port = settings.port
        self.metrics = Metrics(
            settings.version,
            lambda: len(self._connections()),
            bus=bool(settings.bus_url),
            max_connections=settings.max_connections,
        )
        self.rooms: rooms.Rooms | None = None
        self._server: WebSocketServer | None = None
        self._stopping = asyncio.Event()

    # --- state --------------------------------------------------------------------------

    def _connections(self) -> set[ServerConnection]:
        return self._server.connections if self._server else set()

    def at_capacity(self) -> bool:
        """Whether the open connections reached ``--max-connections``."""
        # Server.connections builds a new set over every connection, on each handshake:
        # a quarter of an instance's CPU samples at 12,000 connections (py-spy, `make
        # bench`). all_connections holds those and the ones opening or closing, so its
        # size, read at no cost, rules out the usual case of a server below its limit.
        limit = self.settings.max_connections
        if self._server is None or len(self._server.all_connections) < limit:
            return False
        return len(self._connections()) >= limit

    def bus_state(self) -> str:
        """``connected``, ``disconnected``, or ``none`` when no bus is configured."""
        if self.rooms is not None:
            return self.rooms.bus_state
        return "disconnected" if self.settings.bus_url else "none"

    def status(self) -> dict[str, Any]:
        """The JSON body of ``/healthz`` and ``/readyz``; ``status`` is ``ok`` when ready.

        The bus does not count: without it, the process still serves its own clients.
        """
        ready = self.state == RUNNING and not self.at_capacity()
        return {
            "status": "ok" if ready else "unavailable",
            "state": self.state,
            "pid": os.getpid(),
            "port": self.port,
            "connections": len(self._connections()),
            "version": self.settings.version,
            "bus": self.bus_state(),
        }

    # --- HTTP before the handshake ------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer the HTTP routes, or refuse a handshake; None lets the handshake go on.

        Args:
            connection: the connection being opened.
            request: its HTTP request.
        """
        path, _, query = request.path.partition("?")
        if path in ("/healthz", "/readyz"):
            report = self.status()
            ok = path == "/healthz" or report["status"] == "ok"
            code = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            if "brief" in parse_qs(query, keep_blank_values=True):
                # What nginx's public /healthz asks for: up or not, and nothing of the process.
                report = {"status": report["status"]}
            return http_response(code, json.dumps(report).encode() + b"\n", "application/json")
        if path == "/metrics":
            return http_response(HTTPStatus.OK, self.metrics.render(), CONTENT_TYPE_LATEST)
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if not upgrade:
            response = self.http_hook(connection, request) if self.http_hook else None
            return response  # None: the library answers 426 Upgrade Required
        refusal = self._refusal(request)
        if refusal is not None:
            status, reason = refusal
            self.metrics.handshakes.labels("refused").inc()
            self._log("handshake_refused", connection, request, status=status.value, reason=reason)
            return http_response(status, f"{reason}\n".encode(), "text/plain; charset=utf-8")
        return None

    def _refusal(self, request: Request) -> tuple[HTTPStatus, str] | None:
        # The capacity check holds under concurrent handshakes because this hook is
        # synchronous and websockets 17.4 writes the 101 and registers the connection
        # without yielding (a fresh socket's write buffer is never full).
        if self.state != RUNNING:
            return HTTPStatus.SERVICE_UNAVAILABLE, "draining"
        if self.at_capacity():
            return HTTPStatus.SERVICE_UNAVAILABLE, "at capacity"
        origin = request.headers.get("Origin")
        # Listed origins are websockets' own check (serve(origins=...), in run()). With
        # none listed, a browser's page must be of the host the handshake is sent to. A
        # missing Origin is a non-browser client, which no browser policy protects.
        if (
            not self.settings.allowed_origins
            and origin is not None
            and not self._same_host(origin, request)
        ):
            return HTTPStatus.FORBIDDEN, "origin not allowed"
        return None

    @staticmethod
    def _same_host(origin: str, request: Request) -> bool:
        """Whether the page that sends the handshake is of the host it is sent to (the
        Origin's host is the Host header's, as nginx passes it on): a page elsewhere cannot
        open a socket with its visitors' cookies (cross-site WebSocket hijacking)."""
        hosts = request.headers.get_all("Host")
        try:
            page = urlsplit(origin).hostname
            target = urlsplit("//" + hosts[0]).hostname if len(hosts) == 1 else None
        except ValueError:  # an address that does not parse is no one's page
            return False
        return page is not None and page == target

    def process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> None:
        """Count an accepted handshake, and one websockets refused for an Origin not
        listed (the others refused are counted in :meth:`process_request`, which refuses
        none with 403 while origins are listed; every response comes here)."""
        if response.status_code == HTTPStatus.SWITCHING_PROTOCOLS:
            self.metrics.handshakes.labels("accepted").inc()
        elif response.status_code == HTTPStatus.FORBIDDEN and self.settings.allowed_origins:
            self.metrics.handshakes.labels("refused").inc()
            self._log("handshake_refused", connection, request,
                      status=HTTPStatus.FORBIDDEN.value, reason="origin not allowed")  # fmt: skip

    # --- connections --------------------------------------------------------------------

    async def handle(self, connection: ServerConnection) -> None:
        """Run the operator's handler; the library closes the connection when it returns."""
        self._log("connection_open", connection, connection.request)
        await self.handler(connection)

    def connection_closed(self, connection: ServerConnection) -> None:
        """Count and log a WebSocket connection once its TCP connection is gone."""
        code = connection.close_code or CloseCode.ABNORMAL_CLOSURE
        self.metrics.closes.labels(str(int(code))).inc()
        self._log("connection_closed", connection, connection.request, code=int(code))

    def _log(
        self, event: str, connection: ServerConnection, request: Request | None, **fields: Any
    ) -> None:
        forwarded = request.headers.get("X-Forwarded-For") if request else None
        if connection.remote_address:
            peer = connection.remote_address[0]
            client = client_address(peer, forwarded, self.settings.trusted_proxies)
        else:
            # A unix socket's peer has no address; it is a local process the socket's
            # folder let in (nginx), so its X-Forwarded-For is believed.
            client = client_address("unix", forwarded, (), trust_peer=bool(forwarded))
        path = request.path if request else "-"
        logger.info(event, extra={"fields": {"client": client, "path": path, **fields}})

    # --- life cycle ---------------------------------------------------------------------

    def connection_class(self) -> type[ServerConnection]:
        """A connection class that counts data frames both ways and logs each close.

        Counting happens at the frame layer rather than in ``send()`` and ``recv()``:
        ``broadcast()`` writes frames without ``send()``, and a handler may never read
        what a client sent.
        """
        server = self

        class MeteredProtocol(ServerProtocol):
            def send_frame(self, frame: Frame) -> None:
                super().send_frame(frame)
                if frame.opcode in DATA_OPCODES:
                    server.metrics.count_frame("out", frame)

        class MeteredConnection(ServerConnection):
            def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
                # serve() builds the protocol itself and offers no factory for it, so
                # the connection gives the protocol its counting subclass.
                protocol.__class__ = MeteredProtocol
                super().__init__(protocol, *args, **kwargs)

            def process_event(self, event: Event) -> None:
                super().process_event(event)
                if isinstance(event, Frame) and event.opcode in DATA_OPCODES:
                    server.metrics.count_frame("in", event)

            def connection_lost(self, exc: Exception | None) -> None:
                super().connection_lost(exc)
                # Health checks, refusals and failed handshakes were never connections.
                if self.response is not None and self.response.status_code == 101:
                    server.connection_closed(self)

        return MeteredConnection

    def on_signal(self, signum: int) -> None:
        """First SIGTERM/SIGINT: drain. A second one: exit at once."""
        if self._stopping.is_set():
            logger.warning("second_signal", extra={"fields": {"signal": signum}})
            os._exit(1)
        self._stopping.set()

    async def run(self) -> int:
        """Serve until a signal, then drain.

        Returns:
            The exit code: 0 after a graceful stop, 1 when the port cannot be listened on.
        """
        settings = self.settings
        sock = systemd.activation_socket()
        activated = sock is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.on_signal, signum)
        own_path = settings.unix_socket if sock is None else ""
        own_inode = 0
        try:
            if own_path:
                sock = bind_unix(own_path)
                own_inode = os.lstat(own_path).st_ino
            options: dict[str, Any] = {"sock": sock} if sock else {
                "host": settings.host, "port": settings.port, "reuse_address": True,
            }  # fmt: skip
            server = await serve(
                self.handle,
                process_request=self.process_request,
                process_response=self.process_response,
                # Our own factory: compression="deflate" would add the library's fixed one.
                compression=None,
                extensions=deflate_extensions(settings),
                max_size=settings.max_size,
                max_queue=settings.max_queue,
                open_timeout=settings.open_timeout,
                close_timeout=settings.close_timeout,
                ping_interval=settings.ping_interval,
                ping_timeout=settings.ping_timeout,
                create_connection=self.connection_class(),
                # None listed too: a client without an Origin (not a browser) connects.
                origins=(
                    [*map(Origin, settings.allowed_origins), None]
                    if settings.allowed_origins
                    else None
                ),
                server_header=None,
                **options,
            )
        except OSError as error:
            # A port in use is an operator's problem to read in one line, not a traceback.
            fields: dict[str, Any] = {
                "host": settings.host, "port": settings.port, "error": error.strerror,
            }  # fmt: skip
            if own_path:
                fields = {"unix_socket": own_path, "error": error.strerror}
            logger.error("listen_failed", extra={"fields": fields})
            if sock is not None:
                sock.close()
            return 1
        async with server:
            self._server = server
            listening = _listening(server, sock)
            self.port = _bound_port(listening, settings.port)
            # Before the loop runs again, so before any handler: the label needs the port.
            self.rooms = rooms.Rooms(
                settings.instance or f"{socket.gethostname()}:{self.port}",
                metrics=self.metrics,
                bus_servers=settings.bus_url,
                bus_token=settings.bus_token,
                bus_ca=settings.bus_ca,
                prefix=settings.bus_prefix,
                history=rooms.History(
                    max_age=settings.bus_history_max_age,
                    max_bytes=settings.bus_history_max_bytes,
                    replicas=settings.bus_history_replicas,
                    apply=bool(settings.bus_history_apply),
                ) if settings.bus_history_max_age > 0 else None,
                max_queue_bytes=settings.max_queue_bytes,
            )  # fmt: skip
            rooms.set_current(self.rooms)
            self.rooms.start()
            bus = ",".join(redact(url) for url in settings.bus_url) or "none"
            logger.info(
                "listening",
                extra={"fields": {
                    "port": self.port, "version": settings.version, "handler": settings.handler,
                    "pid": os.getpid(), "socket_activated": activated,
                    "unix_socket": _unix_path(listening) or "-",
                    "instance": self.rooms.instance, "bus": bus,
                }},
            )  # fmt: skip
            systemd.notify(f"READY=1\nSTATUS=serving on port {self.port}")
            await self._stopping.wait()
            await self.drain(server)
        if own_path:
            # Gone at a clean stop: nginx then finds no file rather than a refusing one.
            _unlink_own(own_path, own_inode)
        return 0

    def restarting(self) -> bool:
        """Whether the rollout marked this stop as a restart (a stat on a tmpfs: instant)."""
        marker = self.settings.restart_file
        return bool(marker) and os.path.exists(marker)

    async def drain(self, server: WebSocketServer) -> None:
        """Refuse new handshakes, close open connections, all within the drain timeout."""
        self.state = DRAINING
        systemd.notify("STOPPING=1\nSTATUS=draining")
        restart = self.restarting()
        code, reason = (
            (CloseCode.SERVICE_RESTART, "service restart")
            if restart
            else (CloseCode.GOING_AWAY, "server shutdown")
        )
        spread = self.settings.drain_spread
        logger.info(
            "draining",
            extra={"fields": {
                "connections": len(server.connections), "close_code": int(code), "spread": spread,
            }},
        )  # fmt: skip
        started = asyncio.get_running_loop().time()
        closing: list[asyncio.Task[None]] = []  # held until the drain ends
        if spread > 0:
            # No new connection (one still in its handshake gets a 503, as at any close);
            # the open ones are closed a few at a time over the spread.
            server.server.close()
            closing = await _close_spread(server, code, reason, spread)
        server.close(close_connections=True, code=code, reason=reason)
        try:
            left_s = self.settings.drain_timeout - (asyncio.get_running_loop().time() - started)
            await asyncio.wait_for(server.wait_closed(), max(left_s, 0.0))
        except TimeoutError:
            left = server.all_connections
            logger.warning("drain_timeout", extra={"fields": {"left": len(left)}})
            # A handler that ignores its closed connection never returns, and
            # wait_closed() waits for every handler: end them so the drain timeout,
            # not systemd's SIGKILL, bounds the stop.
            for connection in left:
                connection.transport.abort()
            for task in [*server.handler_tasks, *closing]:
                task.cancel()
            await server.wait_closed()
        if self.rooms is not None:
            # The handlers have left their rooms: the fleet hears of it before the exit.
            await self.rooms.close()
        logger.info("stopped", extra={"fields": {"port": self.port}})


# How often a spread drain closes its next few connections.
_SPREAD_TICK = 0.05


async def _close_spread(
    server: WebSocketServer, code: int, reason: str, spread: float
) -> list[asyncio.Task[None]]:
    """Start closing the server's open connections evenly over ``spread`` seconds; the
    tasks of their closing handshakes, which the drain then waits for with the handlers
    (a handshake still in progress is refused by the server's close that follows)."""
    connections = [c for c in server.connections if c.state is State.OPEN]
    if not connections:
        return []
    ticks = max(1, int(spread / _SPREAD_TICK))
    loop = asyncio.get_running_loop()
    started = loop.time()
    closing: list[asyncio.Task[None]] = []
    for tick in range(ticks):
        # Up to the share this tick ends at: the last tick closes whatever is left.
        first, last = len(connections) * tick // ticks, len(connections) * (tick + 1) // ticks
        for connection in connections[first:last]:
            if connection.state is State.OPEN:
                closing.append(asyncio.create_task(connection.close(code, reason)))
        await asyncio.sleep(max(0.0, started + (tick + 1) * spread / ticks - loop.time()))
    return closing


def _listening(server: WebSocketServer, sock: socket.socket | None) -> socket.socket:
    return sock or next(iter(server.sockets))


def _bound_port(listening: socket.socket, named: int) -> int:
    # A unix socket has no port: the instance keeps the one it is named by.
    return named if listening.family == socket.AF_UNIX else int(listening.getsockname()[1])


def _unix_path(listening: socket.socket) -> str:
    return str(listening.getsockname()) if listening.family == socket.AF_UNIX else ""


def _unlink_own(path: str, inode: int) -> None:
    """Remove the socket file this process bound, not one a newer process bound since."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
