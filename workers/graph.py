"""The task graph: one table (`GRAPH`) of every step the workers run, and `execute`, which runs one under its lease.

For each task the table says what it runs, what may follow it, and how its failure reads on the job::

    project_anchors                    when a job opens (scoring projects the anchors itself if this failed)
    score_job ──► near_duplicates      when every silo is complete, or on the admin's ``score``
    train_init ──► train_aggregate(r) ──► train_aggregate(r + 1) … at each round's deadline (or when all sent)
                                     └──► train_evaluate(r)
    train_withdraw ──► train_evaluate(0)   when a silo withdraws from a finished merge job

The Celery tasks (`workers.tasks`) and the tests' in-process runner both call `execute`, so both go through the
same lease, the same error classes and the same follow-ups. What each job state waits for on start-up is
`workers.steps.Dispatcher.resume` (torch-free: the API runs it); a failure is recorded by
`workers.steps.fail_owner`, which the reaper also uses when a step's workers keep dying.

Errors: transient ones (`TRANSIENT`: database or broker unreachable, a locked SQLite file, I/O) put the step back in
the queue and propagate, for Celery to retry; errors in the data or the job's state (`PERMANENT`) fail the job with
the message; any other exception is a bug: the job fails with its type and message, and it propagates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import OperationalError

from scoring.errors import ScoringError
from storage.errors import StorageError, TransientStorageError
from workers import names, pipeline, training
from workers.steps import Dispatcher, FollowUp, Lease, LeaseLost, fail_owner

log = logging.getLogger("clues.workers")

TRANSIENT = (OperationalError, TransientStorageError, ConnectionError, TimeoutError)
PERMANENT = (ScoringError, StorageError)
"""Errors in the data or the job's state. A `TransientStorageError` is a `StorageError` but is re-raised (retried)."""

Run = Callable[[pipeline.Resources, Lease, Sequence[Any]], tuple[str, list[FollowUp]]]
"""``run(resources, lease, args) -> (status, follow_ups)``."""


@dataclass(frozen=True)
class Node:
    """One task of the graph. ``what`` and ``failure`` are formatted with the task's arguments."""

    run: Run
    what: str
    """The step in words, for logs: ``"scoring of job {0}"``."""
    follows: tuple[str, ...] = ()
    """The tasks ``run`` may return as follow-ups (`execute` refuses any other)."""
    failure: str = ""
    """Prefix of the failure message recorded on the job: ``"round {1}: "``."""
    doc: str = ""


def progress(res: pipeline.Resources, lease: Lease, job_id: str) -> pipeline.Progress:
    """A progress callback that also stops the run (`LeaseLost`) once another worker took the step over."""
    write = pipeline.progress_writer(res, job_id)

    def report(fraction: float, message: str) -> None:
        lease.check()
        write(fraction, message)

    return report


def _project_anchors(res: pipeline.Resources, lease: Lease, args: Sequence[Any]) -> tuple[str, list[FollowUp]]:
    pipeline.project_anchors(res, args[0], progress(res, lease, args[0]))
    return "done", []


def _score_job(res: pipeline.Resources, lease: Lease, args: Sequence[Any]) -> tuple[str, list[FollowUp]]:
    table = pipeline.score_job(res, args[0], progress(res, lease, args[0]))
    log.info("job %s scored: %d samples", args[0], len(table.ids))
    return "done", [FollowUp(names.NEAR_DUPLICATES, (args[0],))]


def _near_duplicates(res: pipeline.Resources, lease: Lease, args: Sequence[Any]) -> tuple[str, list[FollowUp]]:
    return str(pipeline.find_near_duplicates(res, args[0])), []


def _deadline(job_id: str, opened: training.RoundOpened | None) -> list[FollowUp]:
    """The round's deadline check: aggregates with what arrived (quorum permitting) if not all silos sent."""
    if opened is None:
        return []
    return [FollowUp(names.TRAIN_AGGREGATE, (job_id, opened.round), opened.delay_s + 1.0)]


def _train_init(res: pipeline.Resources, lease: Lease, args: Sequence[Any]) -> tuple[str, list[FollowUp]]:
    return "started", _deadline(args[0], training.init_train(res, args[0]))


def _train_aggregate(res: pipeline.Resources, lease: Lease, args: Sequence[Any]) -> tuple[str, list[FollowUp]]:
    job_id, round = args
    outcome = training.aggregate_round(res, job_id, round)
    follow = _deadline(job_id, outcome.opened)
    if outcome.evaluate is not None:
        follow.append(FollowUp(names.TRAIN_EVALUATE, (job_id, outcome.evaluate)))
    return outcome.status, follow


def _train_evaluate(res: pipeline.Resources, lease: Lease, args: Sequence[Any]) -> tuple[str, list[FollowUp]]:
    training.evaluate_round(res, *args)
    return "done", []


def _train_withdraw(res: pipeline.Resources, lease: Lease, args: Sequence[Any]) -> tuple[str, list[FollowUp]]:
    outcome = training.withdraw_silo(res, *args)
    follow = [FollowUp(names.TRAIN_EVALUATE, (args[0], outcome.evaluate))] if outcome.evaluate is not None else []
    return outcome.status, follow


GRAPH: dict[str, Node] = {
    names.PROJECT_ANCHORS: Node(
        _project_anchors,
        "anchor projection of job {0}",
        doc="Anchor projections at every checkpoint (skipped when stored already).",
    ),
    names.SCORE_JOB: Node(
        _score_job,
        "scoring of job {0}",
        follows=(names.NEAR_DUPLICATES,),
        doc="Scores, threshold and masks of a job; then the near-duplicate report.",
    ),
    names.NEAR_DUPLICATES: Node(
        _near_duplicates,
        "near-duplicate report of job {0}",
        doc="Near-duplicate pairs across silos and the anchor nearest-neighbour index.",
    ),
    names.TRAIN_INIT: Node(
        _train_init,
        "start of training job {0}",
        follows=(names.TRAIN_AGGREGATE,),
        doc="The initial adapter and round 0 of a training job; schedules round 0's deadline check.",
    ),
    names.TRAIN_AGGREGATE: Node(
        _train_aggregate,
        "round {1} of training job {0}",
        follows=(names.TRAIN_AGGREGATE, names.TRAIN_EVALUATE),
        failure="round {1}: ",
        doc="Aggregate (or merge) a round when it is due; schedules the next deadline check and the evaluation.",
    ),
    names.TRAIN_EVALUATE: Node(
        _train_evaluate,
        "evaluation of round {1} of training job {0}",
        failure="evaluation of round {1}: ",
        doc="Held-out metrics of a round's adapter (the job's, for the last round).",
    ),
    names.TRAIN_WITHDRAW: Node(
        _train_withdraw,
        "withdrawal {1} from training job {0}",
        follows=(names.TRAIN_EVALUATE,),
        failure="withdrawal {1}: ",
        doc="A merge job merged again without a withdrawn silo; then the re-merge's evaluation.",
    ),
}


def execute(dispatcher: Dispatcher, res: pipeline.Resources, task: str, args: Sequence[Any], holder: str) -> str:
    """Claim the step ``task(*args)``, run it, and end its lease as the outcome says (see the module docstring).

    Returns the step's status (``"skipped"`` when another delivery runs or ran it, ``"superseded"`` when its lease
    was taken over, ``"failed"``). Raises the transient errors (the step is queued again) and bugs.
    """
    node = GRAPH[task]
    what = node.what.format(*args)
    lease = Lease(dispatcher, task, list(args), holder)
    if not lease.claim():
        log.info("%s: another delivery runs or ran this step; skipped", what)
        return "skipped"
    try:
        status, follow_ups = node.run(res, lease, args)
        stray = sorted({f.task for f in follow_ups} - set(node.follows))
        if stray:
            raise RuntimeError(f"{task} returned follow-ups {stray} that the task graph does not declare")
    except LeaseLost:
        log.error("%s: lease taken over by another worker; this run stops", what)
        return "superseded"
    except TRANSIENT:
        lease.release()
        raise
    except PERMANENT as exc:
        log.exception("%s failed", what)
        _record_failure(dispatcher, task, args, node.failure.format(*args) + str(exc))
        lease.failed(str(exc))
        return "failed"
    except Exception as exc:  # a bug: the job fails with what is known, the step is not retried forever
        log.exception("%s failed unexpectedly", what)
        message = f"unexpected {type(exc).__name__} in the {what} (see the worker's log): {exc}"
        _record_failure(dispatcher, task, args, message)
        lease.failed(message)
        raise
    except BaseException:  # the worker is stopping: the step goes back to the queue
        lease.release()
        raise
    lease.done(follow_ups)
    return status


def _record_failure(dispatcher: Dispatcher, task: str, args: Sequence[Any], message: str) -> None:
    try:
        with dispatcher.sessions.begin() as session:
            fail_owner(session, task, args[0], message)
    except StorageError:  # the database is unreachable: the step still ends
        log.exception("could not record the failure of %s%s on its job", task, tuple(args))
