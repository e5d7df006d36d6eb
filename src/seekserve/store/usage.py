"""Metered usage: one record per finished request, written locally and shipped to other sites by event_id.
Invariant: adding the same event_id twice (a retry, a replayed Kafka message) stores it once."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Select, func, select

from seekserve.store.db import Database
from seekserve.store.models import UsageRow, check_text, new_event_id, require_aware, utcnow

# column sizes of usage_records, checked before writing so both dialects accept and refuse the same values
_TEXT_LIMITS = {"event_id": 64, "site": 64, "request_id": 128, "key_id": 255, "tenant": 128, "model": 255,
                "backend": 64, "sensitivity": 32}
_INTS = ("prompt_tokens", "cached_tokens", "completion_tokens", "status")
_FLOATS = ("cost_usd", "latency_ms")


@dataclass(frozen=True, kw_only=True)
class UsageRecord:
    """What one request consumed. `ts` is when it finished (aware UTC)."""

    site: str
    request_id: str
    key_id: str
    tenant: str
    model: str
    backend: str
    prompt_tokens: int = 0
    cached_tokens: int = 0            # part of prompt_tokens served from the prefix cache
    completion_tokens: int = 0
    cost_usd: float = 0.0
    status: int = 200                 # HTTP status of the response
    latency_ms: float = 0.0
    sensitivity: str = "none"
    event_id: str = field(default_factory=new_event_id)
    ts: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:   # one record per request: the common case costs a few type checks
        for name, limit in _TEXT_LIMITS.items():
            value = getattr(self, name)
            if type(value) is not str or not 0 < len(value) <= limit:
                check_text(value, name, limit, empty=name in ("request_id", "backend"))
        for name in _INTS:
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        for name in _FLOATS:
            value = getattr(self, name)
            if type(value) is not float or not 0 <= value < math.inf:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                    raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
                object.__setattr__(self, name, float(value))
        if type(self.ts) is not datetime or self.ts.tzinfo is not UTC:
            object.__setattr__(self, "ts", require_aware(self.ts, "ts"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (ts as ISO 8601 with offset), the wire format of the usage topic."""
        data = asdict(self)
        data["ts"] = self.ts.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UsageRecord:
        """Inverse of to_dict. Unknown keys are ignored, so older readers accept newer producers."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("ts"), str):
            values["ts"] = datetime.fromisoformat(values["ts"])
        return cls(**values)


_COLUMNS = tuple(f.name for f in fields(UsageRecord))   # shallow rows: asdict deep-copies every value


def _record(row: UsageRow) -> UsageRecord:
    return UsageRecord(**{f.name: getattr(row, f.name) for f in fields(UsageRecord)})


class UsageStore:
    """Usage records of one database (every site's records, once each)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert = db.bulk_insert(UsageRow, _COLUMNS, ignore_duplicates=True)

    @property
    def db(self) -> Database:
        return self._db

    def add_many(self, records: Iterable[UsageRecord], connection: Connection | None = None) -> int:
        """Store records; those whose event_id is already stored are skipped. Returns how many were new.
        With `connection`, inside its transaction (the record writer's, shared with the audit chain)."""
        unique: dict[str, tuple[Any, ...]] = {}
        for record in records:
            if not isinstance(record, UsageRecord):
                raise TypeError(f"expected UsageRecord, got {type(record).__name__}")
            unique.setdefault(record.event_id, tuple([getattr(record, name) for name in _COLUMNS]))
        if not unique:
            return 0
        if connection is not None:
            return self._insert.execute(connection, list(unique.values()))
        with self._db.write_connection() as own:
            return self._insert.execute(own, list(unique.values()))

    def add(self, record: UsageRecord) -> bool:
        """Store one record; False when its event_id was already stored."""
        return self.add_many([record]) == 1

    def query(self, tenant: str | None = None, key_id: str | None = None, since: datetime | None = None,
              until: datetime | None = None, limit: int = 1000) -> list[UsageRecord]:
        """Records newest first; `since` inclusive, `until` exclusive."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        query = _filtered(select(UsageRow), tenant, key_id, since, until)
        query = query.order_by(UsageRow.ts.desc(), UsageRow.id.desc()).limit(limit)
        with self._db.session() as session:
            return [_record(row) for row in session.scalars(query)]

    def summary(self, tenant: str | None = None, key_id: str | None = None, since: datetime | None = None,
                until: datetime | None = None) -> list[dict[str, Any]]:
        """Totals per (tenant, key_id, model), sorted by those three."""
        groups = (UsageRow.tenant, UsageRow.key_id, UsageRow.model)
        query = select(*groups, func.count().label("requests"),
                       func.sum(UsageRow.prompt_tokens).label("prompt_tokens"),
                       func.sum(UsageRow.cached_tokens).label("cached_tokens"),
                       func.sum(UsageRow.completion_tokens).label("completion_tokens"),
                       func.sum(UsageRow.cost_usd).label("cost_usd"),
                       func.count().filter(UsageRow.status >= 400).label("errors"))
        query = _filtered(query, tenant, key_id, since, until).group_by(*groups).order_by(*groups)
        with self._db.session() as session:
            rows = session.execute(query).all()
        return [{"tenant": r.tenant, "key_id": r.key_id, "model": r.model, "requests": int(r.requests),
                 "prompt_tokens": int(r.prompt_tokens), "cached_tokens": int(r.cached_tokens),
                 "completion_tokens": int(r.completion_tokens), "cost_usd": float(r.cost_usd),
                 "errors": int(r.errors)} for r in rows]


def _filtered(query: Select[Any], tenant: str | None, key_id: str | None, since: datetime | None,
              until: datetime | None) -> Select[Any]:
    if tenant is not None:
        query = query.where(UsageRow.tenant == tenant)
    if key_id is not None:
        query = query.where(UsageRow.key_id == key_id)
    if since is not None:
        query = query.where(UsageRow.ts >= require_aware(since, "since"))
    if until is not None:
        query = query.where(UsageRow.ts < require_aware(until, "until"))
    return query
