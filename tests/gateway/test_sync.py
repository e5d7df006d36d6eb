"""Kafka sync against a real Kafka-protocol broker (Tansu on loopback): outbox, relay, Kafka, then the
consumer of another site's database. Every event must arrive exactly once (after dedupe by event_id), in
order per site, through a broker outage and a seekserve restart in between."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from seekserve.gateway.sync import EventPublisher, OutboxRelay, SyncConfig, event_payload
from seekserve.gateway.sync_consumer import SyncConsumer, run_consumer_cli
from seekserve.store.audit import AuditLog
from seekserve.store.db import Database, StoreError, upgrade
from seekserve.store.outbox import Outbox
from seekserve.store.usage import UsageRecord, UsageStore
from tests.gateway.broker import TansuBroker

# Tansu rejects aiokafka's InitProducerId v0 (it wants the v3+ producer_id/epoch = -1), so the idempotent
# producer cannot start against it; duplicates from retries are absorbed by the consumer's dedupe anyway.
TANSU_OPTIONS: dict[str, Any] = {"enable_idempotence": False, "send_timeout": 2.0, "max_backoff": 0.5,
                                 "poll_interval": 0.05}


def open_db(path: Path) -> Database:
    url = f"sqlite:///{path}"
    upgrade(url)
    return Database(url)


def sync_config(broker: TansuBroker, site: str, **overrides: Any) -> SyncConfig:
    return SyncConfig(bootstrap_servers=broker.bootstrap, site=site, **{**TANSU_OPTIONS, **overrides})


def beta_consumer(broker: TansuBroker, db: Database, **kwargs: Any) -> SyncConsumer:
    """The consumer of site "beta", ingesting into `db`."""
    return SyncConsumer(sync_config(broker, "beta"), UsageStore(db), AuditLog(db, "beta"), **kwargs)


class Site:
    """One seekserve deployment's sync side: its database, outbox, publisher and relay."""

    def __init__(self, broker: TansuBroker, db_path: Path, name: str, **overrides: Any) -> None:
        self.name, self.db = name, open_db(db_path)
        self.config = sync_config(broker, name, **overrides)
        self.outbox = Outbox(self.db)
        self.registry = CollectorRegistry()
        self.relay = OutboxRelay(self.config, self.outbox, self.registry)
        self.publisher = EventPublisher(self.outbox, self.config, notify=self.relay.notify)
        self.audit = AuditLog(self.db, name)
        self.num_usage = 0

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})

    def serve_requests(self, count: int) -> tuple[list[str], list[str]]:
        """What the gateway does per finished request: one usage and one audit event, published."""
        usage = [UsageRecord(site=self.name, request_id=f"req-{self.num_usage + i}", key_id="key-1",
                             tenant="acme", model="seekserve-tiny", backend="local", prompt_tokens=10 + i,
                             completion_tokens=5) for i in range(count)]
        self.num_usage += count
        audit = self.audit.append_many([{"actor": "key-1", "tenant": "acme", "action": "chat.completion",
                                         "target": r.request_id} for r in usage])
        self.publisher.publish_usage(usage)
        self.publisher.publish_audit(audit)
        return [r.event_id for r in usage], [r.event_id for r in audit]


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0,
                     what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if await outcome if inspect.isawaitable(outcome) else outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def drained(site: Site) -> None:
    await eventually(lambda: asyncio.to_thread(lambda: site.outbox.count_pending() == 0), what="empty outbox")


async def consume_until(consumer: SyncConsumer, num_ingested: int, timeout: float = 20.0) -> None:
    async def caught_up() -> bool:
        await consumer.consume_once(timeout=0.2)
        return consumer.stats.num_ingested >= num_ingested
    await eventually(caught_up, timeout, f"{num_ingested} ingested events")


async def topic_event_ids(bootstrap: str, topic: str) -> list[str]:
    """Every event_id in the topic, in log order per partition (duplicates included)."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                              enable_auto_commit=False)
    await reader.start()
    try:
        reader.assign([TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())])
        ids: list[str] = []
        while batches := await reader.getmany(timeout_ms=500):
            for messages in batches.values():
                ids += [json.loads(m.value)["event_id"] for m in messages]
        return ids
    finally:
        await reader.stop()


def first_occurrences(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def assert_ingested_once(db: Database, origin: str, usage_ids: list[str], audit_ids: list[str]) -> None:
    """The other site's tables hold each event exactly once, and the audit chain arrived intact, in order."""
    usage = UsageStore(db).query(limit=10_000)
    assert sorted(r.event_id for r in usage) == sorted(usage_ids)
    log = AuditLog(db, "beta")
    audit = log.query(site=origin, limit=10_000)
    assert sorted(r.event_id for r in audit) == sorted(audit_ids)
    # local seq follows ingest order; the chain verifies only if every link came in order
    assert [r.event_id for r in sorted(audit, key=lambda r: r.seq or 0)] == audit_ids
    assert log.verify(origin) == (True, None)


def test_events_reach_the_other_site_once_and_in_order(broker: TansuBroker, tmp_path: Path) -> None:
    async def main() -> None:
        alpha = Site(broker, tmp_path / "alpha.db", "alpha", batch_size=16)  # several relay rounds
        beta_db = open_db(tmp_path / "beta.db")
        consumer = beta_consumer(broker, beta_db)
        await alpha.relay.start()
        try:
            usage_ids, audit_ids = alpha.serve_requests(60)
            await drained(alpha)
            await consume_until(consumer, 120)
        finally:
            await alpha.relay.stop()
            await consumer.stop()
        assert alpha.metric("seekserve:sync_events_published_total", {"topic": "seekserve.usage"}) == 60
        assert alpha.metric("seekserve:sync_broker_up") == 1
        assert alpha.metric("seekserve:sync_outbox_pending") == 0
        assert first_occurrences(await topic_event_ids(broker.bootstrap, "seekserve.usage")) == usage_ids
        assert first_occurrences(await topic_event_ids(broker.bootstrap, "seekserve.audit")) == audit_ids
        assert_ingested_once(beta_db, "alpha", usage_ids, audit_ids)
        assert consumer.stats.num_malformed == 0

    asyncio.run(main())


def test_outage_then_restart_loses_nothing(broker: TansuBroker, tmp_path: Path) -> None:
    """Broker stops mid-test; requests keep being served; seekserve restarts while Kafka is still down;
    Kafka returns: every event reaches the other site exactly once. (Tansu's memory storage forgets its
    topics on stop, so events consumed before the outage are checked before it.)"""
    async def main() -> None:
        alpha = Site(broker, tmp_path / "alpha.db", "alpha")
        beta_db = open_db(tmp_path / "beta.db")
        consumer = beta_consumer(broker, beta_db)
        await alpha.relay.start()
        usage_ids, audit_ids = alpha.serve_requests(20)
        await drained(alpha)
        await consume_until(consumer, 40)
        await consumer.stop()

        broker.stop()
        for _ in range(3):  # the gateway keeps serving while Kafka is gone
            more_usage, more_audit = alpha.serve_requests(10)
            usage_ids += more_usage
            audit_ids += more_audit
        await eventually(lambda: alpha.metric("seekserve:sync_broker_up") == 0, what="outage seen")
        assert await asyncio.to_thread(alpha.outbox.count_pending) == 60
        await alpha.relay.stop()  # seekserve shuts down with the events still waiting

        restarted = Site(broker, tmp_path / "alpha.db", "alpha")  # same database file: a new process
        restarted.num_usage = alpha.num_usage
        await restarted.relay.start()
        more_usage, more_audit = restarted.serve_requests(5)
        usage_ids += more_usage
        audit_ids += more_audit
        assert await asyncio.to_thread(restarted.outbox.count_pending) == 70
        broker.start()
        try:
            await drained(restarted)
            await eventually(lambda: restarted.metric("seekserve:sync_broker_up") == 1, what="recovery")
            consumer = beta_consumer(broker, beta_db)
            await consume_until(consumer, 70)  # a new consumer: its own totals
            await consume_drain(consumer)
        finally:
            await restarted.relay.stop()
            await consumer.stop()
        # after the outage the new broker holds exactly the events that waited, in their original order
        assert first_occurrences(await topic_event_ids(broker.bootstrap, "seekserve.usage")) == usage_ids[20:]
        assert first_occurrences(await topic_event_ids(broker.bootstrap, "seekserve.audit")) == audit_ids[20:]
        assert_ingested_once(beta_db, "alpha", usage_ids, audit_ids)

    asyncio.run(main())


async def consume_drain(consumer: SyncConsumer) -> None:
    """Read on until a fetch comes back empty, so a late duplicate would be seen (and must be harmless)."""
    while await consumer.consume_once(timeout=0.5):
        continue


def test_partition_mid_stream_with_a_live_consumer(broker: TansuBroker, tmp_path: Path) -> None:
    """Requests keep coming and the consumer keeps running while the broker freezes (sends in flight time
    out and may still land later): nothing is lost, duplicates are absorbed, the order holds."""
    async def main() -> None:
        alpha = Site(broker, tmp_path / "alpha.db", "alpha", batch_size=8)
        beta_db = open_db(tmp_path / "beta.db")
        consumer = beta_consumer(broker, beta_db)
        stop_consuming, stop_serving = asyncio.Event(), asyncio.Event()
        usage_ids: list[str] = []
        audit_ids: list[str] = []

        async def serve() -> None:
            while not stop_serving.is_set():
                more_usage, more_audit = await asyncio.to_thread(alpha.serve_requests, 2)
                usage_ids.extend(more_usage)
                audit_ids.extend(more_audit)
                await asyncio.sleep(0.02)

        await alpha.relay.start()
        tasks = [asyncio.create_task(serve()), asyncio.create_task(consumer.run(stop_consuming))]
        try:
            await asyncio.sleep(0.5)
            broker.pause()
            await eventually(lambda: alpha.metric("seekserve:sync_broker_up") == 0, what="outage seen")
            await asyncio.sleep(0.5)
            broker.resume()
            await eventually(lambda: alpha.metric("seekserve:sync_broker_up") == 1, what="recovery")
            stop_serving.set()
            await tasks[0]
            await drained(alpha)
            await eventually(lambda: consumer.stats.num_ingested >= 2 * len(usage_ids), what="ingest")
        finally:
            stop_serving.set()
            stop_consuming.set()
            await asyncio.gather(*tasks)
            await alpha.relay.stop()
        assert (alpha.metric("seekserve:sync_errors_total") or 0) >= 1
        assert first_occurrences(await topic_event_ids(broker.bootstrap, "seekserve.usage")) == usage_ids
        assert first_occurrences(await topic_event_ids(broker.bootstrap, "seekserve.audit")) == audit_ids
        assert_ingested_once(beta_db, "alpha", usage_ids, audit_ids)

    asyncio.run(main())


def test_idempotent_producer_refused_by_tansu_is_reported(broker: TansuBroker, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Tansu answers aiokafka's InitProducerId v0 with an error: the relay keeps the events and says which
    setting to change, instead of a bare "UnknownError"."""
    async def main() -> None:
        alpha = Site(broker, tmp_path / "alpha.db", "alpha", enable_idempotence=True)
        alpha.serve_requests(1)
        await alpha.relay.start()
        try:
            await eventually(lambda: alpha.metric("seekserve:sync_broker_up") == 0, what="refusal")
        finally:
            await alpha.relay.stop()
        assert await asyncio.to_thread(alpha.outbox.count_pending) == 2

    with caplog.at_level(logging.WARNING, logger="seekserve.gateway.sync"):
        asyncio.run(main())
    assert "enable_idempotence=False" in caplog.text


def test_redelivered_and_own_site_events_are_stored_once(broker: TansuBroker, tmp_path: Path) -> None:
    async def main() -> None:
        alpha_db = open_db(tmp_path / "alpha.db")
        audit = AuditLog(alpha_db, "alpha").append("key-1", "acme", "chat.completion", "req-1")
        usage = UsageRecord(site="alpha", request_id="req-1", key_id="key-1", tenant="acme",
                            model="seekserve-tiny", backend="local", prompt_tokens=3)
        own = UsageRecord(site="beta", request_id="req-2", key_id="key-2", tenant="acme",
                          model="seekserve-tiny", backend="local")
        await produce_raw(broker, [("seekserve.usage", event_payload("usage", usage))] * 2
                          + [("seekserve.audit", event_payload("audit", audit))] * 2
                          + [("seekserve.usage", event_payload("usage", own))])
        beta_db = open_db(tmp_path / "beta.db")
        consumer = beta_consumer(broker, beta_db)
        try:
            await consume_until(consumer, 2)
            await consume_drain(consumer)
        finally:
            await consumer.stop()
        stats = consumer.stats
        assert (stats.num_ingested, stats.num_duplicates, stats.num_own_site) == (2, 2, 1)
        assert [r.event_id for r in UsageStore(beta_db).query()] == [usage.event_id]
        assert [r.event_id for r in AuditLog(beta_db, "beta").query(site="alpha")] == [audit.event_id]

    asyncio.run(main())


def test_malformed_messages_are_skipped_and_counted(broker: TansuBroker, tmp_path: Path) -> None:
    async def main() -> None:
        good = UsageRecord(site="alpha", request_id="req-1", key_id="key-1", tenant="acme",
                           model="seekserve-tiny", backend="local")
        bad_record = {**event_payload("usage", good), "record": {**good.to_dict(), "prompt_tokens": -1}}
        # parses, but the store refuses it (actor longer than its column): must not block its batch-mate
        audit_ok, audit_bad = AuditLog(open_db(tmp_path / "alpha.db"), "alpha").append_many(
            [{"actor": "key-1", "tenant": "acme", "action": "chat.completion"}] * 2)
        audit_bad = dataclasses.replace(audit_bad, actor="x" * 5000)
        await produce_raw(broker, [("seekserve.usage", b"\xff not json"), ("seekserve.usage", [1, 2]),
                                   ("seekserve.usage", {"type": "usage", "site": "alpha"}),
                                   ("seekserve.usage", bad_record),
                                   ("seekserve.usage", event_payload("usage", good)),
                                   ("seekserve.audit", event_payload("audit", audit_ok)),
                                   ("seekserve.audit", event_payload("audit", audit_bad))])
        beta_db = open_db(tmp_path / "beta.db")
        registry = CollectorRegistry()
        consumer = beta_consumer(broker, beta_db, registry=registry)
        try:
            await consume_until(consumer, 2)
            await consume_drain(consumer)
        finally:
            await consumer.stop()
        assert consumer.stats.num_malformed == 5
        assert registry.get_sample_value("seekserve:sync_consumer_malformed_total") == 5
        assert [r.event_id for r in UsageStore(beta_db).query()] == [good.event_id]
        assert [r.event_id for r in AuditLog(beta_db, "beta").query(site="alpha")] == [audit_ok.event_id]

    asyncio.run(main())


def test_consume_cli_once(broker: TansuBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> int:
        usage = UsageRecord(site="alpha", request_id="req-1", key_id="key-1", tenant="acme",
                            model="seekserve-tiny", backend="local")
        await produce_raw(broker, [("seekserve.usage", event_payload("usage", usage))])
        return await run_consumer_cli(f"sqlite:///{tmp_path / 'beta.db'}", broker.bootstrap, "beta",
                                      once=True, idle_timeout=1.0)

    assert asyncio.run(main()) == 0
    assert "1 events stored" in capsys.readouterr().out
    db = Database(f"sqlite:///{tmp_path / 'beta.db'}")
    try:
        assert len(UsageStore(db).query()) == 1
    finally:
        db.close()


def test_database_failure_rewinds_instead_of_skipping(broker: TansuBroker, tmp_path: Path) -> None:
    """A failed ingest commits nothing and rewinds the fetch position: the same messages come back."""
    async def main() -> None:
        records = [UsageRecord(site="alpha", request_id=f"req-{i}", key_id="key-1", tenant="acme",
                               model="seekserve-tiny", backend="local") for i in range(3)]
        await produce_raw(broker, [("seekserve.usage", event_payload("usage", r)) for r in records])
        beta_db = open_db(tmp_path / "beta.db")
        consumer = beta_consumer(broker, beta_db)
        try:
            with beta_db.engine.begin() as conn:  # the table vanishes: every insert now fails
                conn.execute(text("ALTER TABLE usage_records RENAME TO usage_records_away"))
            with pytest.raises(StoreError):
                for _ in range(50):  # the first fetches may come back empty
                    await consumer.consume_once(timeout=0.2)
            assert consumer.stats.num_ingested == 0
            with beta_db.engine.begin() as conn:
                conn.execute(text("ALTER TABLE usage_records_away RENAME TO usage_records"))
            await consume_until(consumer, 3)
        finally:
            await consumer.stop()
        assert sorted(r.event_id for r in UsageStore(beta_db).query()) == sorted(r.event_id for r in records)

    asyncio.run(main())


def test_config_checks_and_the_sasl_password_stays_out_of_logs(
        broker: TansuBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError):
        SyncConfig(bootstrap_servers="127.0.0.1:9092", site="alpha", security_protocol="TLS")
    with pytest.raises(ValueError):
        SyncConfig(bootstrap_servers="127.0.0.1:9092", site="alpha", batch_size=0)
    outbox = Outbox(open_db(tmp_path / "alpha.db"))
    with pytest.raises(ValueError, match="sasl_password_env"):
        OutboxRelay(sync_config(broker, "alpha", security_protocol="SASL_PLAINTEXT", sasl_username="u",
                                sasl_password_env="SEEKSERVE_TEST_UNSET_VARIABLE"), outbox)
    monkeypatch.setenv("SEEKSERVE_TEST_KAFKA_PASSWORD", "hunter2-secret")
    config = sync_config(broker, "alpha", security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                         sasl_username="seekserve", sasl_password_env="SEEKSERVE_TEST_KAFKA_PASSWORD")
    registry = CollectorRegistry()

    async def main() -> None:
        # the broker does not speak SASL: every attempt fails, and is logged, and the event waits
        relay = OutboxRelay(config, outbox, registry)
        EventPublisher(outbox, config).publish_usage([UsageRecord(
            site="alpha", request_id="req-1", key_id="key-1", tenant="acme", model="m", backend="local")])
        await relay.start()
        try:
            await eventually(lambda: (registry.get_sample_value("seekserve:sync_errors_total") or 0) >= 2,
                             what="failed attempts")
        finally:
            await relay.stop()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert "Kafka unreachable" in caplog.text
    assert "hunter2" not in caplog.text and "hunter2" not in repr(config)
    assert outbox.count_pending() == 1


async def produce_raw(broker: TansuBroker, messages: list[tuple[str, object]]) -> None:
    """Put messages on the topics as another site's relay (or a broken client) would."""
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        for topic, value in messages:
            raw = value if isinstance(value, bytes) else json.dumps(value).encode()
            await producer.send_and_wait(topic, raw, key=b"alpha")
    finally:
        await producer.stop()

