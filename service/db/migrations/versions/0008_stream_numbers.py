"""Event and audit ids that reveal nothing of other tenants: ``job_events.seq`` numbers a job's
(or a sweep's) events 1, 2, 3 ..., ``audit_log.seq`` a tenant's audit rows (operators' rows,
with no tenant, are one more sequence). Each is unique within its scope.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

Existing rows are numbered in the order of their ids. A ``Last-Event-ID`` kept from before the
upgrade was a count across all jobs: resuming with it skips that many of the job's events
(reconnecting without one replays them all).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

NO_TENANT = "tenant_id IS NULL"


def _number(table: str, scope: str) -> None:
    """Rows 1, 2, 3 ... within each ``scope`` value, in id order (nulls are one scope).
    UPDATE ... FROM: PostgreSQL, and SQLite from 3.33."""
    op.execute(f"UPDATE {table} SET seq = numbered.n FROM (SELECT id AS row_id, ROW_NUMBER() "
               f"OVER (PARTITION BY {scope} ORDER BY id) AS n FROM {table}) AS numbered "
               f"WHERE numbered.row_id = {table}.id")


def upgrade() -> None:
    for table, scope in (("job_events", "job_id"), ("audit_log", "tenant_id")):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        _number(table, scope)
        with op.batch_alter_table(table) as batch:
            batch.alter_column("seq", existing_type=sa.Integer(), nullable=False)
            batch.create_unique_constraint(f"uq_{table}_{scope}_seq", [scope, "seq"])
    op.create_index("uq_audit_log_seq_no_tenant", "audit_log", ["seq"], unique=True,
                    postgresql_where=sa.text(NO_TENANT), sqlite_where=sa.text(NO_TENANT))


def downgrade() -> None:
    op.drop_index("uq_audit_log_seq_no_tenant", table_name="audit_log")
    for table, scope in (("job_events", "job_id"), ("audit_log", "tenant_id")):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_{scope}_seq", type_="unique")
            batch.drop_column("seq")
