"""Transactional outbox: events waiting to be published (to Kafka) survive restarts and broker outages.
Invariant: delivery is at-least-once in id order; an event_id is queued once however often it is put."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update

from seekserve.store.db import Database
from seekserve.store.models import OutboxRow, check_text, require_aware, utcnow


@dataclass(frozen=True)
class OutboxItem:
    """One queued event. `id` orders delivery; consumers deduplicate by `event_id`."""

    id: int
    event_id: str
    topic: str
    payload: dict[str, Any]
    created_at: datetime
    attempts: int


def _row_values(topic: str, payload: dict[str, Any], event_id: str, now: datetime) -> dict[str, Any]:
    check_text(topic, "topic", 255)
    check_text(event_id, "event_id", 64)
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    return {"topic": topic, "payload": payload, "event_id": event_id, "created_at": now, "attempts": 0}


def _ids(ids: Iterable[int]) -> list[int]:
    unique = sorted(set(ids))
    if any(isinstance(i, bool) or not isinstance(i, int) for i in unique):
        raise TypeError("outbox ids must be ints")
    return unique


class Outbox:
    """The outbox table of one database. Several publishers may drain it; duplicates are then possible,
    which is why every consumer of these events deduplicates by event_id."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def put(self, topic: str, payload: dict[str, Any], event_id: str) -> None:
        """Queue one event; a no-op when `event_id` is already queued (or was delivered)."""
        self.put_many([(topic, payload, event_id)])

    def put_many(self, items: Iterable[tuple[str, dict[str, Any], str]]) -> int:
        """Queue (topic, payload, event_id) triples in one transaction; returns how many were new."""
        now = utcnow()
        unique: dict[str, dict[str, Any]] = {}
        for topic, payload, event_id in items:
            unique.setdefault(event_id, _row_values(topic, payload, event_id, now))
        if not unique:
            return 0
        statement = self._db.insert_ignoring_duplicates(OutboxRow).returning(OutboxRow.id)
        with self._db.session() as session:
            return len(session.execute(statement, list(unique.values())).all())

    def pending(self, limit: int = 500) -> list[OutboxItem]:
        """Undelivered events, oldest (lowest id) first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        query = (select(OutboxRow).where(OutboxRow.delivered_at.is_(None))
                 .order_by(OutboxRow.id).limit(limit))
        with self._db.session() as session:
            return [OutboxItem(id=row.id, event_id=row.event_id, topic=row.topic, payload=row.payload,
                               created_at=row.created_at, attempts=row.attempts)
                    for row in session.scalars(query)]

    def mark_delivered(self, ids: Iterable[int]) -> int:
        """Mark events delivered (already-delivered ones keep their first time); returns how many changed."""
        unique = _ids(ids)
        if not unique:
            return 0
        statement = (update(OutboxRow).where(OutboxRow.id.in_(unique), OutboxRow.delivered_at.is_(None))
                     .values(delivered_at=utcnow()))
        with self._db.session() as session:
            return session.execute(statement).rowcount

    def note_attempt(self, ids: Iterable[int]) -> None:
        """Count one more delivery attempt for each event (for backoff and alerting on stuck events)."""
        unique = _ids(ids)
        if unique:
            with self._db.session() as session:
                session.execute(update(OutboxRow).where(OutboxRow.id.in_(unique))
                                .values(attempts=OutboxRow.attempts + 1))

    def count_pending(self) -> int:
        with self._db.session() as session:
            return session.scalar(select(func.count()).select_from(OutboxRow)
                                  .where(OutboxRow.delivered_at.is_(None))) or 0

    def purge_delivered(self, before: datetime) -> int:
        """Delete events delivered before `before` (the table would otherwise grow forever)."""
        statement = delete(OutboxRow).where(OutboxRow.delivered_at < require_aware(before, "before"))
        with self._db.session() as session:
            return session.execute(statement).rowcount
