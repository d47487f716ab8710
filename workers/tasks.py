"""Celery task wrappers: take ids only, hold the step's lease, call `workers.pipeline` / `workers.training`.

Each task first claims its step (`workers.steps.Lease`): a duplicate delivery, of a step that another worker runs
or that is done, returns ``"skipped"`` at once. While it runs, a thread heartbeats the lease, and a progress report
stops the run if the lease was taken over. Follow-up steps (the near-duplicate report, the next round's deadline
check, an evaluation) are queued in the transaction that marks the step done.

Delivery: ``acks_late`` + ``reject_on_worker_lost`` (see `workers.celery_app`), and every step is idempotent.
Transient errors (database or broker unreachable, a locked SQLite file, I/O) put the step back in the queue and are
retried with exponential backoff; errors in the data or the job's state are permanent and recorded on the job as
``failed`` with the message. A worker killed with ``kill -9`` leaves a stale lease that the API's reaper re-sends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

from celery import Task
from sqlalchemy.exc import OperationalError

from scoring.errors import ScoringError
from storage.errors import StorageError, TransientStorageError
from workers import names, pipeline, training
from workers.celery_app import celery_app
from workers.steps import Dispatcher, FollowUp, Lease, LeaseLost, holder_name

log = logging.getLogger("clues.workers")

TRANSIENT = (OperationalError, TransientStorageError, ConnectionError, TimeoutError)
RETRY = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": TRANSIENT,
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 8,
}
PERMANENT = (ScoringError, StorageError)
"""Errors in the data or the job's state. A `TransientStorageError` is a `StorageError` but is re-raised (retried)."""

Body = Callable[[Lease], tuple[str, list[FollowUp]]]


@cache
def resources() -> pipeline.Resources:
    """This worker process's storage handles, built on first use from the app's settings."""
    return pipeline.Resources.from_settings(celery_app.conf.clues_settings)


@cache
def dispatcher() -> Dispatcher:
    """This worker process's `Dispatcher`: how a step queues its follow-ups."""

    def send(task: str, args: list, countdown: float | None) -> None:
        celery_app.send_task(task, args=args, countdown=countdown)

    return Dispatcher(resources().sessions, send, celery_app.conf.clues_settings)


def run_step(task: Task, args: list, body: Body, on_failure: Callable[[str], None], what: str) -> str:
    """Claim the step, run ``body(lease)``, and end the lease as its outcome says. ``on_failure(message)`` records a
    permanent error on the job."""
    lease = Lease(dispatcher(), task.name, args, holder_name(task.request.id))
    if not lease.claim():
        log.info("%s: another delivery runs or ran this step; skipped", what)
        return "skipped"
    try:
        status, follow_ups = body(lease)
    except LeaseLost:
        log.error("%s: lease taken over by another worker; this run stops", what)
        return "superseded"
    except TRANSIENT:
        lease.release()
        raise
    except PERMANENT as exc:
        log.exception("%s failed", what)
        try:
            on_failure(str(exc))
        except StorageError:  # the job itself is gone (deleted) or unreachable: the step still ends
            log.exception("%s: could not record the failure on the job", what)
        lease.failed(str(exc))
        return "failed"
    except BaseException:  # a bug: the step fails loudly and is not retried forever
        lease.failed("unexpected error (see the worker's log)")
        raise
    lease.done(follow_ups)
    return status


def _progress(lease: Lease, job_id: str) -> pipeline.Progress:
    write = pipeline.progress_writer(resources(), job_id)

    def report(fraction: float, message: str) -> None:
        lease.check()
        write(fraction, message)

    return report


@celery_app.task(name=names.PROJECT_ANCHORS, **RETRY)
def project_anchors(self: Task, job_id: str) -> str:
    """Anchor projections at every checkpoint (skipped when stored already)."""
    res = resources()

    def body(lease: Lease) -> tuple[str, list[FollowUp]]:
        pipeline.project_anchors(res, job_id, _progress(lease, job_id))
        return "done", []

    return run_step(
        self, [job_id], body, lambda e: pipeline.set_anchor_failed(res, job_id, e), f"anchor projection of {job_id}"
    )


@celery_app.task(name=names.SCORE_JOB, **RETRY)
def score_job(self: Task, job_id: str) -> str:
    """Scores, threshold and masks of a job; then the near-duplicate report."""
    res = resources()

    def body(lease: Lease) -> tuple[str, list[FollowUp]]:
        table = pipeline.score_job(res, job_id, _progress(lease, job_id))
        log.info("job %s scored: %d samples", job_id, len(table.ids))
        return "done", [FollowUp(names.NEAR_DUPLICATES, (job_id,))]

    return run_step(self, [job_id], body, lambda e: pipeline.fail_job(res, job_id, e), f"scoring of job {job_id}")


@celery_app.task(name=names.NEAR_DUPLICATES, **RETRY)
def near_duplicates(self: Task, job_id: str) -> str:
    """Near-duplicate pairs across silos and the anchor nearest-neighbour index."""

    def body(lease: Lease) -> tuple[str, list[FollowUp]]:
        return str(pipeline.find_near_duplicates(resources(), job_id)), []

    return run_step(self, [job_id], body, lambda e: None, f"near-duplicate report of job {job_id}")


def _deadline(job_id: str, opened: training.RoundOpened | None) -> list[FollowUp]:
    """The round's deadline check: aggregates with what arrived (quorum permitting) if not all silos sent."""
    if opened is None:
        return []
    return [FollowUp(names.TRAIN_AGGREGATE, (job_id, opened.round), opened.delay_s + 1.0)]


@celery_app.task(name=names.TRAIN_INIT, **RETRY)
def train_init(self: Task, job_id: str) -> str:
    """The initial adapter and round 0 of a training job; schedules round 0's deadline check."""
    res = resources()

    def body(lease: Lease) -> tuple[str, list[FollowUp]]:
        return "started", _deadline(job_id, training.init_train(res, job_id))

    return run_step(
        self, [job_id], body, lambda e: training.fail_train(res, job_id, e), f"start of training job {job_id}"
    )


@celery_app.task(name=names.TRAIN_AGGREGATE, **RETRY)
def train_aggregate(self: Task, job_id: str, round: int) -> str:
    """Aggregate (or merge) a round when it is due; schedules the next deadline check and the evaluation."""
    res = resources()

    def body(lease: Lease) -> tuple[str, list[FollowUp]]:
        outcome = training.aggregate_round(res, job_id, round)
        follow = _deadline(job_id, outcome.opened)
        if outcome.evaluate is not None:
            follow.append(FollowUp(names.TRAIN_EVALUATE, (job_id, outcome.evaluate)))
        return outcome.status, follow

    return run_step(
        self,
        [job_id, round],
        body,
        lambda e: training.fail_train(res, job_id, f"round {round}: {e}"),
        f"round {round} of training job {job_id}",
    )


@celery_app.task(name=names.TRAIN_EVALUATE, **RETRY)
def train_evaluate(self: Task, job_id: str, round: int) -> str:
    """Held-out metrics of a round's adapter (the job's, for the last round)."""
    res = resources()

    def body(lease: Lease) -> tuple[str, list[FollowUp]]:
        training.evaluate_round(res, job_id, round)
        return "done", []

    return run_step(
        self,
        [job_id, round],
        body,
        lambda e: training.fail_train(res, job_id, f"evaluation of round {round}: {e}"),
        f"evaluation of round {round} of training job {job_id}",
    )
