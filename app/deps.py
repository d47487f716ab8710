"""Request dependencies: the per-app state, a database session, and who is calling (admin or which silo)."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from app.config import AppSettings
from app.errors import ApiError
from app.limits import AuthLimiter
from storage import repository as repo
from storage.blobs import LocalBlobStore
from storage.models import Silo
from webui import COOKIE_NAME, SessionSigner, same_origin
from wire import hash_token
from workers.steps import Dispatcher


@dataclass
class AppState:
    settings: AppSettings
    sessions: sessionmaker[Session]
    blobs: LocalBlobStore
    dispatcher: Dispatcher
    """How routes hand steps to the workers: ``dispatcher.enqueue(task, *args, countdown=None)`` (the outbox)."""
    ping_broker: Callable[[], None]
    signer: SessionSigner
    auth_limiter: AuthLimiter


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


def client_address(request: Request) -> str:
    """Who is asking, for the failed-authentication limit (behind a proxy: run uvicorn with its proxy headers)."""
    return request.client.host if request.client else "unknown"


def authenticate(state: AppState, session: Session, token: str, address: str) -> Principal | None:
    """`principal_for_token`, counting failures per ``address``: past `AppSettings.auth_failures_per_minute` it
    raises a 429 with ``Retry-After`` without looking at the token."""
    wait = state.auth_limiter.retry_after(address)
    if wait is not None:
        raise ApiError(429, f"too many failed logins from {address}; try again in {wait} s", {"Retry-After": str(wait)})
    principal = principal_for_token(state, session, token)
    if principal is None:
        state.auth_limiter.failed(address)
    return principal


def principal_for_token(state: AppState, session: Session, token: str) -> Principal | None:
    """The administrator or the silo a bearer token belongs to; None for an unknown token."""
    admin = state.settings.admin_token
    if admin and hmac.compare_digest(token.encode(), admin.encode()):
        return Principal(None)
    silo = repo.silo_by_token(session, token=token)
    return Principal(silo) if silo is not None else None


def principal_from_cookie(state: AppState, session: Session, request: Request) -> Principal | None:
    """The dashboard session's principal, if the request carries a valid session cookie whose token still holds:
    the admin token unchanged, or the silo still holding the token it logged in with."""
    signed = state.signer.read(request.cookies.get(COOKIE_NAME))
    if signed is None or repo.session_revoked(session, sid=signed.sid):
        return None
    if signed.subject == "admin":
        admin = state.settings.admin_token
        return Principal(None) if admin and state.signer.matches(signed, hash_token(admin)) else None
    kind, _, name = signed.subject.partition(":")
    silo = repo.find_silo(session, name=name) if kind == "silo" else None
    if silo is None or not state.signer.matches(signed, silo.token_hash):
        return None
    return Principal(silo)


def get_principal(
    state: StateDep,
    session: SessionDep,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller, from ``Authorization: Bearer`` or else the dashboard's session cookie. A cookie-authenticated
    request that changes state must come from our own pages (`webui.same_origin`): 403 otherwise."""
    if credentials is not None and credentials.credentials:
        principal = authenticate(state, session, credentials.credentials, client_address(request))
        if principal is None:
            raise ApiError(401, "unknown token", {"WWW-Authenticate": "Bearer"})
        return principal
    principal = principal_from_cookie(state, session, request)
    if principal is None:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"})
    unsafe = request.method not in ("GET", "HEAD", "OPTIONS")
    if unsafe and not same_origin(request.headers, request.headers.get("host")):
        raise ApiError(403, "cross-site request refused: a dashboard session may change state only from its own pages")
    return principal


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


# --- path parameters shared by the routes and the pages ---

JobId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="the job id")]
TrainId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="the training job id")]
Index = Annotated[int, PathParam(ge=0, le=100_000)]
"""A checkpoint index."""
Round = Annotated[int, PathParam(ge=0, le=100_000)]
"""A training round."""
WithdrawalId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="the withdrawal id")]
