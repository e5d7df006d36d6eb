"""Kafka sync, publishing side: usage and audit events go to the durable outbox first, and `OutboxRelay`
ships the outbox to Kafka in id order. Invariant: a row is marked delivered only after the broker
acknowledged it (acks=all), so an outage or a crash may duplicate an event (consumers dedupe by
event_id) but never lose or reorder one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.exc import SQLAlchemyError

from seekserve.store.audit import AuditRecord
from seekserve.store.db import StoreError
from seekserve.store.outbox import Outbox, OutboxItem
from seekserve.store.usage import UsageRecord

log = logging.getLogger(__name__)

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# Everything that means "the broker is unreachable or refused us": retried with backoff, never skipped.
# (In Python 3.11 asyncio.TimeoutError is TimeoutError, an OSError.)
BROKER_ERRORS: tuple[type[BaseException], ...] = (KafkaError, OSError)
STORE_ERRORS: tuple[type[BaseException], ...] = (StoreError, SQLAlchemyError)
# One relay batch per topic is sent as few Kafka record batches as possible, each awaited before the next,
# so a failure can never leave a later event delivered and an earlier one not (no holes in the order).
_MAX_BATCH_BYTES = 1 << 20
_TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS


@dataclass(frozen=True)
class SyncConfig:
    """Where and how to sync. Secrets are never fields: `sasl_password_env` names the variable holding one."""

    bootstrap_servers: str           # "host:port[,host:port...]"
    site: str                        # this deployment's name; also the Kafka message key (one partition)
    usage_topic: str = "seekserve.usage"
    audit_topic: str = "seekserve.audit"
    client_id: str = "seekserve"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None     # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password_env: str | None = None  # name of the environment variable with the SASL password
    ssl_cafile: str | None = None         # CA bundle for SSL/SASL_SSL (system CAs when None)
    # idempotent producer (producer id + sequence numbers): broker-side dedupe of the producer's own retries
    enable_idempotence: bool = True
    batch_size: int = 500                 # outbox rows read per round
    poll_interval: float = 0.5            # seconds between outbox polls when idle (notify() cuts it short)
    max_backoff: float = 30.0             # cap of the exponential backoff while the broker is unreachable
    send_timeout: float = 30.0            # a send not acknowledged within this counts as an outage
    create_topics: bool = True            # create the two topics on connect (existing ones are kept)
    topic_partitions: int = 3
    topic_replication_factor: int = 1
    retain_delivered: float = 86400.0     # seconds a delivered outbox row is kept before it is deleted

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip() or not self.site.strip():
            raise ValueError("sync needs bootstrap_servers and a site name")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"security_protocol must be one of {SECURITY_PROTOCOLS}, "
                             f"got {self.security_protocol!r}")
        if self.batch_size < 1 or self.topic_partitions < 1 or self.topic_replication_factor < 1:
            raise ValueError("batch_size, topic_partitions and topic_replication_factor must be >= 1")
        if min(self.poll_interval, self.max_backoff, self.send_timeout) <= 0:
            raise ValueError("poll_interval, max_backoff and send_timeout must be > 0")

    @property
    def topics(self) -> tuple[str, str]:
        return (self.usage_topic, self.audit_topic)


def kafka_client_options(config: SyncConfig) -> dict[str, Any]:
    """Connection keyword arguments shared by aiokafka's producer, consumer and admin client.
    The result holds the SASL password: pass it on, never log it."""
    options: dict[str, Any] = {"bootstrap_servers": config.bootstrap_servers, "client_id": config.client_id,
                               "security_protocol": config.security_protocol,
                               "request_timeout_ms": int(config.send_timeout * 1000)}
    if "SSL" in config.security_protocol:
        options["ssl_context"] = create_ssl_context(cafile=config.ssl_cafile)
    if config.security_protocol.startswith("SASL"):
        password = os.environ.get(config.sasl_password_env or "")
        if not config.sasl_username or password is None:
            raise ValueError(f"{config.security_protocol} needs sasl_username and the password in the "
                             f"environment variable named by sasl_password_env "
                             f"({config.sasl_password_env!r})")
        options.update(sasl_mechanism=config.sasl_mechanism or "PLAIN",
                       sasl_plain_username=config.sasl_username, sasl_plain_password=password)
    return options


def event_payload(kind: str, record: UsageRecord | AuditRecord) -> dict[str, Any]:
    """The envelope of one event on the wire (the Kafka message value, as JSON)."""
    return {"type": kind, "site": record.site, "event_id": record.event_id, "record": record.to_dict()}


class EventPublisher:
    """Queues events in the outbox; cheap and synchronous (callers run it in a worker thread). `notify`,
    typically `OutboxRelay.notify`, asks the relay to send now instead of at its next poll."""

    def __init__(self, outbox: Outbox, config: SyncConfig, notify: Callable[[], None] | None = None) -> None:
        self._outbox, self._config, self._notify = outbox, config, notify

    def publish_usage(self, records: Sequence[UsageRecord]) -> int:
        """Queue usage records; returns how many were new (a re-published event_id is queued once)."""
        return self._publish(self._config.usage_topic, "usage", records)

    def publish_audit(self, records: Sequence[AuditRecord]) -> int:
        """Queue audit records; returns how many were new."""
        return self._publish(self._config.audit_topic, "audit", records)

    def _publish(self, topic: str, kind: str, records: Sequence[UsageRecord | AuditRecord]) -> int:
        if not records:
            return 0
        num_new = self._outbox.put_many((topic, event_payload(kind, r), r.event_id) for r in records)
        if num_new and self._notify is not None:
            self._notify()
        return num_new


class RelayMetrics:
    """The relay's Prometheus metrics, in the caller's registry (or a private one)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.pending = Gauge("seekserve:sync_outbox_pending", "Events waiting in the outbox", registry=r)
        self.published = Counter("seekserve:sync_events_published", "Events acknowledged by Kafka", ["topic"],
                                 registry=r)
        self.errors = Counter("seekserve:sync_errors", "Failed relay rounds (broker or store)", registry=r)
        self.broker_up = Gauge("seekserve:sync_broker_up", "1 when the last contact with Kafka succeeded",
                               registry=r)


def describe_error(err: BaseException) -> str:
    """`Name: message` once (aiokafka's messages already start with their class name)."""
    text, name = str(err), type(err).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def _discard_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: the send was already counted as failed


async def wait_event(event: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `event` gets set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


class OutboxRelay:
    """Background task draining the outbox into Kafka: `start()`, `notify()`, `stop()`."""

    def __init__(self, config: SyncConfig, outbox: Outbox, registry: CollectorRegistry | None = None) -> None:
        self._config, self._outbox = config, outbox
        self.metrics = RelayMetrics(registry)
        # built once, so a bad security setup fails here and not inside the background task
        self._options = kafka_client_options(config)
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._broker_up: bool | None = None  # None until the first contact
        self._store_failing = False
        self._partitioner = DefaultPartitioner()
        self._next_purge = 0.0              # monotonic time of the next sweep of delivered rows

    @property
    def is_broker_up(self) -> bool:
        return bool(self._broker_up)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the relay is already running")
        self._loop = asyncio.get_running_loop()
        self._wakeup, self._stopping = asyncio.Event(), asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="seekserve-sync-relay")
        self._task.add_done_callback(self._on_task_done)

    def notify(self) -> None:
        """Wake the relay now; safe to call from any thread (publishers run in worker threads)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wakeup.set)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop after delivering what can be delivered within `timeout`; the rest stays in the outbox."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._wakeup.set()
        # asyncio.wait never raises the task's own error: _on_task_done has already logged it
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # a round still running after `timeout` is stuck on an unreachable broker; a full close would flush
        # until its batch expires (send_timeout, 30 s by default): bound it, the unsent rows stay pending
        await self._close_producer(None if done else 1.0)
        try:
            num_left = await asyncio.to_thread(self._outbox.count_pending)
        except STORE_ERRORS as err:  # shutting down anyway: say so, do not fail the shutdown
            log.warning("sync relay stopped; cannot count the outbox (%s)", describe_error(err))
            return
        if num_left:
            log.info("sync relay stopped; %d events stay in the outbox until the next start", num_left)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("sync relay died; events accumulate in the outbox until restart",
                      exc_info=task.exception())

    async def _run(self) -> None:
        delay = self._initial_backoff()
        while True:
            self._wakeup.clear()
            try:
                has_more = await self._deliver_round()
            except BROKER_ERRORS as err:
                await self._on_broker_error(err)
            except STORE_ERRORS as err:
                self._on_store_error(err)
            else:
                self._on_round_ok()
                delay = self._initial_backoff()
                if not has_more:
                    if self._stopping.is_set():
                        return
                    await wait_event(self._wakeup, self._config.poll_interval)
                continue
            if self._stopping.is_set():
                return
            await wait_event(self._stopping, delay)  # notify() must not cut a backoff short: it would hammer
            delay = min(delay * 2, self._config.max_backoff)

    def _initial_backoff(self) -> float:
        return min(0.5, self._config.max_backoff)

    async def _deliver_round(self) -> bool:
        """Send one batch of pending events; True when more may be waiting."""
        items: list[OutboxItem] = []
        try:   # the pending gauge is refreshed even when connecting fails (during an outage it grows)
            producer = await self._connect()
            items = await asyncio.to_thread(self._outbox.pending, self._config.batch_size)
            for topic in dict.fromkeys(item.topic for item in items):
                await self._send_topic(producer, topic, [item for item in items if item.topic == topic])
        finally:
            self.metrics.pending.set(await asyncio.to_thread(self._outbox.count_pending))
        more = len(items) >= self._config.batch_size
        if not more:
            await self._purge_delivered()
        return more

    async def _purge_delivered(self) -> None:
        """Delivered rows are kept `retain_delivered` seconds (for inspection), then deleted, hourly."""
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + 3600.0
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self._config.retain_delivered)
        removed = await asyncio.to_thread(self._outbox.purge_delivered, cutoff)
        if removed:
            log.info("removed %d delivered events older than %.0f h from the outbox", removed,
                     self._config.retain_delivered / 3600)

    async def _send_topic(self, producer: AIOKafkaProducer, topic: str, items: list[OutboxItem]) -> None:
        # key = site: all of a site's events land in one partition, so Kafka keeps their order
        key = self._config.site.encode()
        partitions = sorted(await producer.partitions_for(topic))
        partition = self._partitioner(key, partitions, partitions)
        batch, batch_items = producer.create_batch(), list[OutboxItem]()
        for item in items:
            value = json.dumps(item.payload, separators=(",", ":")).encode()
            kind = str(item.payload.get("type", ""))
            headers = [("event_id", item.event_id.encode()), ("type", kind.encode())]
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                # full: ship it first; an empty batch accepts any one record, even an oversized one
                await self._send_batch(producer, batch, topic, partition, batch_items)
                batch, batch_items = producer.create_batch(), []
                batch.append(key=key, value=value, timestamp=None, headers=headers)
            batch_items.append(item)
        if batch_items:
            await self._send_batch(producer, batch, topic, partition, batch_items)

    async def _send_batch(self, producer: AIOKafkaProducer, batch: Any, topic: str, partition: int,
                          items: list[OutboxItem]) -> None:
        ids = [item.id for item in items]
        try:
            future = await producer.send_batch(batch, topic, partition=partition)
            # aiokafka fails the batch itself after send_timeout (its request timeout); this longer bound is
            # a safety net. asyncio.wait, not wait_for: cancelling the future would not stop the send.
            try:
                done, _ = await asyncio.wait({future}, timeout=self._config.send_timeout + 2.0)
            except asyncio.CancelledError:           # the relay is stopping: the send's outcome is moot
                future.add_done_callback(_discard_outcome)
                raise
            if not done:
                future.add_done_callback(_discard_outcome)  # whatever it becomes, it is handled here
                raise KafkaTimeoutError(f"no acknowledgement from Kafka within {self._config.send_timeout}s")
            future.result()
        except BROKER_ERRORS:
            await asyncio.to_thread(self._outbox.note_attempt, ids)
            raise
        await asyncio.to_thread(self._outbox.mark_delivered, ids)
        self.metrics.published.labels(topic=topic).inc(len(ids))

    async def _connect(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        if self._config.create_topics:
            await self._ensure_topics()
        producer = AIOKafkaProducer(**self._options, acks="all",
                                    enable_idempotence=self._config.enable_idempotence, linger_ms=0,
                                    max_batch_size=_MAX_BATCH_BYTES, max_request_size=2 * _MAX_BATCH_BYTES)
        try:
            await asyncio.wait_for(producer.start(), self._config.send_timeout)
        except BaseException as err:
            await producer.stop()  # a failed start leaves connections and tasks behind
            if self._config.enable_idempotence and isinstance(err, KafkaError) \
                    and not isinstance(err, KafkaConnectionError):
                # the broker answered but refused InitProducerId (Tansu does): say what to change
                raise KafkaError(f"{describe_error(err)} at producer start; a broker without idempotent "
                                 "producer support needs enable_idempotence=False") from err
            raise
        self._producer = producer
        return producer

    async def _ensure_topics(self) -> None:
        admin = AIOKafkaAdminClient(**self._options)
        try:
            await asyncio.wait_for(admin.start(), self._config.send_timeout)
            wanted = [NewTopic(t, self._config.topic_partitions, self._config.topic_replication_factor)
                      for t in self._config.topics]
            response = await admin.create_topics(wanted)
        finally:
            await admin.close()
        for topic, code, message in response.topic_errors:
            if code not in (0, _TOPIC_EXISTS):
                # e.g. no CreateTopics permission: the topics may have been created by an operator
                log.warning("could not create Kafka topic %s (error %d: %s); sending anyway",
                            topic, code, message)

    async def _close_producer(self, timeout: float | None = None) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            # stop() flushes; with the broker gone that lasts until the batch expires (request timeout =
            # send_timeout), so the default bound is only a safety net
            await asyncio.wait_for(producer.stop(), timeout or self._config.send_timeout + 5)
        except BROKER_ERRORS as err:
            log.debug("closing the Kafka producer failed: %s", type(err).__name__)

    async def _on_broker_error(self, err: BaseException) -> None:
        self.metrics.errors.inc()
        self.metrics.broker_up.set(0)
        if self._broker_up is not False:
            log.warning("Kafka unreachable (%s); events wait in the outbox and are retried with backoff",
                        describe_error(err))
        self._broker_up = False
        await self._close_producer()

    def _on_store_error(self, err: BaseException) -> None:
        self.metrics.errors.inc()
        if not self._store_failing:
            log.warning("sync relay cannot read the outbox (%s); retrying", describe_error(err))
        self._store_failing = True

    def _on_round_ok(self) -> None:
        if self._broker_up is False:
            log.info("Kafka reachable again; the outbox is being delivered")
        if self._store_failing:
            log.info("sync relay can read the outbox again")
        self._broker_up, self._store_failing = True, False
        self.metrics.broker_up.set(1)
