"""Tamper-evident audit log: each site's records form a SHA-256 hash chain (hash = sha256(prev_hash +
canonical JSON of the record)). Invariant: appends to one site's chain are serialized across threads and
replicas, so the chain never forks; changing, removing or reordering a stored record breaks `verify`."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from pydantic_core import from_json
from sqlalchemy import Connection, Row, String, bindparam, select, type_coerce

from seekserve.store.db import Database, JSONText
from seekserve.store.models import AuditRow, check_text, new_event_id, require_aware, utcnow

GENESIS_HASH = "0" * 64
_TEXT_LIMITS = {"event_id": 64, "site": 64, "actor": 255, "tenant": 128, "action": 64, "target": 512,
                "status": 32}
# verify reads ts and detail undecoded, so a row tampered into garbage is reported rather than crashing it
_RAW_COLUMNS = (AuditRow.seq, AuditRow.event_id, AuditRow.site, type_coerce(AuditRow.ts, String).label("ts"),
                AuditRow.actor, AuditRow.tenant, AuditRow.action, AuditRow.target, AuditRow.status,
                type_coerce(AuditRow.detail, String).label("detail"), AuditRow.prev_hash, AuditRow.hash)
_EVENT_KEYS = frozenset({"actor", "tenant", "action", "target", "status", "detail", "event_id", "ts"})


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: Any) -> str:
    """The one JSON spelling hashed: sorted keys, no spaces, UTF-8 kept, NaN/Infinity refused."""
    return _CANONICAL.encode(value)


def chain_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """sha256 hex of prev_hash + canonical JSON of the record's fields (everything but seq and hash)."""
    return _link(prev_hash, canonical_json(fields))


def _link(prev_hash: str, fields_json: str) -> str:
    return hashlib.sha256((prev_hash + fields_json).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One audit event as chained. `seq` is this database's row number (None before it is stored)."""

    event_id: str
    site: str
    ts: datetime
    actor: str
    tenant: str
    action: str
    target: str
    status: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str
    seq: int | None = None

    def hashed_fields(self) -> dict[str, Any]:
        """The fields the hash covers; ts in a fixed ISO form (microseconds, +00:00) so it round-trips."""
        return _hashed_fields(self, self.site, self.prev_hash)

    def expected_hash(self) -> str:
        return chain_hash(self.prev_hash, self.hashed_fields())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, the wire format of the audit topic."""
        return {**self.hashed_fields(), "hash": self.hash, "seq": self.seq}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        ts = data["ts"]
        return cls(event_id=data["event_id"], site=data["site"],
                   ts=datetime.fromisoformat(ts) if isinstance(ts, str) else ts, actor=data["actor"],
                   tenant=data["tenant"], action=data["action"], target=data.get("target", ""),
                   status=data.get("status", "ok"), detail=dict(data.get("detail") or {}),
                   prev_hash=data["prev_hash"], hash=data["hash"], seq=data.get("seq"))


_ROW_FIELDS = tuple(f.name for f in fields(AuditRecord) if f.name != "seq")


def _hashed_fields(e: AuditRecord | AuditEvent, site: str, prev_hash: str) -> dict[str, Any]:
    return {"event_id": e.event_id, "site": site, "ts": _ts_text(e.ts), "actor": e.actor, "tenant": e.tenant,
            "action": e.action, "target": e.target, "status": e.status, "detail": e.detail, "prev_hash": prev_hash}


_quote = json.encoder.encode_basestring   # what the canonical encoder writes for a str (ensure_ascii=False)


def _hashed_json(e: AuditEvent, site: str, prev_hash: str, detail_json: str) -> str:
    """canonical_json(_hashed_fields(e, site, prev_hash)), spelled out key by key (sorted) around the
    detail's canonical JSON: the same text (a test compares them), without encoding the detail twice."""
    return (f'{{"action":{_quote(e.action)},"actor":{_quote(e.actor)},"detail":{detail_json},'
            f'"event_id":{_quote(e.event_id)},"prev_hash":{_quote(prev_hash)},"site":{_quote(site)},'
            f'"status":{_quote(e.status)},"target":{_quote(e.target)},"tenant":{_quote(e.tenant)},'
            f'"ts":{_quote(_ts_text(e.ts))}}}')


def _ts_text(ts: datetime) -> str:
    if type(ts) is not datetime or ts.tzinfo is not UTC:
        ts = require_aware(ts, "ts")
    return ts.isoformat(timespec="microseconds")


def _record(row: AuditRow | Row[Any]) -> AuditRecord:
    return AuditRecord(event_id=row.event_id, site=row.site, ts=row.ts, actor=row.actor, tenant=row.tenant,
                       action=row.action, target=row.target, status=row.status, detail=row.detail,
                       prev_hash=row.prev_hash, hash=row.hash, seq=row.seq)


@dataclass(frozen=True)
class AuditEvent:
    """Who did what, waiting for its place in the chain (validated when appended). The event id and the time
    are fixed when it is made, so a retried append stores it once."""
    actor: str
    tenant: str
    action: str
    target: str = ""
    status: str = "ok"
    detail: dict[str, Any] = field(default_factory=dict)
    event_id: str = field(default_factory=new_event_id)
    ts: datetime = field(default_factory=utcnow)


def _event(values: AuditEvent | Mapping[str, Any]) -> AuditEvent:
    if isinstance(values, AuditEvent):
        event = values
    else:
        unknown = set(values) - _EVENT_KEYS
        if unknown:
            raise ValueError(f"unknown audit event fields: {sorted(unknown)}")
        missing = {"actor", "tenant", "action"} - {k for k, v in values.items() if v is not None}
        if missing:
            raise ValueError(f"audit event lacks {sorted(missing)}")
        event = AuditEvent(**{k: v for k, v in values.items() if v is not None})
    for name, limit in _TEXT_LIMITS.items():
        if name != "site":
            check_text(getattr(event, name), name, limit, empty=name == "target")
    if not isinstance(event.detail, dict):
        raise TypeError("detail must be a dict")
    detail = event.detail
    if not _plain(detail):
        try:
            # normalise through JSON now: the hash must cover exactly what the database will hand back
            detail = from_json(canonical_json(event.detail))
        except (TypeError, ValueError) as err:
            raise ValueError(f"detail must be JSON-serializable without NaN: {err}") from None
    ts = event.ts if isinstance(event.ts, datetime) and event.ts.tzinfo is UTC else require_aware(event.ts, "ts")
    return event if ts is event.ts and detail == event.detail else replace(event, detail=detail, ts=ts)


def _plain(value: Any, depth: int = 0) -> bool:
    """True when JSON hands `value` back unchanged (str keys; str, int, finite float, bool, None, list), so
    the round trip through JSON can be skipped. Tuples, int keys, NaN and deep nesting take the round trip."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    if depth > 16:
        return False
    if kind is dict:
        for k, v in value.items():    # a loop, not all(...): scalars (nearly every value) cost no call
            item = type(v)
            if type(k) is not str or not (item is str or item is int or item is bool or v is None
                                          or _plain(v, depth + 1)):
                return False
        return True
    if kind is list:
        return all(_plain(v, depth + 1) for v in value)
    return False


class AuditLog:
    """The audit chain of `site` in `db`, plus read access to every site's records stored there."""

    def __init__(self, db: Database, site: str) -> None:
        self._db, self.site = db, check_text(site, "site", _TEXT_LIMITS["site"])
        self._insert = db.bulk_insert(AuditRow, _ROW_FIELDS)
        self._last = db.prepared(select(AuditRow.hash).where(AuditRow.site == bindparam("site"))
                                 .order_by(AuditRow.seq.desc()).limit(1))

    @property
    def db(self) -> Database:
        return self._db

    def append(self, actor: str, tenant: str, action: str, target: str = "", status: str = "ok",
               detail: dict[str, Any] | None = None, *, event_id: str | None = None,
               ts: datetime | None = None) -> AuditRecord:
        """Chain one event. With an `event_id` already stored, returns the stored record (a safe retry)."""
        return self.append_many([{"actor": actor, "tenant": tenant, "action": action, "target": target,
                                  "status": status, "detail": detail, "event_id": event_id, "ts": ts}])[0]

    def append_many(self, events: Sequence[AuditEvent | Mapping[str, Any]],
                    connection: Connection | None = None) -> list[AuditRecord]:
        """Chain several events in one transaction, in list order. Each event is an AuditEvent or a mapping
        with actor, tenant, action and optionally target, status, detail, event_id, ts. With `connection`
        (a write_connection of this database), inside its transaction."""
        pending = [_event(values) for values in events]
        if not pending:
            return []
        lock = f"seekserve:audit:{self.site}"
        if connection is not None:
            self._db.lock(connection, lock)
            return self._append(connection, pending)
        with self._db.write_connection(lock) as own:
            return self._append(own, pending)

    def append_new(self, events: Sequence[AuditEvent], connection: Connection) -> None:
        """Chain events whose ids were never appended (the record writer's fresh batch), inside
        `connection`'s transaction: append_many without its look-up of stored ids and without handing
        records back. A reused id still fails on the unique constraint (and the writer's retry then goes
        through append_many)."""
        pending = [_event(values) for values in events]
        if not pending:
            return
        self._db.lock(connection, f"seekserve:audit:{self.site}")
        self._insert.execute(connection, self._chain(connection, pending))

    def _append(self, connection: Connection, pending: list[AuditEvent]) -> list[AuditRecord]:
        table = AuditRow.__table__
        ids = [event.event_id for event in pending]
        # a stored event_id is a retry: answer with what is stored
        done = {row.event_id: _record(row)
                for row in connection.execute(select(table).where(table.c.event_id.in_(ids)))}
        fresh = [event for event in pending if event.event_id not in done]
        rows = self._chain(connection, fresh)
        if rows:
            self._insert.execute(connection, rows)
            # the rows ran in list order, each taking the next seq under the lock: read them back in one query
            seqs = dict(connection.execute(select(table.c.event_id, table.c.seq)
                                           .where(table.c.event_id.in_([row[0] for row in rows]))).all())
            for row, event in zip(rows, fresh):   # rows are in AuditRecord's field order; detail as JSON text
                done[row[0]] = AuditRecord(*row[:8], event.detail, *row[9:], seq=seqs[row[0]])
        return [done[event.event_id] for event in pending]

    def _chain(self, connection: Connection, events: list[AuditEvent]) -> list[tuple[Any, ...]]:
        """The rows of `events` chained after this site's last record, in _ROW_FIELDS order."""
        if not events:
            return []
        last = self._last.scalar(connection, site=self.site)
        prev_hash, rows = GENESIS_HASH if last is None else last, []
        for e in events:
            detail = JSONText(canonical_json(e.detail))    # hashed, and stored as it is
            digest = _link(prev_hash, _hashed_json(e, self.site, prev_hash, detail))
            rows.append((e.event_id, self.site, e.ts, e.actor, e.tenant, e.action, e.target, e.status, detail,
                         prev_hash, digest))
            prev_hash = digest
        return rows

    def verify(self, site: str | None = None) -> tuple[bool, int | None]:
        """Recompute every chain (or one site's). (True, None) when intact, else (False, seq of the first
        record whose content or link to its predecessor does not match)."""
        # streamed in batches: memory stays flat however long the chain
        query = select(*_RAW_COLUMNS).order_by(AuditRow.seq).execution_options(yield_per=1000)
        if site is not None:
            query = query.where(AuditRow.site == site)
        with self._db.session() as session:
            rows = session.execute(query)
            try:
                return _first_bad(rows)
            finally:
                rows.close()  # returning early must still release PostgreSQL's server-side cursor

    def query(self, tenant: str | None = None, since: datetime | None = None, until: datetime | None = None,
              action: str | None = None, limit: int = 1000, site: str | None = None) -> list[AuditRecord]:
        """Records newest first; `since` inclusive, `until` exclusive."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        query = select(AuditRow)
        for column, value in ((AuditRow.tenant, tenant), (AuditRow.action, action), (AuditRow.site, site)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(AuditRow.ts >= require_aware(since, "since"))
        if until is not None:
            query = query.where(AuditRow.ts < require_aware(until, "until"))
        query = query.order_by(AuditRow.ts.desc(), AuditRow.seq.desc()).limit(limit)
        with self._db.session() as session:
            return [_record(row) for row in session.scalars(query)]

    def ingest(self, records: Iterable[AuditRecord]) -> int:
        """Store other sites' records verbatim (their hashes untouched), skipping event_ids already stored;
        returns how many were new. Each site's records must come in chain order; records carrying their
        origin seq are sorted by it (a stable sort, so records without one keep their order)."""
        batch = sorted(records, key=lambda r: (r.site, r.seq if r.seq is not None else 0))
        if not batch:
            return 0
        rows = [_verbatim_row(record) for record in batch]
        statement = self._db.insert_ignoring_duplicates(AuditRow).returning(AuditRow.seq)
        # hold the append lock of every site touched, in a fixed order, so no local append interleaves
        sites = sorted({record.site for record in batch})
        with self._db.write_session(f"seekserve:audit:{sites[0]}") as session:
            for site in sites[1:]:
                self._db.lock(session, f"seekserve:audit:{site}")
            # row by row, as in append: local seq order must follow chain order
            return sum(len(session.execute(statement, [row]).all()) for row in rows)


def _verbatim_row(record: AuditRecord) -> dict[str, Any]:
    if not isinstance(record, AuditRecord):
        raise TypeError(f"expected AuditRecord, got {type(record).__name__}")
    for name, limit in _TEXT_LIMITS.items():
        check_text(getattr(record, name), name, limit, empty=name == "target")
    for name in ("prev_hash", "hash"):
        check_text(getattr(record, name), name, 64)
    if not isinstance(record.detail, dict):
        raise TypeError("detail must be a dict")
    row = {name: getattr(record, name) for name in _ROW_FIELDS}
    row["ts"] = require_aware(record.ts, "ts")
    return row


def _first_bad(rows: Iterable[Row[Any]]) -> tuple[bool, int | None]:
    expected: dict[str, str] = {}  # site → hash the site's next record must link to
    for row in rows:
        if row.prev_hash != expected.get(row.site, GENESIS_HASH) or row.hash != _raw_hash(row):
            return False, row.seq
        expected[row.site] = row.hash
    return True, None


def _raw_hash(row: Row[Any]) -> str | None:
    """The hash a raw row should have; None when a column was altered into something undecodable."""
    try:
        ts = datetime.fromisoformat(row.ts) if isinstance(row.ts, str) else row.ts
        detail = json.loads(row.detail) if isinstance(row.detail, str) else row.detail
        ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts  # SQLite keeps UTC without an offset
        record = AuditRecord(**{**row._asdict(), "ts": ts, "detail": detail})
        return record.expected_hash()
    except (TypeError, ValueError, AttributeError):
        return None
