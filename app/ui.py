"""The coordinator's dashboard: server-rendered pages (Jinja2) over the same JSON API the CLI uses.

    /ui/login, /ui/logout     a token typed once into a form becomes a signed HttpOnly, SameSite=Strict cookie
    /ui/jobs                  scoring and training jobs with live progress and their errors
    /ui/jobs/{id}             one scoring job: histograms with the threshold, anchor scores, kept fractions,
                              per-checkpoint terms, near-duplicate clusters, the sample table (server-side paging,
                              CSV export; a calibrated job's signal values, calibrated z and, for a dropped sample,
                              the signal that flagged it, in words) and the override audit log
    /ui/train/{id}            one training job: rounds, training curve, evaluation results

The admin sees every silo (ids and scores: the coordinator never holds text); a silo that logs in here sees only
its own jobs and rows. The pages' scripts read `/v1/...` with the session cookie; charts use Plotly, served from
the installed ``plotly`` package.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app.deps import (
    JobId,
    Principal,
    SessionDep,
    StateDep,
    TrainId,
    authenticate,
    client_address,
    principal_from_cookie,
)
from app.services.jobs import job_for, job_public
from app.services.training import train_for, train_public
from app.services.withdrawal import withdrawal_public
from scoring.calibration import fused_signals
from storage import repository as repo
from webui import (
    COOKIE_NAME,
    PREFIX,
    STATIC_DIR,
    cookie_options,
    page_context,
    plotly_js,
    safe_next,
    signal_columns,
    template_environment,
)
from wire import hash_token

STATIC = f"{PREFIX}/static"
router = APIRouter(prefix=PREFIX, include_in_schema=False)
templates = Jinja2Templates(env=template_environment(Path(__file__).parent / "templates"))


class LoginRequired(Exception):
    """A page was asked for without a valid session: answered with a redirect to the login form."""


def _page_principal(request: Request, state: StateDep, session: SessionDep) -> Principal:
    principal = principal_from_cookie(state, session, request)
    if principal is None:
        raise LoginRequired
    return principal


def _render(request: Request, name: str, principal: Principal | None, status: int = 200, **context: Any) -> Response:
    who = None if principal is None else ("admin" if principal.is_admin else f"silo {principal.silo.name}")
    base = page_context("coordinator", who, status, is_admin=principal is not None and principal.is_admin)
    response = templates.TemplateResponse(request, name, {**base, **context}, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("", response_class=HTMLResponse)
def home() -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/jobs", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> Response:
    hint = "Paste the admin token, or your silo's token to see your own samples' scores."
    return _render(request, "login.html", None, login_url=f"{PREFIX}/login", next=safe_next(next), hint=hint)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    state: StateDep,
    session: SessionDep,
    token: Annotated[str, Form(max_length=500)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    principal = authenticate(state, session, token.strip(), client_address(request)) if token.strip() else None
    if principal is None:
        return _render(
            request,
            "login.html",
            None,
            status=401,
            login_url=f"{PREFIX}/login",
            next=safe_next(next),
            hint="Paste the admin token, or your silo's token.",
            error="That token is not valid here.",
        )
    subject, token_hash = (
        ("admin", hash_token(token.strip()))
        if principal.is_admin
        else (f"silo:{principal.silo.name}", principal.silo.token_hash)
    )
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        state.signer.sign(subject, token_hash),
        **cookie_options(state.signer, state.settings.secure_cookies),
    )
    return response


@router.post("/logout")
def logout(request: Request, state: StateDep, session: SessionDep) -> RedirectResponse:
    """End the session: in the browser (the cookie is deleted) and on the server (its id is revoked, so a copy of
    the cookie no longer works either)."""
    signed = state.signer.read(request.cookies.get(COOKIE_NAME))
    if signed is not None:
        repo.revoke_session(session, sid=signed.sid, expires_at=datetime.fromtimestamp(signed.expires, UTC))
        session.commit()
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/")
    return response


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, state: StateDep, session: SessionDep) -> Response:
    principal = _page_principal(request, state, session)
    silo_id = None if principal.is_admin else principal.silo.id
    scoring = [job_public(j, principal, session) for j in repo.list_jobs(session, silo_id=silo_id)]
    training = [train_public(j, principal, session) for j in repo.list_train_jobs(session, silo_id=silo_id)]
    return _render(request, "jobs.html", principal, scoring=scoring[::-1], training=training[::-1])


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: JobId, request: Request, state: StateDep, session: SessionDep) -> Response:
    principal = _page_principal(request, state, session)
    row = job_for(session, job_id, principal)
    job = job_public(row, principal, session)
    trainings = [
        t
        for t in repo.list_train_jobs(session, silo_id=None if principal.is_admin else principal.silo.id)
        if t.scoring_job_id == job_id or (t.settings.get("selection") or {}).get("scoring_job") == job_id
    ]
    values, fused = signal_columns(job.spec, fused_signals(job.spec["signals"]))
    return _render(
        request,
        "job.html",
        principal,
        job=job,
        charts=True,
        trainings=trainings,
        signal_values=values,
        signal_fused=fused,
        local_edges=(row.options or {}).get("reference_edges"),
    )


@router.get("/train/{job_id}", response_class=HTMLResponse)
def train_page(job_id: TrainId, request: Request, state: StateDep, session: SessionDep) -> Response:
    principal = _page_principal(request, state, session)
    job = train_public(train_for(session, job_id, principal), principal, session)
    mine = None if principal.is_admin else principal.silo.name
    withdrawals = [withdrawal_public(w) for w in repo.list_withdrawals(session, job_id=job_id, silo=mine)]
    return _render(request, "train.html", principal, job=job, charts=True, withdrawals=withdrawals)


@router.get("/static/plotly.min.js")
def plotly() -> FileResponse:
    return FileResponse(plotly_js(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})


def install(app: FastAPI) -> None:
    """Mount the pages and their static files on ``app``; a page asked for without a session redirects to the login
    form, and a page error (404, 403) renders as a page rather than JSON."""
    app.include_router(router)
    app.mount(STATIC, StaticFiles(directory=STATIC_DIR), name="ui-static")

    async def to_login(request: Request, exc: Exception) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{PREFIX}/login?next={quote(target)}", status_code=303)

    app.add_exception_handler(LoginRequired, to_login)


def is_page(request: Request) -> bool:
    """Whether the request is for a dashboard page (its errors render as pages, not JSON)."""
    return request.url.path == PREFIX or request.url.path.startswith(f"{PREFIX}/")


def error_page(request: Request, status: int, detail: str) -> Response:
    """An error met while rendering a dashboard page (unknown job: 404...), as a page."""
    return _render(request, "error.html", None, status=status, detail=detail)
