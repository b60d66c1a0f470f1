"""Job kinds: ``jobs.kind`` is ``finetune`` (every job before this) or ``suggest`` (rank a
dataset of unlabelled images for labelling with a tuned model); ``jobs.result`` holds what a
job that makes no model found (a suggest job's ranked images).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("kind", sa.String(16), nullable=False,
                                    server_default="finetune"))
    op.add_column("jobs", sa.Column("result", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("result")
        batch.drop_column("kind")
