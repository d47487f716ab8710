"""``clues coordinator serve|up|openapi`` and ``clues worker``: run the coordinator's processes.

Settings come from the environment (``CLUES_*``, see docs/coordinator.md); ``--data-dir`` overrides
``CLUES_DATA_DIR``. Without ``CLUES_REDIS_URL`` and ``CLUES_DATABASE_URL`` everything lives in SQLite files under the
data directory (the embedded default): no Redis, no PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from agent.console import EXIT_OK, CliError

ADMIN_TOKEN_FILE = "admin-token"


def configure_logging(json_lines: bool, level: str = "INFO") -> None:
    from app.metrics import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _overrides(args: argparse.Namespace) -> dict:
    return {"data_dir": Path(args.data_dir)} if getattr(args, "data_dir", None) else {}


def app_settings(args: argparse.Namespace):
    from pydantic import ValidationError

    from app.config import AppSettings

    try:
        return AppSettings(**_overrides(args))
    except ValidationError as exc:
        raise CliError(f"settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc


def _admin_token(settings, generate: bool):
    """The admin token: CLUES_ADMIN_TOKEN, else (embedded ``up``) one kept in <data-dir>/admin-token (mode 0600)."""
    if settings.admin_token or not generate:
        return settings
    path = settings.data_dir / ADMIN_TOKEN_FILE
    if not path.is_file():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("clues_admin_" + secrets.token_urlsafe(32))
    token = path.read_text().strip()
    print(f"admin token: {path} (export CLUES_ADMIN_TOKEN=$(cat {path}))", file=sys.stderr)
    return settings.model_copy(update={"admin_token": token})


def _serve(settings, host: str, port: int) -> None:
    import uvicorn

    from app.main import create_app

    configure_logging(settings.log_json)
    private_files()
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # a stalled upload cannot hold SIGTERM up forever
    )


def private_files() -> None:
    """Files and directories this process creates are its owner's only (0600 / 0700): the database, the blobs
    (anchor texts, adapters), the broker files and the work directories hold the consortium's data."""
    os.umask(0o077)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = app_settings(args)
    if not settings.admin_token:
        print("warning: CLUES_ADMIN_TOKEN is not set; admin routes will answer 403", file=sys.stderr)
    _serve(settings, args.host, args.port)
    return EXIT_OK


def _die_with_parent() -> None:
    """In the worker child (Linux): receive SIGTERM when the parent dies, even by SIGKILL, so no worker is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cmd_up(args: argparse.Namespace) -> int:
    """API in this process, one worker in a child process; Ctrl-C stops both."""
    settings = _admin_token(app_settings(args), generate=True)
    broker = "Redis" if settings.redis_url else "SQLite transport (embedded)"
    database = "PostgreSQL" if (settings.database_url or "").startswith("postgresql") else "SQLite"
    print(f"clues coordinator: data {settings.data_dir}, database {database}, broker {broker}", file=sys.stderr)
    env = {**os.environ, "CLUES_DATA_DIR": str(settings.data_dir)}
    worker = subprocess.Popen([sys.executable, "-m", "clues", "worker"], env=env, preexec_fn=_die_with_parent)
    # uvicorn shuts down on SIGTERM and then re-raises it: with the default handler the process would end there,
    # before the worker is stopped below
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        _serve(settings, args.host, args.port)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    return EXIT_OK


def export_openapi() -> dict:
    """The API's OpenAPI document (built on a throw-away data directory; nothing is served)."""
    from app.config import AppSettings
    from app.main import create_app

    with tempfile.TemporaryDirectory() as tmp:
        return create_app(AppSettings(data_dir=Path(tmp)), migrate=False).openapi()


def cmd_openapi(args: argparse.Namespace) -> int:
    text = json.dumps(export_openapi(), indent=2, sort_keys=True) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from workers.celery_app import celery_app, configure
    from workers.config import ServiceSettings

    try:
        settings = ServiceSettings(**_overrides(args))
    except ValidationError as exc:
        raise CliError(f"settings: {exc}") from exc
    private_files()
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    configure(celery_app, settings)
    configure_logging(json_lines=False, level=args.loglevel)
    pool = "solo" if args.concurrency == 1 else "prefork"
    argv = ["worker", f"--pool={pool}", f"--concurrency={args.concurrency}", f"--loglevel={args.loglevel}"]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    celery_app.worker_main(argv)
    return EXIT_OK


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "coordinator",
        help="run the coordinator (API + workers)",
        description="The coordinator: REST API for the admin and the silos, Celery workers for scoring.",
    )
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, func, text in (
        ("serve", cmd_serve, "the API only (workers run separately: 'clues worker')"),
        (
            "up",
            cmd_up,
            "API + one worker on this machine; with no CLUES_REDIS_URL/CLUES_DATABASE_URL it needs no server",
        ),
    ):
        q = csub.add_parser(name, help=text, description=text)
        q.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
        q.add_argument("--port", type=int, default=8000, help="port (default 8000)")
        q.add_argument("--data-dir", default=None, help="overrides CLUES_DATA_DIR (default ./clues-data)")
        q.set_defaults(func=func)
    q = csub.add_parser("openapi", help="print or write the OpenAPI spec", description="Export the OpenAPI spec.")
    q.add_argument("--out", default="-", help="file to write (default: stdout)")
    q.set_defaults(func=cmd_openapi)

    p = sub.add_parser(
        "worker",
        help="run a Celery worker of the coordinator",
        description="A Celery worker: anchor projections, scoring, near-duplicate reports. Broker: CLUES_REDIS_URL, "
        "else the SQLite transport under the data directory.",
    )
    p.add_argument("--data-dir", default=None, help="overrides CLUES_DATA_DIR (default ./clues-data)")
    p.add_argument("--concurrency", type=int, default=1, help="parallel tasks (1: solo pool, the default)")
    p.add_argument("--loglevel", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--hostname", default=None, help="worker node name (default celery@<host>)")
    p.set_defaults(func=cmd_worker)
