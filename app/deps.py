"""Request dependencies: the per-app state, a database session, and who is calling (admin or which silo)."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from app.config import AppSettings
from app.errors import ApiError
from storage import repository as repo
from storage.blobs import LocalBlobStore
from storage.models import Silo

Enqueue = Callable[..., None]
"""``enqueue(task_name, job_id, *args, countdown=None)``: hand a task to the workers (``countdown``: not before
that many seconds)."""


@dataclass
class AppState:
    settings: AppSettings
    sessions: sessionmaker[Session]
    blobs: LocalBlobStore
    enqueue: Enqueue
    ping_broker: Callable[[], None]


def get_state(request: Request) -> AppState:
    return request.app.state.clues


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

bearer = HTTPBearer(auto_error=False, description="the admin token, or a silo's token")


@dataclass(frozen=True)
class Principal:
    """The caller: the administrator (``silo`` None) or one silo."""

    silo: Silo | None

    @property
    def is_admin(self) -> bool:
        return self.silo is None


def get_principal(
    state: StateDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if credentials is None or not credentials.credentials:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"})
    token = credentials.credentials
    admin = state.settings.admin_token
    if admin and hmac.compare_digest(token.encode(), admin.encode()):
        return Principal(None)
    silo = repo.silo_by_token(session, token=token)
    if silo is None:
        raise ApiError(401, "unknown token", {"WWW-Authenticate": "Bearer"})
    return Principal(silo)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "this route needs the admin token")
    return principal


def require_silo(principal: PrincipalDep) -> Principal:
    if principal.is_admin:
        raise ApiError(403, "this route is for silos: use a silo's token")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
SiloDep = Annotated[Principal, Depends(require_silo)]
