"""Per-sample index of shard parts (``shard_samples``): duplicate-id checks at upload become key lookups.

Revision ID: 0002_shard_samples
Revises: 0001_initial
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_shard_samples"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shard_samples",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("sample_id", sa.String(500), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_shard_samples_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "owner", "sample_id", name=op.f("pk_shard_samples")),
    )


def downgrade() -> None:
    op.drop_table("shard_samples")
