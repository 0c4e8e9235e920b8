"""``python -m app``: parse settings, set up logging, load the handler, serve."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from app.config import Settings, parse_settings
from app.server import Handler, Server

__all__ = ["load_handler", "main", "run"]

logger = logging.getLogger("app")


class EventFormatter(logging.Formatter):
    """One line per event: ``event=... key=value ...`` or the same as a JSON object.

    Args:
        style: ``"kv"`` or ``"json"``.
    """

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
    """Log one line per event on stdout (journald), as key=value or JSON."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(EventFormatter(settings.log_format))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    if settings.log_level != "debug":
        # The library's info lines (every connection opened or rejected) repeat our own
        # events without their fields; its warnings and errors still come through.
        logging.getLogger("websockets").setLevel(logging.WARNING)


def load_handler(spec: str) -> Handler:
    """Import the handler named ``module:callable``.

    Args:
        spec: ``module:callable``, e.g. ``app.handlers:echo``.

    Raises:
        ValueError: naming the handler and what is wrong with it.
    """
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    # Whatever the operator's module raises while importing is a bad handler, told in
    # one line like a missing module, not a traceback.
    except Exception as error:
        raise ValueError(f"cannot load handler {spec!r}: {error}") from error
    handler = getattr(module, attribute, None)
    if not callable(handler):
        raise ValueError(
            f"cannot load handler {spec!r}: no callable {attribute!r} in {module_name}"
        )
    return handler  # type: ignore[no-any-return]


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
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
    return _event_loop_runner()(Server(settings, handler).run())


def run() -> None:
    """Entry point of ``python -m app`` and the ``wsfleet-app`` script."""
    sys.exit(main())
