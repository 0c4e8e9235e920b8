"""A Socket.IO client written to the protocol, over one ``websockets`` connection: what the
bench's load clients speak to the peer (bench/peers/socketio), so that one Python load
generator measures both stacks.

The framing implemented (Engine.IO protocol 4, Socket.IO protocol 5, WebSocket transport
only, text frames only: the chat sends no binary):

- Engine.IO: one packet per WebSocket frame, a digit for its type, then its payload.
  ``0`` open (the server's first frame: ``0{"sid":...,"upgrades":[],"pingInterval":25000,
  "pingTimeout":20000,"maxPayload":1000000}``), ``1`` close, ``2`` ping (the server's,
  every pingInterval; the client answers ``3`` pong within pingTimeout or is dropped),
  ``3`` pong, ``4`` message (its payload a Socket.IO packet), ``6`` noop.
- Socket.IO, inside an Engine.IO message: a digit for its type, then ``<n>-`` for binary
  attachments, the namespace and ``,`` unless it is ``/``, an ack id, and a JSON payload,
  each only when present. ``0`` CONNECT (``40`` or ``40{auth}`` from the client; ``40{"sid":
  ...,"pid":...}`` from the server), ``1`` DISCONNECT, ``2`` EVENT (``42["name",arg,...]``),
  ``3`` ACK, ``4`` CONNECT_ERROR (``44{"message":...}``).
- Connection state recovery: with it on, the server's CONNECT carries a private session id
  ``pid``, and each broadcast event carries its offset (a Redis stream id) as its last
  argument. A client that reconnects sends ``40{"pid":<pid>,"offset":<last offset seen>}``;
  the session was recovered when the server's CONNECT answers with the same pid. The missed
  events may come before that CONNECT: they are held until it, as socket.io-client does.

:func:`decode` and :class:`Session` do no I/O (frames in, packets and frames out);
:class:`SioConnection` carries them out on a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = [
    "ConnectError",
    "Packet",
    "Session",
    "SioConnection",
    "decode",
    "encode_event",
    "url_of",
]

# Engine.IO packet types.
OPEN, CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP = range(7)
# Socket.IO packet types.
CONNECT, DISCONNECT, EVENT, ACK, CONNECT_ERROR, BINARY_EVENT, BINARY_ACK = range(7)


class ConnectError(Exception):
    """The server refused the namespace (CONNECT_ERROR) or closed before CONNECT."""


@dataclass(frozen=True)
class Packet:
    """One frame, decoded: its Engine.IO type, and for a message its Socket.IO packet."""

    engine: int
    kind: int | None = None  # the Socket.IO type, for an Engine.IO message
    namespace: str = "/"
    ack: int | None = None
    data: Any = None

    @property
    def event(self) -> tuple[str, list[Any]] | None:
        """An EVENT's name and arguments; None for any other packet."""
        if self.kind != EVENT or not isinstance(self.data, list) or not self.data:
            return None
        return str(self.data[0]), list(self.data[1:])


def decode(frame: str | bytes) -> Packet:
    """One WebSocket frame of Engine.IO 4 / Socket.IO 5, decoded.

    Raises:
        ValueError: not a packet of these protocols (or a binary one, which the chat
            never sends).
    """
    if isinstance(frame, bytes):
        raise ValueError("binary frame: the chat sends none")
    if not frame or not frame[0].isdigit() or int(frame[0]) > NOOP:
        raise ValueError(f"not an Engine.IO packet: {frame[:40]!r}")
    engine = int(frame[0])
    body = frame[1:]
    if engine == OPEN:
        return Packet(OPEN, data=json.loads(body))
    if engine != MESSAGE:
        return Packet(engine, data=body or None)
    if not body or not body[0].isdigit() or int(body[0]) > BINARY_ACK:
        raise ValueError(f"not a Socket.IO packet: {frame[:40]!r}")
    kind = int(body[0])
    rest = body[1:]
    if kind in (BINARY_EVENT, BINARY_ACK):
        raise ValueError("binary Socket.IO packet: the chat sends none")
    namespace = "/"
    if rest.startswith("/"):
        namespace, _, rest = rest.partition(",")
    digits = len(rest) - len(rest.lstrip("0123456789"))
    ack = int(rest[:digits]) if digits else None
    rest = rest[digits:]
    return Packet(MESSAGE, kind, namespace, ack, json.loads(rest) if rest else None)


def encode_event(name: str, *args: Any) -> str:
    """An EVENT to the main namespace: ``42["name",...]``."""
    return "42" + json.dumps([name, *args], separators=(",", ":"))


@dataclass
class Session:
    """A client's side of connection state recovery: the session id the server gave and
    the offset of the last broadcast seen, across that client's connections."""

    pid: str | None = None
    offset: str | None = None
    recoveries: int = 0  # reconnects the server said it recovered
    lost: int = 0  # reconnects it did not (a new session: what was missed is gone)

    def connect_frame(self, auth: dict[str, Any] | None = None) -> str:
        """The client's CONNECT: with the session to recover, once there is one."""
        payload = dict(auth or {})
        if self.pid is not None and self.offset is not None:
            payload |= {"pid": self.pid, "offset": self.offset}
        return "40" + (json.dumps(payload, separators=(",", ":")) if payload else "")

    def connected(self, packet: Packet) -> bool:
        """Take the server's CONNECT; whether it recovered the session it was asked to."""
        data = packet.data if isinstance(packet.data, dict) else {}
        asked = self.pid is not None and self.offset is not None
        recovered = asked and data.get("pid") == self.pid
        if asked:
            if recovered:
                self.recoveries += 1
            else:
                self.lost += 1
        self.pid = data.get("pid")
        return recovered

    def seen(self, args: list[Any]) -> None:
        """Note a delivered event's offset: its last argument, when that is a string."""
        if self.pid is not None and args and isinstance(args[-1], str):
            self.offset = args[-1]


def url_of(base: str, room: str) -> str:
    """The WebSocket URL of the peer at ``base`` (``wss://host``) for ``room``."""
    return f"{base.rstrip('/')}/socket.io/?EIO=4&transport=websocket&room={room}"


@dataclass
class SioConnection:
    """One Socket.IO client over a WebSocket, connected to the main namespace."""

    ws: ClientConnection
    session: Session
    opened: dict[str, Any]
    recovered: bool = False
    # The events that came before the server's CONNECT (a recovery's missed ones).
    held: list[tuple[str, list[Any]]] = field(default_factory=list)

    @classmethod
    async def open(
        cls,
        url: str,
        context: ssl.SSLContext | None,
        session: Session | None = None,
        open_timeout: float = 10.0,
        **options: Any,
    ) -> SioConnection:
        """The WebSocket handshake, Engine.IO's open and Socket.IO's CONNECT, within
        ``open_timeout``; ``options`` go to websockets' connect (``sock=``...)."""
        ws = await connect(
            url, ssl=context, compression=None, ping_interval=None, open_timeout=open_timeout,
            max_size=None, **options,
        )  # fmt: skip
        session = session if session is not None else Session()
        try:
            async with asyncio.timeout(open_timeout):
                first = decode(await ws.recv())
                if first.engine != OPEN:
                    raise ConnectError(f"the server's first packet is not open: {first}")
                await ws.send(session.connect_frame())
                held = []
                while True:
                    packet = decode(await ws.recv())
                    if packet.engine == PING:
                        await ws.send("3")
                    elif packet.kind == CONNECT:
                        recovered = session.connected(packet)
                        return cls(ws, session, first.data, recovered, held)
                    elif packet.kind == CONNECT_ERROR:
                        raise ConnectError(f"refused: {packet.data}")
                    elif (event := packet.event) is not None:
                        held.append(event)
                    elif packet.engine == CLOSE or packet.kind == DISCONNECT:
                        raise ConnectError("closed before CONNECT")
        except BaseException:
            await ws.close()
            raise

    async def events(self) -> AsyncIterator[tuple[str, list[Any]]]:
        """The events, in order, until the connection closes; answers the server's pings.
        Each delivered event's offset is noted in the session before it is yielded."""
        while self.held:
            name, args = self.held.pop(0)
            self.session.seen(args)
            yield name, args
        try:
            async for frame in self.ws:
                packet = decode(frame)
                if packet.engine == PING:
                    await self.ws.send("3")
                elif (event := packet.event) is not None:
                    self.session.seen(event[1])
                    yield event
                elif packet.engine == CLOSE or packet.kind == DISCONNECT:
                    return
        except ConnectionClosed:
            return

    async def emit(self, name: str, *args: Any) -> None:
        await self.ws.send(encode_event(name, *args))

    async def close(self) -> None:
        """Leave as socket.io-client's disconnect() does: DISCONNECT, then the close."""
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send("41")
        await self.ws.close()
