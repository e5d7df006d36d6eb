"""API keys: creation, verification, revocation and rotation, backed by the `api_keys` table.
Invariant: a secret is returned once by create/rotate and never stored; only its peppered HMAC is."""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from seekserve.gateway.principal import Limits, Role, Tier
from seekserve.store.db import Database
from seekserve.store.models import ApiKeyRow, require_aware, utcnow

SECRET_PREFIX = "sk-ss-"
SECRET_LENGTH = len(SECRET_PREFIX) + 43   # 32 random bytes → 43 url-safe base64 chars, unpadded
DISPLAY_CHARS = 4                         # random chars shown in `prefix`: 24 of 256 bits, tells keys apart
TOUCH_INTERVAL = timedelta(seconds=60)    # last_used_at refresh period: one write per key a minute, at most
MIN_PEPPER_BYTES = 16
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ID_RE = re.compile(r"key_[0-9a-f]{16}")
_DURATION_RE = re.compile(r"\s*([0-9]{1,9})\s*([dhms])\s*", re.ASCII)
_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
_KEY_LOCK = "seekserve:api_keys"          # serializes name checks against concurrent creates on PostgreSQL


class KeyStoreError(Exception):
    """A key operation refused. `kind` is "not_found", "conflict" or "invalid" (maps to 404/409/400)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def generate_secret() -> str:
    """A new key secret: "sk-ss-" + 43 url-safe base64 characters of 32 random bytes."""
    return SECRET_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def hash_secret(secret: str, pepper: bytes) -> str:
    """HMAC-SHA256 hex of the secret. The pepper lives outside the database, so a stolen table of hashes
    cannot be checked against guesses."""
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def parse_duration(text: str) -> timedelta:
    """"30d" | "12h" | "90m" | "45s" → timedelta; ValueError for anything else."""
    found = _DURATION_RE.fullmatch(text) if isinstance(text, str) else None
    if found is None:
        raise ValueError(f"not a duration: {text!r} (expected a number followed by d, h, m or s, e.g. 30d)")
    return timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True)
class ApiKeyRecord:
    """One key as stored, minus its hash. Safe to log and to show."""

    id: str
    name: str
    role: Role
    tenant: str
    tier: Tier
    models: frozenset[str] | None
    limits: Limits
    prefix: str
    created_at: datetime
    created_by: str | None
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_to: str | None

    def status(self, now: datetime | None = None) -> str:
        """"revoked", "expired", "rotated" (replaced, still valid until expires_at) or "active"."""
        now = utcnow() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "rotated" if self.rotated_to is not None else "active"

    def is_valid(self, now: datetime | None = None) -> bool:
        """Whether the key authenticates at `now` (active, or rotated within its grace period)."""
        return self.status(now) in ("active", "rotated")

    def to_public_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """JSON-safe view for APIs and the CLI; holds no hash or secret."""
        limits = self.limits
        return {
            "id": self.id, "name": self.name, "prefix": self.prefix, "role": self.role.value,
            "tenant": self.tenant, "tier": self.tier.value, "status": self.status(now),
            "models": None if self.models is None else sorted(self.models),
            "limits": {"rps": limits.rps, "rpm": limits.rpm, "tpm": limits.tpm,
                       "max_concurrency": limits.max_concurrency},
            "created_at": _iso(self.created_at), "created_by": self.created_by,
            "last_used_at": _iso(self.last_used_at), "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at), "rotated_to": self.rotated_to,
        }


def _record(row: ApiKeyRow) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row.id, name=row.name, role=Role(row.role), tenant=row.tenant, tier=Tier(row.tier),
        models=None if row.models is None else frozenset(row.models),
        limits=Limits(rps=row.rps, rpm=row.rpm, tpm=row.tpm, max_concurrency=row.max_concurrency),
        prefix=row.prefix, created_at=row.created_at, created_by=row.created_by,
        last_used_at=row.last_used_at, expires_at=row.expires_at, revoked_at=row.revoked_at,
        rotated_to=row.rotated_to)


def _check_limits(limits: Limits) -> Limits:
    if not isinstance(limits, Limits):
        raise KeyStoreError(f"limits must be a Limits, got {type(limits).__name__}")
    for field, kinds in (("rps", (int, float)), ("rpm", int), ("tpm", int), ("max_concurrency", int)):
        value = getattr(limits, field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds) or not value >= 0):
            raise KeyStoreError(f"limit {field} must be a number >= 0 (a whole one but for rps) or None, "
                                f"got {value!r}")
    return limits


def _check_models(models: Iterable[str] | None) -> list[str] | None:
    if models is None:
        return None
    if isinstance(models, str):
        raise KeyStoreError("models must be a collection of model names, not one string")
    names = sorted(set(models))
    if any(not isinstance(m, str) or not m or len(m) > 255 for m in names):
        raise KeyStoreError("model names must be non-empty strings of at most 255 characters")
    return names


def _check_created_by(created_by: str | None) -> str | None:
    if created_by is not None and (not isinstance(created_by, str) or len(created_by) > 255):
        raise KeyStoreError("created_by must be a string of at most 255 characters")
    return created_by


def _check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not tenant or len(tenant) > 128:
        raise KeyStoreError("tenant must be 1..128 characters")
    return tenant


class KeyStore:
    """API keys of every tenant. `clock` returns the current aware UTC time (tests inject one)."""

    def __init__(self, db: Database, pepper: bytes, clock: Callable[[], datetime] = utcnow) -> None:
        if not isinstance(pepper, bytes) or len(pepper) < MIN_PEPPER_BYTES:
            raise ValueError(f"the key pepper must be at least {MIN_PEPPER_BYTES} bytes")
        self._db, self._pepper, self._clock = db, pepper, clock

    def __repr__(self) -> str:
        return f"KeyStore({self._db!r})"  # never the pepper

    def create(self, name: str, role: Role | str, tenant: str, tier: Tier | str = Tier.standard,
               models: Iterable[str] | None = None, limits: Limits = Limits(),  # noqa: B008 (frozen)
               expires_at: datetime | None = None, created_by: str | None = None) -> tuple[ApiKeyRecord, str]:
        """A new key and its secret (shown once). Name: 1..64 of [A-Za-z0-9._-], unique among live keys."""
        now = self._clock()
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or _ID_RE.fullmatch(name):
            raise KeyStoreError(f"invalid key name {name!r}: 1..64 characters of A-Z a-z 0-9 . _ - "
                                "(and not shaped like a key id)")
        try:
            role, tier = Role(role), Tier(tier)
            expires_at = None if expires_at is None else require_aware(expires_at, "expires_at")
        except (TypeError, ValueError) as err:
            raise KeyStoreError(str(err)) from None
        if expires_at is not None and expires_at <= now:
            raise KeyStoreError("expires_at must be in the future")
        row = ApiKeyRow(name=name, role=role.value, tenant=_check_tenant(tenant), tier=tier.value,
                        models=_check_models(models), expires_at=expires_at,
                        created_by=_check_created_by(created_by))
        _set_limits(row, _check_limits(limits))
        with self._db.write_session(_KEY_LOCK) as session:
            if any(_record(r).is_valid(now) for r in self._rows_named(session, name)):
                raise KeyStoreError(f"a live key named {name!r} already exists", "conflict")
            secret = self._fill_new(row, now)
            session.add(row)
            session.flush()
            return _record(row), secret

    def _fill_new(self, row: ApiKeyRow, now: datetime) -> str:
        secret = generate_secret()
        row.id = "key_" + secrets.token_hex(8)
        row.secret_hash = hash_secret(secret, self._pepper)
        row.prefix = secret[:len(SECRET_PREFIX) + DISPLAY_CHARS] + "…"
        row.created_at = now
        return secret

    @staticmethod
    def _rows_named(session: Session, name: str, tenant: str | None = None) -> builtins.list[ApiKeyRow]:
        query = select(ApiKeyRow).where(ApiKeyRow.name == name, ApiKeyRow.revoked_at.is_(None))
        if tenant is not None:
            query = query.where(ApiKeyRow.tenant == tenant)
        return builtins.list(session.scalars(query))

    def verify(self, secret: str) -> ApiKeyRecord | None:
        """The key a secret belongs to, or None (unknown, revoked, expired). Constant-time on the hash."""
        well_formed = isinstance(secret, str) and len(secret) == SECRET_LENGTH
        if not (well_formed and secret.startswith(SECRET_PREFIX)):
            return None  # not one of ours: no database round trip for junk
        digest = hash_secret(secret, self._pepper)
        now = self._clock()
        with self._db.session() as session:
            row = session.scalars(select(ApiKeyRow).where(ApiKeyRow.secret_hash == digest)).one_or_none()
            if row is None or not hmac.compare_digest(row.secret_hash, digest):
                return None
            record = _record(row)
        if not record.is_valid(now):
            return None
        if record.last_used_at is None or now - record.last_used_at >= TOUCH_INTERVAL:
            record = self._touch(record, now)
        return record

    def _touch(self, record: ApiKeyRecord, now: datetime) -> ApiKeyRecord:
        # conditional UPDATE: replicas racing on the same key write once, not once each
        stale = or_(ApiKeyRow.last_used_at.is_(None), ApiKeyRow.last_used_at <= now - TOUCH_INTERVAL)
        with self._db.session() as session:
            statement = update(ApiKeyRow).where(ApiKeyRow.id == record.id, stale).values(last_used_at=now)
            session.execute(statement)
        return replace(record, last_used_at=now)

    def get(self, id_or_name: str, tenant: str | None = None) -> ApiKeyRecord | None:
        """The key with this id (any status), or the current non-revoked key with this name; None when
        absent or, with `tenant`, owned by another tenant."""
        with self._db.session() as session:
            row = self._resolve(session, id_or_name, tenant)
            return None if row is None else _record(row)

    def _resolve(self, session: Session, id_or_name: str, tenant: str | None) -> ApiKeyRow | None:
        if not isinstance(id_or_name, str):
            return None
        if _ID_RE.fullmatch(id_or_name):
            row = session.get(ApiKeyRow, id_or_name)
            return None if row is None or (tenant is not None and row.tenant != tenant) else row
        now = self._clock()
        rank = {"active": 0, "rotated": 1, "expired": 2}
        # the current key of a name: live before rotated-away before expired, newest first
        rows = sorted(self._rows_named(session, id_or_name, tenant),
                      key=lambda r: (rank[_record(r).status(now)], -r.created_at.timestamp()))
        return rows[0] if rows else None

    def _require(self, session: Session, id_or_name: str, tenant: str | None) -> ApiKeyRow:
        row = self._resolve(session, id_or_name, tenant)
        if row is None:
            raise KeyStoreError(f"no key {id_or_name!r}", "not_found")
        return row

    def has_usable_keys(self) -> bool:
        """Whether any key could authenticate now (not revoked, not expired): then the server needs auth."""
        now = self._clock()
        query = (select(ApiKeyRow.id).where(ApiKeyRow.revoked_at.is_(None))
                 .where(or_(ApiKeyRow.expires_at.is_(None), ApiKeyRow.expires_at > now)).limit(1))
        with self._db.session() as session:
            return session.execute(query).first() is not None

    def list(self, tenant: str | None = None, include_revoked: bool = True) -> builtins.list[ApiKeyRecord]:
        """Keys (of one tenant, or all), oldest first."""
        query = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        if tenant is not None:
            query = query.where(ApiKeyRow.tenant == tenant)
        if not include_revoked:
            query = query.where(ApiKeyRow.revoked_at.is_(None))
        with self._db.session() as session:
            return [_record(row) for row in session.scalars(query)]

    def revoke(self, id_or_name: str, tenant: str | None = None) -> ApiKeyRecord:
        """Revoke a key now. By name, keys it was rotated from (still in their grace period) go too, so
        "revoke ci" leaves no credential called ci working."""
        now = self._clock()
        with self._db.write_session(_KEY_LOCK) as session:
            row = self._require(session, id_or_name, tenant)
            if row.revoked_at is not None:
                return _record(row)
            row.revoked_at = now
            if not _ID_RE.fullmatch(id_or_name):
                for older in self._rows_named(session, row.name, row.tenant):
                    if older.rotated_to is not None and _record(older).is_valid(now):
                        older.revoked_at = now
            session.flush()
            return _record(row)

    def rotate(self, id_or_name: str, grace: timedelta, created_by: str | None = None,
               tenant: str | None = None) -> tuple[ApiKeyRecord, str]:
        """Replace a live key with a new secret. The old one keeps working for `grace` (never past its own
        expiry); the new one has the same name, rights and lifetime length."""
        if not isinstance(grace, timedelta) or grace < timedelta(0):
            raise KeyStoreError("grace must be a non-negative timedelta")
        _check_created_by(created_by)
        now = self._clock()
        with self._db.write_session(_KEY_LOCK) as session:
            old = self._require(session, id_or_name, tenant)
            state = _record(old).status(now)
            if state != "active":
                raise KeyStoreError(f"key {old.id} is {state}; only an active key can be rotated", "conflict")
            lifetime = None if old.expires_at is None else old.expires_at - old.created_at
            new = ApiKeyRow(name=old.name, role=old.role, tenant=old.tenant, tier=old.tier, models=old.models,
                            rps=old.rps, rpm=old.rpm, tpm=old.tpm, max_concurrency=old.max_concurrency,
                            created_by=created_by, expires_at=None if lifetime is None else now + lifetime)
            secret = self._fill_new(new, now)
            session.add(new)
            old.rotated_to = new.id
            old.expires_at = now + grace if old.expires_at is None else min(old.expires_at, now + grace)
            session.flush()
            return _record(new), secret


def _set_limits(row: ApiKeyRow, limits: Limits) -> None:
    row.rps, row.rpm = limits.rps, limits.rpm
    row.tpm, row.max_concurrency = limits.tpm, limits.max_concurrency
