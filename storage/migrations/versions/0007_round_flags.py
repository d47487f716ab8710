"""Round flags: what the aggregation's guard did to each silo's update (count capped, score mass clamped, delta
clipped), recorded on the round (`storage.models.TrainRound.guard`, with the clip bound and the delta norms); NULL
for rounds closed before.

Revision ID: 0007_round_flags
Revises: 0006_task_steps
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_round_flags"
down_revision: str | None = "0006_task_steps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("train_rounds") as batch:
        batch.add_column(sa.Column("guard", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("train_rounds") as batch:
        batch.drop_column("guard")
