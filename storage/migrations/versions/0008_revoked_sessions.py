"""Revoked dashboard sessions (`storage.models.RevokedSession`): logging out ends the session on the server, not
only in the browser.

Revision ID: 0008_revoked_sessions
Revises: 0007_round_flags
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_revoked_sessions"
down_revision: str | None = "0007_round_flags"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "revoked_sessions",
        sa.Column("sid", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sid", name=op.f("pk_revoked_sessions")),
    )


def downgrade() -> None:
    op.drop_table("revoked_sessions")
