"""Dashboard: owner overrides of keep/drop decisions (``score_overrides``, an append-only audit log), the threshold's
own decision and the nearest anchors on each score, a cached per-job score summary, each checkpoint's term as its own
row (``score_parts``, backfilled) and indexes for sorting and counting scores.

Revision ID: 0004_dashboard
Revises: 0003_training
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_dashboard"
down_revision: str | None = "0003_training"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("scores") as batch:
        batch.add_column(sa.Column("auto_selected", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("override_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("nearest", sa.JSON(), nullable=True))
    op.execute("UPDATE scores SET auto_selected = selected")
    with op.batch_alter_table("scores") as batch:
        batch.alter_column("auto_selected", existing_type=sa.Boolean(), nullable=False)
    op.create_index(op.f("ix_scores_job_id_score"), "scores", ["job_id", "score"])
    op.create_index(op.f("ix_scores_job_id_owner_score"), "scores", ["job_id", "owner", "score"])
    op.create_index(
        op.f("ix_scores_job_id_owner_selected_auto_selected_override_id"),
        "scores",
        ["job_id", "owner", "selected", "auto_selected", "override_id"],
    )
    op.create_table(
        "score_parts",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("sample_id", sa.String(500), nullable=False),
        sa.Column("t", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_score_parts_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "owner", "sample_id", "t", name=op.f("pk_score_parts")),
    )
    op.create_index(op.f("ix_score_parts_job_id_t_value"), "score_parts", ["job_id", "t", "value"])
    _backfill_parts()
    op.add_column("jobs", sa.Column("summary", sa.JSON(), nullable=True))
    op.create_table(
        "score_overrides",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("sample_id", sa.String(500), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("previous", sa.Boolean(), nullable=False),
        sa.Column("selected", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_score_overrides_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_score_overrides")),
    )
    op.create_index(
        op.f("ix_score_overrides_job_id_owner_sample_id"), "score_overrides", ["job_id", "owner", "sample_id"]
    )


def _backfill_parts() -> None:
    """One ``score_parts`` row per checkpoint term of every score already stored."""
    bind = op.get_bind()
    scores = sa.table(
        "scores", sa.column("job_id"), sa.column("owner"), sa.column("sample_id"), sa.column("parts", sa.JSON())
    )
    parts = sa.table(
        "score_parts", sa.column("job_id"), sa.column("owner"), sa.column("sample_id"), sa.column("t"),
        sa.column("value"),
    )  # fmt: skip
    result = bind.execute(sa.select(scores)).yield_per(5000)
    for chunk in result.partitions():
        rows = [
            {"job_id": j, "owner": o, "sample_id": s, "t": t, "value": float(v)}
            for j, o, s, terms in chunk
            for t, v in enumerate(terms or [])
        ]
        if rows:
            bind.execute(sa.insert(parts), rows)


def downgrade() -> None:
    op.drop_index(op.f("ix_score_overrides_job_id_owner_sample_id"), table_name="score_overrides")
    op.drop_table("score_overrides")
    op.drop_column("jobs", "summary")
    op.drop_index(op.f("ix_score_parts_job_id_t_value"), table_name="score_parts")
    op.drop_table("score_parts")
    op.drop_index(op.f("ix_scores_job_id_owner_selected_auto_selected_override_id"), table_name="scores")
    op.drop_index(op.f("ix_scores_job_id_owner_score"), table_name="scores")
    op.drop_index(op.f("ix_scores_job_id_score"), table_name="scores")
    with op.batch_alter_table("scores") as batch:
        batch.drop_column("nearest")
        batch.drop_column("override_id")
        batch.drop_column("auto_selected")
