"""Declarative tables of the store; migrations/versions/0001_initial.py creates exactly these (a test
compares them). Invariant: every timestamp is stored and returned as an aware UTC datetime, on both
dialects."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Float, Index, Integer, MetaData, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# SQLite only aliases rowid (and so auto-increments) for a column declared exactly INTEGER PRIMARY KEY
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Named constraints: Alembic needs stable names to alter or drop them in later migrations.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_event_id() -> str:
    """32 hex digits: the time in milliseconds (48 bits), then 80 random bits. Ids made later sort later, so
    the unique index on event_id grows at its end: a batch of records dirties a few index pages, not one
    page per record as random (uuid4) ids did. The random part only has to be unique, not secret: it comes
    from `random` (seeded from the OS, reseeded in a forked child), not a system call per id."""
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(80):020x}"


def require_aware(value: datetime, what: str) -> datetime:
    """`value` in UTC; ValueError for a naive datetime, whose meaning would depend on the host's zone."""
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


def check_text(value: Any, what: str, max_len: int, *, empty: bool = False) -> str:
    """`value` if it is a str within the column's size (same rule on both dialects, though SQLite would
    store anything); TypeError for a non-str, ValueError for a bad length."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_len or (not empty and not value):
        raise ValueError(f"{what} must be {'0' if empty else '1'}..{max_len} characters, got {len(value)}")
    return value


class UTCDateTime(TypeDecorator[datetime]):
    """DateTime(timezone=True) that refuses naive input and always returns aware UTC. SQLite keeps no
    offset, so values are stored there as naive UTC and re-labelled on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if type(value) is not datetime or value.tzinfo is not UTC:    # the usual aware UTC value skips this
            value = require_aware(value, "timestamp")
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (Index(None, "name"), Index(None, "tenant"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)          # "key_" + 16 hex
    name: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)      # HMAC-SHA256 hex, never the secret
    prefix: Mapped[str] = mapped_column(String(16))                        # "sk-ss-Ab12…", for display
    role: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str] = mapped_column(String(128))
    tier: Mapped[str] = mapped_column(String(16))
    models: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))  # NULL: every model
    rps: Mapped[float | None] = mapped_column(Float)
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str | None] = mapped_column(String(255))
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rotated_to: Mapped[str | None] = mapped_column(String(32))


class UsageRow(Base):
    __tablename__ = "usage_records"
    __table_args__ = (Index(None, "tenant", "ts"), Index(None, "key_id", "ts"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime)
    site: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str] = mapped_column(String(255))
    tenant: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(255))
    backend: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[float] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)                            # HTTP status of the response
    latency_ms: Mapped[float] = mapped_column(Float)
    sensitivity: Mapped[str] = mapped_column(String(32))


class AuditRow(Base):
    __tablename__ = "audit_records"
    # (site, seq): verify walks each site's chain in seq order
    __table_args__ = (Index(None, "tenant", "ts"), Index(None, "site", "seq"))

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    site: Mapped[str] = mapped_column(String(64))
    ts: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(255))
    tenant: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class OutboxRow(Base):
    __tablename__ = "outbox"
    # (delivered_at, id) serves "WHERE delivered_at IS NULL ORDER BY id"; no dialect-specific partial index
    __table_args__ = (Index(None, "delivered_at", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    topic: Mapped[str] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
