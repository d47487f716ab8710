"""A silo's own dashboard, served by its agent on the silo's machine: the coordinator's scores for this silo joined
with the silo's local text, so the owner sees what was dropped and why, and can override a decision.

    /ui/login, /ui/logout        the silo's token typed once becomes a signed HttpOnly, SameSite=Strict cookie
    /ui/jobs                     the scoring jobs this silo is in, with live progress and errors
    /ui/jobs/{id}                the silo's histogram with the threshold, kept and overridden counts, and the sample
                                 table (scores, per-checkpoint terms, text previews, nearest anchors, Override)
    /api/jobs[/{id}[/summary]]   the coordinator's answers, fetched with the silo's token
    /api/jobs/{id}/samples       score rows joined with the local text, filtered, sorted and paged here
    /api/jobs/{id}/overrides     the audit log (GET); keep/drop/auto with a reason (POST, sent to the coordinator)

The text never leaves this process: the coordinator sends ids and scores, the join happens here, and an override
sends only the sample id, the decision and the reason. All of a job's rows are fetched once and kept in memory
(`JobRows`); after ``ttl_s`` they are refetched in the background while the old ones keep serving. Started by
``clues agent dashboard``.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.client import Client, CoordinatorError
from scoring.data import Sample, read_samples
from storage.repository import hash_token
from webui import STATIC_DIR, TEMPLATES_DIR, Session, SessionSigner, load_secret, plotly_js, same_origin

log = logging.getLogger("clues.agent.dashboard")

PREFIX = "/ui"
STATIC = f"{PREFIX}/static"
PREVIEW_CHARS = 400
FETCH_PAGE = 50_000
MAX_JOBS = 8  # jobs whose rows are held at once
SORT_PATTERN = r"^(row|score|sample_id|silo|selected|part:\d{1,4})$"
JobId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="the job id")]
templates = Jinja2Templates(
    env=Environment(
        loader=ChoiceLoader([FileSystemLoader(Path(__file__).parent / "templates"), FileSystemLoader(TEMPLATES_DIR)]),
        autoescape=select_autoescape(["html"]),
    )
)


# -- the local text and the joined rows: plain data and pure functions ------------------------------------------------


def _preview(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


@dataclass(frozen=True)
class Text:
    """What the table shows of one local sample, and what text search looks in (all its text, lower-cased)."""

    instruction: str  # the prompt's non-system turns (Alpaca: instruction, blank line, input), ≤ PREVIEW_CHARS
    response: str  # ≤ PREVIEW_CHARS
    search: str


def index_text(samples: list[Sample]) -> dict[str, Text]:
    """Sample id → `Text`, computed once per read of the data file."""
    out = {}
    for s in samples:
        prompt = "\n\n".join(c for r, c in s.prompt if r != "system") or "\n\n".join(c for _, c in s.prompt)
        search = "\n".join([s.id, *(c for _, c in s.prompt), s.response]).lower()
        out[s.id] = Text(_preview(prompt), _preview(s.response), search)
    return out


class LocalText:
    """The silo's data file, read again when it changes on disk (a file that no longer reads keeps the old text)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.version = 0
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.by_id: dict[str, Text] = {}
        self.current()  # the first read raises: a bad file stops the dashboard from starting

    def current(self) -> dict[str, Text]:
        try:
            st = os.stat(self.path)
        except OSError:
            if self._stamp is None:
                raise
            return self.by_id
        with self._lock:
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                try:
                    self.by_id, self.version = index_text(read_samples(self.path)), self.version + 1
                except (OSError, ValueError) as exc:
                    if self._stamp is None:
                        raise
                    log.warning("%s: kept the text read before: %s", self.path, exc)
                self._stamp = (st.st_mtime_ns, st.st_size)
        return self.by_id


def join_rows(score_rows: list[dict], text: dict[str, Text]) -> tuple[list[dict], list[str]]:
    """The coordinator's rows with ``instruction``, ``response`` and ``text_missing`` added, and each row's search
    text (just the lower-cased id when the local file lacks the sample)."""
    rows, search = [], []
    for r in score_rows:
        t = text.get(r["sample_id"])
        rows.append({**r, "instruction": t.instruction if t else "", "response": t.response if t else ""})
        rows[-1]["text_missing"] = t is None
        search.append(t.search if t else r["sample_id"].lower())
    return rows, search


def _sort_key(sort: str) -> Callable[[dict], Any]:
    if sort.startswith("part:"):
        t = int(sort.partition(":")[2])
        return lambda r: r["parts"][t]
    if sort in ("score", "sample_id", "selected"):
        return lambda r: r[sort]
    raise ValueError(sort)


@dataclass
class JobRows:
    """One job's rows for this silo, in upload order, joined with the local text. ``orders`` caches ascending index
    orders per sort key; `patch` clears it."""

    threshold: float | None
    rows: list[dict]
    search: list[str]
    text_version: int
    fetched: float  # time.monotonic() when the fetch began
    orders: dict[str, list[int]] = field(default_factory=dict)
    without_text: int = field(init=False)

    def __post_init__(self) -> None:
        self.without_text = sum(r["text_missing"] for r in self.rows)

    @property
    def checkpoints(self) -> int | None:
        return len(self.rows[0]["parts"]) if self.rows else None

    def order(self, sort: str) -> list[int]:
        if sort in ("row", "silo"):  # every row is this silo's
            return list(range(len(self.rows)))
        order = self.orders.get(sort)
        if order is None:
            key, rows = _sort_key(sort), self.rows
            order = self.orders[sort] = sorted(range(len(rows)), key=lambda i: key(rows[i]))
        return order

    def patch(self, record: dict) -> None:
        """Put an override the coordinator recorded (`OverridePublic`) into the cached row."""
        info = None
        if record["decision"] != "auto":
            info = {k: record[k] for k in ("id", "decision", "reason", "actor", "created_at")}
        for row in self.rows:
            if row["sample_id"] == record["sample_id"]:
                row["selected"], row["override"] = record["selected"], info
        self.orders.clear()


@dataclass(frozen=True)
class SampleQuery:
    """The table's filters (None: any) and order."""

    q: str | None = None
    kept: bool | None = None
    overridden: bool | None = None
    min_score: float | None = None
    max_score: float | None = None
    sort: str = "row"
    descending: bool = False


def query_rows(job: JobRows, query: SampleQuery, limit: int, offset: int) -> tuple[int, list[dict]]:
    """``(total matching, the page)``: each filter narrows an index list, in the requested order."""
    rows, idx = job.rows, job.order(query.sort)
    if query.descending:
        idx = idx[::-1]
    if query.kept is not None:
        idx = [i for i in idx if rows[i]["selected"] is query.kept]
    if query.overridden is not None:
        idx = [i for i in idx if (rows[i]["override"] is not None) is query.overridden]
    if query.min_score is not None:
        idx = [i for i in idx if rows[i]["score"] >= query.min_score]
    if query.max_score is not None:
        idx = [i for i in idx if rows[i]["score"] <= query.max_score]
    if query.q:
        needle, search = query.q.lower(), job.search
        idx = [i for i in idx if needle in search[i]]
    return len(idx), [rows[i] for i in idx[offset : offset + limit]]


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
        client: Client,
        url: str,
        token: str,
        text: LocalText,
        signer: SessionSigner,
        *,
        silo: str | None,
        ttl_s: float,
        secure: bool,
    ) -> None:
        self.client, self.url, self.text, self.signer = client, url, text, signer
        self.silo: str | None = silo
        self.ttl_s, self.secure = ttl_s, secure
        self._token, self._token_hash = token, hash_token(token)
        self.cookie = f"clues_silo_{signer.fingerprint(self._token_hash)[:12]}"  # not the coordinator's cookie
        self._cache: dict[str, JobRows] = {}
        self._patched: dict[str, float] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()
        self._fill_locks: dict[str, threading.Lock] = {}

    @property
    def brand(self) -> str:
        return f"silo {self.silo}" if self.silo else "silo"

    def learn_name(self, jobs: list[dict]) -> None:
        """The coordinator shows a silo only itself among a job's members: that is this silo's name."""
        for job in jobs:
            if self.silo is None and job.get("silos"):
                self.silo = job["silos"][0]["name"]

    # -- sessions

    def token_matches(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token.encode())

    def new_cookie(self) -> str:
        return self.signer.sign(f"silo:{self.silo or ''}", self._token_hash)

    def session_of(self, request: Request) -> Session | None:
        session = self.signer.read(request.cookies.get(self.cookie))
        if session is None or not session.subject.startswith("silo:"):
            return None
        return session if self.signer.matches(session, self._token_hash) else None

    # -- rows

    def rows(self, job_id: str) -> JobRows:
        """The job's joined rows: fetched now when none are held (or the local text changed), else the held ones,
        with a refetch started in the background once they are older than ``ttl_s``."""
        self.text.current()
        entry = self._cache.get(job_id)
        if entry is None or entry.text_version != self.text.version:
            return self._fill(job_id, force=False)
        if time.monotonic() - entry.fetched > self.ttl_s:
            with self._lock:
                if job_id in self._refreshing:
                    return entry
                self._refreshing.add(job_id)
            threading.Thread(target=self._refresh, args=(job_id,), name=f"rows-{job_id[:8]}", daemon=True).start()
        return entry

    def _refresh(self, job_id: str) -> None:
        try:
            self._fill(job_id, force=True)
        except Exception as exc:  # the held rows keep serving; the next request tries again
            log.warning("job %s: refetching the scores failed: %s", job_id, exc)
        finally:
            with self._lock:
                self._refreshing.discard(job_id)

    def _fill(self, job_id: str, *, force: bool) -> JobRows:
        """Fetch and join the job's rows (one fetch at a time per job; unless ``force``, rows that another request
        fetched meanwhile are taken instead)."""
        with self._lock:
            lock = self._fill_locks.setdefault(job_id, threading.Lock())
        with lock:
            held = self._cache.get(job_id)
            if not force and held is not None and held.text_version == self.text.version:
                return held
            started = time.monotonic()
            answer = self.client.scores(job_id, page=FETCH_PAGE)
            text, version = self.text.current(), self.text.version
            rows, search = join_rows(answer["rows"], text)
            entry = JobRows(answer["threshold"], rows, search, version, started)
            with self._lock:
                if self._patched.get(job_id, 0.0) > started:  # an override landed while this fetch ran: the
                    held = self._cache.get(job_id)  # rows may predate it, so keep the patched ones (or these)
                    entry = held if held is not None and held.text_version == version else entry
                    entry.fetched = 0.0  # and fetch again on the next request
                self._cache[job_id] = entry
                while len(self._cache) > MAX_JOBS:  # forget the job fetched longest ago
                    others = (j for j in self._cache if j != job_id)
                    del self._cache[min(others, key=lambda j: self._cache[j].fetched)]
            return entry

    def patch(self, job_id: str, record: dict) -> None:
        with self._lock:
            self._patched[job_id] = time.monotonic()
            entry = self._cache.get(job_id)
        if entry is not None:
            entry.patch(record)

    # -- pages

    def render(self, request: Request, name: str, *, status: int = 200, **context: Any) -> Response:
        base = {
            "brand": self.brand,
            "static": STATIC,
            "home": f"{PREFIX}/jobs",
            "logout_url": f"{PREFIX}/logout",
            "who": self.brand if self.session_of(request) else None,
            "is_admin": False,
            "charts": False,
            "coordinator": self.url,
            "status_code": status,
        }
        return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)


def _dashboard(request: Request) -> Dashboard:
    return request.app.state.dashboard


DashDep = Annotated[Dashboard, Depends(_dashboard)]


def _page_session(request: Request, dash: DashDep) -> Session:
    session = dash.session_of(request)
    if session is None:
        raise LoginRequired
    return session


def _api_session(request: Request, dash: DashDep) -> Session:
    session = dash.session_of(request)
    if session is None:
        raise HTTPException(401, f"not logged in: open {PREFIX}/login")
    return session


def _same_origin(request: Request, _: Annotated[Session, Depends(_api_session)]) -> None:
    if not same_origin(request.headers, request.headers.get("host")):
        raise HTTPException(403, "cross-site request refused: overrides are accepted only from this dashboard's pages")


PageAuth = Annotated[Session, Depends(_page_session)]
ApiAuth = Annotated[Session, Depends(_api_session)]
SameOrigin = Annotated[None, Depends(_same_origin)]


# -- pages ----------------------------------------------------------------------------------------------------------

ui = APIRouter(prefix=PREFIX, include_in_schema=False)


def _safe_next(target: str | None) -> str:
    """Only our own pages: no scheme, no host, no protocol-relative ``//`` (an open redirect otherwise)."""
    if target and target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/jobs"


def _login_page(request: Request, dash: Dashboard, next: str | None, error: str | None = None) -> Response:
    hint = "Paste this silo's token: the one its agent uses with the coordinator."
    status = 200 if error is None else 401
    return dash.render(
        request, "login.html", status=status, login_url=f"{PREFIX}/login", next=_safe_next(next), hint=hint, error=error
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
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        dash.cookie,
        dash.new_cookie(),
        max_age=int(dash.signer.ttl_s),
        httponly=True,
        samesite="strict",
        secure=dash.secure,
        path="/",
    )
    return response


@ui.post("/logout")
def logout(dash: DashDep) -> RedirectResponse:
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(dash.cookie, path="/")
    return response


@ui.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, dash: DashDep, _: PageAuth) -> Response:
    jobs = dash.client.jobs()
    dash.learn_name(jobs)
    return dash.render(request, "jobs.html", jobs=jobs[::-1], samples=len(dash.text.current()))


@ui.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: JobId, request: Request, dash: DashDep, _: PageAuth) -> Response:
    job = dash.client.job(job_id)
    dash.learn_name([job])
    return dash.render(request, "job.html", job=job, charts=job["status"] == "done", silo=dash.silo or "")


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
    """The coordinator's summary (`ScoreSummary`) of this silo's scores."""
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
    job = dash.rows(job_id)
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
    record = dash.client.create_override(job_id, body.sample_id, body.decision, body.reason.strip())
    dash.patch(job_id, record)
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
    client_factory: Callable[[], Client] | None = None,
    ttl_s: float = 30.0,
    secure_cookies: bool = False,
) -> FastAPI:
    """The silo dashboard app.

    Args:
        coordinator: the coordinator's URL.
        token: this silo's token: sent to the coordinator, and the password of the login form.
        data: the silo's data file (`scoring.data.read_samples`); read now, and again when it changes.
        work_dir: where the session secret is kept (``session.key``) unless ``CLUES_SESSION_SECRET`` is set.
        silo: this silo's name, when known (else learnt from the coordinator's jobs).
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
        else Client(coordinator, token, timeout=60.0, retries=1, backoff=0.2, transport=transport)
    )
    dash = Dashboard(
        client, coordinator, token, text, SessionSigner(secret), silo=silo, ttl_s=ttl_s, secure=secure_cookies
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
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    return app
