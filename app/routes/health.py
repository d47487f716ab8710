"""Liveness and readiness: is the database reachable, is the broker reachable."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import StateDep
from app.schemas import Health
from storage.db import ping

router = APIRouter(tags=["health"])


def _check(fn) -> str:
    try:
        fn()
    except Exception as exc:  # reported, not raised: this route describes failures
        return f"error: {type(exc).__name__}: {exc}"[:300]
    return "ok"


@router.get("/healthz", operation_id="healthz", responses={503: {"model": Health}})
def healthz(state: StateDep) -> Health:
    """200 when the database and the broker answer, else 503 with what failed."""
    health = Health(
        status="ok",
        database=_check(lambda: ping(state.sessions.kw["bind"])),
        broker=_check(state.ping_broker),
    )
    if health.database != "ok" or health.broker != "ok":
        health.status = "degraded"
        return JSONResponse(health.model_dump(), status_code=503)
    return health
