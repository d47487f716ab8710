"""Integration fixtures: the coordinator as real processes (API under uvicorn, Celery workers) on real Redis and,
when asked, real PostgreSQL. Without those servers the tests skip with the reason; with ``CI=true`` they fail."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SILOS
from tests.storage.conftest import postgres_url  # noqa: F401  (a fixture, used by service_factory)

REDIS_URL = os.environ.get("CLUES_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")
ADMIN_TOKEN = "admin-secret-for-tests-0123456789abcdef"
HERE = Path(__file__).parent


def unavailable(reason: str) -> None:
    """Skip, or fail under CI=true (CI must run every integration test)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def redis_url() -> str:
    """The test Redis database, emptied (a test's leftover tasks must not reach the next test's workers)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL} ({exc})")
    client.flushdb()
    client.close()
    return REDIS_URL


class Service:
    """The coordinator's processes for one test, all sharing one data directory and environment."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.url = ""
        self.admin_token = ADMIN_TOKEN
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    @staticmethod
    def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the coordinator did not become healthy:\n{log.read_text()[-3000:]}")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        proc.log_file = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def start_api(self, same_port: bool = False) -> None:
        """Start ``clues coordinator serve``; ``same_port``: where the last one listened (a restart)."""
        port = int(self.url.rsplit(":", 1)[1]) if same_port else self.free_port()
        self.url = f"http://127.0.0.1:{port}"
        proc = self._spawn("api", [sys.executable, "-m", "clues", "coordinator", "serve", "--port", str(port)])
        self.wait_healthy(self.url, proc, self.root / "api.log")

    def start_worker(self, name: str, slow_parts_s: float | None = None) -> subprocess.Popen:
        args = ["--hostname", f"{name}@%h"]
        if slow_parts_s is None:
            return self._spawn(name, [sys.executable, "-m", "clues", "worker", *args])
        return self._spawn(name, [sys.executable, str(HERE / "slow_worker.py"), str(slow_parts_s), *args])

    def kill_api(self) -> None:
        """SIGKILL the API process (the last one started)."""
        api = next(p for p in reversed(self.procs) if "serve" in p.args)
        api.kill()
        api.wait(30)

    def api_log_has(self, text: str) -> bool:
        return text in (self.root / "api.log").read_text()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            proc.log_file.close()


@pytest.fixture
def service_factory(tmp_path, request) -> Iterator:
    """``make(database="sqlite"|"postgresql", redis=True) -> Service``: every other setting is the product's
    default (the fault tests must recover with what a user gets)."""
    made: list[Service] = []

    def make(database: str = "sqlite", redis: bool = True) -> Service:
        root = tmp_path / "service"
        root.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLUES_")}
        env |= {
            "CLUES_DATA_DIR": str(root / "data"),
            "CLUES_ADMIN_TOKEN": ADMIN_TOKEN,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(HERE.parent.parent),
        }
        if redis:
            env["CLUES_REDIS_URL"] = request.getfixturevalue("redis_url")
        if database == "postgresql":
            env["CLUES_DATABASE_URL"] = request.getfixturevalue("postgres_url")
        service = Service(root, env)
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop()


def each_silo(run) -> dict[str, object]:
    """``run(silo)`` for both silos at once (each may wait for the other); their results, errors re-raised."""
    results: dict[str, object] = {}

    def one(silo: str) -> None:
        try:
            results[silo] = run(silo)
        except BaseException as exc:  # surfaced below
            results[silo] = exc

    threads = [threading.Thread(target=one, args=(s,)) for s in SILOS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for silo in SILOS:
        if isinstance(results.get(silo), BaseException):
            raise results[silo]
    return results
