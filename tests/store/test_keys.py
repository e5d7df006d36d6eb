"""API keys on SQLite and PostgreSQL: secrets, verification, names, tenants, revocation and rotation."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text

from seekserve.gateway.principal import Limits, Role, Tier
from seekserve.store.db import Database
from seekserve.store.keys import (
    ApiKeyRecord,
    KeyStore,
    KeyStoreError,
    generate_secret,
    hash_secret,
    parse_duration,
)
from tests.store.test_db import database, sqlite_template, store_pg_url  # noqa: F401  (fixtures)

PEPPER = b"test-pepper-0123456789abcdef"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
INJECTION = "x' OR '1'='1"


class Clock:
    """A settable clock, so grace periods and expiry are tested without sleeping."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys(database: Database, clock: Clock) -> KeyStore:  # noqa: F811  (pytest fixture argument)
    return KeyStore(database, PEPPER, clock=clock)


def test_secret_format_and_hash() -> None:
    secret = generate_secret()
    assert re.fullmatch(r"sk-ss-[A-Za-z0-9_-]{43}", secret)
    assert generate_secret() != secret
    digest = hash_secret(secret, PEPPER)
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and secret not in digest
    assert hash_secret(secret, b"another-pepper-0123456789") != digest


def test_create_and_verify(keys: KeyStore, database: Database) -> None:  # noqa: F811
    record, secret = keys.create("ci", Role.developer, "acme", tier=Tier.vip, models=["m1", "m2"],
                                 limits=Limits(rps=2.5, rpm=100, tpm=5000, max_concurrency=3),
                                 created_by="root")
    assert record.id.startswith("key_") and len(record.id) == 20
    assert record.prefix == secret[:10] + "…" and record.status(T0) == "active"
    assert record.models == frozenset({"m1", "m2"}) and record.created_at == T0
    verified = keys.verify(secret)
    assert verified is not None and verified.id == record.id and verified.limits == record.limits
    assert verified.role is Role.developer and verified.tier is Tier.vip and verified.tenant == "acme"
    assert keys.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert keys.verify("not-a-key") is None and keys.verify("") is None
    assert KeyStore(database, b"other-pepper-0123456789", clock=keys._clock).verify(secret) is None
    with database.session() as session:
        stored = session.execute(text("SELECT secret_hash FROM api_keys")).scalar_one()
    assert stored == hash_secret(secret, PEPPER) and secret not in stored


def test_secret_never_in_repr_or_public_dict(keys: KeyStore) -> None:
    record, secret = keys.create("web", "admin", "acme")
    shown = repr(record) + str(record.to_public_dict(T0)) + repr(keys)
    assert secret not in shown and secret[10:20] not in shown
    assert hash_secret(secret, PEPPER) not in shown and "pepper" not in repr(keys)
    public = record.to_public_dict(T0)
    assert public["status"] == "active" and public["role"] == "admin" and public["models"] is None
    assert not any("hash" in k or "secret" in k for k in public)


def test_last_used_is_written_at_most_once_a_minute(keys: KeyStore, clock: Clock) -> None:
    record, secret = keys.create("ci", Role.developer, "acme")
    assert keys.verify(secret).last_used_at == T0
    clock.advance(seconds=30)
    keys.verify(secret)
    assert keys.get(record.id).last_used_at == T0
    clock.advance(seconds=31)
    keys.verify(secret)
    assert keys.get(record.id).last_used_at == T0 + timedelta(seconds=61)


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/x", INJECTION, "key_0123456789abcdef",
                                  "é"])
def test_invalid_names_are_refused(keys: KeyStore, name: str) -> None:
    with pytest.raises(KeyStoreError) as caught:
        keys.create(name, Role.developer, "acme")
    assert caught.value.kind == "invalid"


def test_invalid_arguments_are_refused(keys: KeyStore) -> None:
    for kwargs in ({"role": "root"}, {"tier": "gold"}, {"expires_at": T0 - timedelta(seconds=1)},
                   {"expires_at": datetime(2031, 1, 1)}, {"limits": Limits(rpm=-1)}, {"models": "m1"},
                   {"limits": Limits(tpm=1.5)}, {"limits": Limits(rps=float("nan"))},
                   {"created_by": "x" * 256}, {"tenant": ""}):
        args = {"name": "ok", "role": Role.developer, "tenant": "acme", **kwargs}
        with pytest.raises(KeyStoreError) as caught:
            keys.create(**args)
        assert caught.value.kind == "invalid", kwargs


def test_names_are_unique_among_live_keys(keys: KeyStore, clock: Clock) -> None:
    first, _ = keys.create("ci", Role.developer, "acme", expires_at=T0 + timedelta(hours=1))
    with pytest.raises(KeyStoreError) as caught:
        keys.create("ci", Role.developer, "other-tenant")
    assert caught.value.kind == "conflict"
    clock.advance(hours=2)  # expired keys free their name
    second, _ = keys.create("ci", Role.developer, "acme")
    keys.revoke(second.id)  # and so do revoked ones
    third, _ = keys.create("ci", Role.admin, "acme")
    assert keys.get("ci").id == third.id
    assert {k.id for k in keys.list()} == {first.id, second.id, third.id}
    assert [k.id for k in keys.list(include_revoked=False)] == [first.id, third.id]


def test_concurrent_creates_of_one_name_make_one_key(keys: KeyStore) -> None:
    barrier, outcomes = threading.Barrier(4), []

    def create() -> None:
        barrier.wait()
        try:
            outcomes.append(keys.create("race", Role.developer, "acme")[0].id)
        except KeyStoreError as err:
            outcomes.append(err.kind)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o for o in outcomes if o == "conflict") == ["conflict"] * 3
    assert len(keys.list()) == 1


def test_tenant_scoping(keys: KeyStore) -> None:
    a, _ = keys.create("a-key", Role.developer, "acme")
    b, _ = keys.create("b-key", Role.developer, "globex")
    assert keys.get(a.id, tenant="acme").id == a.id
    assert keys.get(a.id, tenant="globex") is None and keys.get("a-key", tenant="globex") is None
    assert [k.id for k in keys.list(tenant="globex")] == [b.id]
    with pytest.raises(KeyStoreError) as caught:
        keys.revoke("a-key", tenant="globex")
    assert caught.value.kind == "not_found"
    with pytest.raises(KeyStoreError):
        keys.rotate(a.id, timedelta(hours=1), tenant="globex")
    assert keys.get(a.id).status(T0) == "active"


def test_injection_shaped_values_are_stored_and_matched_literally(keys: KeyStore) -> None:
    evil, secret = keys.create("evil", Role.developer, INJECTION, models=[INJECTION])
    keys.create("plain", Role.developer, "acme")
    assert [k.id for k in keys.list(tenant=INJECTION)] == [evil.id]
    assert keys.get(INJECTION) is None and keys.get("evil", tenant="x") is None
    assert keys.get("evil", tenant=INJECTION).models == frozenset({INJECTION})
    assert keys.verify(secret).tenant == INJECTION
    assert keys.list(tenant="' OR 1=1 --") == []


def test_revoke(keys: KeyStore, clock: Clock) -> None:
    record, secret = keys.create("ci", Role.developer, "acme")
    clock.advance(seconds=5)
    revoked = keys.revoke("ci")
    assert revoked.id == record.id and revoked.revoked_at == T0 + timedelta(seconds=5)
    assert revoked.status(clock()) == "revoked" and keys.verify(secret) is None
    assert keys.get("ci") is None and keys.get(record.id).status(clock()) == "revoked"
    assert keys.revoke(record.id).revoked_at == revoked.revoked_at  # revoking twice changes nothing
    with pytest.raises(KeyStoreError) as caught:
        keys.revoke("nope")
    assert caught.value.kind == "not_found"


def test_rotate_with_grace(keys: KeyStore, clock: Clock) -> None:
    old, old_secret = keys.create("ci", Role.developer, "acme", tier=Tier.batch, models=["m"],
                                  limits=Limits(rpm=7), expires_at=T0 + timedelta(days=30))
    clock.advance(days=1)
    new, new_secret = keys.rotate("ci", timedelta(hours=1), created_by="ops")
    assert new_secret != old_secret and new.id != old.id and new.name == "ci"
    assert (new.role, new.tenant, new.tier, new.models, new.limits) == (old.role, old.tenant, old.tier,
                                                                        old.models, old.limits)
    assert new.expires_at == clock() + timedelta(days=30)  # same lifetime length, counted from now
    assert new.created_by == "ops" and keys.get("ci").id == new.id
    stale = keys.get(old.id)
    assert stale.rotated_to == new.id and stale.expires_at == clock() + timedelta(hours=1)
    assert keys.verify(old_secret).status(clock()) == "rotated" and keys.verify(new_secret).id == new.id
    with pytest.raises(KeyStoreError) as caught:
        keys.rotate(old.id, timedelta(hours=1))
    assert caught.value.kind == "conflict"
    clock.advance(minutes=59)
    assert keys.verify(old_secret) is not None
    clock.advance(minutes=1)
    assert keys.verify(old_secret) is None and keys.verify(new_secret) is not None
    assert keys.get(old.id).status(clock()) == "expired"


def test_rotation_never_extends_the_old_expiry(keys: KeyStore) -> None:
    old, _ = keys.create("ci", Role.developer, "acme", expires_at=T0 + timedelta(minutes=10))
    new, _ = keys.rotate(old.id, timedelta(days=7))
    assert keys.get(old.id).expires_at == T0 + timedelta(minutes=10)
    assert new.expires_at == T0 + timedelta(minutes=10)


def test_revoke_by_name_also_ends_rotation_grace(keys: KeyStore) -> None:
    _, old_secret = keys.create("ci", Role.developer, "acme")
    _, new_secret = keys.rotate("ci", timedelta(days=1))
    keys.revoke("ci")
    assert keys.verify(old_secret) is None and keys.verify(new_secret) is None


def test_record_status_order() -> None:
    base = {"id": "key_0000000000000000", "name": "n", "role": Role.admin, "tenant": "t",
            "tier": Tier.standard, "models": None, "limits": Limits(), "prefix": "sk-ss-abcd…",
            "created_at": T0, "created_by": None,
            "last_used_at": None, "expires_at": None, "revoked_at": None, "rotated_to": None}
    assert ApiKeyRecord(**base).status(T0) == "active"
    assert ApiKeyRecord(**{**base, "rotated_to": "key_1"}).status(T0) == "rotated"
    assert ApiKeyRecord(**{**base, "rotated_to": "key_1", "expires_at": T0}).status(T0) == "expired"
    assert ApiKeyRecord(**{**base, "expires_at": T0, "revoked_at": T0}).status(T0) == "revoked"


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["d", "h", "m", "s"]))
def test_parse_duration_round_trips(amount: int, unit: str) -> None:
    seconds = {"d": 86400, "h": 3600, "m": 60, "s": 1}[unit]
    assert parse_duration(f"{amount}{unit}") == timedelta(seconds=amount * seconds)


@given(st.text(max_size=12).filter(lambda s: not re.fullmatch(r"\s*[0-9]{1,9}\s*[dhms]\s*",
                                                 s, re.ASCII)))
def test_parse_duration_refuses_garbage(garbage: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(garbage)
