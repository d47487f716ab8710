"""Calibrated scores: each score row's raw signal values (``signal_values``), calibrated z per fused signal
(``signal_z``) and the signal that flagged it (``flagged_by``); all NULL for the rows of pure trace jobs.

Revision ID: 0005_calibrated
Revises: 0004_dashboard
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_calibrated"
down_revision: str | None = "0004_dashboard"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("scores") as batch:
        batch.add_column(sa.Column("signal_values", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("signal_z", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("flagged_by", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scores") as batch:
        batch.drop_column("flagged_by")
        batch.drop_column("signal_z")
        batch.drop_column("signal_values")
