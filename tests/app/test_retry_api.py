"""The admin's retry routes and the steps on a job's page, with the product's own dispatcher on the embedded broker
(kombu's SQLite transport: the messages really land in ``broker.sqlite``; no worker runs here)."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.config import AppSettings
from app.main import create_app
from storage import repository as repo
from storage.models import TaskStep, utcnow
from tests.app.test_api import ADMIN, job_body, store_checkpoints_and_anchors
from workers import names
from workers.steps import Lease


@pytest.fixture
def coordinator(tmp_path):
    settings = AppSettings(data_dir=tmp_path / "coord", admin_token="admin-secret-for-tests-0123456789abcdef")
    app = create_app(settings)
    with TestClient(app) as client:
        token = client.post("/v1/silos", json={"name": "a"}, headers=ADMIN).json()["token"]
        client.post("/v1/silos", json={"name": "b"}, headers=ADMIN)
        yield client, app.state.clues, {"Authorization": f"Bearer {token}"}


def broker_messages(state) -> int:
    with sqlite3.connect(state.settings.data_dir / "broker.sqlite") as db:
        return db.execute("SELECT count(*) FROM kombu_message").fetchone()[0]


def step(client, job_id: str, task: str) -> dict:
    job = client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()
    return next(s for s in job["steps"] if s["task"] == task)


def open_job(client, state) -> str:
    job_id = client.post("/v1/jobs", json=job_body(), headers=ADMIN).json()["id"]
    store_checkpoints_and_anchors(state, job_id)
    assert client.post(f"/v1/jobs/{job_id}/open", headers=ADMIN).status_code == 200
    return job_id


def test_retry_re_sends_a_waiting_step_and_leaves_a_live_one_alone(coordinator):
    client, state, _ = coordinator
    job_id = open_job(client, state)
    assert step(client, job_id, names.PROJECT_ANCHORS) | {"heartbeat_age_s": None} == {
        "task": names.PROJECT_ANCHORS,
        "args": [job_id],
        "state": "queued",
        "attempt": 1,
        "lost": 0,
        "holder": None,
        "heartbeat_age_s": None,
        "error": None,
    }
    assert broker_messages(state) == 1
    r = client.post(f"/v1/jobs/{job_id}/retry", headers=ADMIN)
    assert r.status_code == 202 and step(client, job_id, names.PROJECT_ANCHORS)["attempt"] == 2
    assert broker_messages(state) == 2
    worker = Lease(state.dispatcher, names.PROJECT_ANCHORS, [job_id], "worker-1")
    assert worker.claim()  # a worker picks it up
    r = client.post(f"/v1/jobs/{job_id}/retry", headers=ADMIN)
    assert r.status_code == 202
    running = step(client, job_id, names.PROJECT_ANCHORS)
    assert (running["state"], running["attempt"], running["holder"]) == ("running", 2, "worker-1")
    assert 0 <= running["heartbeat_age_s"] < 5
    assert broker_messages(state) == 2  # nothing sent behind a live worker
    worker.stop_heartbeat()
    with state.sessions.begin() as session:  # that worker died 50 s ago
        session.execute(update(TaskStep).values(heartbeat_at=utcnow() - timedelta(seconds=50)))
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=ADMIN).status_code == 202
    again = step(client, job_id, names.PROJECT_ANCHORS)
    assert (again["state"], again["attempt"], again["lost"]) == ("queued", 3, 1)
    assert broker_messages(state) == 3


def test_score_on_a_scoring_job_re_sends_a_lost_step(coordinator):
    client, state, _ = coordinator
    job_id = open_job(client, state)
    with state.sessions.begin() as session:  # as if every silo had completed and scoring had been queued
        repo.update_job(session, job_id=job_id, status="scoring", anchor_status="done")
    assert client.post(f"/v1/jobs/{job_id}/score", headers=ADMIN).status_code == 202
    assert step(client, job_id, names.SCORE_JOB)["state"] == "queued"
    assert broker_messages(state) == 2  # the anchor projection's, and this one


def test_nothing_to_retry_is_a_409_and_silos_cannot_retry_or_see_steps(coordinator):
    client, state, silo = coordinator
    draft = client.post("/v1/jobs", json=job_body(), headers=ADMIN).json()["id"]
    r = client.post(f"/v1/jobs/{draft}/retry", headers=ADMIN)
    assert r.status_code == 409 and "nothing to retry" in r.json()["detail"]
    job_id = open_job(client, state)
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=silo).status_code == 403
    assert client.get(f"/v1/jobs/{job_id}", headers=silo).json()["steps"] is None


def test_start_up_re_sends_a_scoring_job_whose_message_was_lost(tmp_path):
    """A coordinator restarted with a job in ``scoring`` and no live worker on it queues its step again."""
    settings = AppSettings(data_dir=tmp_path / "coord", admin_token="admin-secret-for-tests-0123456789abcdef")
    with TestClient(create_app(settings)) as client:
        state = client.app.state.clues
        client.post("/v1/silos", json={"name": "a"}, headers=ADMIN)
        client.post("/v1/silos", json={"name": "b"}, headers=ADMIN)
        job_id = open_job(client, state)
        with state.sessions.begin() as session:
            repo.update_job(session, job_id=job_id, status="scoring", anchor_status="done")
    with TestClient(create_app(settings)) as client:
        assert step(client, job_id, names.SCORE_JOB)["state"] == "queued"
        assert broker_messages(client.app.state.clues) == 2
