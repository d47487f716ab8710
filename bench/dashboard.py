"""Dashboard latency on a large scored job: "a page for a job with 100k samples answers in under a second".

Data: `tests.seed.seed_scored_job` writes a ``done`` scored job straight into storage (``--samples`` split over three
silos, ``--checkpoints`` per-checkpoint terms per row, 40 anchor samples, ``--duplicates`` near-duplicate pairs
across silo1 and silo2), then ``--overrides`` owner overrides go in through `storage.scores.override` so that the
audit log and the ``overridden`` column are not empty. Seeding is set-up and is timed on its own (``seed_s``).

Database: ``--database-url`` (default SQLite in the temporary work directory). A PostgreSQL URL names the server to
use, never the database the benchmark writes: it creates a throwaway database ``clues_bench_<random>`` beside it
(psycopg, autocommit) and drops it at the end (``WITH (FORCE)``), so it never touches other data. The tables are as
the app leaves them right after a job is scored (`storage.repository.replace_scores` runs ``ANALYZE`` on PostgreSQL;
SQLite keeps no statistics unless asked). ``--analyze`` also runs ``ANALYZE`` after seeding (on SQLite: the state
once something gathered statistics).

Server: the real coordinator (`app.main.create_app`) under uvicorn in a child process on a free port, with the
benchmark's admin token; the client logs in through ``POST /ui/login`` (the session cookie, as a browser) and reads
with httpx over real HTTP, one request at a time. The silo override goes through the same cookie path (a login with
the silo's token, ``Origin`` set as a browser sets it).

Requests (what ``/ui/jobs`` and ``/ui/jobs/{id}`` ask for; page ``/v1/jobs/{id}/scores`` requests are
``limit=50``, score descending unless said):

- pages: ``ui_job`` (HTML), ``ui_jobs`` (HTML), ``jobs`` (the jobs list the list page polls), ``summary``,
  ``table_first``, ``table_part0`` (sort ``part:0``), ``table_filtered`` (``silo=silo2&kept=false``),
  ``table_search`` (``q=--search``), ``table_deep`` (``offset=--deep-offset``), ``overrides`` (``limit=50``),
  ``clusters`` (``/duplicates/clusters?limit=20``);
- references: ``csv`` (``/scores.csv``, every row) and ``unpaged`` (``/scores`` with no limit): what a page would
  cost without server-side paging; ``ratios_to_unpaged`` gives each page's median over the unpaged median, same run.

Timing: client wall time from sending to the last body byte. Each request once cold (``first_ms``: the first time
this server process answers it), then ``--repeat`` rounds, each round asking every request once in a rotated order;
median and p95 (nearest rank) over the rounds. A request with no answer in ``--timeout`` seconds is recorded as
``timed_out`` and not asked again; on PostgreSQL its query is cancelled (``pg_cancel_backend``) so that it does not
hold a core through the rest of the run. Then 1 + ``--repeat`` override POSTs (a silo drops or keeps one of its
samples, alternating; the first is reported apart as ``first_ms``), each followed by the summary (whose kept counts
the override changed).

Target: every page request (all but ``csv`` and ``unpaged``) has a median under 1000 ms (a timed-out page fails).

Code: ``code`` names the packages measured and a SHA-256 over their files. Others edit the working tree while a
benchmark runs; to measure one fixed version, copy the packages to a directory and put it first on ``PYTHONPATH``
(the script and its server child honour it; see bench/README.md).

Usage::

    python bench/dashboard.py --out bench/results/dashboard-100k-sqlite.json
    python bench/dashboard.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        --out bench/results/dashboard-100k-postgres.json

One JSON object goes to stdout (and to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
from common import emit, make_log  # bench/common.py (the script's directory is on sys.path)
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: tests.seed is not an installed package, and PYTHONPATH (a snapshot of the tree, see
# bench/README.md) must still win over the working copy, here and in the server child.
sys.path.append(str(ROOT))

import app  # noqa: E402
import storage  # noqa: E402
import webui  # noqa: E402
from storage import scores as score_store  # noqa: E402
from storage.db import make_engine, make_session_factory, upgrade  # noqa: E402
from tests.seed import SeededJob, seed_scored_job  # noqa: E402

ADMIN_TOKEN = "bench-admin-" + secrets.token_urlsafe(16)
SILOS = ("silo1", "silo2", "silo3")
TARGET_MS = 1000.0
log = make_log("dashboard")


@dataclass(frozen=True)
class Req:
    """One request a dashboard page makes; ``page`` False for the references (CSV export, unpaged JSON)."""

    name: str
    path: str
    params: dict[str, str | int]
    page: bool = True


def requests_for(job: str, args: argparse.Namespace) -> list[Req]:
    table = {"sort": "score", "order": "desc", "limit": 50, "offset": 0}
    scores = f"/v1/jobs/{job}/scores"
    return [
        Req("ui_job", f"/ui/jobs/{job}", {}),
        Req("ui_jobs", "/ui/jobs", {}),
        Req("jobs", "/v1/jobs", {}),
        Req("summary", f"/v1/jobs/{job}/summary", {}),
        Req("table_first", scores, table),
        Req("table_part0", scores, table | {"sort": "part:0"}),
        Req("table_filtered", scores, table | {"silo": "silo2", "kept": "false"}),
        Req("table_search", scores, table | {"q": args.search}),
        Req("table_deep", scores, table | {"offset": args.deep_offset}),
        Req("overrides", f"/v1/jobs/{job}/overrides", {"limit": 50}),
        Req("clusters", f"/v1/jobs/{job}/duplicates/clusters", {"limit": 20}),
        Req("csv", f"/v1/jobs/{job}/scores.csv", {"sort": "score", "order": "desc"}, page=False),
        Req("unpaged", scores, {"sort": "score", "order": "desc"}, page=False),
    ]


# ------------------------------------------------------------------------------------------------------------
# Database and data


@dataclass
class Database:
    """The database the benchmark fills: its URL, and for PostgreSQL how to cancel a query left running."""

    url: str
    admin_dsn: str | None = None  # the server's maintenance connection (PostgreSQL only)
    name: str | None = None

    def cancel_running(self, older_than_s: float) -> int:
        """Cancel this database's queries running longer than ``older_than_s`` (a request the client gave up on
        keeps its backend busy otherwise); SQLite: nothing to do. Returns how many were cancelled."""
        if self.admin_dsn is None:
            return 0
        import psycopg

        sql = (
            "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
            "AND pid <> pg_backend_pid() AND now() - query_start > make_interval(secs => %s)"
        )
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute(sql, (self.name, older_than_s)).fetchone()
        return int(row[0]) if row else 0


@contextmanager
def bench_database(url: str | None, work: Path) -> Iterator[Database]:
    """SQLite under ``work``, or a fresh PostgreSQL database beside the one ``url`` names, dropped afterwards."""
    if url is None or make_url(url).get_backend_name() == "sqlite":
        yield Database(url or f"sqlite:///{work}/clues.db")
        return
    import psycopg

    server = make_url(url)
    admin_dsn = server.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"clues_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    log(f"created database {name} on {server.host}:{server.port}")
    try:
        yield Database(server.set(database=name).render_as_string(hide_password=False), admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        log(f"dropped database {name}")


def seed(url: str, args: argparse.Namespace) -> tuple[SeededJob, dict]:
    """Migrate, seed the scored job and the overrides; return the job and the set-up timings."""
    engine = make_engine(url)
    t0 = time.perf_counter()
    upgrade(engine)
    migrate_s = time.perf_counter() - t0
    per_silo = tuple(args.samples // len(SILOS) + (i < args.samples % len(SILOS)) for i in range(len(SILOS)))
    sessions = make_session_factory(engine)
    t0 = time.perf_counter()
    with sessions() as session:
        job = seed_scored_job(
            session, silos=SILOS, per_silo=per_silo, checkpoints=args.checkpoints, duplicates=args.duplicates
        )
    seed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with sessions() as session:
        for i in range(args.overrides):
            silo = SILOS[i % len(SILOS)]
            sample = job.sample_ids[silo][(i * 7919) % len(job.sample_ids[silo])]
            decision = ("keep", "drop")[i % 2]
            score_store.override(
                session, job_id=job.job_id, owner=silo, sample_id=sample, decision=decision, reason="seeded", actor=silo
            )
        session.commit()
    overrides_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.analyze:
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    analyze_s = time.perf_counter() - t0 if args.analyze else None
    version = ".".join(map(str, engine.dialect.server_version_info or ()))
    engine.dispose()
    timings = {"migrate_s": migrate_s, "seed_s": seed_s, "overrides_s": overrides_s, "analyze_s": analyze_s}
    return job, timings | {"per_silo": list(per_silo), "database_version": version}


# ------------------------------------------------------------------------------------------------------------
# Server and client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def coordinator(url: str, work: Path) -> Iterator[str]:
    """The coordinator app under uvicorn in a child process; yields its base URL."""
    port = free_port()
    env = os.environ | {
        "CLUES_DATA_DIR": str(work / "coord"),
        "CLUES_DATABASE_URL": url,
        "CLUES_ADMIN_TOKEN": ADMIN_TOKEN,
        "CLUES_LOG_JSON": "false",
    }
    cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    child = subprocess.Popen(cmd, cwd=work, env=env)  # not cwd=ROOT: that would shadow PYTHONPATH
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"coordinator exited with {child.returncode}")
            try:
                httpx.get(f"{base}/healthz", timeout=5)  # 503 (no broker) is fine: the app answers
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("coordinator did not start in 120 s") from None
                time.sleep(0.2)
        yield base
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contextmanager
def logged_in(base: str, token: str, timeout: float) -> Iterator[httpx.Client]:
    """An httpx client holding the dashboard session cookie of ``token`` (``POST /ui/login``, as the form does)."""
    with httpx.Client(base_url=base, timeout=httpx.Timeout(timeout), headers={"Origin": base}) as client:
        response = client.post("/ui/login", data={"token": token, "next": "/ui/jobs"})
        if response.status_code != 303 or not client.cookies:
            raise RuntimeError(f"login failed: {response.status_code} {response.text[:300]}")
        yield client


def timed_get(client: httpx.Client, req: Req) -> tuple[float, int]:
    """(milliseconds, body bytes) of one GET, body read to the end; raises on a non-200 answer."""
    t0 = time.perf_counter()
    response = client.get(req.path, params=req.params)
    body = response.content
    ms = 1e3 * (time.perf_counter() - t0)
    if response.status_code != 200:
        raise RuntimeError(f"{req.name}: {response.status_code} {body[:300]!r}")
    return ms, len(body)


# ------------------------------------------------------------------------------------------------------------
# Measurements


def code_version() -> dict:
    """Which code was measured: the packages' directory, git HEAD there, and a SHA-256 over their files (others
    edit the working tree while benchmarks run; equal hashes mean the same code)."""
    digest = hashlib.sha256()
    dirs = [Path(m.__file__).parent for m in (app, storage, webui)]
    for d in dirs:
        for path in sorted(f for f in d.rglob("*") if f.suffix in (".py", ".html", ".js", ".css")):
            digest.update(path.relative_to(d.parent).as_posix().encode())
            digest.update(path.read_bytes())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dirs[0], capture_output=True, text=True, check=False)
    return {"packages": str(dirs[0].parent), "git_head": head.stdout.strip() or None, "sha256": digest.hexdigest()}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def stats(times: list[float], first: float | None = None, size: int | None = None) -> dict:
    out = {"median_ms": round(statistics.median(times), 2), "p95_ms": round(p95(times), 2)}
    out |= {"min_ms": round(min(times), 2), "max_ms": round(max(times), 2), "n": len(times)}
    if first is not None:
        out["first_ms"] = round(first, 2)
    if size is not None:
        out["bytes"] = size
    return out


def measure_pages(client: httpx.Client, reqs: list[Req], args: argparse.Namespace, db: Database) -> dict[str, dict]:
    """First call of each request, then ``args.repeat`` rotated rounds. A request with no answer in ``args.timeout``
    seconds is recorded as timed out and not asked again (its query is cancelled on PostgreSQL)."""
    first: dict[str, float] = {}
    size: dict[str, int] = {}
    times: dict[str, list[float]] = {r.name: [] for r in reqs}
    timed_out: dict[str, dict] = {}

    def attempt(req: Req) -> tuple[float, int] | None:
        try:
            return timed_get(client, req)
        except httpx.TimeoutException:
            cancelled = db.cancel_running(args.timeout / 2)
            timed_out[req.name] = {"timed_out": True, "timeout_s": args.timeout, "queries_cancelled": cancelled}
            log(f"{req.name}: no answer in {args.timeout:.0f} s ({cancelled} queries cancelled); not asked again")
            return None

    for req in reqs:
        if (got := attempt(req)) is not None:
            first[req.name], size[req.name] = got
            log(f"first {req.name}: {got[0]:.0f} ms, {got[1]} bytes")
    for rep in range(args.repeat):
        live = [r for r in reqs if r.name not in timed_out]
        k = rep % len(live)
        for req in live[k:] + live[:k]:  # rotated, so no request always follows the heavy references
            if req.name not in timed_out and (got := attempt(req)) is not None:
                times[req.name].append(got[0])
        log(f"round {rep + 1}/{args.repeat}: " + ", ".join(f"{n} {t[-1]:.0f}" for n, t in times.items() if t))
    return {
        r.name: timed_out.get(r.name) or stats(times[r.name] or [first[r.name]], first[r.name], size[r.name])
        for r in reqs
    }


def measure_override(silo_client: httpx.Client, admin: httpx.Client, job: SeededJob, repeat: int) -> dict[str, dict]:
    """1 + ``repeat`` override POSTs by silo1 (through its dashboard session), each followed by the admin's
    summary; the first is reported apart (``first_ms``)."""
    ids = job.sample_ids["silo1"]
    summary = Req("summary_after_override", f"/v1/jobs/{job.job_id}/summary", {})
    posts: list[float] = []
    after: list[float] = []
    for i in range(repeat + 1):  # the first is reported apart, as for the pages
        body = {"sample_id": ids[(i * 104729 + 17) % len(ids)], "decision": ("drop", "keep")[i % 2], "reason": "bench"}
        t0 = time.perf_counter()
        response = silo_client.post(f"/v1/jobs/{job.job_id}/overrides", json=body)
        posts.append(1e3 * (time.perf_counter() - t0))
        if response.status_code != 201:
            raise RuntimeError(f"override: {response.status_code} {response.text[:300]}")
        after.append(timed_get(admin, summary)[0])
    log(f"override POST median {statistics.median(posts):.0f} ms; summary after {statistics.median(after):.0f} ms")
    return {
        "override_post": stats(posts[1:], first=posts[0]),
        "summary_after_override": stats(after[1:], first=after[0]),
    }


def config_of(args: argparse.Namespace, job: SeededJob, reqs: list[Req], backend: str) -> dict:
    return {
        "samples": args.samples,
        "silos": list(SILOS),
        "checkpoints": args.checkpoints,
        "anchors": len(job.anchor_ids),
        "duplicates": args.duplicates,
        "overrides": args.overrides,
        "repeat": args.repeat,
        "database": backend,
        "analyze": args.analyze,
        "timeout_s": args.timeout,
        "search": args.search,
        "deep_offset": args.deep_offset,
        "requests": {r.name: {"path": r.path.replace(job.job_id, "{id}"), "params": r.params} for r in reqs},
    }


def run(args: argparse.Namespace, work: Path) -> dict:
    started, load_at_start = time.perf_counter(), os.getloadavg()
    with bench_database(args.database_url, work) as db:
        url = db.url
        backend = make_url(url).get_backend_name()
        log(f"seeding {args.samples} samples x {args.checkpoints} checkpoints on {backend}")
        job, setup = seed(url, args)
        log(f"seeded in {setup['seed_s']:.1f} s (+ {args.overrides} overrides in {setup['overrides_s']:.1f} s)")
        reqs = requests_for(job.job_id, args)
        with coordinator(url, work) as base, logged_in(base, ADMIN_TOKEN, args.timeout) as admin:
            requests = measure_pages(admin, reqs, args, db)
            with logged_in(base, job.tokens["silo1"], args.timeout) as silo:
                requests |= measure_override(silo, admin, job, args.repeat)
    unpaged = requests["unpaged"].get("median_ms")
    pages = [r.name for r in reqs if r.page]
    slow = [n for n in pages if requests[n].get("median_ms", math.inf) >= TARGET_MS]
    return {
        "benchmark": "dashboard",
        "label": args.label,
        "config": config_of(args, job, reqs, backend),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": os.getloadavg(),
        },
        "code": code_version(),
        "setup": setup,
        "requests": requests,
        "ratios_to_unpaged": {
            n: round(r["median_ms"] / unpaged, 4) if unpaged and "median_ms" in r else None
            for n, r in requests.items()
            if n != "unpaged"
        },
        "target": {"page_ms": TARGET_MS, "met": not slow, "slow": slow},
        "wall_s": round(time.perf_counter() - started, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100_000, help="scored samples, split over 3 silos (default 100000)")
    p.add_argument("--checkpoints", type=int, default=4, help="T: per-checkpoint terms per row (default 4)")
    p.add_argument("--database-url", default=None, help="default SQLite in the work dir; a PostgreSQL server URL")
    p.add_argument("--repeat", type=int, default=7, help="timed rounds after the first call (default 7)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may go unanswered (default 60)")
    p.add_argument("--duplicates", type=int, default=100, help="near-duplicate pairs (default 100)")
    p.add_argument("--overrides", type=int, default=60, help="overrides seeded before timing (default 60)")
    p.add_argument(
        "--analyze",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also run ANALYZE after seeding (the app does on PostgreSQL; on SQLite: statistics as if gathered); "
        "default off: the database as the app leaves it right after scoring",
    )
    p.add_argument("--search", default="1234", help="the id search's q (default 1234)")
    p.add_argument("--deep-offset", type=int, default=90_000, help="offset of the deep page (default 90000)")
    p.add_argument("--work-dir", type=Path, default=None, help="parent of the temporary work directory")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--label", default=None, help="free text stored in the JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dashboard-", dir=args.work_dir))
    try:
        result = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
