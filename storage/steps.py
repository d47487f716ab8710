"""The task steps' leases in SQL (`storage.models.TaskStep`): queue, claim, heartbeat, finish, and find the stale.

Every transition that two processes could race on is one conditional ``UPDATE`` (a compare-and-set on the row's
``state``, ``holder`` or ``sent_at``), so it is safe on SQLite and PostgreSQL alike without table locks: two workers
never both claim a step, and two reapers never both re-send one. `workers.steps` puts these to work around Celery.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from storage.models import TaskStep, utcnow

MAX_KEY = 200


def step_key(task: str, args: list[Any] | tuple[Any, ...]) -> str:
    """The step's identity: its task name and JSON arguments (a job id, and a round for training steps)."""
    key = f"{task}:{json.dumps(list(args), separators=(',', ':'))}"
    if len(key) > MAX_KEY:
        raise ValueError(f"step key longer than {MAX_KEY} characters: {key[:60]}...")
    return key


@dataclass(frozen=True)
class Stale:
    """A step found by `find_due`: ``reason`` is ``lost`` (running, heartbeat stale) or ``unsent`` (queued, its
    message apparently lost)."""

    key: str
    task: str
    args: list[Any]
    job_id: str
    reason: str
    attempt: int
    lost: int
    sent_at: datetime
    not_before: datetime


def get(session: Session, key: str) -> TaskStep | None:
    return session.get(TaskStep, key)


def for_job(session: Session, job_id: str) -> list[TaskStep]:
    """Every step of a job (scoring or training), oldest first."""
    return list(session.scalars(select(TaskStep).where(TaskStep.job_id == job_id).order_by(TaskStep.sent_at)))


def mark_queued(
    session: Session, task: str, args: list[Any], *, not_before: datetime, stale_before: datetime, force: bool = False
) -> bool:
    """Record that ``task(*args)`` is about to be sent (not before ``not_before``). Returns whether to send it.

    A step that is running with a heartbeat at or after ``stale_before`` is left alone (False) unless ``force``:
    it is being worked on, and its worker will finish it. Any other step (new, queued, done, failed, or running on a
    dead worker) becomes ``queued`` again with one more attempt.
    """
    key = step_key(task, args)
    now = utcnow()
    row = session.get(TaskStep, key)
    if row is None:  # False: queued at the same moment by another process, whose message is sent
        return _insert_first(session, task, args, state="queued", not_before=not_before, sent_at=now)
    fresh = row.state == "running" and row.heartbeat_at is not None and row.heartbeat_at >= stale_before
    if fresh and not force:
        return False
    changed = session.execute(
        update(TaskStep)
        .where(TaskStep.key == key, TaskStep.state == row.state, TaskStep.attempt == row.attempt)
        .values(
            state="queued",
            attempt=row.attempt + 1,
            lost=row.lost + (1 if row.state == "running" else 0),
            holder=None,
            not_before=not_before,
            sent_at=now,
            error=None,
            finished_at=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    session.expire(row)
    return changed == 1


def claim(session: Session, task: str, args: list[Any], holder: str, *, stale_before: datetime) -> bool:
    """Take the step's lease for ``holder`` (compare-and-set). True when this delivery is to run it.

    Claimable: a queued step, or a running step whose heartbeat is older than ``stale_before`` (its worker died; a
    late redelivery takes over). A step with no row (sent by a version without leases) is inserted as running.
    Done, failed and freshly held steps are not claimed: that delivery is a duplicate.
    """
    key = step_key(task, args)
    now = utcnow()
    held = session.execute(
        update(TaskStep)
        .where(
            TaskStep.key == key,
            or_(
                TaskStep.state == "queued",
                (TaskStep.state == "running") & (TaskStep.heartbeat_at < stale_before),
            ),
        )
        .values(state="running", holder=holder, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    if held == 1:
        return True
    if session.get(TaskStep, key) is not None:
        return False
    return _insert_first(
        session, task, args, state="running", holder=holder, not_before=now, sent_at=now, heartbeat_at=now
    )


def _insert_first(session: Session, task: str, args: list[Any], **fields: Any) -> bool:
    """Insert the step's first row (attempt 1) in a SAVEPOINT; False when a concurrent insert won the key."""
    row = TaskStep(key=step_key(task, args), task=task, args=list(args), job_id=str(args[0]), attempt=1, lost=0)
    for name, value in fields.items():
        setattr(row, name, value)
    try:
        with session.begin_nested():
            session.add(row)
        return True
    except sa_exc.IntegrityError:
        return False


def heartbeat(session: Session, key: str, holder: str) -> bool:
    """Refresh the lease. False when ``holder`` no longer holds it (the step was taken over: stop working on it)."""
    return (
        session.execute(
            update(TaskStep)
            .where(TaskStep.key == key, TaskStep.holder == holder, TaskStep.state == "running")
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
        == 1
    )


def finish(session: Session, key: str, holder: str, state: str = "done", error: str | None = None) -> bool:
    """Release the lease as ``done``, ``failed`` or ``queued`` (to be retried). False when it was not held."""
    now = utcnow()
    values: dict[str, Any] = {"state": state, "error": error, "holder": None}
    if state in ("done", "failed"):
        values["finished_at"] = now
    else:  # back to the queue: its retry is sent now
        values["sent_at"] = values["not_before"] = now
    return (
        session.execute(
            update(TaskStep)
            .where(TaskStep.key == key, TaskStep.holder == holder, TaskStep.state == "running")
            .values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
        == 1
    )


def find_due(session: Session, *, stale_before: datetime, unsent_before: datetime) -> list[Stale]:
    """Steps the reaper should look at: running with a heartbeat older than ``stale_before``, and queued steps
    sent, and due, before ``unsent_before`` (the caller applies its back-off per attempt)."""
    rows = session.scalars(
        select(TaskStep).where(
            or_(
                (TaskStep.state == "running") & (TaskStep.heartbeat_at < stale_before),
                (TaskStep.state == "queued")
                & (TaskStep.sent_at < unsent_before)
                & (TaskStep.not_before < unsent_before),
            )
        )
    )
    return [
        Stale(
            r.key,
            r.task,
            list(r.args),
            r.job_id,
            "lost" if r.state == "running" else "unsent",
            r.attempt,
            r.lost,
            r.sent_at,
            r.not_before,
        )
        for r in rows
    ]


def resend(session: Session, due: Stale, *, now: datetime) -> bool:
    """Re-queue ``due`` if nobody changed it since it was found (compare-and-set on state, attempt and sent time):
    of two reapers that found the same step, exactly one re-sends it."""
    return (
        session.execute(
            update(TaskStep)
            .where(
                TaskStep.key == due.key,
                TaskStep.state == ("running" if due.reason == "lost" else "queued"),
                TaskStep.attempt == due.attempt,
                TaskStep.sent_at == due.sent_at,
            )
            .values(
                state="queued",
                holder=None,
                attempt=due.attempt + 1,
                lost=due.lost + (1 if due.reason == "lost" else 0),
                sent_at=now,
                not_before=max(due.not_before, now),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        == 1
    )


def give_up(session: Session, due: Stale, error: str) -> bool:
    """Mark ``due`` failed (compare-and-set like `resend`)."""
    return (
        session.execute(
            update(TaskStep)
            .where(TaskStep.key == due.key, TaskStep.attempt == due.attempt, TaskStep.sent_at == due.sent_at)
            .values(state="failed", holder=None, error=error, finished_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
        == 1
    )


def backoff(base_s: float, attempt: int, cap_s: float) -> timedelta:
    """How long a queued step's message may go unclaimed before it is sent again: ``base_s`` doubling per attempt,
    at most ``cap_s`` (a step waiting behind long tasks is re-sent ever more rarely; duplicates are no-ops)."""
    return timedelta(seconds=min(base_s * 2 ** max(attempt - 1, 0), cap_s))
