"""Database, migrations and errors of seekserve.store, on SQLite and a real PostgreSQL. Also defines the
`database` fixture the other tests/store modules import (one Database per test, schema at head, empty)."""

from __future__ import annotations

import shutil
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import URL, create_engine, exc, inspect, make_url, text
from sqlalchemy.pool import NullPool

from seekserve.store.db import (
    Database,
    StoreError,
    current_revision,
    default_database_url,
    head_revision,
    mask_url,
    upgrade,
)
from seekserve.store.keys import KeyStore
from seekserve.store.models import Base
from tests.services import free_port

TABLES = ("api_keys", "usage_records", "audit_records", "outbox")


def _reset_schema(url: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def store_pg_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of our own on the shared server, so resetting schemas here never touches
    what other test folders keep in theirs. Falls back to the shared database (reset, then left migrated)
    where the role may not create databases."""
    base = make_url(postgres_url)
    own = base.set(database=f"{base.database}_store_tests")
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            found = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": own.database})
            if found.first() is None:
                conn.execute(text(f"CREATE DATABASE {admin.dialect.identifier_preparer.quote(own.database)}"))
        url = own.render_as_string(hide_password=False)
    except exc.ProgrammingError:
        url = postgres_url
    finally:
        admin.dispose()
    _reset_schema(url)
    upgrade(url)
    yield url
    if url == postgres_url:
        _reset_schema(url)
        upgrade(url)  # leave the shared database as other tests expect it: empty, at head


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty database (no tables at all). The PostgreSQL one is migrated again afterwards."""
    if request.param == "sqlite":
        yield default_database_url(tmp_path / "data")
        return
    url = request.getfixturevalue("store_pg_url")
    _reset_schema(url)
    yield url
    upgrade(url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty SQLite file; copying it is much faster than migrating once per test."""
    path = tmp_path_factory.mktemp("store-template") / "seekserve.db"
    upgrade(URL.create("sqlite", database=str(path)).render_as_string())
    # upgrade() closed its last connection, which checkpoints the WAL into the file: one file is the database
    assert not path.with_name("seekserve.db-wal").exists()
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A Database at head with empty tables; SQLite in tmp_path or the shared PostgreSQL test database."""
    if request.param == "sqlite":
        url = default_database_url(tmp_path / "data")
        shutil.copyfile(request.getfixturevalue("sqlite_template"), make_url(url).database)
    else:
        url = request.getfixturevalue("store_pg_url")  # at head: fresh_url migrates it again after use
    db = Database(url)
    if db.dialect == "postgresql":
        with db.session() as session:
            session.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY"))
    try:
        yield db
    finally:
        db.close()


def test_default_database_url_creates_a_private_folder(tmp_path: Path) -> None:
    url = default_database_url(tmp_path / "a" / "b")
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    assert make_url(url).database == str(tmp_path / "a" / "b" / "seekserve.db")
    upgrade(url)
    assert (tmp_path / "a" / "b" / "seekserve.db").exists()


def test_sqlite_is_tuned(tmp_path: Path) -> None:
    db = Database(default_database_url(tmp_path))
    try:
        with db.session() as session:
            assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert session.execute(text("PRAGMA busy_timeout")).scalar() == 5000
        assert db.dialect == "sqlite"
    finally:
        db.close()


def test_upgrade_from_empty_to_head_is_idempotent(fresh_url: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the migrations are found from the package, not from the cwd
    assert current_revision(fresh_url) is None
    upgrade(fresh_url)
    assert current_revision(fresh_url) == head_revision() == "0001"
    upgrade(fresh_url)
    assert current_revision(fresh_url) == "0001"
    engine = create_engine(fresh_url, poolclass=NullPool)
    try:
        assert set(TABLES) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_concurrent_upgrades_do_not_collide(fresh_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def replica() -> None:
        barrier.wait()
        try:
            upgrade(fresh_url)
        except Exception as err:  # noqa: BLE001  (collected, asserted on below)
            errors.append(err)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert current_revision(fresh_url) == head_revision()


def test_models_match_migrations(database: Database) -> None:
    with database.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_session_commits_on_success_and_rolls_back_on_error(database: Database) -> None:
    insert = text("INSERT INTO outbox (event_id, topic, payload, created_at, attempts) "
                  "VALUES (:e, 't', '{}', CURRENT_TIMESTAMP, 0)")
    with database.session() as session:
        session.execute(insert, {"e": "kept"})
    with pytest.raises(RuntimeError), database.session() as session:
        session.execute(insert, {"e": "dropped"})
        raise RuntimeError("boom")
    with database.session() as session:
        assert session.execute(text("SELECT event_id FROM outbox")).scalars().all() == ["kept"]


def _assert_masked(err: StoreError, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in str(err) and secret not in repr(err)
    assert err.__cause__ is None and err.__suppress_context__


def test_unreachable_database_raises_store_error_without_password() -> None:
    url = f"postgresql+psycopg://seek:hunter2%40pw@127.0.0.1:{free_port()}/nowhere"
    for action in (upgrade, current_revision):
        with pytest.raises(StoreError) as caught:
            action(url)
        _assert_masked(caught.value, "hunter2", "hunter2@pw")
        assert "***" in str(caught.value) and "127.0.0.1" in str(caught.value)
    db = Database(url)
    try:
        with pytest.raises(StoreError) as caught:
            KeyStore(db, b"p" * 32).list()
        _assert_masked(caught.value, "hunter2")
        assert "hunter2" not in repr(db)
    finally:
        db.close()


@pytest.mark.parametrize("url", ["not a url", "mysql://root:hunter2@db.example/seek",
                                 "postgresql+nodriver://root:hunter2@db.example/seek", "sqlite:////no/such/dir/x.db"])
def test_bad_urls_raise_store_error_without_password(url: str) -> None:
    with pytest.raises(StoreError) as caught:
        upgrade(url)
    _assert_masked(caught.value, "hunter2")


def test_mask_url_hides_passwords_even_in_unparseable_urls() -> None:
    assert mask_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert "secret" not in mask_url("weird://u:secret@[broken")


def test_missing_schema_is_a_clear_store_error(tmp_path: Path) -> None:
    db = Database(default_database_url(tmp_path))
    try:
        with pytest.raises(StoreError, match="no such table"):
            KeyStore(db, b"p" * 32).list()
    finally:
        db.close()


@given(st.datetimes(timezones=st.just(UTC)))
def test_bulk_insert_timestamps_bind_as_sqlalchemy_would(value: datetime) -> None:
    """BulkInsert's shortcut for aware timestamps on SQLite gives the text SQLAlchemy's own processors give."""
    from sqlalchemy.dialects.sqlite import pysqlite

    from seekserve.store.db import _fast_processor
    from seekserve.store.models import UTCDateTime
    dialect = pysqlite.dialect()
    fast = _fast_processor(UTCDateTime(), dialect)
    slow = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert fast is not None and slow is not None and fast(value) == slow(value)


def test_bulk_insert_takes_json_text_on_either_driver() -> None:
    """A JSONText value is stored as is where the driver binds JSON as text, and decoded where it wraps."""
    from sqlalchemy import JSON
    from sqlalchemy.dialects.postgresql import psycopg
    from sqlalchemy.dialects.sqlite import pysqlite

    from seekserve.store.db import JSONText, _fast_processor
    value = {"b": [1, "é"], "a": None}
    on_sqlite = _fast_processor(JSON(), pysqlite.dialect())
    assert on_sqlite is not None and on_sqlite(JSONText('{"a":null}')) == '{"a":null}'
    on_pg = _fast_processor(JSON(), psycopg.dialect())
    assert on_pg is not None and on_pg(JSONText('{"b":[1,"é"],"a":null}')).obj == value
