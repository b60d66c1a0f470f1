"""Write holds: ``blob_deletions.not_before`` lets a writer schedule the removal of objects
it is about to store before their row exists (a model's bundle, an upload's images), so a
writer killed between the two leaves nothing behind for long; the row's transaction takes
the hold back. An ordinary deletion has no ``not_before``.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("blob_deletions", sa.Column("not_before", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("blob_deletions") as batch:
        batch.drop_column("not_before")
