"""initial schema: api_keys, usage_records, audit_records, outbox

Hand-written to match seekserve/store/models.py exactly (tests/store compare them with Alembic
autogenerate on SQLite and PostgreSQL). Self-contained: later model changes must not alter this file.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _big_id() -> sa.types.TypeEngine:
    # SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _create_api_keys() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("models", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("rps", sa.Float(), nullable=True),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("max_concurrency", sa.Integer(), nullable=True),
        _ts("created_at"),
        sa.Column("created_by", sa.String(255), nullable=True),
        _ts("last_used_at", nullable=True),
        _ts("expires_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.Column("rotated_to", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("secret_hash", name="uq_api_keys_secret_hash"),
    )
    op.create_index("ix_api_keys_name", "api_keys", ["name"])
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])


def _create_usage_records() -> None:
    op.create_table(
        "usage_records",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        _ts("ts"),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(255), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("backend", sa.String(64), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("sensitivity", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_records"),
        sa.UniqueConstraint("event_id", name="uq_usage_records_event_id"),
    )
    op.create_index("ix_usage_records_tenant_ts", "usage_records", ["tenant", "ts"])
    op.create_index("ix_usage_records_key_id_ts", "usage_records", ["key_id", "ts"])


def _create_audit_records() -> None:
    op.create_table(
        "audit_records",
        sa.Column("seq", _big_id(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        _ts("ts"),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_records"),
        sa.UniqueConstraint("event_id", name="uq_audit_records_event_id"),
    )
    op.create_index("ix_audit_records_tenant_ts", "audit_records", ["tenant", "ts"])
    op.create_index("ix_audit_records_site_seq", "audit_records", ["site", "seq"])


def _create_outbox() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        _ts("delivered_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )
    op.create_index("ix_outbox_delivered_at_id", "outbox", ["delivered_at", "id"])


def upgrade() -> None:
    _create_api_keys()
    _create_usage_records()
    _create_audit_records()
    _create_outbox()


def downgrade() -> None:
    for table in ("outbox", "audit_records", "usage_records", "api_keys"):
        op.drop_table(table)
