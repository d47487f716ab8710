"""The coordinator API: `create_app` wires settings, storage, the task queue, routes, errors and metrics.

Run it with ``clues coordinator serve`` (API only) or ``clues coordinator up`` (API + a worker, embedded default).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app import errors, metrics, ui
from app.config import AppSettings, get_settings
from app.deps import AppState
from app.limits import AuthLimiter, RequestGuard, install_errors
from app.openapi import document_errors
from app.routes import health, jobs, scores, silos, train
from storage.blobs import LocalBlobStore
from storage.db import make_engine, make_session_factory, upgrade
from webui import SessionSigner, load_secret
from workers.celery_app import create_celery
from workers.steps import Dispatcher, Send

log = logging.getLogger("clues.app")

API_VERSION = "0.1.0"
DESCRIPTION = """Federated data-quality scoring (CLUES): silos post projected per-sample gradients, never text; the
coordinator scores them against its trusted anchor set and returns each silo its selection mask.

Admin routes take the admin token, silo routes a silo's token, both as `Authorization: Bearer <token>`. Errors are
`{"detail": "<message>"}` with a 4xx status. Binary uploads carry `X-Content-SHA256` and are idempotent."""


def create_app(settings: AppSettings | None = None, *, send: Send | None = None, migrate: bool = True) -> FastAPI:
    """The FastAPI app.

    Args:
        settings: default `get_settings()` (environment).
        send: how a step's message reaches the workers, ``send(task, args, countdown)``; default: Celery
            ``send_task`` by name on the settings' broker. Either way steps go through the outbox
            (`workers.steps.Dispatcher`), whose reaper runs in this process. Tests pass one that runs
            `workers.graph.execute` in-process, or one that only records.
        migrate: bring the database schema to the current Alembic head on start-up.
    """
    settings = settings or get_settings()
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)  # the database, the blobs (anchor texts, adapters) and the broker: owner only
    engine = make_engine(settings.storage.database_url)
    celery = create_celery(settings)

    def send_task(task: str, args: list[Any], countdown: float | None) -> None:
        celery.send_task(task, args=args, countdown=countdown)

    def ping_broker() -> None:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    sessions = make_session_factory(engine)
    dispatcher = Dispatcher(sessions, send or send_task, settings)
    state = AppState(
        settings=settings,
        sessions=sessions,
        blobs=LocalBlobStore(settings.storage.blob_dir),
        dispatcher=dispatcher,
        ping_broker=ping_broker,
        signer=SessionSigner(load_secret(settings.session_secret, settings.data_dir / "session.key")),
        auth_limiter=AuthLimiter(settings.auth_failures_per_minute),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if migrate:
            upgrade(engine)
        state.blobs.sweep_tmp()
        try:
            dispatcher.resume()
        except Exception:  # a broker down at start-up: the reaper sends the queued steps once it is back
            log.exception("could not re-queue the jobs' pending steps")
        stop_reaper = dispatcher.start_reaper()
        yield
        stop_reaper()
        state.blobs.sweep_own()  # uploads still stalled when the server stopped: their half bodies go too
        engine.dispose()

    app = FastAPI(title="clues coordinator", version=API_VERSION, description=DESCRIPTION, lifespan=lifespan)
    app.state.clues = state
    errors.install(app, pages=(ui.is_page, ui.error_page))
    install_errors(app)
    metrics.install(app)
    app.add_middleware(
        RequestGuard, max_json_bytes=settings.max_json_bytes, max_json_depth=settings.max_json_depth
    )  # the outermost of ours: bodies are bounded before anything reads them
    app.include_router(health.router)
    app.include_router(silos.router)
    app.include_router(jobs.router)
    app.include_router(scores.router)
    app.include_router(train.router)
    ui.install(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            ))  # fmt: skip
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
