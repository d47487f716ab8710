"""DP-SGD: the privacy report a silo sends with each round's update (its ε ledger's figures,
`storage.models.TrainUpdate.privacy`); NULL for rounds trained without DP-SGD.

Revision ID: 0009_privacy
Revises: 0008_revoked_sessions
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_privacy"
down_revision: str | None = "0008_revoked_sessions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("train_updates") as batch:
        batch.add_column(sa.Column("privacy", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("train_updates") as batch:
        batch.drop_column("privacy")
