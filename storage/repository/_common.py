"""What the repository modules share: inserts that tolerate a concurrent writer, checked column updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from storage.models import (
    utcnow,
)

T = TypeVar("T")


def _insert_once(session: Session, row: T, existing: Callable[[], T | None]) -> tuple[T, bool]:
    """Insert ``row`` unless ``existing()`` finds one; on a concurrent insert (unique violation), return the winner."""
    found = existing()
    if found is not None:
        return found, False
    try:
        with session.begin_nested():  # a SAVEPOINT: the violation must not abort the caller's transaction
            session.add(row)
    except sa_exc.IntegrityError:
        found = existing()
        if found is None:
            raise
        return found, False
    return row, True


def _update(session: Session, row: T, allowed: frozenset[str], fields: dict[str, Any]) -> T:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise TypeError(f"not updatable field(s) of {type(row).__name__}: {unknown}")
    for key, value in fields.items():
        setattr(row, key, value)
    row.updated_at = utcnow()  # type: ignore[attr-defined]
    session.flush()
    return row
