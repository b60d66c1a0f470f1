"""Tasks: ``datasets.task`` is a labelled dataset's, ``single_label`` (one class per image) or
``multi_label`` (a set of labels per image, from labels.csv), detected at upload;
``models.task`` is the task a model was trained for.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05

Labelled datasets and models from earlier releases were all single-label; unlabelled
datasets have no task.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("datasets", sa.Column("task", sa.String(16), nullable=True))
    op.execute("UPDATE datasets SET task = 'single_label' WHERE kind = 'labeled'")
    op.add_column("models", sa.Column("task", sa.String(16), nullable=False,
                                            server_default="single_label"))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("task")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("task")
