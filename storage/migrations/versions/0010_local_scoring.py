"""Silo-local scoring: the aggregate a silo sends instead of its projections (kept count, total, score histogram;
`storage.models.JobMember.aggregate`); NULL for shared jobs.

Revision ID: 0010_local_scoring
Revises: 0009_privacy
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_local_scoring"
down_revision: str | None = "0009_privacy"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_members") as batch:
        batch.add_column(sa.Column("aggregate", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_members") as batch:
        batch.drop_column("aggregate")
