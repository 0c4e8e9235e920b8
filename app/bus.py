"""One process's connection to its host's NATS server, kept for the life of the process.

The bus carries room messages and presence between the processes of the fleet;
:mod:`app.rooms` decides what goes on it. This module keeps the connection: it
connects in the background (the process serves meanwhile), logs a loss once, tries
again forever with backoff, and keeps ``wsapp_bus_connected`` and the round trip in
the metrics. nats-py subscribes again by itself after a reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client
from nats.aio.client import Server as PoolServer
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api as js_api
from nats.js.errors import BadRequestError, NotFoundError

from app.metrics import BusMetrics

__all__ = ["READ_BATCH", "Bus", "OnMessage", "StoredMessage", "StreamMissing", "redact"]

logger = logging.getLogger(__name__)

OnMessage = Callable[[str, Mapping[str, str], bytes], Awaitable[None]]
"""Awaited with the subject, headers and payload of every message received; the messages
of one subscription are handed over one at a time, in order."""

# Until the first connection, an attempt every second (nats-py's own loop, whole
# seconds). After a loss, an attempt at once, then waits doubling from 50 ms to 2 s:
# a server back after a restart is found again within about 2 s.
_START_RETRY = 1
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
_CONNECT_TIMEOUT = 2
# The host's server is on loopback: a dead one closes the socket at once. The pings
# find a hung one (no answer to 2 pings 5 s apart).
_PING_INTERVAL = 5
_RTT_EVERY = 2.0
_RTT_TIMEOUT = 2
_CLOSE_FLUSH_TIMEOUT = 1
# What nats-py reports, while still connected, as the connection breaks.
_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
)


# Each request to the stream waits this long for an answer; it is tried again (a publish
# with the same Nats-Msg-Id: stored once, whichever attempt got through) until STORE_DEADLINE,
# which outlasts a stream leader's election (NATS's raft elects within 4-9 s) and a host's
# server restarting.
_STORE_TIMEOUT = 2.0
_STORE_RETRY_WAIT = 0.2
STORE_DEADLINE = 12.0
"""Seconds a stored publish keeps trying before it gives up (the sender then falls back to
at most once)."""
BUS_RETURN_WAIT = 5.0
"""Seconds a store waits for a lost connection to come back (the host's server restarting:
systemd starts it again after 1 s, and the instances find it within about 2 s) before the
sender is told its message was not stored."""
READ_DEADLINE = 30.0
"""Seconds a read of the history keeps trying: a client being given what it missed waits,
rather than be told its history is incomplete, while the host's server restarts and
its JetStream catches up."""
# JetStream's error code for a stream that exists with another configuration.
_STREAM_NAME_IN_USE = 10058

T = TypeVar("T")

StoredMessage = js_api.RawStreamMsg
"""A message read back from a stream: ``seq``, ``subject``, ``headers``, ``data``."""

# JetStream's error codes for a subject with no message (an answer: none) and for a
# stream that is not there (an error: never read as "none").
_NO_MESSAGE = 10037
_NO_STREAM = 10059
# A range is read by a consumer of its own, this many messages a request; the consumer
# goes when the read is done, or after this long unused (a read cut short).
READ_BATCH = 256
_CONSUMER_IDLE = 30.0


class StreamMissing(Exception):
    """The history's stream is not there (deleted, or not made yet)."""


def redact(url: str) -> str:
    """``url`` without a user or password, fit for a log line."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "", parts.port or 4222)


def _headers_size(headers: Mapping[str, str]) -> int:
    """Bytes of a NATS header block: ``NATS/1.0\\r\\n``, ``Key: value\\r\\n`` each, ``\\r\\n``."""
    return 12 + sum(len(key.encode()) + len(value.encode()) + 4 for key, value in headers.items())


class Bus:
    """The connection to the bus, up whenever a server answers.

    Args:
        servers: URLs of the servers to use: the host's own, on loopback. Servers the
            cluster advertises are never used, so a process stays with its host's server.
        token: auth token for the server, or empty. Never logged.
        name: this process's label, shown in the server's list of connections.
        metrics: the bus series to keep.
        on_message: called for every message received on a subscription.
        on_connected: called on each connection, once subscriptions are restored.
    """

    def __init__(
        self,
        servers: Sequence[str],
        token: str,
        name: str,
        metrics: BusMetrics,
        on_message: OnMessage,
        on_connected: Callable[[], None],
    ) -> None:
        self.servers = list(servers)
        self._token = token
        self._name = name
        self._metrics = metrics
        self._on_message = on_message
        self._on_connected = on_connected
        self._ours = {_host_port(url) for url in self.servers}
        self._client = Client()
        self._subscriptions: dict[str, Subscription] = {}
        # One subscribe or unsubscribe at a time: two joins of a room at once would
        # otherwise both find it unsubscribed and make two subscriptions.
        self._subscribing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._ever_connected = False
        self._outage_logged = False
        self._closing = False
        metrics.connected.set(0)
        metrics.rtt.set(math.nan)

    @property
    def connected(self) -> bool:
        """Whether the connection is up now."""
        return self._client.is_connected

    @property
    def subscribed(self) -> set[str]:
        """The subjects subscribed to (restored by nats-py after a reconnection)."""
        return set(self._subscriptions)

    def start(self) -> None:
        """Connect in the background; returns at once."""
        self._task = asyncio.create_task(self._run(), name="bus")

    async def _run(self) -> None:
        try:
            await self._connect_and_measure()
        except Exception:
            # Not expected (nats-py retries forever), but never silent: rooms stay local.
            logger.exception("bus_failed")
            self._metrics.connected.set(0)

    async def _connect_and_measure(self) -> None:
        await self._client.connect(
            servers=self.servers,
            name=self._name,
            token=self._token or None,
            # A process delivers its own messages to its members itself.
            no_echo=True,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=_START_RETRY,
            reconnect_to_server_handler=self._next_server,
            connect_timeout=_CONNECT_TIMEOUT,
            ping_interval=_PING_INTERVAL,
            max_outstanding_pings=2,
            error_cb=self._error,
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
        )
        await self._up()
        while True:
            if self.connected:
                # Not nats-py's rtt(): it reads the loop's clock, whose steps are 1 ms
                # under uvloop, longer than a round trip on loopback.
                started = time.perf_counter()
                # Disconnected during the ping: the gauge was reset, nothing to measure.
                with contextlib.suppress(nats.errors.Error):
                    await self._client.flush(_RTT_TIMEOUT)
                    self._metrics.rtt.set(time.perf_counter() - started)
            await asyncio.sleep(_RTT_EVERY)

    def _next_server(
        self, pool: list[PoolServer], info: dict[str, Any]
    ) -> tuple[PoolServer | None, float]:
        """nats-py's hook between reconnection attempts: which server, after what wait."""
        ours = [server for server in pool if _host_port(server.uri.geturl()) in self._ours]
        if not ours:
            return None, _BACKOFF_MAX
        server = min(ours, key=lambda candidate: candidate.reconnects)
        if server.reconnects == 0:
            return server, 0.0
        wait = min(_BACKOFF_FIRST * 2 ** (server.reconnects - 1), _BACKOFF_MAX)
        # Jitter: the instances of a host do not all knock at the same instant.
        return server, wait * random.uniform(0.5, 1.0)  # noqa: S311 (not a secret)

    async def _up(self) -> None:
        again = self._ever_connected
        self._ever_connected = True
        self._outage_logged = False
        self._metrics.connected.set(1)
        url = self._client.connected_url
        fields = {"url": redact(url.geturl()) if url else "-", "reconnected": again}
        logger.info("bus_connected", extra={"fields": fields})
        self._on_connected()

    async def _reconnected(self) -> None:
        await self._up()

    async def _disconnected(self) -> None:
        self._metrics.connected.set(0)
        self._metrics.rtt.set(math.nan)
        if self._ever_connected and not self._closing:
            self._log_outage("bus_lost", None)

    async def _error(self, error: Exception) -> None:
        if self._closing:
            return
        if self.connected and not isinstance(error, _CONNECTION_ERRORS):
            # A slow consumer, a permission denied: the connection stays.
            logger.warning("bus_error", extra={"fields": {"error": str(error)}})
            return
        self._log_outage("bus_lost" if self._ever_connected else "bus_unreachable", error)

    def _log_outage(self, event: str, error: Exception | None) -> None:
        """Log the first sign of an outage; the failed attempts after it only at debug."""
        fields: dict[str, object] = {"servers": ",".join(redact(url) for url in self.servers)}
        if error is not None:
            fields["error"] = str(error) or type(error).__name__
        if self._outage_logged:
            logger.debug("bus_attempt_failed", extra={"fields": fields})
            return
        self._outage_logged = True
        logger.warning(event, extra={"fields": fields})

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None = None
    ) -> str | None:
        """Hand a message to the server, unless it cannot go now.

        Nothing is buffered while the connection is down: what is published then is lost.

        Returns:
            None once handed over, else why not: ``"disconnected"`` or ``"too_large"``
            (over the server's ``max_payload``, headers included).
        """
        if not self.connected:
            return "disconnected"
        size = len(payload) + (_headers_size(headers) if headers else 0)
        if size > self._client.max_payload:
            return "too_large"
        try:
            await self._client.publish(subject, payload, headers=dict(headers) if headers else None)
        except nats.errors.Error:
            return "disconnected"
        return None

    async def subscribe(self, subject: str) -> None:
        """Receive ``subject``'s messages; nothing happens while disconnected.

        A subscription made while reconnecting would reach the server twice, once
        replayed by nats-py and once from its buffer: the caller subscribes again
        once :attr:`connected` (``on_connected`` tells it).
        """
        async with self._subscribing:
            if subject in self._subscriptions or not self.connected:
                return
            # Lost meanwhile: the next connection has the caller subscribe again.
            with contextlib.suppress(nats.errors.Error):
                self._subscriptions[subject] = await self._client.subscribe(
                    subject, cb=self._receive
                )

    async def unsubscribe(self, subject: str) -> None:
        """Stop receiving ``subject``'s messages (also while disconnected)."""
        async with self._subscribing:
            subscription = self._subscriptions.pop(subject, None)
            if subscription is not None:
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()

    async def _receive(self, message: Msg) -> None:
        await self._on_message(message.subject, message.headers or {}, message.data)

    async def flush(self) -> bool:
        """Wait until the server has processed everything sent so far (a subscription
        made, say); False when disconnected or it did not answer in time."""
        if not self.connected:
            return False
        try:
            await self._client.flush(_RTT_TIMEOUT)
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    # --- the history: a JetStream stream on the same servers ------------------------------

    async def ensure_stream(self, config: js_api.StreamConfig, update: bool) -> bool:
        """Create the stream if it is missing; with ``update``, bring an existing one to
        ``config``. Whether the stream now has ``config``.

        Raises:
            nats.errors.Error: JetStream is off, has no quorum yet, or refused the config.
        """
        jetstream = self._client.jetstream(timeout=_STORE_TIMEOUT)
        try:
            await jetstream.add_stream(config)
        except BadRequestError as error:
            if error.err_code != _STREAM_NAME_IN_USE:
                raise
            if not update:
                return False
            await jetstream.update_stream(config)
        return True

    async def store(
        self, subject: str, payload: bytes, headers: Mapping[str, str], msg_id: str,
        deadline: float = STORE_DEADLINE,
    ) -> int | None:  # fmt: skip
        """Publish into the stream and wait until it is stored (replicated, when the stream
        is); the stream's sequence, or None when it could not be stored within ``deadline``
        seconds, the connection stayed down for :data:`BUS_RETURN_WAIT`, or it is over
        the server's ``max_payload``.

        Tried again while the stream has no leader; every try carries the same
        ``Nats-Msg-Id``, so the stream keeps the message once as long as every try falls
        within its duplicate window (which must outlast ``deadline``). A connection that
        is down is waited for only as long as the host's server takes to restart: the
        sender is not held for the whole deadline.
        """
        headers = {**headers, "Nats-Msg-Id": msg_id}
        size = len(payload) + _headers_size(headers)
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline
        away_until: float | None = None
        while loop.time() < until:
            if self.connected:
                away_until = None
                if size > self._client.max_payload:
                    return None
                # No try may answer after the deadline: a retry could land outside the window.
                left = max(0.05, min(_STORE_TIMEOUT, until - loop.time()))
                try:
                    jetstream = self._client.jetstream(timeout=left)
                    return (await jetstream.publish(subject, payload, headers=headers)).seq
                except (nats.errors.Error, TimeoutError):
                    pass
            elif away_until is None:
                away_until = loop.time() + BUS_RETURN_WAIT
            elif loop.time() >= away_until:
                return None
            await asyncio.sleep(_STORE_RETRY_WAIT)
        return None

    async def _retrying(
        self, request: Callable[[], Awaitable[T]], within: float = STORE_DEADLINE
    ) -> T | None:
        """``request()`` until it answers, for ``within`` seconds at most; None after."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            if self.connected:
                try:
                    return await request()
                except NotFoundError:
                    raise
                except (nats.errors.Error, TimeoutError):
                    pass
            await asyncio.sleep(_STORE_RETRY_WAIT)
        return None

    async def _read(
        self, request: Callable[[], Awaitable[StoredMessage]], within: float = READ_DEADLINE
    ) -> StoredMessage | None:
        try:
            found = await self._retrying(request, within)
        except NotFoundError as error:
            if error.err_code == _NO_STREAM:
                raise StreamMissing(error.description) from error
            return None
        if found is None:
            raise TimeoutError("the history did not answer")
        return found

    async def last_stored(self, stream: str, subject: str, within: float = READ_DEADLINE) -> int:
        """The sequence of the last message stored on ``subject``; 0 when there is none.

        Raises:
            TimeoutError: the stream did not answer within ``within`` seconds.
            StreamMissing: the stream is not there.
        """

        async def get() -> StoredMessage:
            return await self._client.jetstream(timeout=_STORE_TIMEOUT).get_last_msg(
                stream, subject
            )

        found = await self._read(get, within)
        return (found.seq or 0) if found else 0

    async def first_stored(self, stream: str, within: float = 0.0) -> int:
        """The stream's first sequence still stored (everything before it expired); asked
        again while the connection is down or the stream does not answer, for ``within``
        seconds (0: once).

        Raises:
            nats.errors.Error: the stream did not answer (or is not there).
            TimeoutError: not within ``within`` seconds.
        """

        async def info() -> js_api.StreamInfo:
            return await self._client.jetstream(timeout=_STORE_TIMEOUT).stream_info(stream)

        if within <= 0:
            found = await info()
        elif (answered := await self._retrying(info, within)) is None:
            raise TimeoutError("the history did not answer")
        else:
            found = answered
        return (found.state.first_seq or 1) if found.state else 1

    async def read_range(
        self, stream: str, subject: str, after: int, through: int
    ) -> tuple[list[tuple[int, Mapping[str, str], bytes]], bool]:
        """The messages stored on ``subject`` with sequences in (``after``, ``through``],
        at most :data:`READ_BATCH` of them, read in one request by a consumer of their own;
        and whether the stream holds nothing more on ``subject`` after the last of them.

        Raises:
            nats.errors.Error: the stream did not answer (or is not there).
        """
        jetstream = self._client.jetstream(timeout=_STORE_TIMEOUT)
        config = js_api.ConsumerConfig(
            name=self._client._nuid.next().decode(),
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
            ack_policy=js_api.AckPolicy.NONE,
            filter_subject=subject,
            inactive_threshold=_CONSUMER_IDLE,
            mem_storage=True,
            num_replicas=1,
        )
        info = await jetstream.add_consumer(stream, config)
        try:
            if not info.num_pending:
                return [], True
            assert config.name is not None
            pull = await jetstream.pull_subscribe_bind(consumer=config.name, stream=stream)
            try:
                fetched = await pull.fetch(min(READ_BATCH, info.num_pending), _STORE_TIMEOUT)
            finally:
                await pull.unsubscribe()
        finally:
            with contextlib.suppress(nats.errors.Error):
                await jetstream.delete_consumer(stream, config.name or "")
        found: list[tuple[int, Mapping[str, str], bytes]] = [
            (m.metadata.sequence.stream, m.headers or {}, m.data)
            for m in fetched
            if m.metadata.sequence.stream <= through
        ]
        exhausted = not fetched or fetched[-1].metadata.num_pending == 0
        return found, exhausted

    async def close(self) -> None:
        """Send what is buffered and disconnect; no further attempts."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        client = self._client
        if client.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await client.flush(_CLOSE_FLUSH_TIMEOUT)
        if client.is_connected or client.is_reconnecting or client.is_connecting:
            await client.close()
        self._metrics.connected.set(0)
        self._metrics.rtt.set(math.nan)
