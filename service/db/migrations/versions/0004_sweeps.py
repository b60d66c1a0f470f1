"""Hyperparameter sweeps: the sweeps table, one row per trial (linking it to its job), and
``jobs.sweep_id`` on the trials' jobs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("dataset_id", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("base", sa.JSON(), nullable=False),
        sa.Column("space", sa.JSON(), nullable=False),
        sa.Column("objective", sa.String(32), nullable=False),
        sa.Column("n_trials", sa.Integer(), nullable=False),
        sa.Column("parallelism", sa.Integer(), nullable=False),
        sa.Column("pruner", sa.String(16), nullable=False),
        sa.Column("sampler", sa.String(16), nullable=False),
        sa.Column("max_total_s", sa.Double(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    for column in ("tenant_id", "dataset_id", "status", "created_at"):
        op.create_index(f"ix_sweeps_{column}", "sweeps", [column])
    op.create_table(
        "sweep_trials",
        sa.Column("sweep_id", sa.String(32), sa.ForeignKey("sweeps.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("number", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("system_attrs", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("job_id", name="uq_sweep_trials_job_id"),
    )
    op.add_column("jobs", sa.Column("sweep_id", sa.String(32), nullable=True))
    op.create_index("ix_jobs_sweep_id", "jobs", ["sweep_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_sweep_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sweep_id")
    op.drop_table("sweep_trials")
    op.drop_table("sweeps")
