"""Tenancy: tenants, API keys, the audit log, job runs; every object belongs to a tenant.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

Existing datasets, jobs, models, aliases and idempotency keys move to the ``default`` tenant.
Aliases, idempotency keys and model versions become unique per tenant. Jobs gain the
dispatcher's admission time, hold reason and retry time. Sizes become 64-bit.
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DEFAULT_TENANT_ID = "0" * 32
TENANT_TABLES = ("datasets", "jobs", "models", "model_aliases", "idempotency_keys")


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    _create_new_tables()
    for table in TENANT_TABLES:
        op.add_column(table, sa.Column("tenant_id", sa.String(32), nullable=False,
                                       server_default=DEFAULT_TENANT_ID))
    for table in ("datasets", "jobs", "models"):
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])
    op.add_column("jobs", sa.Column("admitted_at", sa.DateTime(), nullable=True))
    op.add_column("jobs", sa.Column("hold_reason", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("retry_at", sa.DateTime(), nullable=True))
    op.add_column("models", sa.Column("size_bytes", sa.BigInteger(), nullable=False,
                                      server_default="0"))
    op.add_column("models", sa.Column("exports_bytes", sa.BigInteger(), nullable=False,
                                      server_default="0"))
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("size_bytes", type_=sa.BigInteger(), existing_nullable=False)
    _unique_per_tenant()
    # Defaults were only for the rows already there; the application always sets them.
    for table in TENANT_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("tenant_id", server_default=None, existing_nullable=False,
                               existing_type=sa.String(32))
    with op.batch_alter_table("models") as batch:
        for column in ("size_bytes", "exports_bytes"):
            batch.alter_column(column, server_default=None, existing_nullable=False,
                               existing_type=sa.BigInteger())


def _create_new_tables() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("quotas", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.bulk_insert(tenants, [{"id": DEFAULT_TENANT_ID, "name": "default",
                              "created_at": datetime.now(UTC).replace(tzinfo=None),
                              "quotas": {}}])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=True),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("action", sa.String(120), nullable=False),
        sa.Column("object_id", sa.String(200), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_tenant_id", "audit_log", ["tenant_id"])
    op.create_index("ix_audit_log_created_at", "audit_log", ["created_at"])
    op.create_table(
        "job_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_runs_job_id", "job_runs", ["job_id"])
    op.create_index("ix_job_runs_tenant_id", "job_runs", ["tenant_id"])
    op.create_index("ix_job_runs_ended_at", "job_runs", ["ended_at"])


def _unique_per_tenant() -> None:
    """Aliases, idempotency keys and model versions: unique within a tenant, not globally."""
    postgres = _postgres()
    with warnings.catch_warnings():
        # SQLite rebuilds the table; SQLAlchemy notes the primary key it had before.
        warnings.filterwarnings("ignore", message=".*specifies columns.*primary_key.*")
        for table, columns in (("model_aliases", ["tenant_id", "name", "alias"]),
                               ("idempotency_keys", ["tenant_id", "key"])):
            if postgres:
                op.drop_constraint(f"{table}_pkey", table, type_="primary")
            with op.batch_alter_table(table, recreate="auto") as batch:
                batch.create_primary_key(f"pk_{table}", columns)
    # SQLite's (name, version) constraint has no name; reflection gives it this one.
    old = "models_name_version_key" if postgres else "uq_models_name"
    with op.batch_alter_table(
            "models", naming_convention={"uq": "uq_%(table_name)s_%(column_0_name)s"}) as batch:
        batch.drop_constraint(old, type_="unique")
        batch.create_unique_constraint("uq_models_tenant_name_version",
                                       ["tenant_id", "name", "version"])


def downgrade() -> None:
    postgres = _postgres()
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint("uq_models_tenant_name_version", type_="unique")
        batch.create_unique_constraint("models_name_version_key" if postgres else "uq_models_name",
                                       ["name", "version"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*specifies columns.*primary_key.*")
        for table, columns in (("model_aliases", ["name", "alias"]),
                               ("idempotency_keys", ["key"])):
            with op.batch_alter_table(table, recreate="always" if not postgres else "auto") \
                    as batch:
                batch.drop_constraint(f"pk_{table}", type_="primary")
                batch.create_primary_key(f"{table}_pkey", columns)
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("size_bytes", type_=sa.Integer(), existing_nullable=False)
    for table in ("datasets", "jobs", "models"):
        op.drop_index(f"ix_{table}_tenant_id", table)
    with op.batch_alter_table("models") as batch:
        batch.drop_column("exports_bytes")
        batch.drop_column("size_bytes")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("retry_at")
        batch.drop_column("hold_reason")
        batch.drop_column("admitted_at")
    for table in TENANT_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant_id")
    for table in ("job_runs", "audit_log", "api_keys", "tenants"):
        op.drop_table(table)
