"""The audit hash chain on SQLite and PostgreSQL: appends, concurrency, tamper detection, foreign sites."""

from __future__ import annotations

import hashlib
import itertools
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from seekserve.store.audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditLog,
    AuditRecord,
    _hashed_fields,
    _hashed_json,
    canonical_json,
)
from seekserve.store.db import Database, default_database_url, upgrade
from tests.store.test_db import database, sqlite_template, store_pg_url  # noqa: F401  (fixtures)


def test_append_builds_a_chain(database: Database) -> None:  # noqa: F811
    log = AuditLog(database, "eu")
    first = log.append("admin", "acme", "key.create", target="key_1", detail={"name": "ci", "n": [1, 2.5]})
    second = log.append("alice", "acme", "chat", status="denied", detail={"ü": "ß"})
    assert first.prev_hash == GENESIS_HASH and second.prev_hash == first.hash
    fields = {k: v for k, v in first.to_dict().items() if k not in ("seq", "hash")}
    assert first.hash == hashlib.sha256((GENESIS_HASH + canonical_json(fields)).encode()).hexdigest()
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
    assert (first.seq, second.seq) == (1, 2)
    assert log.verify() == (True, None)
    assert log.query() == [second, first]


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                            | st.text(), lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@given(st.text(max_size=20), st.text(max_size=20), st.text(max_size=20), st.text(max_size=20),
       st.dictionaries(st.text(max_size=8), _json_values, max_size=4), st.text(max_size=10))
def test_hashed_json_is_the_canonical_spelling(actor: str, tenant: str, action: str, target: str,
                                               detail: dict, site: str) -> None:
    """The chain's fast spelling of what is hashed is byte for byte canonical_json of the hashed fields
    (quotes, backslashes, control characters and non-ASCII included)."""
    event = AuditEvent(actor=actor, tenant=tenant, action=action, target=target, status='o"k\\', detail=detail)
    prev = "ab" * 32
    assert _hashed_json(event, site, prev, canonical_json(detail)) == canonical_json(_hashed_fields(event, site, prev))


def test_append_many_and_retries(database: Database) -> None:  # noqa: F811
    log = AuditLog(database, "eu")
    records = log.append_many([{"actor": "a", "tenant": "t", "action": f"act{i}", "event_id": f"ev{i}"}
                               for i in range(20)])
    assert [r.seq for r in records] == list(range(1, 21))
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    again = log.append("a", "t", "other", event_id="ev3")  # a retried event_id answers with the stored record
    assert again == records[3] and len(log.query()) == 20
    assert log.verify() == (True, None)
    with pytest.raises(ValueError):
        log.append_many([{"actor": "a", "tenant": "t"}])
    with pytest.raises(ValueError):
        log.append("a", "t", "x", detail={"bad": float("nan")})
    with pytest.raises(ValueError):
        log.append("a", "t", "x", detail={"bad": object()})


def test_append_new_chains_like_append_many(database: Database) -> None:  # noqa: F811
    """The record writer's fast path: same chain, same rows, no look-ups; a reused id still cannot land."""
    log = AuditLog(database, "eu")
    first = log.append_many([{"actor": "a", "tenant": "t", "action": "x", "event_id": "ev0"}])
    events = [AuditEvent(actor="k", tenant="t", action="inference.chat", detail={"n": i, "tags": ["a"], "ok": True},
                         event_id=f"new{i}") for i in range(5)]
    with database.write_connection() as connection:
        log.append_new(events, connection)
    stored = sorted(log.query(), key=lambda r: r.seq)
    assert [r.event_id for r in stored] == ["ev0"] + [f"new{i}" for i in range(5)]
    assert stored[1].prev_hash == first[0].hash and all(r.hash == r.expected_hash() for r in stored)
    assert stored[3].detail == {"n": 2, "tags": ["a"], "ok": True}
    assert log.verify() == (True, None)
    with pytest.raises(IntegrityError), database.write_connection() as connection:   # rolled back whole
        log.append_new([AuditEvent(actor="k", tenant="t", action="x", event_id="new1")], connection)
    assert len(log.query()) == 6 and log.verify() == (True, None)


def test_concurrent_appends_never_fork(database: Database) -> None:  # noqa: F811
    # each thread has its own Database (own pool), like a separate replica: only the database lock serializes
    barrier, errors = threading.Barrier(4), []

    def replica(n: int) -> None:
        db = Database(database.url)
        try:
            log = AuditLog(db, "eu")
            barrier.wait()
            for i in range(15):
                log.append(f"actor{n}", "acme", "chat", detail={"i": i})
        except Exception as err:  # noqa: BLE001  (collected, asserted on below)
            errors.append(err)
        finally:
            db.close()

    threads = [threading.Thread(target=replica, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    log = AuditLog(database, "eu")
    records = sorted(log.query(limit=100), key=lambda r: r.seq)
    assert len(records) == 60 and len({r.prev_hash for r in records}) == 60  # no two share a parent
    assert log.verify() == (True, None)


@pytest.mark.parametrize("column, value", [("actor", "mallory"), ("detail", '{"name": "evil"}'),
                                           ("prev_hash", "f" * 64), ("hash", "0" * 64)])
def test_tampering_is_detected_at_its_seq(database: Database, column: str, value: str) -> None:  # noqa: F811
    log = AuditLog(database, "eu")
    records = [log.append("admin", "acme", "key.create", detail={"name": f"k{i}"}) for i in range(5)]
    with database.session() as session:
        session.execute(text(f"UPDATE audit_records SET {column} = :v WHERE seq = :s"),
                        {"v": value, "s": records[2].seq})
    assert log.verify() == (False, records[2].seq)


@pytest.mark.parametrize("column, value", [("detail", "{not json"), ("ts", "yesterday")])
def test_rows_tampered_into_garbage_are_reported(tmp_path: Path, column: str, value: str) -> None:
    # only SQLite lets a json/timestamp column hold garbage; verify must report it, not crash on it
    url = default_database_url(tmp_path)
    upgrade(url)
    db = Database(url)
    try:
        log = AuditLog(db, "eu")
        records = [log.append("admin", "acme", "x", detail={"i": i}) for i in range(3)]
        with db.session() as session:
            session.execute(text(f"UPDATE audit_records SET {column} = :v WHERE seq = :s"),
                            {"v": value, "s": records[1].seq})
        assert log.verify() == (False, records[1].seq)
    finally:
        db.close()


def test_deleting_a_record_is_detected(database: Database) -> None:  # noqa: F811
    log = AuditLog(database, "eu")
    records = [log.append("admin", "acme", "x") for _ in range(4)]
    with database.session() as session:
        session.execute(text("DELETE FROM audit_records WHERE seq = :s"), {"s": records[1].seq})
    assert log.verify() == (False, records[2].seq)


def test_ingest_foreign_site_is_verbatim_and_idempotent(database: Database) -> None:  # noqa: F811
    us, them = AuditLog(database, "eu"), AuditLog(database, "us")
    foreign = [them.append("bob", "globex", "chat", detail={"i": i}) for i in range(3)]
    with database.session() as session:  # pretend they were written elsewhere: only ingest brings them here
        session.execute(text("DELETE FROM audit_records"))
    us.append("alice", "acme", "chat")
    wire = [AuditRecord.from_dict(r.to_dict()) for r in reversed(foreign)]  # out of order on the wire
    assert us.ingest(wire) == 3
    assert us.ingest(wire) == 0
    us.append("alice", "acme", "chat")
    stored = {r.event_id: r for r in us.query(site="us")}
    assert {e: (r.hash, r.prev_hash) for e, r in stored.items()} == {r.event_id: (r.hash, r.prev_hash)
                                                                      for r in foreign}
    assert us.verify() == (True, None) and us.verify("us") == (True, None)
    assert [r.site for r in us.query(tenant="acme")] == ["eu", "eu"]


def test_ingest_keeps_a_forged_record_detectable(database: Database) -> None:  # noqa: F811
    them = AuditLog(database, "us")
    good = them.append("bob", "globex", "chat")
    with database.session() as session:
        session.execute(text("DELETE FROM audit_records"))
    forged = AuditRecord(**{**good.__dict__, "actor": "mallory"})
    us = AuditLog(database, "eu")
    assert us.ingest([forged]) == 1
    bad_seq = us.query(site="us")[0].seq
    assert us.verify("us") == (False, bad_seq) and us.verify("eu") == (True, None)


def test_query_filters_and_time(database: Database) -> None:  # noqa: F811
    log = AuditLog(database, "eu")
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    for i in range(6):
        log.append("admin", "acme" if i % 2 else "x' OR '1'='1", "key.create" if i < 3 else "chat",
                   ts=t0 + timedelta(minutes=i))
    assert [r.ts.minute for r in log.query(tenant="x' OR '1'='1")] == [4, 2, 0]
    assert [r.ts.minute for r in log.query(action="chat", since=t0 + timedelta(minutes=4))] == [5, 4]
    assert [r.ts.minute for r in log.query(until=t0 + timedelta(minutes=2), limit=1)] == [1]
    assert log.query()[0].ts == t0 + timedelta(minutes=5) and log.query()[0].ts.tzinfo == UTC
    assert log.verify() == (True, None)
