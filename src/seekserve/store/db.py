"""Database access: one Engine per URL (SQLite embedded default, PostgreSQL by URL) and Alembic upgrades.
Invariant: no error raised from here carries the URL's password; writers that must not interleave
(audit chain, key names, migrations) go through `write_session`, serialized across threads and replicas."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    URL,
    Connection,
    Dialect,
    Engine,
    bindparam,
    create_engine,
    event,
    exc,
    insert,
    make_url,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.dml import Insert

from seekserve.store.models import UTCDateTime

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 5000
# errors that mean "the database is unreachable, misconfigured or not migrated", not a bug in the caller
_INFRA_ERRORS = (exc.OperationalError, exc.InterfaceError, exc.ProgrammingError)


class StoreError(RuntimeError):
    """The store cannot do its job (bad URL, unreachable server, missing schema). Message is password-free."""


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***; works on URLs SQLAlchemy cannot even parse."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (exc.ArgumentError, ValueError, TypeError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def _password(url: str) -> str | None:
    try:
        return make_url(url).password
    except (exc.ArgumentError, ValueError, TypeError):
        found = re.search(r"://[^:/@]*:([^@]*)@", str(url))
        return found.group(1) if found else None


def _scrub(message: str, url: str) -> str:
    # a driver message may echo the conninfo; remove the password in every spelling we can know
    secret = _password(url)
    if secret:
        for spelling in {secret, quote(secret, safe="")}:
            message = message.replace(spelling, "***")
    return message


def store_error(what: str, url: str, err: BaseException) -> StoreError:
    """A StoreError for `err`, naming the masked URL and the driver's own reason (password scrubbed)."""
    reason = str(err.orig) if isinstance(err, exc.DBAPIError) and err.orig is not None else str(err)
    reason = _scrub(reason.strip().splitlines()[0] if reason.strip() else type(err).__name__, url)
    if "no such table" in reason or "does not exist" in reason:
        reason += " (is the database migrated? seekserve.store.db.upgrade() creates the schema)"
    return StoreError(f"{what} ({mask_url(url)}): {reason}")


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_*_lock, derived from a lock name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def default_database_url(data_dir: Path) -> str:
    """SQLite file `seekserve.db` in `data_dir`, creating the folder owner-only (it holds key hashes)."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.exists():
        data_dir.mkdir(mode=0o700, parents=True)
        os.chmod(data_dir, 0o700)  # mkdir's mode is filtered by the umask; be explicit
    return URL.create("sqlite", database=str(data_dir / "seekserve.db")).render_as_string()


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Take transaction control away from pysqlite (it defers BEGIN and commits before DDL); we emit BEGIN
    # ourselves in the "begin" hook, which lets write sessions use BEGIN IMMEDIATE.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    try:
        # the busy timeout first: the journal-mode switch of a fresh file may meet another connection's lock
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS:d}")
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the single writer
        cursor.execute("PRAGMA foreign_keys=ON")
        # with WAL, NORMAL never corrupts; a power cut may only drop the last commits
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get("seekserve_begin", "BEGIN"))


def build_engine(url: str, **kwargs: Any) -> Engine:
    """An Engine tuned per dialect; StoreError (masked) for a URL that cannot be used."""
    try:
        parsed = make_url(url)
        options: dict[str, Any] = dict(kwargs)
        if parsed.get_backend_name() == "sqlite":
            options.setdefault("connect_args", {}).update(
                check_same_thread=False, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
            engine = create_engine(parsed, **options)
            event.listen(engine, "connect", _sqlite_on_connect)
            event.listen(engine, "begin", _sqlite_on_begin)
            return engine
        if parsed.get_backend_name() != "postgresql":
            raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")
        options.setdefault("pool_pre_ping", True)
        if "connect_timeout" not in parsed.query:
            # an unroutable host should fail in seconds, not the OS's minutes
            options.setdefault("connect_args", {}).setdefault("connect_timeout", 10)
        return create_engine(parsed, **options)
    except (exc.ArgumentError, exc.NoSuchModuleError, ValueError, TypeError, ImportError) as err:
        raise store_error("unusable database URL", url, err) from None


class Database:
    """An Engine plus session factories. `session()` commits on success and rolls back on error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = build_engine(url)
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        # SQLite has one writer per file: BEGIN IMMEDIATE takes it up front (so a read-then-write never
        # fails half-way), and a process-local lock queues our own threads instead of busy-polling.
        self._immediate = self.engine.execution_options(seekserve_begin="BEGIN IMMEDIATE")
        self._write_sessions = sessionmaker(bind=self._immediate, expire_on_commit=False)
        self._sqlite_writer = threading.RLock()

    def __repr__(self) -> str:
        return f"Database({mask_url(self.url)!r})"

    @property
    def dialect(self) -> str:
        """"sqlite" or "postgresql"."""
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends normally, rolled back when it raises."""
        with self._unit(self._sessions) as session:
            yield session

    @contextmanager
    def write_session(self, lock_name: str | None = None) -> Iterator[Session]:
        """A unit of work that holds the writer lock: SQLite's file write lock (BEGIN IMMEDIATE), or on
        PostgreSQL the transaction-scoped advisory lock `lock_name` (none when lock_name is None)."""
        if self.dialect == "sqlite":
            with self._sqlite_writer, self._unit(self._write_sessions) as session:
                yield session
            return
        with self._unit(self._sessions) as session:
            if lock_name is not None:
                self.lock(session, lock_name)
            yield session

    @contextmanager
    def write_connection(self, lock_name: str | None = None) -> Iterator[Connection]:
        """write_session's guarantees on a Core connection, without the ORM session's bookkeeping (about
        0.5 ms a transaction): for the record writer's batches."""
        sqlite = self.dialect == "sqlite"
        try:
            with (self._sqlite_writer if sqlite else contextlib.nullcontext(),
                  (self._immediate if sqlite else self.engine).begin() as connection):
                if lock_name is not None:
                    self.lock(connection, lock_name)
                yield connection
        except _INFRA_ERRORS as err:
            raise store_error("database operation failed", self.url, err) from None

    def lock(self, session: Session | Connection, lock_name: str) -> None:
        """Inside a write_session (or write_connection), also take the lock `lock_name` until the
        transaction ends. A no-op on SQLite, where the write session already excludes every other writer."""
        if self.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key(lock_name)})

    @contextmanager
    def _unit(self, factory: sessionmaker[Session]) -> Iterator[Session]:
        session = factory()
        try:
            yield session
            session.commit()
        except _INFRA_ERRORS as err:
            session.rollback()
            raise store_error("database operation failed", self.url, err) from None
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def insert_ignoring_duplicates(self, table: type[Any]) -> Insert:
        """INSERT … ON CONFLICT (event_id) DO NOTHING in this database's dialect."""
        dialect_insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        return dialect_insert(table).on_conflict_do_nothing(index_elements=["event_id"])

    def bulk_insert(self, table: Any, columns: tuple[str, ...], ignore_duplicates: bool = False) -> BulkInsert:
        """A many-row INSERT of `columns` into `table`, compiled once for this database (see BulkInsert)."""
        return BulkInsert(self, table, columns, ignore_duplicates)

    def prepared(self, statement: Executable) -> PreparedQuery:
        """`statement` compiled once for this database (see PreparedQuery)."""
        return PreparedQuery(self, statement)

    def close(self) -> None:
        """Close every pooled connection; the Database must not be used afterwards."""
        self.engine.dispose()


class BulkInsert:
    """An INSERT compiled once, run as one executemany with each column's own bind processing (the same
    conversions SQLAlchemy applies: aware UTC timestamps, JSON). Core's per-row parameter handling cost
    about 10 µs a row, more than the rest of writing a usage or audit record (benchmarks/README.md §5).
    Rows run in list order: on SQLite each takes the next rowid."""

    def __init__(self, db: Database, table: Any, columns: tuple[str, ...], ignore_duplicates: bool) -> None:
        table = getattr(table, "__table__", table)
        statement = db.insert_ignoring_duplicates(table) if ignore_duplicates else insert(table)
        dialect = db.engine.dialect
        compiled = statement.values({name: bindparam(name) for name in columns}).compile(dialect=dialect)
        self.sql = str(compiled)
        self._positional = compiled.positional
        order = list(compiled.positiontup or ()) if compiled.positional else list(columns)
        self._index = [columns.index(name) for name in order]
        self._names = order
        self._in_order = self._index == list(range(len(columns)))
        processors = [_fast_processor(table.c[name].type, dialect) for name in order]
        self._processed = [(i, p) for i, p in enumerate(processors) if p is not None]

    def execute(self, connection: Connection, rows: list[tuple[Any, ...]]) -> int:
        """Insert rows (tuples in `columns` order); how many were stored (duplicates skipped)."""
        if not rows:
            return 0
        params: list[Any] = []
        for row in rows:
            values = list(row) if self._in_order else [row[i] for i in self._index]
            for i, process in self._processed:
                values[i] = process(values[i])
            params.append(tuple(values) if self._positional else dict(zip(self._names, values)))
        return connection.exec_driver_sql(self.sql, params).rowcount


class JSONText(str):
    """A value already spelled as JSON, for a JSON column of a BulkInsert: stored as it is where the
    driver takes JSON as text (SQLite, psycopg2), decoded and bound as usual elsewhere. Spares encoding a
    value twice when its text was needed anyway (the audit chain hashes it)."""


_SAMPLE_TIMES = (datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC))


def _fast_processor(column_type: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """The column's bind processor, or an equivalent faster one. SQLAlchemy's chain for an aware timestamp
    on SQLite costs about 4 µs a value; the shortcut is used only if it gives the same text on samples."""
    slow = column_type.dialect_impl(dialect).bind_processor(dialect)
    if slow is None:
        return None
    if isinstance(column_type, UTCDateTime) and dialect.name == "sqlite":
        def fast_time(value: Any) -> Any:
            if type(value) is datetime and value.tzinfo is UTC:
                return value.replace(tzinfo=None).isoformat(" ", "microseconds")
            return slow(value)
        if all(fast_time(t) == slow(t) for t in _SAMPLE_TIMES):
            return fast_time
        return slow
    if isinstance(column_type, JSON):
        sample = {"b": [1, "é"], "a": None}
        if isinstance(slow(sample), str):
            return lambda value: value if type(value) is JSONText else slow(value)
        return lambda value: slow(json.loads(value)) if type(value) is JSONText else slow(value)
    return slow


class PreparedQuery:
    """A statement compiled once and run as driver SQL: Core's per-execution work (cache look-up, result
    set-up) cost about 0.3 ms for the audit chain's one-row look-up of each write batch. Parameters are
    the statement's bindparam names; values pass to the driver as they are (no type processing), so this
    is for plain strings and numbers."""

    def __init__(self, db: Database, statement: Executable) -> None:
        compiled = statement.compile(dialect=db.engine.dialect)
        self.sql = str(compiled)
        self._defaults = dict(compiled.params)      # e.g. a LIMIT's value
        self._order = list(compiled.positiontup or ()) if compiled.positional else None

    def scalar(self, connection: Connection, **params: Any) -> Any:
        """The first column of the first row, or None."""
        values = {**self._defaults, **params}
        args = tuple(values[name] for name in self._order) if self._order is not None else values
        return connection.exec_driver_sql(self.sql, args).scalar()


def _alembic_config() -> Config:
    config = Config()
    # configparser interpolation treats % specially; the package path could contain one
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` to `revision`. Safe to run twice and from several replicas at once:
    the whole upgrade runs in one transaction under a lock (PostgreSQL advisory lock, SQLite write lock).
    SQLite can answer "database is locked" without waiting while several processes create a fresh file
    (its journal-mode switch does not always use the busy handler): that case is retried."""
    for attempt in range(5):
        try:
            _upgrade_once(url, revision)
            return
        except exc.OperationalError as err:
            if not (url.startswith("sqlite") and "locked" in str(err)) or attempt == 4:
                raise store_error("database upgrade failed", url, err) from None
            time.sleep(0.2 * (attempt + 1))
        except (exc.SQLAlchemyError, OSError) as err:
            raise store_error("database upgrade failed", url, err) from None


def _upgrade_once(url: str, revision: str) -> None:
    engine = build_engine(url, poolclass=NullPool)
    config = _alembic_config()
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.execution_options(seekserve_begin="BEGIN IMMEDIATE")
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    lock = advisory_key("seekserve:migrate")
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock})
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at `url` is at; None for a database never migrated."""
    engine = build_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except (exc.SQLAlchemyError, OSError) as err:
        raise store_error("cannot read the database revision", url, err) from None
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest revision shipped in the package."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise StoreError(f"no migrations found in {MIGRATIONS_DIR}")
    return head
