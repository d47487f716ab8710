"""Dashboard sessions revoked by logging out."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from storage.models import (
    RevokedSession,
    utcnow,
)


def revoke_session(session: Session, *, sid: str, expires_at: datetime) -> None:
    """Record a logged-out dashboard session (idempotent), and forget those past their expiry."""
    now = utcnow()
    session.execute(delete(RevokedSession).where(RevokedSession.expires_at < now))
    if session.get(RevokedSession, sid) is None and expires_at > now:
        session.add(RevokedSession(sid=sid, expires_at=expires_at))
    session.flush()


def session_revoked(session: Session, *, sid: str) -> bool:
    return session.get(RevokedSession, sid) is not None
