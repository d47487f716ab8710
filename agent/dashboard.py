"""A silo's own dashboard, served by its agent on the silo's machine: the coordinator's scores for this silo joined
with the silo's local text, so the owner sees what was dropped and why, and can override a decision.

    /ui/login, /ui/logout        the silo's token typed once becomes a signed HttpOnly, SameSite=Strict cookie
    /ui/jobs                     the scoring jobs this silo is in, with live progress and errors
    /ui/jobs/{id}                the silo's histogram with the threshold, kept and overridden counts, and the sample
                                 table (scores, per-checkpoint terms, a calibrated job's signal values and calibrated
                                 z and, for a dropped sample, the signal that flagged it in words, text previews,
                                 nearest anchors, Override)
    /api/jobs[/{id}[/summary]]   the coordinator's answers, fetched with the silo's token
    /api/jobs/{id}/samples       score rows joined with the local text, filtered, sorted and paged here
    /api/jobs/{id}/overrides     the audit log (GET); keep/drop/auto with a reason (POST, sent to the coordinator)

A silo-local job (``scoring_mode: local``) has no rows at the coordinator: the rows and the summary are the ones the
agent scored here and left in the work directory (`agent.local`), and an override is refused (it would send a sample
id). One module of about 470 lines: the routes, their session handling and error pages read best together.

Here: the FastAPI app (`create_dashboard`), the session cookie, the routes and the error pages; the local text and
the joined rows, filtered, sorted and paged, are `agent.samples`. The text never leaves this process: an override
sends only the sample id, the decision and the reason. The silo's name is the coordinator's answer to whose token
this is (``GET /v1/silos/me``). Started by ``clues agent dashboard``.
"""

from __future__ import annotations

import contextlib
import hmac
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.client import CoordinatorError, SiloClient
from agent.samples import SORT_PATTERN, LocalText, RowCache, SampleQuery, query_rows
from scoring.calibration import fused_signals
from webui import (
    PREFIX,
    SECURITY_HEADERS,
    STATIC_DIR,
    CookieSession,
    SessionSigner,
    cookie_options,
    load_secret,
    page_context,
    plotly_js,
    safe_next,
    same_origin,
    signal_columns,
    template_environment,
)
from wire import hash_token

STATIC = f"{PREFIX}/static"
JobId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="the job id")]
templates = Jinja2Templates(env=template_environment(Path(__file__).parent / "templates"))


# -- coordinator failures -------------------------------------------------------------------------------------------


def describe(exc: CoordinatorError, url: str) -> tuple[int, str]:
    """The status and message a coordinator failure becomes here: its 4xx pass through (a 404 stays a 404), an
    unreachable coordinator, a refused token or a server error is a 502 that names the coordinator."""
    if exc.status is None:
        return 502, f"the coordinator at {url} cannot be reached: {exc.detail}"
    if exc.status == 401:
        return 502, f"the coordinator at {url} refused this silo's token ({exc.status}: {exc.detail}); check --token"
    if 400 <= exc.status < 500:
        return exc.status, exc.detail
    return 502, f"the coordinator at {url} failed: {exc.status}: {exc.detail}"


# -- the dashboard: the coordinator client, the local text, the row cache and the session ---------------------------


class LoginRequired(Exception):
    """A page was asked for without a valid session: answered with a redirect to the login form."""


class Dashboard:
    """What the routes share (``app.state.dashboard``)."""

    def __init__(
        self,
        client: SiloClient,
        url: str,
        token: str,
        text: LocalText,
        signer: SessionSigner,
        *,
        silo: str | None,
        ttl_s: float,
        secure: bool,
        work_dir: Path,
    ) -> None:
        self.client, self.url, self.text, self.signer = client, url, text, signer
        self.revoked: set[str] = set()
        self.silo: str | None = silo
        self.secure = secure
        self.work_dir = Path(work_dir)
        self.rows = RowCache(client, text, ttl_s=ttl_s, local=self.local)
        self._token, self._token_hash = token, hash_token(token)
        self.cookie = f"clues_silo_{signer.fingerprint(self._token_hash)[:12]}"  # not the coordinator's cookie

    def local(self, job_id: str) -> dict[str, Any] | None:
        """The rows this silo scored itself for a silo-local job (`agent.local.local_rows`), None for other jobs."""
        from agent.local import local_rows

        return local_rows(self.work_dir, job_id)

    def releases(self) -> dict[str, Any] | None:
        """This silo's noisy-aggregate releases (`scoring.privacy.ReleaseLedger` under the work dir): the ε they
        spent in all and how many; None when it has made none."""
        from scoring.privacy import RELEASE_LEDGER, ReleaseLedger

        ledger = ReleaseLedger.open(self.work_dir / RELEASE_LEDGER)
        if not ledger.releases:
            return None
        return {"epsilon": ledger.epsilon_spent, "count": len(ledger.releases)}

    @property
    def brand(self) -> str:
        return f"silo {self.silo}" if self.silo else "silo"

    def learn_name(self) -> str:
        """This silo's name: the coordinator's answer to whose token this is (`Client.me`), asked once and kept.

        Raises:
            agent.client.CoordinatorError: the coordinator cannot be reached or refuses the token (a 403 for a
                token that is not a silo's).
        """
        if self.silo is None:
            self.silo = self.client.me()["name"]
        return self.silo

    # -- sessions

    def token_matches(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token.encode())

    def new_cookie(self) -> str:
        return self.signer.sign(f"silo:{self.silo or ''}", self._token_hash)

    def session_of(self, request: Request) -> CookieSession | None:
        session = self.signer.read(request.cookies.get(self.cookie))
        if session is None or not session.subject.startswith("silo:") or session.sid in self.revoked:
            return None
        return session if self.signer.matches(session, self._token_hash) else None

    def revoke(self, request: Request) -> None:
        """End the request's session here, not only in its browser (one process serves this dashboard: the set of
        revoked sessions lives in memory; a restart ends every session anyway when the secret is not kept)."""
        session = self.signer.read(request.cookies.get(self.cookie))
        if session is not None:
            self.revoked.add(session.sid)

    # -- pages

    def render(self, request: Request, name: str, *, status: int = 200, **context: Any) -> Response:
        who = self.brand if self.session_of(request) else None
        base = page_context(self.brand, who, status, coordinator=self.url)
        return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)


def _dashboard(request: Request) -> Dashboard:
    return request.app.state.dashboard


DashDep = Annotated[Dashboard, Depends(_dashboard)]


def _page_session(request: Request, dash: DashDep) -> CookieSession:
    session = dash.session_of(request)
    if session is None:
        raise LoginRequired
    return session


def _api_session(request: Request, dash: DashDep) -> CookieSession:
    session = dash.session_of(request)
    if session is None:
        raise HTTPException(401, f"not logged in: open {PREFIX}/login")
    return session


def _same_origin(request: Request, _: Annotated[CookieSession, Depends(_api_session)]) -> None:
    if not same_origin(request.headers, request.headers.get("host")):
        raise HTTPException(403, "cross-site request refused: overrides are accepted only from this dashboard's pages")


PageAuth = Annotated[CookieSession, Depends(_page_session)]
ApiAuth = Annotated[CookieSession, Depends(_api_session)]
SameOrigin = Annotated[None, Depends(_same_origin)]


# -- pages ----------------------------------------------------------------------------------------------------------

ui = APIRouter(prefix=PREFIX, include_in_schema=False)


def _login_page(request: Request, dash: Dashboard, next: str | None, error: str | None = None) -> Response:
    hint = "Paste this silo's token: the one its agent uses with the coordinator."
    status = 200 if error is None else 401
    return dash.render(
        request, "login.html", status=status, login_url=f"{PREFIX}/login", next=safe_next(next), hint=hint, error=error
    )


@ui.get("/login", response_class=HTMLResponse)
def login_form(request: Request, dash: DashDep, next: str | None = None) -> Response:
    return _login_page(request, dash, next)


@ui.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    dash: DashDep,
    token: Annotated[str, Form(max_length=500)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    if not dash.token_matches(token.strip()):
        return _login_page(request, dash, next, "That is not this silo's token.")
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        dash.cookie,
        dash.new_cookie(),
        **cookie_options(dash.signer, dash.secure),
    )
    return response


@ui.post("/logout")
def logout(request: Request, dash: DashDep) -> RedirectResponse:
    dash.revoke(request)
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(dash.cookie, path="/")
    return response


@ui.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, dash: DashDep, _: PageAuth) -> Response:
    dash.learn_name()
    jobs = dash.client.jobs()
    withdrawals = dash.client.withdrawals()[::-1]
    releases = dash.releases()
    return dash.render(
        request,
        "jobs.html",
        jobs=jobs[::-1],
        training=dash.client.train_jobs()[::-1],
        samples=len(dash.text.current()),
        releases=releases,
        withdrawals=withdrawals,
    )


@ui.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: JobId, request: Request, dash: DashDep, _: PageAuth) -> Response:
    silo = dash.learn_name()
    job = dash.client.job(job_id)
    spec = {"score": "trace", "signals": [], **job["spec"]}  # a coordinator that predates the score settings
    values, fused = signal_columns(spec, fused_signals(spec["signals"]))
    job["spec"] = spec
    return dash.render(
        request,
        "job.html",
        job=job,
        charts=job["status"] == "done",
        silo=silo,
        signal_values=values,
        signal_fused=fused,
    )


@ui.get("/static/plotly.min.js")
def plotly() -> FileResponse:
    return FileResponse(plotly_js(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})


# -- JSON -----------------------------------------------------------------------------------------------------------

api = APIRouter(prefix="/api", include_in_schema=False)


@api.get("/jobs")
def list_jobs(dash: DashDep, _: ApiAuth) -> list[dict]:
    """The coordinator's scoring jobs this silo is in (`JobPublic`)."""
    return dash.client.jobs()


@api.get("/jobs/{job_id}")
def get_job(job_id: JobId, dash: DashDep, _: ApiAuth) -> dict:
    return dash.client.job(job_id)


@api.get("/jobs/{job_id}/summary")
def get_summary(job_id: JobId, dash: DashDep, _: ApiAuth) -> dict:
    """The coordinator's summary (`ScoreSummary`) of this silo's scores; for a silo-local job, the same computed here
    from the silo's own rows."""
    answer = dash.local(job_id)
    if answer is not None:
        from agent.local import local_summary

        return local_summary(job_id, dash.learn_name(), answer)
    return dash.client.summary(job_id)


@api.get("/jobs/{job_id}/samples")
def get_samples(
    job_id: JobId,
    dash: DashDep,
    _: ApiAuth,
    q: Annotated[str | None, Query(max_length=500, description="case-insensitive substring of text or id")] = None,
    kept: bool | None = None,
    overridden: bool | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    sort: Annotated[str, Query(max_length=16, pattern=SORT_PATTERN)] = "row",
    order: Literal["asc", "desc"] = "asc",
    limit: Annotated[int, Query(ge=1, le=10_000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JSONResponse:
    """This silo's score rows (the coordinator's fields) with ``instruction`` and ``response`` previews from the
    local file and ``text_missing`` when it lacks the sample; ``without_text`` counts those over the whole job."""
    job = dash.rows.get(job_id)
    if sort.startswith("part:") and job.checkpoints is not None and int(sort[5:]) >= job.checkpoints:
        raise HTTPException(422, f"sort: {sort} names no checkpoint; job {job_id} has {job.checkpoints} (0..T-1)")
    query = SampleQuery(q, kept, overridden, min_score, max_score, sort, order == "desc")
    total, rows = query_rows(job, query, limit, offset)
    body = {"total": total, "threshold": job.threshold, "without_text": job.without_text, "rows": rows}
    return JSONResponse(body)


class OverrideBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sample_id: str = Field(min_length=1, max_length=500)
    decision: Literal["keep", "drop", "auto"]
    reason: str = Field("", max_length=500, description="why; required, kept in the coordinator's audit log")


@api.post("/jobs/{job_id}/overrides", status_code=201)
def post_override(job_id: JobId, body: OverrideBody, dash: DashDep, _: SameOrigin) -> JSONResponse:
    """Keep or drop one of this silo's samples (``auto``: back to the threshold's decision), sent to the
    coordinator with the silo's token; its audit record."""
    if not body.reason.strip():
        raise HTTPException(422, "reason: required; say why you keep or drop this sample (it goes in the audit log)")
    if dash.local(job_id) is not None:
        raise HTTPException(
            409, "this job scores at the silo: an override would send a sample id to the coordinator, so it is not sent"
        )
    record = dash.client.create_override(job_id, body.sample_id, body.decision, body.reason.strip())
    dash.rows.patch(job_id, record)
    return JSONResponse(record, status_code=201)


@api.get("/jobs/{job_id}/overrides")
def get_overrides(
    job_id: JobId,
    dash: DashDep,
    _: ApiAuth,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict:
    """This silo's overrides of the job (`OverrideLog`), newest first."""
    return dash.client.overrides(job_id, limit=limit, offset=offset)


# -- the app --------------------------------------------------------------------------------------------------------


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _error(request: Request, status: int, detail: str, headers: dict | None = None) -> Response:
    if _is_api(request):
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)
    return request.app.state.dashboard.render(request, "error.html", status=status, detail=detail)


def _install_errors(app: FastAPI) -> None:
    """Coordinator failures (`describe`), HTTP errors and invalid input as JSON under /api, as pages elsewhere."""

    async def coordinator_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CoordinatorError)
        status, detail = describe(exc, request.app.state.dashboard.url)
        return _error(request, status, detail)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return _error(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        where = lambda loc: ".".join(str(p) for p in loc if p not in ("body", "query", "path"))  # noqa: E731
        return _error(request, 422, "; ".join(f"{where(e['loc'])}: {e['msg']}" for e in exc.errors()))

    async def to_login(request: Request, exc: Exception) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{PREFIX}/login?next={quote(target)}", status_code=303)

    app.add_exception_handler(CoordinatorError, coordinator_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(LoginRequired, to_login)


def create_dashboard(
    coordinator: str,
    token: str,
    data: Path,
    work_dir: Path,
    *,
    silo: str | None = None,
    transport: Any = None,
    client_factory: Callable[[], SiloClient] | None = None,
    ttl_s: float = 30.0,
    secure_cookies: bool = False,
) -> FastAPI:
    """The silo dashboard app.

    Args:
        coordinator: the coordinator's URL.
        token: this silo's token: sent to the coordinator, and the password of the login form.
        data: the silo's data file (`scoring.data.read_samples`); read now, and again when it changes.
        work_dir: where the session secret is kept (``session.key``) unless ``CLUES_SESSION_SECRET`` is set, and where
            ``clues agent run`` left a silo-local job's rows (the same ``--work-dir``).
        silo: this silo's name, when known (else asked of the coordinator, ``GET /v1/silos/me``, on the first page).
        transport: an httpx transport for the coordinator client (tests).
        client_factory: makes the coordinator client instead (tests); ``transport`` is then unused.
        ttl_s: age after which a job's held rows are refetched (in the background).
        secure_cookies: mark the session cookie ``Secure`` (when served over HTTPS).

    Raises:
        OSError, scoring.errors.DataError: the data file cannot be read.
    """
    text = LocalText(Path(data))
    secret = load_secret(os.environ.get("CLUES_SESSION_SECRET"), Path(work_dir) / "session.key")
    client = (
        client_factory()
        if client_factory
        else SiloClient(coordinator, token, timeout=60.0, retries=1, backoff=0.2, transport=transport)
    )
    dash = Dashboard(
        client,
        coordinator,
        token,
        text,
        SessionSigner(secret),
        silo=silo,
        ttl_s=ttl_s,
        secure=secure_cookies,
        work_dir=Path(work_dir),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        client.close()

    app = FastAPI(title="clues silo dashboard", openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.dashboard = dash
    app.include_router(ui)
    app.include_router(api)
    app.mount(STATIC, StaticFiles(directory=STATIC_DIR), name="ui-static")
    _install_errors(app)

    @app.get("/", include_in_schema=False)
    @app.get(PREFIX, include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/jobs", status_code=303)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        if not request.url.path.startswith(f"{STATIC}/"):  # pages and JSON carry the silo's text: never cache
            response.headers["Cache-Control"] = "no-store"
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return app
