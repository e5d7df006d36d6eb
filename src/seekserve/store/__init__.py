"""Persistence: SQLAlchemy 2 (SQLite embedded default, PostgreSQL by URL) with Alembic migrations."""
