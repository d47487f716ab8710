"""Celery task wrappers: take ids only, call `workers.pipeline`, set the retry policy.

Delivery: ``acks_late`` + ``reject_on_worker_lost`` (see `workers.celery_app`), so a task whose worker was killed is
delivered again, and the pipeline functions are idempotent. Transient errors (database or broker unreachable, a
locked SQLite file, I/O) are retried with exponential backoff; errors in the data or the job's state are permanent
and recorded on the job as ``failed`` with the message.
"""

from __future__ import annotations

import logging
from functools import cache

from celery import Task
from sqlalchemy.exc import OperationalError

from scoring.errors import ScoringError
from storage.errors import StorageError, TransientStorageError
from workers import names, pipeline, training
from workers.celery_app import celery_app

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


@cache
def resources() -> pipeline.Resources:
    """This worker process's storage handles, built on first use from the app's settings."""
    return pipeline.Resources.from_settings(celery_app.conf.clues_settings)


def _progress(task: Task, job_id: str) -> pipeline.Progress:
    write = pipeline.progress_writer(resources(), job_id)

    def report(fraction: float, message: str) -> None:
        write(fraction, message)
        if task.request.id:
            task.update_state(state="PROGRESS", meta={"job": job_id, "progress": fraction, "message": message})

    return report


@celery_app.task(name=names.PROJECT_ANCHORS, **RETRY)
def project_anchors(self: Task, job_id: str) -> str:
    """Anchor projections at every checkpoint (skipped when stored already)."""
    res = resources()
    try:
        pipeline.project_anchors(res, job_id, _progress(self, job_id))
    except TRANSIENT:
        raise
    except PERMANENT as exc:
        log.exception("anchor projection of job %s failed", job_id)
        pipeline.set_anchor_failed(res, job_id, str(exc))
        return "failed"
    return "done"


@celery_app.task(name=names.SCORE_JOB, **RETRY)
def score_job(self: Task, job_id: str) -> str:
    """Scores, threshold and masks of a job; then queues the near-duplicate report."""
    res = resources()
    try:
        table = pipeline.score_job(res, job_id, _progress(self, job_id))
    except TRANSIENT:
        raise
    except PERMANENT as exc:
        log.exception("scoring of job %s failed", job_id)
        pipeline.fail_job(res, job_id, str(exc))
        return "failed"
    log.info("job %s scored: %d samples", job_id, len(table.ids))
    celery_app.send_task(names.NEAR_DUPLICATES, args=[job_id])
    return "done"


@celery_app.task(name=names.NEAR_DUPLICATES, **RETRY)
def near_duplicates(self: Task, job_id: str) -> int:
    """Near-duplicate pairs across silos and the anchor nearest-neighbour index."""
    try:
        return pipeline.find_near_duplicates(resources(), job_id)
    except TRANSIENT:
        raise
    except PERMANENT:
        log.exception("near-duplicate report of job %s failed", job_id)
        return -1


def _schedule_deadline(job_id: str, opened: training.RoundOpened | None) -> None:
    """The round's deadline check: aggregates with what arrived (quorum permitting) if not all silos sent."""
    if opened is not None:
        celery_app.send_task(names.TRAIN_AGGREGATE, args=[job_id, opened.round], countdown=opened.delay_s + 1.0)


@celery_app.task(name=names.TRAIN_INIT, **RETRY)
def train_init(self: Task, job_id: str) -> str:
    """The initial adapter and round 0 of a training job; schedules round 0's deadline check."""
    res = resources()
    try:
        _schedule_deadline(job_id, training.init_train(res, job_id))
    except TRANSIENT:
        raise
    except PERMANENT as exc:
        log.exception("training job %s could not start", job_id)
        training.fail_train(res, job_id, str(exc))
        return "failed"
    return "started"


@celery_app.task(name=names.TRAIN_AGGREGATE, **RETRY)
def train_aggregate(self: Task, job_id: str, round: int) -> str:
    """Aggregate (or merge) a round when it is due; schedules the next deadline check and the evaluation."""
    res = resources()
    try:
        outcome = training.aggregate_round(res, job_id, round)
    except TRANSIENT:
        raise
    except PERMANENT as exc:
        log.exception("round %d of training job %s failed", round, job_id)
        training.fail_train(res, job_id, f"round {round}: {exc}")
        return "failed"
    _schedule_deadline(job_id, outcome.opened)
    if outcome.evaluate is not None:
        celery_app.send_task(names.TRAIN_EVALUATE, args=[job_id, outcome.evaluate])
    return outcome.status


@celery_app.task(name=names.TRAIN_EVALUATE, **RETRY)
def train_evaluate(self: Task, job_id: str, round: int) -> str:
    """Held-out metrics of a round's adapter (the job's, for the last round)."""
    res = resources()
    try:
        training.evaluate_round(res, job_id, round)
    except TRANSIENT:
        raise
    except PERMANENT as exc:
        log.exception("evaluation of round %d of training job %s failed", round, job_id)
        training.fail_train(res, job_id, f"evaluation of round {round}: {exc}")
        return "failed"
    return "done"
