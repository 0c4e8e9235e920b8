"""The built-in handlers: ``echo`` (the default) and ``chat`` (a browser demo).

A handler is a plain websockets handler, ``async def handler(ws) -> None``. It may carry
a ``process_request`` attribute, ``(connection, request) -> Response | None``, to answer
plain HTTP requests (no ``Upgrade`` header) itself, as ``chat`` does for its page.
"""

from __future__ import annotations

from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.http11 import Request, Response

from app.server import http_response

__all__ = ["chat", "echo"]

_templates = Environment(
    loader=PackageLoader("app", "templates"), autoescape=select_autoescape(["html"])
)
# Clients of each chat room in this process. A room spans one process only: clients that
# nginx sends to another instance are in another room of the same name.
_rooms: dict[str, set[ServerConnection]] = {}


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


async def chat(ws: ServerConnection) -> None:
    """Send each message to every client of the room in this process, the sender too.

    The room is named by the path, ``/ws/<room>``, or by ``/ws?room=<room>``; ``lobby``
    when neither names one. ``GET /?room=<room>`` serves the page that joins it.
    """
    room = _room_of(ws.request.path if ws.request else "/")
    members = _rooms.setdefault(room, set())
    members.add(ws)
    try:
        async for message in ws:
            broadcast(members, message)
    finally:
        members.discard(ws)
        if not members:
            _rooms.pop(room, None)


def _chat_page(connection: ServerConnection, request: Request) -> Response | None:
    """Serve the chat page on ``GET /``; anything else is left to the WebSocket handshake."""
    parts = urlsplit(request.path)
    if parts.path not in ("/", "/chat"):
        return None
    room = _room_of("/ws?" + parts.query)
    page = _templates.get_template("chat.html").render(room=room)
    return http_response(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")


chat.process_request = _chat_page  # type: ignore[attr-defined]
