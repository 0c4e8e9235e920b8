"""The built-in handlers: ``echo`` (the default) and ``chat`` (a browser demo).

A handler is a plain websockets handler, ``async def handler(ws) -> None``. It may carry
a ``process_request`` attribute, ``(connection, request) -> Response | None``, to answer
plain HTTP requests (no ``Upgrade`` header) itself, as ``chat`` does for its page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from app import rooms
from app.server import http_response

__all__ = ["chat", "echo"]

_templates = Environment(
    loader=PackageLoader("app", "templates"), autoescape=select_autoescape(["html"])
)
# The chat page's policy: its own script and style (by nonce), its WebSockets back to the
# host that served it ('self' covers ws: and wss: of the same host), nothing else.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# How often a client that asked for events is told the room's member count, if changed.
PRESENCE_EVERY = 0.5


async def echo(ws: ServerConnection) -> None:
    """Send every message back unchanged: text as text, binary as binary."""
    async for message in ws:
        await ws.send(message)


def _room_of(path: str) -> str:
    """``/ws/<room>`` or ``/ws?room=<room>``; ``lobby`` when none is named."""
    parts = urlsplit(path)
    name = parts.path.removeprefix("/ws").strip("/")
    if not name:
        name = parse_qs(parts.query).get("room", ["lobby"])[0]
    return name[:64] or "lobby"


def _wants_events(path: str) -> bool:
    return parse_qs(urlsplit(path).query).get("events", [""])[0] == "1"


def _since(path: str) -> int | None:
    """``since=<id>``: the last message id the client saw; None when absent or not an id."""
    value = parse_qs(urlsplit(path).query).get("since", [""])[0]
    return int(value) if value.isdigit() else None


def _last(path: str) -> int:
    """``last=<K>``: the room's latest K messages wanted on joining (at most
    :data:`app.rooms.MAX_RECENT`); 0 when absent or not a number."""
    value = parse_qs(urlsplit(path).query).get("last", [""])[0]
    return min(int(value), rooms.MAX_RECENT) if value.isdigit() else 0


def _sent_ref(frame: bytes) -> str | None:
    """The reference named by a client's message event, ``{"type": "message", "ref": R}``;
    None when ``frame`` is not one (a binary message of the room).

    Raises:
        ValueError: a message event whose reference is not valid (:func:`rooms.valid_ref`).
    """
    if not frame.startswith(b"{"):
        return None
    try:
        event = json.loads(frame)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != "message":
        return None
    ref = event.get("ref")
    if not isinstance(ref, str) or not rooms.valid_ref(ref):
        raise ValueError(f"a message reference is 1 to {rooms.MAX_REF} printable characters")
    return ref


async def chat(ws: ServerConnection) -> None:
    """Send each message to every member of the room in the fleet, the sender too.

    The room is named by the path, ``/ws/<room>``, or by ``/ws?room=<room>``; ``lobby``
    when neither names one. ``GET /?room=<room>`` serves the page that joins it.

    Messages go out as they came in: text as text, binary as binary. A client that adds
    ``events=1`` to the query (the page does) also gets events as binary frames of
    JSON: ``{"type": "message", "id": N}`` before each message the bus stored (its id,
    the same in every process, growing in the room's order), ``{"type": "hello",
    "instance": ...}`` (the process serving it), then ``{"type": "presence", "members": N}``
    whenever the room's count in the fleet changes. A client that comes back with
    ``since=<the last id it saw>`` first gets the messages it missed, then
    ``{"type": "resumed", "restored": K, "complete": true|false, ...}``
    (:meth:`app.rooms.Rooms.joined`); one that joins with ``last=<K>`` instead first
    gets the room's latest K messages, the same way. Such a client may also name what
    it sends, for an acknowledgement (:func:`_chat_in`). A message the room's history
    did not store is refused; a join without the history's answer is closed with 1013.
    """
    path = ws.request.path if ws.request else "/"
    events_wanted = _wants_events(path)
    since = _since(path)
    last = _last(path) if since is None else 0
    try:
        async with rooms.joined(
            _room_of(path), ws, since=since, ids=events_wanted, last=last
        ) as room:
            await _chat_in(ws, room, events_wanted)
    except rooms.HistoryUnavailable:
        # No starting point in the room's history: nothing could be promised. 1013: try
        # again later (the page does, backing off).
        await ws.close(CloseCode.TRY_AGAIN_LATER, "room history unavailable")


async def _chat_in(ws: ServerConnection, room: rooms.Room, events_wanted: bool) -> None:
    """Broadcast what the member sends.

    An events client may precede a message with ``{"type": "message", "ref": R}`` (a
    binary frame of JSON; R its own reference, unique in the room): once the message is
    stored it gets ``{"type": "ack", "ref": R, "id": N}`` (after the message itself, whose
    message event names R to every member). The same reference sent again in the room,
    from any connection, within the stream's duplicate window (2 min), is stored once: its
    ack names the first id. A client back from a cut finds what it sent in its resume,
    by reference, for as long as it can resume.

    A message the history did not store is refused, to an events client with
    ``{"type": "refused", "reason": ...}`` (and its ``ref``), to another with a close
    1013: no one got it, and the client knows.
    """
    events = asyncio.create_task(_send_events(ws, room)) if events_wanted else None
    ref: str | None = None
    try:
        async for message in ws:
            if events_wanted and ref is None and isinstance(message, bytes):
                try:
                    ref = _sent_ref(message)
                except ValueError as error:
                    await ws.close(CloseCode.POLICY_VIOLATION, str(error))
                    return
                if ref is not None:
                    continue  # the next frame is the message it names
            named, ref = ref, None
            try:
                seq = await room.broadcast(message, named)
            except rooms.NotStored as error:
                if not events_wanted:
                    await ws.close(CloseCode.TRY_AGAIN_LATER, "message not stored")
                    return
                refused = {"type": "refused", "reason": str(error)}
                if named is not None:
                    refused["ref"] = named
                await ws.send(json.dumps(refused).encode())
                continue
            if named is not None:
                await ws.send(json.dumps({"type": "ack", "ref": named, "id": seq}).encode())
    finally:
        if events is not None:
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events


async def _send_events(ws: ServerConnection, room: rooms.Room) -> None:
    """Tell the client which instance serves it, then the room's count when it changes."""
    hello = {"type": "hello", "instance": rooms.current().instance}
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps(hello).encode())
        told = -1
        while True:
            members = room.members()
            if members != told:
                await ws.send(json.dumps({"type": "presence", "members": members}).encode())
                told = members
            await asyncio.sleep(PRESENCE_EVERY)


def _chat_page(connection: ServerConnection, request: Request) -> Response | None:
    """Serve the chat page on ``GET /``; anything else is left to the WebSocket handshake."""
    parts = urlsplit(request.path)
    if parts.path not in ("/", "/chat"):
        return None
    room = _room_of("/ws?" + parts.query)
    # The page's one script and one style run by this response's nonce; nothing else
    # runs, loads or frames it (an injected tag in a message would not run either).
    nonce = secrets.token_urlsafe(16)
    page = _templates.get_template("chat.html").render(room=room, nonce=nonce)
    policy = CONTENT_SECURITY_POLICY.format(nonce=nonce)
    return http_response(
        HTTPStatus.OK, page.encode(), "text/html; charset=utf-8",
        [("Content-Security-Policy", policy)],
    )  # fmt: skip


chat.process_request = _chat_page  # type: ignore[attr-defined]
