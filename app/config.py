"""Settings of one server process: command-line options, each defaulting to an env var.

systemd starts every instance with ``EnvironmentFile=``, so each option is read from
``APP_<NAME>`` when it is not given on the command line.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Settings", "build_parser", "parse_settings"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SUBJECT_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


@dataclass(frozen=True)
class Settings:
    """Everything a server process is configured with."""

    host: str
    port: int
    unix_socket: str
    handler: str
    version: str
    max_size: int
    max_queue: int
    open_timeout: float
    close_timeout: float
    ping_interval: float
    ping_timeout: float
    max_connections: int
    allowed_origins: tuple[str, ...]
    compression: str
    compression_window_bits: int
    compression_memlevel: int
    drain_timeout: float
    restart_file: str
    trusted_proxies: tuple[Network, ...]
    log_format: str
    log_level: str
    bus_url: tuple[str, ...]
    bus_token: str
    bus_prefix: str
    bus_history_max_age: float
    bus_history_max_bytes: int
    bus_history_replicas: int
    instance: str


# name, type, default, help. The option is --<name>, the env var APP_<NAME>.
_OPTIONS: list[tuple[str, type, object, str]] = [
    ("host", str, "127.0.0.1", "address to bind (ignored with socket activation)"),
    ("port", int, 8001, "port to bind; 0 picks a free one (ignored with socket activation); "
     "with --unix-socket, only the instance's name in /readyz and logs"),
    ("unix_socket", str, "", "unix socket path to bind instead of host:port (ignored with "
     "socket activation); a stale socket file there is replaced, and the new one is open to "
     "whoever can reach its folder: the folder's permissions decide who connects"),
    ("handler", str, "app.handlers:echo", "the websockets handler, as module:callable"),
    ("version", str, "dev", "release label reported by /healthz, /readyz and /metrics"),
    ("max_size", int, 1048576, "largest message accepted, in bytes; past it: close 1009"),
    ("max_queue", int, 16, "messages buffered per connection before reading pauses"),
    ("open_timeout", float, 10.0, "seconds for a client to complete the opening handshake"),
    ("close_timeout", float, 10.0, "seconds to wait for the closing handshake"),
    ("ping_interval", float, 20.0, "seconds between keepalive pings"),
    ("ping_timeout", float, 20.0, "seconds to wait for a pong before closing 1011"),
    ("max_connections", int, 10000, "open connections per process; past it: HTTP 503"),
    ("allowed_origins", str, "", "comma-separated Origin values allowed (empty: pages of "
     "the host the handshake is sent to), others get 403; a request without Origin is "
     "not from a browser and is let through"),
    ("compression", str, "deflate", "permessage-deflate: 'deflate' or 'none' (less memory)"),
    ("compression_window_bits", int, 10, "deflate's window, 9..15: the server's and, when "
     "the client offers it, the client's (2**bits bytes each; larger compresses better)"),
    ("compression_memlevel", int, 3, "zlib memLevel of the server's compressor, 1..9 "
     "(memory per connection against speed and ratio)"),
    ("drain_timeout", float, 10.0, "seconds the graceful shutdown may take before exiting"),
    ("restart_file", str, "", "if this file exists at SIGTERM, close with 1012 instead of 1001"),
    ("trusted_proxies", str, "127.0.0.1,::1", "proxies whose X-Forwarded-For is believed"),
    ("log_format", str, "kv", "log lines as 'kv' (key=value) or 'json'"),
    ("log_level", str, "info", "debug, info, warning or error"),
    ("bus_url", str, "", "NATS server(s) that carry rooms across the fleet, comma-separated, "
     "e.g. nats://127.0.0.1:4222 (empty: rooms stay in this process)"),
    ("bus_token", str, "", "auth token for the bus server (better given in the environment)"),
    ("bus_prefix", str, "wsapp", "first tokens of the bus subjects: <prefix>.room.<room>"),
    ("bus_history_max_age", float, 0.0, "seconds the bus keeps each room message (a JetStream "
     "stream <PREFIX>_ROOMS): messages get ids and a client coming back with the last id it "
     "saw gets what it missed; 0: no history, room messages go at most once"),
    ("bus_history_max_bytes", int, 268435456, "bytes of room messages the history holds at "
     "most; the oldest go first"),
    ("bus_history_replicas", int, 1, "bus servers holding each stored message, 1..5 (3 keeps "
     "every message with one server down)"),
    ("instance", str, "", "label of this process in presence and logs (empty: <hostname>:<port>)"),
]  # fmt: skip
# Options whose value must not show in --help (it prints the defaults, read from APP_*).
_SECRETS = {"bus_token"}
# --version conventionally prints the program's own version: the release label is
# --version-label (still APP_VERSION, the variable the deploy writes).
_OPTION_NAMES = {"version": "--version-label"}
_CHOICES = {
    "compression": ("deflate", "none"),
    "log_format": ("kv", "json"),
    "log_level": ("debug", "info", "warning", "error"),
}


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser, with defaults taken from ``environ`` (``os.environ``)."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve a websockets handler, with health, metrics and graceful shutdown.",
        epilog="Every option also reads its default from APP_<OPTION> (e.g. APP_PORT).",
    )
    for name, kind, default, text in _OPTIONS:
        variable = f"APP_{name.upper()}"
        # argparse converts a string default with `type`, so a bad APP_* value is
        # reported like a bad option (choices are checked in parse_settings: argparse
        # does not check them on defaults).
        parser.add_argument(
            _OPTION_NAMES.get(name, f"--{name.replace('_', '-')}"),
            dest=name,
            type=kind,
            default=env.get(variable, default),
            choices=_CHOICES.get(name),
            help=f"{text} (env {variable}"
            + (")" if name in _SECRETS else "; default: %(default)s)"),
        )
    return parser


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Parse the command line (and environment) into Settings; exits 2 on bad input."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    for name, choices in _CHOICES.items():
        if getattr(args, name) not in choices:
            parser.error(
                f"--{name.replace('_', '-')}: invalid choice {getattr(args, name)!r} "
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
    try:
        proxies = tuple(ipaddress.ip_network(p, strict=False) for p in _split(args.trusted_proxies))
    except ValueError as error:
        parser.error(f"--trusted-proxies: {error}")
    bus_urls = _split(args.bus_url)
    # Not echoed: a URL may carry a user and password.
    if any(urlsplit(url).scheme not in ("nats", "tls") for url in bus_urls):
        parser.error("--bus-url: every URL must start with nats:// or tls://")
    if not _SUBJECT_PREFIX.fullmatch(args.bus_prefix):
        parser.error(
            f"--bus-prefix: {args.bus_prefix!r} is not a NATS subject prefix "
            "(dot-separated tokens of letters, digits, '-' and '_')"
        )
    if ":" not in args.handler:
        parser.error(f"--handler must be module:callable, got {args.handler!r}")
    if args.bus_history_max_age < 0:
        parser.error("--bus-history-max-age must be 0 (no history) or more seconds")
    if args.bus_history_max_bytes < 1:
        parser.error("--bus-history-max-bytes must be at least 1")
    if not 1 <= args.bus_history_replicas <= 5:
        parser.error("--bus-history-replicas must be between 1 and 5")
    return Settings(
        host=args.host,
        port=args.port,
        unix_socket=args.unix_socket,
        handler=args.handler,
        version=args.version,
        max_size=args.max_size,
        max_queue=args.max_queue,
        open_timeout=args.open_timeout,
        close_timeout=args.close_timeout,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        max_connections=args.max_connections,
        allowed_origins=_split(args.allowed_origins),
        compression=args.compression,
        compression_window_bits=args.compression_window_bits,
        compression_memlevel=args.compression_memlevel,
        drain_timeout=args.drain_timeout,
        restart_file=args.restart_file,
        trusted_proxies=proxies,
        log_format=args.log_format,
        log_level=args.log_level,
        bus_url=bus_urls,
        bus_token=args.bus_token,
        bus_prefix=args.bus_prefix,
        bus_history_max_age=args.bus_history_max_age,
        bus_history_max_bytes=args.bus_history_max_bytes,
        bus_history_replicas=args.bus_history_replicas,
        instance=args.instance,
    )
