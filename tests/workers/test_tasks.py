"""The Celery tasks (run eagerly, in-process, with their step leases on a real SQLite database): transient
errors are retried, permanent ones and bugs fail the job once, a duplicate delivery does nothing, and a follow-up
the task graph does not declare is refused."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from scoring.errors import DataError
from storage import steps as leases
from storage.db import make_engine, make_session_factory
from storage.models import Base
from workers import graph, names, tasks
from workers.config import ServiceSettings
from workers.steps import Dispatcher, FollowUp

score_job = tasks.TASKS[names.SCORE_JOB]


@pytest.fixture
def eager(monkeypatch, tmp_path):
    calls: dict[str, list] = {"score": [], "fail": [], "sent": []}
    engine = make_engine(f"sqlite:///{tmp_path}/clues.db")
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    send = lambda name, args, countdown: calls["sent"].append((name, args))  # noqa: E731
    monkeypatch.setattr(tasks, "dispatcher", lambda: Dispatcher(sessions, send, ServiceSettings(data_dir=tmp_path)))
    calls["sessions"] = sessions
    conf = tasks.celery_app.conf
    monkeypatch.setitem(conf, "task_always_eager", True)
    monkeypatch.setitem(conf, "result_backend", "cache+memory://")  # eager results stay in this process
    monkeypatch.delattr(tasks.celery_app._local, "backend", raising=False)
    monkeypatch.setattr(tasks, "resources", lambda: object())
    monkeypatch.setattr(graph, "progress", lambda res, lease, job_id: lambda fraction, message: None)
    monkeypatch.setattr(graph, "fail_owner", lambda session, task, job_id, error: calls["fail"].append(error))
    monkeypatch.setattr(score_job, "retry_backoff", False)  # no sleeping between eager retries
    yield calls
    tasks.celery_app._local.__dict__.pop("backend", None)  # the next user gets the configured backend again
    engine.dispose()


def state_of(eager, task: str, *args) -> str:
    with eager["sessions"]() as session:
        return leases.get(session, leases.step_key(task, list(args))).state


def test_transient_errors_are_retried_then_the_task_succeeds(eager, monkeypatch):
    def flaky(res, job_id, progress):
        eager["score"].append(job_id)
        if len(eager["score"]) < 3:
            raise OperationalError("SELECT 1", {}, Exception("database is locked"))
        return type("Table", (), {"ids": ("x", "y")})()

    monkeypatch.setattr(graph.pipeline, "score_job", flaky)
    result = score_job.apply(args=["j1"])
    assert result.get() == "done"
    assert eager["score"] == ["j1", "j1", "j1"] and eager["fail"] == []
    assert eager["sent"] == [("clues.near_duplicates", ["j1"])]
    assert state_of(eager, names.SCORE_JOB, "j1") == "done"
    assert state_of(eager, names.NEAR_DUPLICATES, "j1") == "queued"
    assert score_job.apply(args=["j1"]).get() == "skipped"  # a late duplicate delivery
    assert eager["score"] == ["j1", "j1", "j1"]


def test_permanent_errors_fail_the_job_without_retrying(eager, monkeypatch):
    def broken(res, job_id, progress):
        eager["score"].append(job_id)
        raise DataError("silo 'a' part 0: rows [3] hold NaN or Inf")

    monkeypatch.setattr(graph.pipeline, "score_job", broken)
    assert score_job.apply(args=["j2"]).get() == "failed"
    assert eager["score"] == ["j2"] and eager["fail"] == ["silo 'a' part 0: rows [3] hold NaN or Inf"]
    assert eager["sent"] == []
    assert state_of(eager, names.SCORE_JOB, "j2") == "failed"


def test_delivery_guarantees_are_configured():
    conf = tasks.celery_app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert set(tasks.TASKS) == set(graph.GRAPH) == set(names.ALL)
    for task in tasks.TASKS.values():
        assert task.acks_late and task.reject_on_worker_lost and OperationalError in task.autoretry_for


def test_a_bug_fails_the_job_with_its_type_and_the_step_is_not_retried(eager, monkeypatch):
    def buggy(res, job_id, progress):
        eager["score"].append(job_id)
        raise KeyError("checkpoints")

    monkeypatch.setattr(graph.pipeline, "score_job", buggy)
    result = score_job.apply(args=["j3"])
    with pytest.raises(KeyError):
        result.get()
    assert eager["score"] == ["j3"]  # not retried
    assert len(eager["fail"]) == 1 and eager["fail"][0].startswith("unexpected KeyError in the scoring of job j3")
    assert state_of(eager, names.SCORE_JOB, "j3") == "failed"
    assert eager["sent"] == []


def test_a_follow_up_the_graph_does_not_declare_is_refused(eager, monkeypatch):
    def run(res, lease, args):
        return "done", [FollowUp(names.TRAIN_INIT, (args[0],))]  # scoring never starts training

    monkeypatch.setitem(graph.GRAPH, names.SCORE_JOB, graph.Node(run, "scoring of job {0}"))
    with pytest.raises(RuntimeError, match="does not declare"):
        score_job.apply(args=["j4"]).get()
    assert state_of(eager, names.SCORE_JOB, "j4") == "failed" and eager["sent"] == []
