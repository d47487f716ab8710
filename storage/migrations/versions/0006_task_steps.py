"""Task steps and their leases (`storage.models.TaskStep`): a worker claims a step before running it and heartbeats
while it runs, so a step whose worker died is re-sent (`workers.steps`).

Revision ID: 0006_task_steps
Revises: 0005_calibrated
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_task_steps"
down_revision: str | None = "0005_calibrated"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_steps",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("lost", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(200), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_task_steps")),
    )
    op.create_index(op.f("ix_task_steps_job_id"), "task_steps", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_task_steps_job_id"), table_name="task_steps")
    op.drop_table("task_steps")
