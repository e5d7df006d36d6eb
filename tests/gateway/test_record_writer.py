"""The usage/audit RecordWriter: batches written in one transaction, nothing lost or doubled when a write
fails, chained records handed to `on_written` (the Kafka outbox) with their seq."""

from __future__ import annotations

from pathlib import Path

import pytest

from seekserve.gateway.usage import RecordWriter
from seekserve.store.audit import AuditEvent, AuditLog, AuditRecord
from seekserve.store.db import Database, upgrade
from seekserve.store.usage import UsageRecord, UsageStore


@pytest.fixture()
def stores(tmp_path: Path) -> tuple[UsageStore, AuditLog]:
    url = f"sqlite:///{tmp_path / 'records.db'}"
    upgrade(url)
    db = Database(url)
    return UsageStore(db), AuditLog(db, "local")


def _records(n: int) -> list[tuple[UsageRecord, AuditEvent]]:
    return [(UsageRecord(site="local", request_id=f"req{i}", key_id="key_1", tenant="t", model="m", backend="cloud",
                         prompt_tokens=i, completion_tokens=1),
             AuditEvent(actor="key_1", tenant="t", action="inference.chat", target="m", detail={"request_id": f"req{i}"}))
            for i in range(n)]


def _write_all(writer: RecordWriter, n: int) -> None:
    for u, a in _records(n):
        writer.add_usage(u)
        writer.add_audit(a)
    assert writer.flush()
    writer.close()


def test_batches_land_in_order_and_chained(stores: tuple[UsageStore, AuditLog]) -> None:
    usage, audit = stores
    _write_all(RecordWriter(usage, audit, flush_interval=0.01), 40)
    assert sorted(r.prompt_tokens for r in usage.query()) == list(range(40))
    chain = sorted(audit.query(), key=lambda r: r.seq)
    assert [r.detail["request_id"] for r in chain] == [f"req{i}" for i in range(40)]
    assert audit.verify() == (True, None)


def test_a_failed_write_is_retried_without_loss_or_doubles(stores: tuple[UsageStore, AuditLog],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    usage, audit = stores
    real, calls = audit.append_new, []

    def flaky(events, connection):   # the usage rows of this transaction are rolled back with it
        calls.append(len(events))
        if len(calls) == 1:
            real(events, connection)
            raise RuntimeError("connection dropped after the insert")
        return real(events, connection)
    monkeypatch.setattr(audit, "append_new", flaky)
    monkeypatch.setattr("seekserve.gateway.usage.time.sleep", lambda s: None)
    _write_all(RecordWriter(usage, audit, flush_interval=0.01), 10)
    assert calls[0] == 10             # the fast path ran once; the retry took append_many
    assert len(usage.query()) == 10 and len(audit.query()) == 10
    assert audit.verify() == (True, None)


def test_on_written_gets_the_chained_records(stores: tuple[UsageStore, AuditLog]) -> None:
    usage, audit = stores
    seen: list[tuple[list[UsageRecord], list[AuditRecord]]] = []
    _write_all(RecordWriter(usage, audit, flush_interval=0.01, on_written=lambda u, a: seen.append((u, a))), 5)
    audits = [r for _, batch in seen for r in batch]
    assert [r.seq for r in audits] == [1, 2, 3, 4, 5]
    assert all(r.hash == r.expected_hash() for r in audits)
    assert sum(len(u) for u, _ in seen) == 5


def test_flush_waits_for_what_was_queued_before_it(stores: tuple[UsageStore, AuditLog]) -> None:
    """flush() returns once the records queued before it are stored (a 0.3 s flush interval is still being
    slept out when it is called); after close() it answers at once."""
    usage, audit = stores
    writer = RecordWriter(usage, audit, flush_interval=0.3)
    for u, a in _records(3):
        writer.add_usage(u)
        writer.add_audit(a)
    assert writer.flush(timeout=10.0)
    assert len(usage.query()) == 3 and len(audit.query()) == 3
    assert writer.flush(timeout=10.0)      # nothing pending: no interval to sleep out
    writer.close()
    assert writer.flush(timeout=10.0)
