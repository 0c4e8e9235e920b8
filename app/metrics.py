"""Prometheus metrics of one server process, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest
from websockets.frames import Frame

__all__ = ["BusMetrics", "Metrics"]


class Metrics:
    """The counters and gauges ``/metrics`` exposes.

    Args:
        version: the release label, exposed as ``wsapp_info{version=...}``.
        open_connections: returns the number of open WebSocket connections at scrape time.
        max_connections: ``--max-connections``, exposed as ``wsapp_connections_max`` so an
            alert can compare the open connections with it; None leaves the series out.
        bus: whether the process talks to a bus; its series exist only then (absent,
            not 0, where rooms stay in-process).
    """

    def __init__(
        self,
        version: str,
        open_connections: Callable[[], int],
        bus: bool = False,
        max_connections: int | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        Info("wsapp", "The running release.", registry=self.registry).info({"version": version})
        Gauge(
            "wsapp_connections_open", "Open WebSocket connections.", registry=self.registry
        ).set_function(open_connections)
        if max_connections is not None:
            Gauge(
                "wsapp_connections_max",
                "Open WebSocket connections past which handshakes are refused (503).",
                registry=self.registry,
            ).set(max_connections)
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
        # Each frame both ways is counted: the series of each direction looked up once
        # here, not by labels() (a lock and a dict of label values) for every frame.
        self._frame_series = {
            direction: (self.messages.labels(direction), self.bytes.labels(direction))
            for direction in ("in", "out")
        }
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
        self.deliveries = Counter(
            "wsapp_room_deliveries",
            "Room messages written to members, by source: local (a member of this process "
            "sent it) or bus (another process did).",
            ["source"],
            registry=self.registry,
        )
        for source in ("local", "bus"):
            self.deliveries.labels(source)
        self.room_closes = Counter(
            "wsapp_room_closes",
            "Room members closed by the process, by reason: slow (4008: its outgoing queue "
            "passed --max-queue-bytes) or send_back (1012: messages this process could not "
            "get for it); each comes back with its last id.",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("slow", "send_back"):
            self.room_closes.labels(reason)
        self.bus = BusMetrics(self.registry) if bus else None

    def count_frame(self, direction: str, frame: Frame) -> None:
        """Count a data frame: its payload bytes, and a message when it is the last one.

        Args:
            direction: ``"in"`` or ``"out"``.
            frame: a text, binary or continuation frame, uncompressed.
        """
        messages, payload = self._frame_series[direction]
        if frame.fin:
            messages.inc()
        payload.inc(len(frame.data))

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class BusMetrics:
    """The series of the message bus between the processes of the fleet.

    Args:
        registry: the registry of the process's :class:`Metrics`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "wsapp_bus_connected", "1 while connected to the bus server, else 0.",
            registry=registry,
        )  # fmt: skip
        self.messages = Counter(
            "wsapp_bus_messages",
            "Messages on the bus, by direction (out: published, in: received) and kind "
            "(room: a member's message, presence: a member count).",
            ["direction", "kind"],
            registry=registry,
        )
        self.dropped = Counter(
            "wsapp_bus_dropped",
            "Room messages not published, by reason (disconnected, too_large): without "
            "history only the members in this process got them; with history no one did, "
            "and the sender was told (not_stored).",
            ["reason"],
            registry=registry,
        )
        self.rtt = Gauge(
            "wsapp_bus_rtt_seconds",
            "Round trip to the bus server (PING/PONG), measured every few seconds.",
            registry=registry,
        )
        self.history = Gauge(
            "wsapp_bus_history",
            "1 while room messages are stored in the bus's history (JetStream) before "
            "delivery, else 0: they then go at most once.",
            registry=registry,
        )
        self.replayed = Counter(
            "wsapp_room_replayed",
            "Room messages delivered from the history, by cause (resume: a client came back "
            "with the last id it saw; gap: this process missed them live).",
            ["cause"],
            registry=registry,
        )
        for direction in ("in", "out"):
            for kind in ("room", "presence"):
                self.messages.labels(direction, kind)
        for reason in ("disconnected", "too_large", "not_stored"):
            self.dropped.labels(reason)
        for cause in ("resume", "gap"):
            self.replayed.labels(cause)
