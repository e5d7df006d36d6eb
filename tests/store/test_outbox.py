"""The outbox on SQLite and PostgreSQL: idempotent puts, id-ordered pending items, delivery bookkeeping."""

from __future__ import annotations

from datetime import timedelta

import pytest

from seekserve.store.db import Database
from seekserve.store.models import utcnow
from seekserve.store.outbox import Outbox
from tests.store.test_db import database, sqlite_template, store_pg_url  # noqa: F401  (fixtures)


def test_put_is_idempotent_and_pending_is_ordered(database: Database) -> None:  # noqa: F811
    outbox = Outbox(database)
    outbox.put("usage", {"n": 0, "nested": {"ü": [1, 2]}}, "ev0")
    assert outbox.put_many([("audit", {"n": i}, f"ev{i}") for i in range(1, 6)]) == 5
    outbox.put("usage", {"n": "changed"}, "ev0")  # same event_id: ignored, first payload kept
    assert outbox.put_many([("usage", {}, "ev1"), ("usage", {}, "ev9"), ("usage", {}, "ev9")]) == 1
    items = outbox.pending()
    assert [i.event_id for i in items] == ["ev0", "ev1", "ev2", "ev3", "ev4", "ev5", "ev9"]
    assert [i.id for i in items] == sorted(i.id for i in items)
    assert items[0].payload == {"n": 0, "nested": {"ü": [1, 2]}} and items[0].topic == "usage"
    assert items[0].attempts == 0 and items[0].created_at.tzinfo is not None
    assert [i.event_id for i in outbox.pending(limit=2)] == ["ev0", "ev1"]
    assert outbox.count_pending() == 7


def test_delivery_and_attempts(database: Database) -> None:  # noqa: F811
    outbox = Outbox(database)
    outbox.put_many([("t", {"i": i}, f"ev{i}") for i in range(4)])
    first, second, *_ = outbox.pending()
    outbox.note_attempt([first.id, second.id])
    outbox.note_attempt([first.id])
    assert [i.attempts for i in outbox.pending()] == [2, 1, 0, 0]
    assert outbox.mark_delivered([first.id, second.id]) == 2
    assert outbox.mark_delivered([first.id]) == 0 and outbox.mark_delivered([]) == 0
    assert [i.event_id for i in outbox.pending()] == ["ev2", "ev3"] and outbox.count_pending() == 2
    outbox.put("t", {}, "ev0")  # a delivered event is not queued again
    assert outbox.count_pending() == 2
    assert outbox.purge_delivered(utcnow() + timedelta(seconds=1)) == 2
    assert outbox.count_pending() == 2
    with pytest.raises(TypeError):
        outbox.mark_delivered(["1"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        outbox.put("t", [], "ev7")  # type: ignore[arg-type]
