"""Serving engines: ``models.serving`` holds a model's ONNX Runtime preparation once done
(the parity check against torch, the int8 guard, and the hash of the files' tar in the
store); null until its first prediction prepares it.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("serving", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("serving")
