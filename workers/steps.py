"""Steps that always finish: an outbox for sending tasks, a lease with a heartbeat for running them, and a reaper.

Every task of the graph (anchor projection, scoring, near duplicates, training init / aggregation / evaluation) is a
`storage.models.TaskStep` row keyed by its name and arguments.

- **Sending** (`Dispatcher.enqueue`): the row becomes ``queued`` in the database first, then the message goes to
  the broker. A message that never arrives, or that a dying worker took with it (kombu's SQLite transport never
  redelivers one), leaves a ``queued`` row behind that the reaper sends again.
- **Running** (`Lease`): a worker runs a step only after claiming its row (compare-and-set), and refreshes
  ``heartbeat_at`` every ``heartbeat_s`` from a thread while it runs. A duplicate delivery (a re-send, a Redis
  redelivery after the visibility timeout) finds the step running, done or failed and does nothing. Follow-up steps
  are queued in the same transaction that marks the step done.
- **Reaping** (`Dispatcher.reap`, in the API process every ``reap_every_s``): a running step whose heartbeat is
  older than ``lease_timeout_s`` is on a dead worker and is sent again; a queued step not claimed ``resend_after_s``
  after it was due is sent again (with back-off). Each re-send is a compare-and-set, so several API processes may
  reap at once and each step is still sent once. A step whose worker died ``max_lost`` times is failed with a message.

With the defaults a step on a worker killed with ``kill -9`` is running again on a live worker within about a minute
(45 s lease + up to 15 s until the next reap), on either broker. Imports no torch: the API uses it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from storage import repository as repo
from storage import steps as leases
from storage.errors import NotFoundError
from storage.models import Job, TrainJob, TrainWithdrawal, utcnow
from workers import names
from workers.config import ServiceSettings

log = logging.getLogger("clues.steps")

Send = Callable[[str, list[Any], float | None], None]
"""``send(task, args, countdown)``: put one message on the broker."""

TRAIN_TASKS = (names.TRAIN_INIT, names.TRAIN_AGGREGATE, names.TRAIN_EVALUATE)


class LeaseLost(RuntimeError):
    """This worker's lease on its step was taken over (its heartbeats stopped reaching the database): stop."""


@dataclass(frozen=True)
class FollowUp:
    """A step to queue once the current one is done: ``task(*args)``, not before ``countdown`` seconds."""

    task: str
    args: tuple[Any, ...]
    countdown: float | None = None


class Dispatcher:
    """Sends steps through the outbox and re-sends the lost ones (see the module docstring)."""

    def __init__(self, sessions: sessionmaker[Session], send: Send, settings: ServiceSettings):
        self.sessions, self.send, self.settings = sessions, send, settings

    def _stale_before(self, now: datetime) -> datetime:
        return now - timedelta(seconds=self.settings.lease_timeout_s)

    def enqueue(self, task: str, *args: Any, countdown: float | None = None, force: bool = False) -> bool:
        """Queue ``task(*args)`` and send it. Returns False (and sends nothing) when the step is running on a live
        worker, unless ``force``. A broker error propagates and leaves the step queued: the reaper sends it later;
        `cancel` it if the caller undoes what the step was for."""
        now = utcnow()
        with self.sessions.begin() as session:
            go = leases.mark_queued(
                session,
                task,
                list(args),
                not_before=now + timedelta(seconds=countdown or 0.0),
                stale_before=self._stale_before(now),
                force=force,
            )
        if go:
            self.send(task, list(args), countdown)
        return go

    def cancel(self, task: str, *args: Any, error: str) -> None:
        """Mark a queued step failed (its message, if it arrives, does nothing)."""
        with self.sessions.begin() as session:
            row = leases.get(session, leases.step_key(task, list(args)))
            if row is not None and row.state == "queued":
                row.state, row.error, row.finished_at = "failed", error, utcnow()

    def queue_follow_ups(self, session: Session, follow_ups: list[FollowUp]) -> list[FollowUp]:
        """Mark ``follow_ups`` queued in ``session`` (the caller's transaction); returns those to send after it
        commits."""
        now = utcnow()
        return [
            f
            for f in follow_ups
            if leases.mark_queued(
                session,
                f.task,
                list(f.args),
                not_before=now + timedelta(seconds=f.countdown or 0.0),
                stale_before=self._stale_before(now),
            )
        ]

    def send_all(self, follow_ups: list[FollowUp]) -> None:
        """Send what `queue_follow_ups` returned. A broker error is logged: the reaper re-sends those steps."""
        for f in follow_ups:
            try:
                self.send(f.task, list(f.args), f.countdown)
            except Exception:
                log.exception("could not send %s%s now; the reaper will", f.task, f.args)

    def reap(self) -> list[tuple[str, str]]:
        """One pass of the reaper. Returns ``(step key, what was done)`` for each step it re-sent or failed."""
        s = self.settings
        now = utcnow()
        base = timedelta(seconds=s.resend_after_s)
        with self.sessions() as session:
            due = leases.find_due(session, stale_before=self._stale_before(now), unsent_before=now - base)
        acted: list[tuple[str, str]] = []
        for step in due:
            if step.reason == "unsent":
                wait = leases.backoff(s.resend_after_s, step.attempt, max(s.visibility_timeout, s.resend_after_s))
                if step.sent_at > now - wait or step.not_before > now - base:
                    continue
            with self.sessions.begin() as session:
                if step.reason == "lost" and step.lost + 1 >= s.max_lost:
                    message = (
                        f"{step.task} stopped {step.lost + 1} times without finishing (its worker died each time; "
                        "out of memory?); not retried again. Retry it from the admin API once the cause is fixed."
                    )
                    if leases.give_up(session, step, message):
                        fail_owner(session, step.task, step.job_id, message)
                        acted.append((step.key, "failed"))
                        log.error("step %s failed: %s", step.key, message)
                    continue
                if not leases.resend(session, step, now=now):
                    continue  # another reaper, a worker or the API changed it since it was found
            acted.append((step.key, f"re-sent ({step.reason})"))
            log.warning("step %s re-sent: %s", step.key, "its worker died" if step.reason == "lost" else "lost")
            try:
                self.send(step.task, step.args, None)
            except Exception:
                log.exception("could not re-send %s; the next pass will", step.key)
        return acted

    def start_reaper(self) -> Callable[[], None]:
        """Run `reap` every ``reap_every_s`` in a daemon thread. Returns the function that stops it."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.settings.reap_every_s):
                try:
                    self.reap()
                except Exception:  # a database or broker outage: the next pass tries again
                    log.exception("reaper pass failed")

        thread = threading.Thread(target=loop, name="clues-reaper", daemon=True)
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join(timeout=5)

        return halt

    def resume(self) -> int:
        """On start-up: queue (again) the step that each job's state waits for (`job_waits_for`,
        `train_waits_for`, `withdrawal_waits_for`). Running steps on live workers are left alone; duplicates of
        queued steps are no-ops.
        Returns the number of steps sent."""
        with self.sessions() as session:
            waits = [job_waits_for(job) for job in repo.list_jobs(session)]
            waits += [train_waits_for(session, job) for job in repo.list_train_jobs(session)]
            waits += [withdrawal_waits_for(w) for w in repo.list_withdrawals(session)]
        return sum(self.enqueue(task, *args, countdown=countdown) for task, args, countdown in filter(None, waits))


Wait = tuple[str, tuple[Any, ...], float | None]
"""``(task, args, countdown)``: the step a job waits for."""


def withdrawal_waits_for(row: TrainWithdrawal) -> Wait | None:
    """The re-merge a pending withdrawal waits for; None when it is done or failed, or waits for the silo's
    retrained adapter instead (its upload queues the re-merge)."""
    if row.status != "pending" or (row.sample_ids is not None and "update" not in row.report):
        return None
    return names.TRAIN_WITHDRAW, (row.job_id, row.id), None


def job_waits_for(job: Job) -> Wait | None:
    """The step a scoring job waits for: its scoring when it is ``scoring``; its anchor projection when it is
    ``open`` with the projection pending or running."""
    if job.status == "scoring":
        return names.SCORE_JOB, (job.id,), None
    if job.status == "open" and job.anchor_status in ("pending", "running"):
        return names.PROJECT_ANCHORS, (job.id,), None
    return None


def train_waits_for(session: Session, job: TrainJob) -> Wait | None:
    """The step a training job waits for: its start (``starting``); its final evaluation (``evaluating``); when
    ``running``, its round's aggregation, at the round's deadline while the round is open."""
    if job.status == "starting":
        return names.TRAIN_INIT, (job.id,), None
    if job.status == "evaluating":
        return names.TRAIN_EVALUATE, (job.id, job.round), None
    if job.status != "running":
        return None
    row = repo.get_round(session, job_id=job.id, round=job.round)
    countdown = max(0.0, (row.deadline - utcnow()).total_seconds()) + 1.0 if row.status == "open" else None
    return names.TRAIN_AGGREGATE, (job.id, job.round), countdown


def fail_owner(session: Session, task: str, job_id: str, message: str) -> None:
    """Record on the job that one of its steps failed for good: a permanent error in the step (`workers.graph`), or
    a worker that kept dying (the reaper). A job that is done or failed already is left as it is; a failed anchor
    projection marks only the anchors (scoring projects them itself), except in a silo-local job, which has no
    scoring step to do it again: that job fails (the admin's retry sends the anchor step again)."""
    log.error("%s of job %s failed: %s", task, job_id, message)
    try:
        if task == names.SCORE_JOB:
            job = repo.get_job(session, job_id=job_id)
            if job.status not in ("done", "failed"):
                repo.update_job(
                    session, job_id=job_id, status="failed", error=message, message="failed", finished_at=utcnow()
                )
        elif task == names.PROJECT_ANCHORS:
            job = repo.get_job(session, job_id=job_id)
            repo.update_job(session, job_id=job_id, anchor_status="failed", error=message)
            if (job.options or {}).get("scoring_mode") == "local" and job.status not in ("done", "failed"):
                repo.update_job(session, job_id=job_id, status="failed", message="failed", finished_at=utcnow())
        elif task == names.TRAIN_WITHDRAW:  # the job keeps its adapter; the withdrawal is what failed
            for row in repo.list_withdrawals(session, job_id=job_id):
                if row.status == "pending":
                    repo.finish_withdrawal(
                        session, withdrawal_id=row.id, status="failed", report=row.report, error=message
                    )
        elif task in TRAIN_TASKS:
            job = repo.get_train_job(session, job_id=job_id)
            if job.status not in ("done", "failed"):
                repo.update_train_job(
                    session, job_id=job_id, status="failed", error=message, message="failed", finished_at=utcnow()
                )
    except NotFoundError:
        pass  # the job was deleted


def holder_name(request_id: str | None) -> str:
    """Who holds a lease: host, process and Celery request id (unique per delivery)."""
    return f"{socket.gethostname()}:{os.getpid()}:{request_id or 'inline'}"


@dataclass
class Lease:
    """The lease on one step while this process runs it (see the module docstring). Use `claim` first; then
    `check` between units of work, and exactly one of `done`, `failed` or `release`."""

    dispatcher: Dispatcher
    task: str
    args: list[Any]
    holder: str
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return leases.step_key(self.task, self.args)

    def claim(self) -> bool:
        """Take the lease and start heartbeating. False: another delivery runs, or ran, this step."""
        d = self.dispatcher
        with d.sessions.begin() as session:
            if not leases.claim(session, self.task, self.args, self.holder, stale_before=d._stale_before(utcnow())):
                return False
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.key}", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        every = self.dispatcher.settings.heartbeat_s
        while not self._stop.wait(every):
            try:
                with self.dispatcher.sessions.begin() as session:
                    if not leases.heartbeat(session, self.key, self.holder):
                        log.error("lease on %s was taken over; stopping this run of it", self.key)
                        self.lost.set()
                        return
            except Exception:  # a locked or unreachable database: the lease has lease_timeout_s of slack
                log.exception("heartbeat of %s failed", self.key)

    def stop_heartbeat(self) -> None:
        """Stop refreshing the lease without ending it (what a worker's death does; tests use it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self) -> None:
        """Raise `LeaseLost` if the step was taken over."""
        if self.lost.is_set():
            raise LeaseLost(f"the lease on {self.key} was taken over")

    def _end(self, state: str, error: str | None = None, follow_ups: list[FollowUp] = ()) -> None:
        self.stop_heartbeat()
        d = self.dispatcher
        with d.sessions.begin() as session:
            if not leases.finish(session, self.key, self.holder, state, error):
                log.warning("lease on %s was not held at its end (%s)", self.key, state)
                return
            to_send = d.queue_follow_ups(session, list(follow_ups))
        d.send_all(to_send)

    def done(self, follow_ups: list[FollowUp] = ()) -> None:
        """The step finished: mark it done and queue ``follow_ups`` in one transaction, then send them."""
        self._end("done", follow_ups=follow_ups)

    def failed(self, error: str) -> None:
        """The step failed for good (the job records why)."""
        self._end("failed", error)

    def release(self) -> None:
        """Put the step back to ``queued`` (a transient error: Celery's retry, or the reaper, sends it again)."""
        self._end("queued")
