"""Silos and their bearer tokens (stored hashed, `wire.hash_token`)."""

from __future__ import annotations

import secrets

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.errors import ConflictError, NotFoundError
from storage.models import (
    Silo,
)
from wire import hash_token

TOKEN_PREFIX = "clues_"


def create_silo(session: Session, *, name: str) -> tuple[Silo, str]:
    """Create a silo and its bearer token; return both (the token cannot be recovered later).

    Raises:
        ConflictError: ``name`` is taken.
    """
    taken = ConflictError(f"silo name '{name}' is already taken")
    if session.scalar(select(Silo.id).where(Silo.name == name)) is not None:
        raise taken
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    silo = Silo(name=name, token_hash=hash_token(token))
    try:
        with session.begin_nested():
            session.add(silo)
    except sa_exc.IntegrityError as exc:  # created concurrently
        raise taken from exc
    return silo, token


def silo_by_token(session: Session, *, token: str) -> Silo | None:
    """The silo whose token this is, or None."""
    return session.scalar(select(Silo).where(Silo.token_hash == hash_token(token)))


def find_silo(session: Session, *, name: str) -> Silo | None:
    """The silo of this name, or None."""
    return session.scalar(select(Silo).where(Silo.name == name))


def get_silo_by_name(session: Session, *, name: str) -> Silo:
    """Raises `NotFoundError` when no silo has this name."""
    silo = find_silo(session, name=name)
    if silo is None:
        raise NotFoundError(f"silo '{name}' does not exist")
    return silo


def list_silos(session: Session) -> list[Silo]:
    """All silos by name."""
    return list(session.scalars(select(Silo).order_by(Silo.name)))
