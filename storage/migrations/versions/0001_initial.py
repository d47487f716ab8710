"""Initial schema: silos, jobs (checkpoints, members, anchor set), shards, scores, duplicate pairs.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _job_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f(f"fk_{table}_job_id_jobs"), ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("model", sa.String(500), nullable=False),
        sa.Column("lora", sa.JSON(), nullable=False),
        sa.Column("projection", sa.JSON(), nullable=False),
        sa.Column("similarity", sa.String(16), nullable=False),
        sa.Column("threshold", sa.JSON(), nullable=False),
        sa.Column("precondition", sa.Boolean(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("anchor_status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("threshold_value", sa.Float(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_table(
        "silos",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_silos")),
        sa.UniqueConstraint("name", name=op.f("uq_silos_name")),
    )
    op.create_index(op.f("ix_silos_token_hash"), "silos", ["token_hash"], unique=True)
    op.create_table(
        "anchor_sets",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("blob_key", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        sa.Column("sample_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        _job_fk("anchor_sets"),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_anchor_sets")),
    )
    op.create_table(
        "duplicate_pairs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("owner_a", sa.String(64), nullable=False),
        sa.Column("sample_a", sa.String(500), nullable=False),
        sa.Column("owner_b", sa.String(64), nullable=False),
        sa.Column("sample_b", sa.String(500), nullable=False),
        sa.Column("similarity", sa.Float(), nullable=False),
        _job_fk("duplicate_pairs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_duplicate_pairs")),
    )
    op.create_index(op.f("ix_duplicate_pairs_job_id"), "duplicate_pairs", ["job_id"])
    op.create_table(
        "job_checkpoints",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("lr_last", sa.Float(), nullable=False),
        sa.Column("adam", sa.JSON(), nullable=False),
        sa.Column("blob_key", sa.String(64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        _job_fk("job_checkpoints"),
        sa.PrimaryKeyConstraint("job_id", "index", name=op.f("pk_job_checkpoints")),
    )
    op.create_table(
        "job_members",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("silo_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=True),
        sa.Column("completed_at", _utc(), nullable=True),
        _job_fk("job_members"),
        sa.ForeignKeyConstraint(
            ["silo_id"], ["silos.id"], name=op.f("fk_job_members_silo_id_silos"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "silo_id", name=op.f("pk_job_members")),
    )
    op.create_table(
        "scores",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("sample_id", sa.String(500), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("parts", sa.JSON(), nullable=False),
        sa.Column("selected", sa.Boolean(), nullable=False),
        _job_fk("scores"),
        sa.PrimaryKeyConstraint("job_id", "owner", "sample_id", name=op.f("pk_scores")),
    )
    op.create_index(op.f("ix_scores_job_id_owner_row"), "scores", ["job_id", "owner", "row"])
    op.create_table(
        "shards",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("checkpoint", sa.Integer(), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=False),
        sa.Column("sample_ids", sa.JSON(), nullable=False),
        sa.Column("blob_key", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        _job_fk("shards"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shards")),
        sa.UniqueConstraint(
            "job_id", "owner", "checkpoint", "part", "role", name=op.f("uq_shards_job_id_owner_checkpoint_part_role")
        ),
    )
    op.create_index(op.f("ix_shards_job_id_owner"), "shards", ["job_id", "owner"])


def downgrade() -> None:
    tables = ("shards", "scores", "job_members", "job_checkpoints", "duplicate_pairs", "anchor_sets", "silos", "jobs")
    for table in tables:  # children first; dropping a table drops its indexes
        op.drop_table(table)
