"""``python -m app``: parse settings, set up logging, load the handler, serve."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import time
from collections.abc import Coroutine
from typing import Any

from app.config import Settings, parse_settings
from app.server import Handler, Server

__all__ = ["load_handler", "main", "run"]

logger = logging.getLogger("app")


class EventFormatter(logging.Formatter):
    """One line per event: ``event=... key=value ...`` or the same as a JSON object."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info).replace("\n", " | ")
        if self.json:
            return json.dumps(fields, default=str)
        return " ".join(f"{key}={_quote(value)}" for key, value in fields.items())


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=') else text


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(EventFormatter(settings.log_format))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    # The library logs each refused or malformed handshake with a traceback; our own
    # handshake_refused line says enough, so keep its logger to real problems.
    logging.getLogger("websockets").setLevel(logging.ERROR)


def load_handler(spec: str) -> Handler:
    """Import ``module:callable``; raises ValueError naming what is wrong."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot load handler {spec!r}: {error}") from error
    handler = getattr(module, attribute, None)
    if not callable(handler):
        raise ValueError(
            f"cannot load handler {spec!r}: no callable {attribute!r} in {module_name}"
        )
    return handler  # type: ignore[no-any-return]


def _event_loop_runner() -> Any:
    """uvloop's runner when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def main(argv: list[str] | None = None) -> int:
    """Run one server process; returns its exit code (2: bad arguments or handler)."""
    settings = parse_settings(argv)
    configure_logging(settings)
    try:
        handler = load_handler(settings.handler)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    server = Server(settings, handler)
    coroutine: Coroutine[Any, Any, int] = server.run()
    return int(_event_loop_runner()(coroutine))


def run() -> None:
    sys.exit(main())
