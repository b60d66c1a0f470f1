"""A training stage's own epochs: ``jobs.stage_start_epoch`` is the epochs finished when the
stage being run began and ``jobs.stage_epochs`` the epochs it may run, so progress can say
"finetune, epoch 2 of 11" beside the total.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05

Jobs from earlier releases have none: their progress shows the total alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("stage_start_epoch", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("stage_epochs", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("stage_start_epoch")
        batch.drop_column("stage_epochs")
