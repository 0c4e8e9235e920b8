"""Wait until an instance is ready, then make a real WebSocket round trip with it.

Run by the app role on the host, after an instance (re)starts, with the Python of a
release's venv (it needs only the websockets package, which every release has)::

    instance_ready.py --port 8001 [--unix-socket /run/wsapp/8001.sock] [--timeout 30]

Ready: ``/readyz`` answers 200 (asked every 0.2 s, each try bounded), then the opening
handshake and a ping answered by a pong, whatever the operator's handler does with
messages. Exits 0 once both passed; 1 when ``--timeout`` seconds pass first, with one
line on stdout saying what it last saw (the role shows it in the rollout's summary).
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
import time

from websockets.sync.client import connect, unix_connect

POLL = 0.2  # seconds between two readiness checks
TRY = 2.0  # seconds one check may take: an instance that accepts but never answers


class _UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection over the instance's unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TRY)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TRY)
        self.sock.connect(self.path)


def readyz(port: int, path: str) -> str:
    """``/readyz``'s status line, or the error that stood in its way."""
    connection = (
        _UnixHTTPConnection(path)
        if path
        else http.client.HTTPConnection("127.0.0.1", port, timeout=TRY)
    )
    try:
        connection.request("GET", "/readyz")
        response = connection.getresponse()
        response.read()
        return f"{response.status} {response.reason}"
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    finally:
        connection.close()


def round_trip(port: int, path: str) -> None:
    """The opening handshake, then a ping answered by a pong."""
    if path:
        ws = unix_connect(path, "ws://localhost/", open_timeout=10)
    else:
        ws = connect(f"ws://127.0.0.1:{port}/", open_timeout=10)
    with ws:
        if not ws.ping().wait(10):
            raise TimeoutError("no pong within 10 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True, help="the instance's port")
    parser.add_argument("--unix-socket", default="", help="its socket with app_listen unix")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait in all")
    args = parser.parse_args(argv)
    name = args.unix_socket or f"port {args.port}"
    deadline = time.monotonic() + args.timeout
    seen = readyz(args.port, args.unix_socket)
    while not seen.startswith("200 "):
        if time.monotonic() >= deadline:
            print(f"{name}: /readyz not 200 within {args.timeout:g} s: {seen}")
            return 1
        time.sleep(POLL)
        seen = readyz(args.port, args.unix_socket)
    try:
        round_trip(args.port, args.unix_socket)
    except Exception as error:
        print(f"{name}: ready, but no WebSocket round trip: {error!r}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
