"""Prometheus metrics of one server process, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest
from websockets.frames import Frame

__all__ = ["Metrics"]


class Metrics:
    """The counters and gauges ``/metrics`` exposes.

    Args:
        version: the release label, exposed as ``wsapp_info{version=...}``.
        open_connections: returns the number of open WebSocket connections at scrape time.
    """

    def __init__(self, version: str, open_connections: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        Info("wsapp", "The running release.", registry=self.registry).info({"version": version})
        Gauge(
            "wsapp_connections_open", "Open WebSocket connections.", registry=self.registry
        ).set_function(open_connections)
        self.handshakes = Counter(
            "wsapp_handshakes",
            "Opening handshakes, by result (accepted or refused).",
            ["result"],
            registry=self.registry,
        )
        self.messages = Counter(
            "wsapp_messages", "WebSocket messages, by direction.", ["direction"],
            registry=self.registry,
        )  # fmt: skip
        self.bytes = Counter(
            "wsapp_bytes", "Payload bytes of WebSocket messages, by direction.", ["direction"],
            registry=self.registry,
        )  # fmt: skip
        self.closes = Counter(
            "wsapp_closes", "Closed WebSocket connections, by close code.", ["code"],
            registry=self.registry,
        )  # fmt: skip
        # Series exist from the start, at 0, so rate() and alerts see the first increase.
        for result in ("accepted", "refused"):
            self.handshakes.labels(result)
        for direction in ("in", "out"):
            self.messages.labels(direction)
            self.bytes.labels(direction)

    def count_frame(self, direction: str, frame: Frame) -> None:
        """Count a data frame: its payload bytes, and a message when it is the last one.

        Args:
            direction: ``"in"`` or ``"out"``.
            frame: a text, binary or continuation frame, uncompressed.
        """
        if frame.fin:
            self.messages.labels(direction).inc()
        self.bytes.labels(direction).inc(len(frame.data))

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
