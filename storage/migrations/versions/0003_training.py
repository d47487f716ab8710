"""Training jobs: federated warmup, federated training and merging (``train_jobs``, ``train_members``,
``train_rounds``, ``train_updates``).

Revision ID: 0003_training
Revises: 0002_shard_samples
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_training"
down_revision: str | None = "0002_shard_samples"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    ref = target.split(".")[0]
    return sa.ForeignKeyConstraint([column], [target], name=op.f(f"fk_{table}_{column}_{ref}"), ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "train_jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("model", sa.String(500), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("quorum", sa.Integer(), nullable=False),
        sa.Column("round_timeout_s", sa.Float(), nullable=False),
        sa.Column("scoring_job_id", sa.String(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("layout", sa.JSON(), nullable=True),
        sa.Column("adapter_config", sa.JSON(), nullable=True),
        sa.Column("server_state_blob", sa.String(64), nullable=True),
        sa.Column("final_blob", sa.String(64), nullable=True),
        sa.Column("eval_blob", sa.String(64), nullable=True),
        sa.Column("eval_num_samples", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_train_jobs")),
    )
    op.create_table(
        "train_members",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("silo_id", sa.Integer(), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=True),
        _fk("train_members", "job_id", "train_jobs.id"),
        _fk("train_members", "silo_id", "silos.id"),
        sa.PrimaryKeyConstraint("job_id", "silo_id", name=op.f("pk_train_members")),
    )
    op.create_table(
        "train_rounds",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("start_blob", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("deadline", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("closed_at", _utc(), nullable=True),
        sa.Column("result_blob", sa.String(64), nullable=True),
        sa.Column("participants", sa.JSON(), nullable=True),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        _fk("train_rounds", "job_id", "train_jobs.id"),
        sa.PrimaryKeyConstraint("job_id", "round", name=op.f("pk_train_rounds")),
    )
    op.create_table(
        "train_updates",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("silo_id", sa.Integer(), nullable=False),
        sa.Column("blob_key", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        sa.Column("score_mass", sa.Float(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        _fk("train_updates", "job_id", "train_jobs.id"),
        _fk("train_updates", "silo_id", "silos.id"),
        sa.PrimaryKeyConstraint("job_id", "round", "silo_id", name=op.f("pk_train_updates")),
    )


def downgrade() -> None:
    for table in ("train_updates", "train_rounds", "train_members", "train_jobs"):
        op.drop_table(table)
