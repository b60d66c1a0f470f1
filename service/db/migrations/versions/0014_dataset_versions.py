"""Dataset versions: ``datasets.parent_id`` names the dataset a version was made from (null
for an upload), ``datasets.version`` counts from 1 along that chain, and ``datasets.added``
says what the version added to its parent (where the images came from, how many per class,
the copies left out). A version's blob holds only what it added.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("datasets", sa.Column("parent_id", sa.String(32), nullable=True))
    op.create_index("ix_datasets_parent_id", "datasets", ["parent_id"])
    op.add_column("datasets", sa.Column("version", sa.Integer(), nullable=False,
                                        server_default="1"))
    op.add_column("datasets", sa.Column("added", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_index("ix_datasets_parent_id", table_name="datasets")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("added")
        batch.drop_column("version")
        batch.drop_column("parent_id")
