"""Jobs record the default recipe: the stage they are in, the auto choices made for them
(each with its reason) and, once finished, the diagnosis of the run.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

All three are nullable: jobs from earlier releases have none of them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("stage", sa.String(16), nullable=True))
    op.add_column("jobs", sa.Column("resolved", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("diagnosis", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in ("diagnosis", "resolved", "stage"):
            batch.drop_column(column)
