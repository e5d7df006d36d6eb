"""Kafka sync, consuming side (`seekserve sync consume`): ingests other sites' usage and audit events into
the local store. Invariant: offsets are committed only after the database write and ingest is idempotent by
event_id, so a redelivered or duplicated message is stored once (at-least-once, effectively exactly-once)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry, Counter

from seekserve.gateway.sync import (
    BROKER_ERRORS,
    STORE_ERRORS,
    SyncConfig,
    describe_error,
    kafka_client_options,
    wait_event,
)
from seekserve.store.audit import AuditLog, AuditRecord
from seekserve.store.db import Database, upgrade
from seekserve.store.usage import UsageRecord, UsageStore

log = logging.getLogger(__name__)

_KINDS: dict[str, type[UsageRecord | AuditRecord]] = {"usage": UsageRecord, "audit": AuditRecord}
# what a bad message can raise while parsed or validated: json (ValueError), from_dict (Type/Key/Value)
_BAD_RECORD_ERRORS = (ValueError, TypeError, KeyError)


class MalformedEvent(ValueError):
    """A message that is not a seekserve sync event; the message text never includes the payload."""


@dataclass(frozen=True)
class SyncEvent:
    kind: str                          # "usage" | "audit"
    site: str                          # the site that produced it
    event_id: str
    record: UsageRecord | AuditRecord


def parse_event(value: bytes | None) -> SyncEvent:
    """Decode one Kafka message value (the envelope `event_payload` writes)."""
    try:
        data = json.loads(value) if value is not None else None
    except ValueError:
        raise MalformedEvent("not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise MalformedEvent("not a JSON object")
    kind, site, event_id, body = data.get("type"), data.get("site"), data.get("event_id"), data.get("record")
    if kind not in _KINDS or not (isinstance(site, str) and isinstance(event_id, str)
                                  and isinstance(body, dict)):
        raise MalformedEvent("missing or invalid type/site/event_id/record")
    try:
        record = _KINDS[kind].from_dict(body)
    except _BAD_RECORD_ERRORS as err:
        raise MalformedEvent(f"invalid {kind} record ({type(err).__name__})") from None
    if record.event_id != event_id or record.site != site:
        raise MalformedEvent("envelope and record disagree on event_id or site")
    return SyncEvent(kind, site, event_id, record)


@dataclass
class ConsumeStats:
    """Running totals of one SyncConsumer."""

    num_read: int = 0          # messages read from Kafka
    num_ingested: int = 0      # new rows written
    num_duplicates: int = 0    # events already stored (redelivery, or another relay's copy)
    num_own_site: int = 0      # our own events coming back: skipped
    num_malformed: int = 0


class SyncConsumer:
    """Reads both sync topics (all partitions, assigned by us: no group rebalances to wait for) and commits
    offsets under `group_id`, so a restarted consumer resumes where it stopped."""

    def __init__(self, config: SyncConfig, usage_store: UsageStore, audit_log: AuditLog,
                 group_id: str | None = None, registry: CollectorRegistry | None = None) -> None:
        self._config, self._usage, self._audit = config, usage_store, audit_log
        self.group_id = group_id or f"seekserve-sync-{config.site}"
        self._options = kafka_client_options(config)
        self._consumer: AIOKafkaConsumer | None = None
        self.stats = ConsumeStats()
        r = registry if registry is not None else CollectorRegistry()
        self._ingested = Counter("seekserve:sync_events_ingested", "Other sites' events stored", ["type"],
                                 registry=r)
        self._malformed = Counter("seekserve:sync_consumer_malformed", "Sync messages skipped as malformed",
                                  registry=r)

    async def start(self) -> None:
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(**self._options, group_id=self.group_id, enable_auto_commit=False,
                                    auto_offset_reset="earliest", metadata_max_age_ms=5000)
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def consume_once(self, timeout: float = 1.0) -> int:
        """Ingest what arrives within `timeout` seconds (one fetch); returns how many messages were read,
        0 when there was nothing new."""
        await self.start()
        assert self._consumer is not None
        if not self._assign(self._consumer):
            await asyncio.sleep(timeout)  # the topics do not exist yet: nothing to read
            return 0
        batches = await self._consumer.getmany(timeout_ms=int(timeout * 1000),
                                               max_records=self._config.batch_size)
        if not batches:
            return 0
        try:
            await asyncio.to_thread(self._ingest, self._parse(batches))
        except BaseException:
            # the position already moved past these messages: rewind, so the next fetch retries them
            for tp, messages in batches.items():
                self._consumer.seek(tp, messages[0].offset)
            raise
        await self._consumer.commit({tp: messages[-1].offset + 1 for tp, messages in batches.items()})
        return sum(len(messages) for messages in batches.values())

    async def run(self, stop_event: asyncio.Event) -> None:
        """Consume until `stop_event` is set, riding out broker and database outages with backoff."""
        delay = 0.5
        try:
            while not stop_event.is_set():
                try:
                    await self.consume_once(timeout=1.0)
                    delay = 0.5
                    continue
                except BROKER_ERRORS as err:
                    log.warning("sync consumer: Kafka error (%s); retrying", describe_error(err))
                    await self.stop()  # a fresh consumer re-bootstraps and re-reads committed offsets
                except STORE_ERRORS as err:
                    log.warning("sync consumer: database error (%s); retrying", err)
                await wait_event(stop_event, delay)
                delay = min(delay * 2, self._config.max_backoff)
        finally:
            await self.stop()

    def _assign(self, consumer: AIOKafkaConsumer) -> bool:
        wanted = {TopicPartition(topic, p) for topic in self._config.topics
                  for p in (consumer.partitions_for_topic(topic) or ())}
        if wanted and wanted != consumer.assignment():
            consumer.assign(sorted(wanted))  # positions restart from the committed offsets
        return bool(wanted)

    def _parse(self, batches: Mapping[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> list[SyncEvent]:
        events = []
        for tp, messages in batches.items():
            for message in messages:
                self.stats.num_read += 1
                try:
                    event = parse_event(message.value)
                except MalformedEvent as err:
                    self._count_malformed(f"{tp.topic}/{tp.partition}@{message.offset}", err)
                    continue
                if event.site == self._config.site:
                    self.stats.num_own_site += 1
                else:
                    events.append(event)
        return events

    def _ingest(self, events: list[SyncEvent]) -> None:
        """Write the events (runs in a worker thread). One transaction per kind; a record the store refuses
        sends that kind down the one-by-one path, so one bad record cannot block the others."""
        for kind in _KINDS:
            records = [e.record for e in events if e.kind == kind]
            if not records:
                continue
            try:
                num_new = self._store(kind, records)
            except _BAD_RECORD_ERRORS:
                num_new = sum(self._store_one(kind, record) for record in records)
            self._ingested.labels(type=kind).inc(num_new)
            self.stats.num_ingested += num_new
            self.stats.num_duplicates += len(records) - num_new

    def _store(self, kind: str, records: list[Any]) -> int:
        return self._usage.add_many(records) if kind == "usage" else self._audit.ingest(records)

    def _store_one(self, kind: str, record: UsageRecord | AuditRecord) -> int:
        try:
            return self._store(kind, [record])
        except _BAD_RECORD_ERRORS as err:
            # the store's message may quote field values: name the error type only, never the payload
            self._count_malformed(f"{kind} event {record.event_id}", MalformedEvent(type(err).__name__))
            return 0

    def _count_malformed(self, where: str, err: BaseException) -> None:
        self.stats.num_malformed += 1
        self._malformed.inc()
        log.warning("sync consumer: skipped malformed message %s: %s", where, err)


async def run_consumer_cli(database_url: str, bootstrap: str, site: str, group_id: str | None = None,
                           once: bool = False, *, options: Mapping[str, Any] | None = None,
                           idle_timeout: float = 5.0) -> int:
    """`seekserve sync consume`: migrate the database, then ingest until stopped (SIGINT/SIGTERM) or, with
    `once`, until no message arrives for `idle_timeout` seconds. `options` are further SyncConfig fields
    (topics, security). Returns the exit status: 0 done, 1 database error, 2 bad config or Kafka error."""
    try:
        config = SyncConfig(bootstrap_servers=bootstrap, site=site, **dict(options or {}))
        upgrade(database_url)
        db = Database(database_url)
    except (ValueError, TypeError) as err:
        print(f"seekserve sync consume: {err}", file=sys.stderr)
        return 2
    except STORE_ERRORS as err:
        print(f"seekserve sync consume: {describe_error(err)}", file=sys.stderr)
        return 1
    try:
        consumer = SyncConsumer(config, UsageStore(db), AuditLog(db, site), group_id)
    except ValueError as err:  # SASL settings without a password, a site name too long, ...
        db.close()
        print(f"seekserve sync consume: {err}", file=sys.stderr)
        return 2
    try:
        if once:
            return await _consume_until_idle(consumer, idle_timeout)
        await _consume_until_signal(consumer)
        return 0
    finally:
        db.close()


async def _consume_until_signal(consumer: SyncConsumer) -> None:
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop_event.set)
    try:
        await consumer.run(stop_event)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    _print_stats(consumer.stats)


async def _consume_until_idle(consumer: SyncConsumer, idle_timeout: float) -> int:
    try:
        caught_up = False
        while not caught_up:   # until a fetch comes back empty
            caught_up = await consumer.consume_once(timeout=idle_timeout) == 0
    except BROKER_ERRORS as err:
        print(f"seekserve sync consume: Kafka error: {describe_error(err)}", file=sys.stderr)
        return 2
    except STORE_ERRORS as err:
        print(f"seekserve sync consume: database error: {err}", file=sys.stderr)
        return 1
    finally:
        await consumer.stop()
    _print_stats(consumer.stats)
    return 0


def _print_stats(stats: ConsumeStats) -> None:
    print(f"read {stats.num_read} messages: {stats.num_ingested} events stored, {stats.num_duplicates} "
          f"already stored, {stats.num_own_site} own-site skipped, {stats.num_malformed} malformed")
