"""A half-received upload over real HTTP (uvicorn) leaves nothing behind: the client announces a body, sends half of
it and hangs up."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest

from agent.client import AdminClient, SiloClient
from storage import repository as repo
from tests.app.test_api import job_body, shard, store_checkpoints_and_anchors
from tests.integration.conftest import ADMIN_TOKEN, Service

pytestmark = pytest.mark.integration


def test_a_dropped_connection_mid_body_stores_nothing(coordinator):
    job_id, token = _open_job(coordinator)
    state = coordinator.app.state.clues
    data = shard([f"s{i}" for i in range(500)])
    url = urlparse(coordinator.url)
    head = (
        f"PUT /v1/jobs/{job_id}/shards/0/0 HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {token}\r\n"
        f"X-Content-SHA256: {hashlib.sha256(data).hexdigest()}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    tmp_dir = coordinator.settings.storage.blob_dir / "tmp"
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(head + data[: len(data) // 2])
        deadline = time.monotonic() + 10
        while not any(tmp_dir.glob("*")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any(tmp_dir.glob("*")), "the server never started writing the body"
    deadline = time.monotonic() + 10
    while any(tmp_dir.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(tmp_dir.glob("*")), "the half-received body was left in the blob store's temp area"
    with state.sessions() as session:
        assert repo.list_shards(session, job_id=job_id) == []
    # the same shard sent whole afterwards is accepted
    with SiloClient(coordinator.url, token) as silo:
        assert silo.upload_shard(job_id, 0, 0, data)["created"] is True


def _open_job(coordinator) -> tuple[str, str]:
    with AdminClient(coordinator.url, coordinator.admin_token) as admin:
        token = {name: admin.register_silo(name)["token"] for name in ("a", "b")}["a"]
        job_id = admin.create_job(job_body())["id"]
    state = coordinator.app.state.clues
    store_checkpoints_and_anchors(state, job_id)
    with state.sessions.begin() as session:
        repo.update_job(session, job_id=job_id, status="open")
    return job_id, token


def test_of_twenty_identical_parallel_uploads_exactly_one_created_the_shard(coordinator):
    job_id, token = _open_job(coordinator)
    data = shard([f"s{i}" for i in range(200)])
    headers = {"Authorization": f"Bearer {token}", "X-Content-SHA256": hashlib.sha256(data).hexdigest(),
               "Content-Type": "application/octet-stream"}  # fmt: skip
    barrier = threading.Barrier(20)

    def upload(_):
        with httpx.Client(base_url=coordinator.url, timeout=60) as http:
            barrier.wait()
            r = http.put(f"/v1/jobs/{job_id}/shards/0/0", content=data, headers=headers)
            return r.status_code, r.json()["created"]

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(upload, range(20)))
    assert sorted(answers, reverse=True) == [(201, True)] + [(200, False)] * 19, answers
    with coordinator.app.state.clues.sessions() as session:
        assert len(repo.list_shards(session, job_id=job_id)) == 1


def test_a_stalled_upload_does_not_hold_up_shutdown_and_leaves_no_temp_file(tmp_path):
    """SIGTERM to ``clues coordinator serve`` while a client has sent half a body and then stalls: the server stops
    within its default graceful-shutdown timeout (15 s) and the half body's temp file is gone."""
    port = Service.free_port()
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUES_")}
    env |= {"CLUES_DATA_DIR": str(data_dir), "CLUES_ADMIN_TOKEN": ADMIN_TOKEN, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "api.log"
    with open(log, "w") as out:
        api = subprocess.Popen(
            [sys.executable, "-m", "clues", "coordinator", "serve", "--port", str(port)], env=env, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        Service.wait_healthy(f"http://127.0.0.1:{port}", api, log)
        with AdminClient(f"http://127.0.0.1:{port}", ADMIN_TOKEN) as admin:
            admin.register_silo("a")
            admin.register_silo("b")
            job_id = admin.create_job(job_body())["id"]
        head = (
            f"PUT /v1/jobs/{job_id}/checkpoints/0 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {ADMIN_TOKEN}\r\nX-Content-SHA256: {'0' * 64}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 10000000\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + b"x" * 100_000)  # then nothing more
            tmp_dir = data_dir / "blobs" / "tmp"
            deadline = time.monotonic() + 10
            while not (tmp_dir.exists() and any(tmp_dir.iterdir())) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert any(tmp_dir.iterdir()), "the server never started writing the body"
            started = time.monotonic()
            api.send_signal(signal.SIGTERM)
            api.wait(60)
            took = time.monotonic() - started
        assert took < 30, f"shutdown took {took:.1f} s"
        assert not any(tmp_dir.iterdir()), "the stalled body's temp file outlived the server"
    finally:
        if api.poll() is None:
            api.kill()
