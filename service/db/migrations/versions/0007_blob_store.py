"""Blobs move to the blob store: datasets and models record their tar's SHA-256, and
``blob_deletions`` holds the prefixes whose objects are still to be removed.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

Rows from before keep a null hash; ``ftune.service.blobs.backfill`` stores their files
(from the data directory they were written to) when the API starts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("datasets", "models"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("blob_sha256", sa.String(64), nullable=True))
    op.create_table(
        "blob_deletions",
        sa.Column("prefix", sa.String(300), primary_key=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("blob_deletions")
    for table in ("datasets", "models"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("blob_sha256")
