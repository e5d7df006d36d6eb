"""Usage records on SQLite and PostgreSQL: idempotent adds, queries, summaries, wire format."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seekserve.store.db import Database
from seekserve.store.usage import UsageRecord, UsageStore
from tests.store.test_db import database, sqlite_template, store_pg_url  # noqa: F401  (fixtures)

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _usage(n: int, tenant: str = "acme", key_id: str = "key_a", model: str = "m",
           **extra: object) -> UsageRecord:
    values = {"site": "eu", "request_id": f"req-{n}", "key_id": key_id, "tenant": tenant, "model": model,
              "backend": "local", "prompt_tokens": 10, "cached_tokens": 4, "completion_tokens": 5,
              "cost_usd": 0.25, "status": 200, "latency_ms": 12.5, "sensitivity": "none",
              "event_id": f"ev-{n}", "ts": T0 + timedelta(seconds=n)}
    return UsageRecord(**{**values, **extra})


def test_add_many_is_idempotent(database: Database) -> None:  # noqa: F811
    store = UsageStore(database)
    batch = [_usage(i) for i in range(5)]
    assert store.add_many(batch) == 5
    assert store.add_many(batch + [_usage(5), _usage(5)]) == 1  # replays and in-batch duplicates skipped
    assert store.add(_usage(0)) is False and store.add_many([]) == 0
    assert [r.event_id for r in store.query()] == [f"ev-{i}" for i in range(5, -1, -1)]


def test_records_round_trip_exactly(database: Database) -> None:  # noqa: F811
    store = UsageStore(database)
    original = _usage(1, ts=datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2))))
    store.add(original)
    (stored,) = store.query()
    assert stored == original and stored.ts.tzinfo == UTC
    assert stored.ts == datetime(2030, 5, 6, 5, 8, 9, 123456, tzinfo=UTC)


def test_query_filters_and_limit(database: Database) -> None:  # noqa: F811
    store = UsageStore(database)
    store.add_many([_usage(i, tenant="acme" if i % 2 else "globex", key_id=f"key_{i % 3}")
                    for i in range(12)])
    acme = store.query(tenant="acme")
    assert len(acme) == 6 and all(r.tenant == "acme" for r in acme)
    assert [r.ts for r in acme] == sorted((r.ts for r in acme), reverse=True)
    assert {r.key_id for r in store.query(key_id="key_1")} == {"key_1"}
    window = store.query(since=T0 + timedelta(seconds=3), until=T0 + timedelta(seconds=6))
    assert [r.request_id for r in window] == ["req-5", "req-4", "req-3"]
    assert len(store.query(limit=2)) == 2
    with pytest.raises(ValueError):
        store.query(since=datetime(2030, 1, 1))  # naive: ambiguous, refused
    with pytest.raises(ValueError):
        store.query(limit=0)


def test_summary_groups_by_tenant_key_and_model(database: Database) -> None:  # noqa: F811
    store = UsageStore(database)
    store.add_many([_usage(1), _usage(2), _usage(3, model="big", status=500),
                    _usage(4, tenant="globex", key_id="key_g", cost_usd=1.0)])
    rows = store.summary()
    assert [(r["tenant"], r["key_id"], r["model"]) for r in rows] == [
        ("acme", "key_a", "big"), ("acme", "key_a", "m"), ("globex", "key_g", "m")]
    acme_m = rows[1]
    assert acme_m == {"tenant": "acme", "key_id": "key_a", "model": "m", "requests": 2,
                      "prompt_tokens": 20, "cached_tokens": 8, "completion_tokens": 10,
                      "cost_usd": pytest.approx(0.5), "errors": 0}
    assert rows[0]["errors"] == 1
    assert [r["tenant"] for r in store.summary(tenant="globex")] == ["globex"]
    assert store.summary(since=T0 + timedelta(seconds=4))[0]["key_id"] == "key_g"


def test_injection_shaped_tenant_is_literal(database: Database) -> None:  # noqa: F811
    store = UsageStore(database)
    evil = "x' OR '1'='1"
    store.add_many([_usage(1, tenant=evil), _usage(2)])
    assert [r.tenant for r in store.query(tenant=evil)] == [evil]
    assert store.query(tenant="' OR 1=1 --") == []


@pytest.mark.parametrize("bad", [{"prompt_tokens": -1}, {"cost_usd": float("nan")}, {"tenant": ""},
                                 {"ts": datetime(2030, 1, 1)}, {"model": "m" * 256}, {"status": True}])
def test_invalid_records_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _usage(1, **bad)


@given(st.builds(_usage, st.integers(0, 10**6), tenant=st.text(min_size=1, max_size=128),
                 cost_usd=st.floats(0, 1e9), latency_ms=st.floats(0, 1e9),
                 prompt_tokens=st.integers(0, 2**31 - 1)))
def test_wire_format_round_trips(record: UsageRecord) -> None:
    data = json.loads(json.dumps(record.to_dict()))
    assert UsageRecord.from_dict({**data, "field_from_the_future": 1}) == record


def test_defaults_fill_event_id_and_time() -> None:
    a = UsageRecord(site="eu", request_id="r", key_id="k", tenant="t", model="m", backend="local")
    b = UsageRecord(site="eu", request_id="r", key_id="k", tenant="t", model="m", backend="local")
    assert a.event_id != b.event_id and len(a.event_id) == 32 and a.ts.tzinfo is not None
