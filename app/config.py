"""Settings of one server process: command-line options, each defaulting to an env var.

systemd starts every instance with ``EnvironmentFile=``, so each option is read from
``APP_<NAME>`` when it is not given on the command line.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Settings", "build_parser", "parse_settings"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SUBJECT_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _option(
    default: object,
    text: str,
    *,
    convert: Callable[[str], object] | None = None,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    secret: bool = False,
) -> Any:
    """One setting, declared once: its --option (``flag``, else --<name>), its APP_<NAME>
    variable and its Settings field all come from the field's name. ``default`` and the
    command line are read as the field's type (int, float, str); ``convert`` makes the
    field's value of that string (a comma-separated list); ``secret``: its value is left
    out of --help, which prints the defaults read from APP_*."""
    return field(
        metadata={"default": default, "help": text, "convert": convert, "choices": choices,
                  "flag": flag, "secret": secret}
    )  # fmt: skip


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    """Everything a server process is configured with: each field one option."""

    host: str = _option("127.0.0.1", "address to bind (ignored with socket activation)")
    port: int = _option(
        8001,
        "port to bind; 0 picks a free one (ignored with socket "
        "activation); with --unix-socket, only the instance's name in /readyz "
        "and logs",
    )
    unix_socket: str = _option(
        "",
        "unix socket path to bind instead of host:port (ignored "
        "with socket activation); a stale socket file there is "
        "replaced, and the new one is open to whoever can reach its "
        "folder: the folder's permissions decide who connects",
    )
    handler: str = _option("app.handlers:echo", "the websockets handler, as module:callable")
    # --version conventionally prints the program's own version: the release label is
    # --version-label (still APP_VERSION, the variable the deploy writes).
    version: str = _option(
        "dev", "release label reported by /healthz, /readyz and /metrics", flag="--version-label"
    )
    max_size: int = _option(1048576, "largest message accepted, in bytes; past it: close 1009")
    max_queue: int = _option(16, "messages buffered per connection before reading pauses")
    max_queue_bytes: int = _option(
        1048576,
        "bytes a room member's outgoing queue may hold (its connection's write buffer) "
        "before the member is closed with 4008 and comes back with its last id; 0: no bound",
    )
    open_timeout: float = _option(10.0, "seconds for a client to complete the opening handshake")
    close_timeout: float = _option(10.0, "seconds to wait for the closing handshake")
    ping_interval: float = _option(20.0, "seconds between keepalive pings")
    ping_timeout: float = _option(20.0, "seconds to wait for a pong before closing 1011")
    max_connections: int = _option(10000, "open connections per process; past it: HTTP 503")
    allowed_origins: tuple[str, ...] = _option(
        "",
        "comma-separated Origin values allowed (empty: pages of the host the handshake is "
        "sent to), others get 403; a request without Origin is not from a browser and is let "
        "through",
        convert=_split,
    )
    compression: str = _option(
        "deflate",
        "permessage-deflate: 'deflate' or 'none' (less memory)",
        choices=("deflate", "none"),
    )
    compression_window_bits: int = _option(
        10,
        "deflate's window, 9..15: the server's and, when the client offers it, the "
        "client's (2**bits bytes each; larger compresses better)",
    )
    compression_memlevel: int = _option(
        3,
        "zlib memLevel of the server's compressor, 1..9 "
        "(memory per connection against speed and ratio)",
    )
    drain_timeout: float = _option(10.0, "seconds the graceful shutdown may take before exiting")
    drain_spread: float = _option(
        0.0,
        "seconds over which the graceful shutdown closes its connections, a few at a "
        "time, so that their clients come back as a stream, not a wave (0: all at once; "
        "less than --drain-timeout)",
    )
    restart_file: str = _option(
        "", "if this file exists at SIGTERM, close with 1012 instead of 1001"
    )
    trusted_proxies: tuple[Network, ...] = _option(
        "127.0.0.1,::1",
        "proxies whose X-Forwarded-For is believed",
        convert=lambda value: tuple(ipaddress.ip_network(p, strict=False) for p in _split(value)),
    )
    log_format: str = _option(
        "kv", "log lines as 'kv' (key=value) or 'json'", choices=("kv", "json")
    )
    log_level: str = _option(
        "info", "debug, info, warning or error", choices=("debug", "info", "warning", "error")
    )
    bus_url: tuple[str, ...] = _option(
        "",
        "NATS servers that carry rooms across the fleet, comma-separated, in order of "
        "preference (the host's own first; the others take over while it is away), e.g. "
        "tls://10.0.0.11:4222,tls://10.0.0.12:4222 (empty: rooms stay in this process)",
        convert=_split,
    )
    bus_token: str = _option(
        "", "auth token for the bus servers (better given in the environment)", secret=True
    )
    bus_ca: str = _option(
        "",
        "CA file (PEM) that verifies the bus servers of tls:// URLs, whose certificates "
        "must name the URL's host (empty: the system's CAs)",
    )
    bus_prefix: str = _option("wsapp", "first tokens of the bus subjects: <prefix>.room.<room>")
    bus_history_max_age: float = _option(
        0.0,
        "seconds the bus keeps each room message (a JetStream stream <PREFIX>_ROOMS): "
        "messages get ids and a client coming back with the last id it saw gets what it "
        "missed; 0: no history, room messages go at most once",
    )
    bus_history_max_bytes: int = _option(
        268435456, "bytes of room messages the history holds at most; the oldest go first"
    )
    bus_history_replicas: int = _option(
        1,
        "bus servers holding each stored message, 1..5 (3 "
        "keeps every message with one server down)",
    )
    bus_history_apply: int = _option(
        0,
        "1: bring an existing history stream to the settings above (the deploy sets it on "
        "one host's instances); 0: make the stream if it is missing, and keep an existing "
        "one's settings (instances of two releases would otherwise flip them)",
    )
    instance: str = _option(
        "", "label of this process in presence and logs (empty: <hostname>:<port>)"
    )


# The command line's type of each field's annotation (with `from __future__ import
# annotations`, the annotation is its source text); a tuple field reads a string.
_KINDS: dict[str, type] = {"int": int, "float": float, "str": str}


def _flag(item: Field[Any]) -> str:
    return str(item.metadata["flag"] or f"--{item.name.replace('_', '-')}")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser, with defaults taken from ``environ`` (``os.environ``)."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve a websockets handler, with health, metrics and graceful shutdown.",
        epilog="Every option also reads its default from APP_<OPTION> (e.g. APP_PORT).",
    )
    for item in fields(Settings):
        variable = f"APP_{item.name.upper()}"
        meta = item.metadata
        # argparse converts a string default with `type`, so a bad APP_* value is
        # reported like a bad option (choices are checked in parse_settings: argparse
        # does not check them on defaults).
        parser.add_argument(
            _flag(item),
            dest=item.name,
            type=_KINDS.get(str(item.type), str),
            default=env.get(variable, meta["default"]),
            choices=meta["choices"],
            help=f"{meta['help']} (env {variable}"
            + (")" if meta["secret"] else "; default: %(default)s)"),
        )
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Parse the command line (and environment) into Settings; exits 2 on bad input."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    for item in fields(Settings):
        choices = item.metadata["choices"]
        if choices and getattr(args, item.name) not in choices:
            parser.error(
                f"{_flag(item)}: invalid choice {getattr(args, item.name)!r} "
                f"(choose from {', '.join(choices)})"
            )
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    # sun_path holds 108 bytes, the terminating NUL included.
    if len(os.fsencode(args.unix_socket)) > 107:
        parser.error(f"--unix-socket: {args.unix_socket!r} is longer than 107 bytes")
    for name in ("max_size", "max_queue", "max_connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if 0 < args.max_queue_bytes < 65536:
        parser.error(
            f"--max-queue-bytes must be 0 (no bound) or at least 65536, got {args.max_queue_bytes}"
        )
    for name in ("open_timeout", "close_timeout", "ping_interval", "ping_timeout", "drain_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be more than 0 seconds")
    # Checked here so a bad value names its option, not a traceback from serve(). RFC 7692
    # allows 8 window bits, but zlib cannot compress with them and websockets refuses them.
    for name, low, high in (("compression_window_bits", 9, 15), ("compression_memlevel", 1, 9)):
        if not low <= getattr(args, name) <= high:
            parser.error(
                f"--{name.replace('_', '-')} must be between {low} and {high}, "
                f"got {getattr(args, name)}"
            )
    values = {}
    for item in fields(Settings):
        convert = item.metadata["convert"]
        try:
            values[item.name] = (
                convert(getattr(args, item.name)) if convert else getattr(args, item.name)
            )
        except ValueError as error:
            parser.error(f"{_flag(item)}: {error}")
    bus_urls = values["bus_url"]
    # Not echoed: a URL may carry a user and password.
    if any(urlsplit(url).scheme not in ("nats", "tls") for url in bus_urls):
        parser.error("--bus-url: every URL must start with nats:// or tls://")
    if args.bus_ca and not os.access(args.bus_ca, os.R_OK):
        parser.error(f"--bus-ca: cannot read {args.bus_ca!r}")
    if not _SUBJECT_PREFIX.fullmatch(args.bus_prefix):
        parser.error(
            f"--bus-prefix: {args.bus_prefix!r} is not a NATS subject prefix "
            "(dot-separated tokens of letters, digits, '-' and '_')"
        )
    if ":" not in args.handler:
        parser.error(f"--handler must be module:callable, got {args.handler!r}")
    if not 0 <= args.drain_spread < args.drain_timeout:
        parser.error(
            f"--drain-spread must be 0 or more seconds and less than --drain-timeout "
            f"({args.drain_timeout}), got {args.drain_spread}"
        )
    if args.bus_history_max_age < 0:
        parser.error("--bus-history-max-age must be 0 (no history) or more seconds")
    if args.bus_history_max_bytes < 1:
        parser.error("--bus-history-max-bytes must be at least 1")
    if args.bus_history_apply not in (0, 1):
        parser.error("--bus-history-apply must be 0 or 1")
    if not 1 <= args.bus_history_replicas <= 5:
        parser.error("--bus-history-replicas must be between 1 and 5")
    return Settings(**values)
