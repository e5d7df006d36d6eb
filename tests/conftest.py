"""Fixtures shared by every test folder: real Redis/PostgreSQL servers (see tests/services.py)."""

from tests.services import postgres_url, redis_url  # noqa: F401  (pytest fixtures)
