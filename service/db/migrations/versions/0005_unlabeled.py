"""Unlabelled images: a dataset has a kind (a dataset of unlabelled images alone is
"unlabeled"), and a job may name such a dataset besides its labelled one.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

Datasets from earlier releases are all labelled; their jobs name no unlabelled dataset.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("datasets", sa.Column("kind", sa.String(16), nullable=False,
                                        server_default="labeled"))
    op.add_column("jobs", sa.Column("unlabeled_dataset_id", sa.String(32), nullable=True))
    op.create_index("ix_jobs_unlabeled_dataset_id", "jobs", ["unlabeled_dataset_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_unlabeled_dataset_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("unlabeled_dataset_id")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("kind")
