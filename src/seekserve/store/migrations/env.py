"""Alembic environment for the store. `seekserve.store.db.upgrade` hands over an open connection (inside a
locked transaction); the alembic CLI (-c store/alembic.ini -x url=...) gets a connection built here."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from seekserve.store.db import build_engine
from seekserve.store.models import Base

TARGET_METADATA = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=TARGET_METADATA,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table for later migrations
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    url = url or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database URL: pass -x url=... or set sqlalchemy.url")
    engine = build_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported; migrate a live database (-x url=...)")
_run_online()
