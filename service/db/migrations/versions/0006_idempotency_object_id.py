"""``idempotency_keys.job_id`` becomes ``object_id``: since sweeps take an Idempotency-Key
too, the column holds a job's id or a sweep's.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

A rename only: every stored key keeps its value. batch_alter_table, as SQLite alters a
column by copying the table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _rename(old: str, new: str) -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column(old, new_column_name=new, existing_type=sa.String(32),
                           existing_nullable=False)


def upgrade() -> None:
    _rename("job_id", "object_id")


def downgrade() -> None:
    _rename("object_id", "job_id")
