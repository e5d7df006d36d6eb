"""Fixtures shared by every test folder: real Redis/PostgreSQL servers (tests/services.py) and a Tansu
Kafka-protocol broker (tests/gateway/broker.py)."""

from tests.gateway.broker import broker  # noqa: F401  (pytest fixture)
from tests.services import postgres_url, redis_url  # noqa: F401  (pytest fixtures)
