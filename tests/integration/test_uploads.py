"""A half-received upload over real HTTP (uvicorn) leaves nothing behind: the client announces a body, sends half of
it and hangs up."""

from __future__ import annotations

import hashlib
import socket
import time
from urllib.parse import urlparse

import pytest

from agent.client import Client
from storage import repository as repo
from tests.app.test_api import job_body, shard, store_checkpoints_and_anchors

pytestmark = pytest.mark.integration


def test_a_dropped_connection_mid_body_stores_nothing(coordinator):
    with Client(coordinator.url, coordinator.admin_token) as admin:
        token = {name: admin.register_silo(name)["token"] for name in ("a", "b")}["a"]
        job_id = admin.create_job(job_body())["id"]
    state = coordinator.app.state.clues
    store_checkpoints_and_anchors(state, job_id)
    with state.sessions.begin() as session:
        repo.update_job(session, job_id=job_id, status="open")
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
    with Client(coordinator.url, token) as silo:
        assert silo.upload_shard(job_id, 0, 0, data)["created"] is True
