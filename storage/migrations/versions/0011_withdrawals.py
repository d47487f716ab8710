"""Withdrawals from training jobs: the audit record of a silo (or some of its samples) leaving a job, and what the
coordinator did about it (`storage.models.TrainWithdrawal`).

Revision ID: 0011_withdrawals
Revises: 0010_local_scoring
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_withdrawals"
down_revision: str | None = "0010_local_scoring"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "train_withdrawals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("silo", sa.String(64), nullable=False),
        sa.Column("sample_ids", sa.JSON(), nullable=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["train_jobs.id"], name=op.f("fk_train_withdrawals_job_id_train_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_train_withdrawals")),
    )
    op.create_index(op.f("ix_train_withdrawals_job_id"), "train_withdrawals", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_train_withdrawals_job_id"), table_name="train_withdrawals")
    op.drop_table("train_withdrawals")
