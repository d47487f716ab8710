"""Step leases (`workers.steps`, `storage.steps`) on a real SQLite database: the outbox, the compare-and-set claim,
the heartbeat, the reaper's re-sends and its give-up, with the production defaults unless a test says why not."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from storage import repository as repo
from storage import steps as leases
from storage.db import make_engine, make_session_factory
from storage.models import Base, TaskStep, utcnow
from workers import names
from workers.config import ServiceSettings
from workers.steps import Dispatcher, FollowUp, Lease, LeaseLost

JOB = "j" * 32


@pytest.fixture(autouse=True)
def _no_heartbeats_after_the_test(monkeypatch):
    """Leases a test leaves held (its "killed" workers) stop heartbeating when it ends."""
    claimed: list[Lease] = []
    claim = Lease.claim

    def tracking(self: Lease) -> bool:
        claimed.append(self)
        return claim(self)

    monkeypatch.setattr(Lease, "claim", tracking)
    yield
    for lease in claimed:
        lease.stop_heartbeat()


@pytest.fixture
def sessions(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path}/clues.db")
    Base.metadata.create_all(engine)
    yield make_session_factory(engine)
    engine.dispose()


class Broker:
    """Records what is sent; ``down`` makes sending fail like an unreachable broker."""

    def __init__(self):
        self.sent: list[tuple[str, list, float | None]] = []
        self.down = False

    def __call__(self, task: str, args: list, countdown: float | None) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        self.sent.append((task, args, countdown))


def dispatcher(sessions, tmp_path: Path, **settings) -> tuple[Dispatcher, Broker]:
    broker = Broker()
    return Dispatcher(sessions, broker, ServiceSettings(data_dir=tmp_path, **settings)), broker


def row(sessions, task: str = names.SCORE_JOB, *args) -> TaskStep:
    with sessions() as session:
        return leases.get(session, leases.step_key(task, list(args or (JOB,))))


def age(sessions, key: str, seconds: float, *columns: str) -> None:
    """Move a step's timestamps ``seconds`` into the past (what waiting that long would do)."""
    with sessions.begin() as session:
        step = session.get(TaskStep, key)
        values = {c: getattr(step, c) - timedelta(seconds=seconds) for c in columns}
        session.execute(update(TaskStep).where(TaskStep.key == key).values(**values))


def make_scoring_job(sessions) -> str:
    with sessions.begin() as session:
        job = repo.create_job(
            session,
            name="j",
            model="tiny:0",
            lora={},
            projection={},
            similarity="cosine",
            threshold={"kind": "anchor_mean"},
            precondition=False,
            options={},
            checkpoints=[{"index": 0, "step": 1, "lr": 1e-4, "lr_last": 1e-4, "adam": {}}],
            silo_names=[],
        )
        repo.update_job(session, job_id=job.id, status="scoring")
        return job.id


def test_the_defaults_recover_a_dead_workers_step_within_two_minutes():
    s = ServiceSettings()
    assert s.lease_timeout_s + s.reap_every_s <= 90 and s.lease_timeout_s >= 3 * s.heartbeat_s
    assert s.visibility_timeout >= 3600  # redelivery stays a slow safety net, never a double run (see the claim)
    with pytest.raises(ValueError, match="at least 3"):
        ServiceSettings(heartbeat_s=30, lease_timeout_s=45)


def test_a_step_runs_once_however_often_it_is_delivered(sessions, tmp_path):
    d, broker = dispatcher(sessions, tmp_path)
    assert d.enqueue(names.SCORE_JOB, JOB)
    assert broker.sent == [(names.SCORE_JOB, [JOB], None)]
    first = Lease(d, names.SCORE_JOB, [JOB], "w1")
    second = Lease(d, names.SCORE_JOB, [JOB], "w2")
    assert first.claim()
    assert not second.claim()  # a duplicate delivery while it runs
    assert not d.enqueue(names.SCORE_JOB, JOB)  # running on a live worker: not sent again
    assert len(broker.sent) == 1
    first.done()
    assert row(sessions).state == "done"
    assert not Lease(d, names.SCORE_JOB, [JOB], "w3").claim()  # a late redelivery of a finished step
    assert d.enqueue(names.SCORE_JOB, JOB)  # asked for again (a re-score): queued and sent
    assert row(sessions).attempt == 2 and row(sessions).state == "queued"


def test_a_message_from_an_older_version_without_a_row_still_runs_once(sessions, tmp_path):
    d, _ = dispatcher(sessions, tmp_path)
    assert Lease(d, names.NEAR_DUPLICATES, [JOB], "w1").claim()
    assert not Lease(d, names.NEAR_DUPLICATES, [JOB], "w2").claim()


def test_a_stale_lease_is_re_sent_once_even_by_two_reapers(sessions, tmp_path):
    d1, _broker1 = dispatcher(sessions, tmp_path)
    d2, _broker2 = dispatcher(sessions, tmp_path)
    d1.enqueue(names.SCORE_JOB, JOB)
    assert Lease(d1, names.SCORE_JOB, [JOB], "killed").claim()  # its worker dies: no heartbeat, no end
    key = leases.step_key(names.SCORE_JOB, [JOB])
    assert d1.reap() == [] and d2.reap() == []  # heartbeat fresh
    age(sessions, key, d1.settings.lease_timeout_s + 1, "heartbeat_at")
    with sessions() as session:  # both reapers found it before either acted
        found = leases.find_due(session, stale_before=utcnow() - timedelta(seconds=45), unsent_before=utcnow())
    assert [f.reason for f in found] == ["lost"]
    with sessions.begin() as session:
        assert leases.resend(session, found[0], now=utcnow())
    with sessions.begin() as session:
        assert not leases.resend(session, found[0], now=utcnow())
    step = row(sessions)
    assert (step.state, step.attempt, step.lost, step.holder) == ("queued", 2, 1, None)
    assert Lease(d2, names.SCORE_JOB, [JOB], "new worker").claim()


def test_the_reaper_re_sends_a_dead_workers_step_and_a_live_one_is_left_alone(sessions, tmp_path):
    d, broker = dispatcher(sessions, tmp_path)
    d.enqueue(names.SCORE_JOB, JOB)
    d.enqueue(names.PROJECT_ANCHORS, JOB)
    Lease(d, names.SCORE_JOB, [JOB], "killed").claim()
    Lease(d, names.PROJECT_ANCHORS, [JOB], "alive").claim()
    age(sessions, leases.step_key(names.SCORE_JOB, [JOB]), 46, "heartbeat_at")
    broker.sent.clear()
    assert d.reap() == [(leases.step_key(names.SCORE_JOB, [JOB]), "re-sent (lost)")]
    assert broker.sent == [(names.SCORE_JOB, [JOB], None)]
    assert d.reap() == []  # queued again and just sent: nothing to do


def test_a_late_redelivery_takes_over_a_stale_lease_without_the_reaper(sessions, tmp_path):
    d, _ = dispatcher(sessions, tmp_path)
    d.enqueue(names.SCORE_JOB, JOB)
    Lease(d, names.SCORE_JOB, [JOB], "killed").claim()
    assert not Lease(d, names.SCORE_JOB, [JOB], "redelivered").claim()
    age(sessions, leases.step_key(names.SCORE_JOB, [JOB]), 46, "heartbeat_at")
    assert Lease(d, names.SCORE_JOB, [JOB], "redelivered").claim()


def test_a_lost_message_is_re_sent_with_back_off(sessions, tmp_path):
    d, _broker = dispatcher(sessions, tmp_path)
    d.enqueue(names.SCORE_JOB, JOB)  # the message is consumed by a worker that dies before claiming it
    key = leases.step_key(names.SCORE_JOB, [JOB])
    assert d.reap() == []
    age(sessions, key, 121, "sent_at", "not_before")
    assert d.reap() == [(key, "re-sent (unsent)")] and row(sessions).attempt == 2
    age(sessions, key, 121, "sent_at", "not_before")
    assert d.reap() == []  # attempt 2 waits 240 s
    age(sessions, key, 120, "sent_at", "not_before")
    assert d.reap() == [(key, "re-sent (unsent)")]


def test_a_scheduled_step_is_not_re_sent_before_it_is_due(sessions, tmp_path):
    d, _broker = dispatcher(sessions, tmp_path)
    d.enqueue(names.TRAIN_AGGREGATE, JOB, 0, countdown=600)
    key = leases.step_key(names.TRAIN_AGGREGATE, [JOB, 0])
    age(sessions, key, 300, "sent_at", "not_before")  # sent 5 min ago, due in 5 min
    assert d.reap() == []
    age(sessions, key, 421, "sent_at", "not_before")  # due 121 s ago, never claimed
    assert d.reap() == [(key, "re-sent (unsent)")]


def test_a_step_that_keeps_killing_its_worker_fails_the_job(sessions, tmp_path):
    d, _broker = dispatcher(sessions, tmp_path)
    job_id = make_scoring_job(sessions)
    key = leases.step_key(names.SCORE_JOB, [job_id])
    d.enqueue(names.SCORE_JOB, job_id)
    for attempt in range(d.settings.max_lost):
        assert Lease(d, names.SCORE_JOB, [job_id], f"w{attempt}").claim()
        age(sessions, key, 46, "heartbeat_at")
        acted = d.reap()
    assert acted == [(key, "failed")]
    assert row(sessions, names.SCORE_JOB, job_id).state == "failed"
    with sessions() as session:
        job = repo.get_job(session, job_id=job_id)
        assert job.status == "failed" and "stopped 3 times" in job.error


def test_follow_ups_survive_a_broker_outage(sessions, tmp_path):
    d, broker = dispatcher(sessions, tmp_path)
    d.enqueue(names.SCORE_JOB, JOB)
    lease = Lease(d, names.SCORE_JOB, [JOB], "w1")
    lease.claim()
    broker.down = True
    lease.done([FollowUp(names.NEAR_DUPLICATES, (JOB,))])  # committed with the step's end, not sent
    follow = leases.step_key(names.NEAR_DUPLICATES, [JOB])
    assert row(sessions, names.NEAR_DUPLICATES, JOB).state == "queued"
    broker.down = False
    age(sessions, follow, 121, "sent_at", "not_before")
    assert d.reap() == [(follow, "re-sent (unsent)")]
    assert broker.sent[-1] == (names.NEAR_DUPLICATES, [JOB], None)


def test_a_waiting_step_can_queue_itself_again(sessions, tmp_path):
    """A round's deadline check that finds the round not due yet schedules itself for the deadline."""
    d, broker = dispatcher(sessions, tmp_path)
    d.enqueue(names.TRAIN_AGGREGATE, JOB, 2)
    lease = Lease(d, names.TRAIN_AGGREGATE, [JOB, 2], "w1")
    lease.claim()
    lease.done([FollowUp(names.TRAIN_AGGREGATE, (JOB, 2), 30.0)])
    step = row(sessions, names.TRAIN_AGGREGATE, JOB, 2)
    assert step.state == "queued" and step.not_before > utcnow() + timedelta(seconds=25)
    assert broker.sent[-1] == (names.TRAIN_AGGREGATE, [JOB, 2], 30.0)


def test_a_released_step_is_claimable_again(sessions, tmp_path):
    d, _ = dispatcher(sessions, tmp_path)
    d.enqueue(names.SCORE_JOB, JOB)
    lease = Lease(d, names.SCORE_JOB, [JOB], "w1")
    lease.claim()
    lease.release()  # a transient error: Celery's retry brings it back
    assert row(sessions).state == "queued"
    assert Lease(d, names.SCORE_JOB, [JOB], "w1-retry").claim()


def test_a_taken_over_lease_stops_its_old_holder(sessions, tmp_path):
    # Short heartbeats here only so that the test need not wait 45 s; the logic is the same at the defaults.
    d, _ = dispatcher(sessions, tmp_path, heartbeat_s=0.05, lease_timeout_s=0.2)
    d.enqueue(names.SCORE_JOB, JOB)
    old = Lease(d, names.SCORE_JOB, [JOB], "partitioned")
    old.claim()
    with sessions.begin() as session:  # the reaper judged it dead and another worker took it
        session.execute(update(TaskStep).values(holder="new", state="running"))
    deadline = time.monotonic() + 5
    while not old.lost.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(LeaseLost):
        old.check()
    old.done()  # its end changes nothing: the new holder's lease stands
    assert row(sessions).holder == "new" and row(sessions).state == "running"


def test_heartbeats_keep_a_long_step_alive(sessions, tmp_path):
    d, _ = dispatcher(sessions, tmp_path, heartbeat_s=0.05, lease_timeout_s=0.2)
    d.enqueue(names.SCORE_JOB, JOB)
    lease = Lease(d, names.SCORE_JOB, [JOB], "w1")
    lease.claim()
    time.sleep(0.5)  # three lease timeouts
    assert d.reap() == [] and not Lease(d, names.SCORE_JOB, [JOB], "w2").claim()
    lease.check()
    lease.done()
    assert row(sessions).state == "done"


def test_cancel_makes_a_queued_steps_message_a_no_op(sessions, tmp_path):
    d, broker = dispatcher(sessions, tmp_path)
    broker.down = True
    with pytest.raises(ConnectionError):
        d.enqueue(names.SCORE_JOB, JOB)
    d.cancel(names.SCORE_JOB, JOB, error="not sent")
    assert row(sessions).state == "failed"
    assert not Lease(d, names.SCORE_JOB, [JOB], "w1").claim()


def test_resume_re_sends_what_scoring_and_open_jobs_wait_for(sessions, tmp_path):
    d, broker = dispatcher(sessions, tmp_path)
    job_id = make_scoring_job(sessions)
    assert d.resume() == 1 and broker.sent == [(names.SCORE_JOB, [job_id], None)]
    Lease(d, names.SCORE_JOB, [job_id], "alive").claim()
    assert d.resume() == 0  # running on a live worker


def test_resume_re_sends_an_anchor_projection_left_running(sessions, tmp_path):
    d, broker = dispatcher(sessions, tmp_path)
    job_id = make_scoring_job(sessions)
    with sessions.begin() as session:
        repo.update_job(session, job_id=job_id, status="open", anchor_status="running")
    assert d.resume() == 1 and broker.sent == [(names.PROJECT_ANCHORS, [job_id], None)]
