"""One process's connection to the bus, kept for the life of the process.

The bus carries room messages and presence between the processes of the fleet;
:mod:`app.rooms` decides what goes on it. This module keeps the connection: it
connects in the background (the process serves meanwhile), to the first server of its
list that answers (the host's own comes first, the other hosts' after it), logs a loss
once, tries again forever, and keeps ``wsapp_bus_connected`` and the round trip in the
metrics. nats-py subscribes again by itself after a reconnection.

A server about to stop (lame duck mode, the bus role's restarts) tells its clients so;
the process then moves to the next server at once, rather than wait to be cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl
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
# seconds). After a loss, each server of the list once, in order and without a wait
# (a restarting server refuses at once, and the next takes over within a second); then
# rounds with waits doubling from 50 ms to 2 s.
_START_RETRY = 1
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
_CONNECT_TIMEOUT = 2
# A server on another host that vanished closes nothing: the pings find it (no answer
# to 2 pings 2 s apart), as they find a hung one.
_PING_INTERVAL = 2
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
        servers: URLs of the servers to use, in order of preference: the host's own
            first. Servers the cluster advertises are never used.
        token: auth token for the servers, or empty. Never logged.
        name: this process's label, shown in the server's list of connections.
        metrics: the bus series to keep.
        on_message: called for every message received on a subscription.
        on_connected: called on each connection, once subscriptions are restored.
        ca_file: CA (PEM) that verifies the servers of ``tls://`` URLs, whose
            certificates must name the URL's host; empty: the system's CAs.
    """

    def __init__(
        self,
        servers: Sequence[str],
        token: str,
        name: str,
        metrics: BusMetrics,
        on_message: OnMessage,
        on_connected: Callable[[], None],
        ca_file: str = "",
    ) -> None:
        self.servers = list(servers)
        self._ca_file = ca_file
        self._token = token
        self._name = name
        self._metrics = metrics
        self._on_message = on_message
        self._on_connected = on_connected
        self._order = [_host_port(url) for url in self.servers]
        # The servers tried since the connection was lost, this round (_next_server).
        self._tried: set[tuple[str, int]] = set()
        self._rounds = 0
        self._client = Client()
        self._subscriptions: dict[str, Subscription] = {}
        # One subscribe or unsubscribe at a time: two joins of a room at once would
        # otherwise both find it unsubscribed and make two subscriptions.
        self._subscribing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._moving: asyncio.Task[None] | None = None
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

    def _tls(self) -> ssl.SSLContext | None:
        if not any(urlsplit(url).scheme == "tls" for url in self.servers):
            return None
        return ssl.create_default_context(cafile=self._ca_file or None)

    async def _connect_and_measure(self) -> None:
        await self._client.connect(
            servers=self.servers,
            name=self._name,
            token=self._token or None,
            tls=self._tls(),
            # The list's order is the preference: the host's own server first.
            dont_randomize=True,
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
            lame_duck_mode_cb=self._lame_duck,
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
        """nats-py's hook before each reconnection attempt: which server, after what wait.

        Each call after the first of an outage follows a failed attempt. A round tries
        every server of the list once, in its order, at once; the rounds after the first
        wait longer and longer, so that a bus that is down everywhere is not hammered.
        """
        known = {_host_port(server.uri.geturl()): server for server in pool}
        candidates = [address for address in self._order if address in known]
        if not candidates:
            return None, _BACKOFF_MAX
        untried = [address for address in candidates if address not in self._tried]
        wait = 0.0
        if not untried:
            self._tried.clear()
            self._rounds += 1
            untried = candidates
            wait = min(_BACKOFF_FIRST * 2 ** (self._rounds - 1), _BACKOFF_MAX)
            # Jitter: the instances of a host do not all knock at the same instant.
            wait *= random.uniform(0.5, 1.0)  # noqa: S311 (not a secret)
        self._tried.add(untried[0])
        return known[untried[0]], wait

    async def _lame_duck(self) -> None:
        """The server is about to stop (lame duck mode): move to the next one now. A task
        of its own: this runs inside the connection's read loop, which the move closes."""
        url = self._client.connected_url
        fields = {"url": redact(url.geturl()) if url else "-"}
        logger.info("bus_server_leaving", extra={"fields": fields})
        if url is not None:
            # Not tried again this round: it takes no new connection while it leaves.
            self._tried.add(_host_port(url.geturl()))
        self._moving = asyncio.create_task(self._client.force_reconnect(), name="bus-move")

    async def _up(self) -> None:
        self._tried.clear()
        self._rounds = 0
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
                    ack = await jetstream.publish(subject, payload, headers=headers)
                except (nats.errors.Error, TimeoutError):
                    pass
                else:
                    # A try that finds an earlier one of the same id still on its way
                    # through the stream's raft is told "duplicate" with sequence 0 (the
                    # leader stages the id before it knows the sequence): asked again, it
                    # is answered with the sequence once the earlier try is stored.
                    if ack.seq:
                        return ack.seq
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

    async def count_after(self, stream: str, subject: str, after: int) -> int:
        """How many messages the stream holds on ``subject`` with sequences after ``after``,
        counted by a consumer of their own (JetStream has no count by subject and start).

        Raises:
            nats.errors.Error: the stream did not answer (or is not there).
        """
        jetstream = self._client.jetstream(timeout=_STORE_TIMEOUT)
        info = await jetstream.add_consumer(stream, self._reader(subject, after))
        with contextlib.suppress(nats.errors.Error):
            await jetstream.delete_consumer(stream, info.name)
        return info.num_pending or 0

    def _reader(self, subject: str, after: int) -> js_api.ConsumerConfig:
        """An ephemeral consumer of ``subject``'s messages after ``after``, gone when done
        or unused for a while (a read cut short)."""
        return js_api.ConsumerConfig(
            name=self._client._nuid.next().decode(),
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
            ack_policy=js_api.AckPolicy.NONE,
            filter_subject=subject,
            inactive_threshold=_CONSUMER_IDLE,
            mem_storage=True,
            num_replicas=1,
        )

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
        config = self._reader(subject, after)
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
        for task in (self._task, self._moving):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        client = self._client
        if client.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await client.flush(_CLOSE_FLUSH_TIMEOUT)
        if client.is_connected or client.is_reconnecting or client.is_connecting:
            await client.close()
        self._metrics.connected.set(0)
        self._metrics.rtt.set(math.nan)
