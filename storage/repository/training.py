"""Training jobs: the job, its members, rounds and the silos' updates, and its held-out set."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.errors import ConflictError, NotFoundError
from storage.models import (
    TrainJob,
    TrainMember,
    TrainRound,
    TrainUpdate,
    TrainWithdrawal,
    utcnow,
)
from storage.repository._common import _insert_once, _update
from storage.repository.jobs import _silos_named

_TRAIN_FIELDS = frozenset(TrainJob.__table__.columns.keys()) - {"id", "created_at", "updated_at"}


def create_train_job(
    session: Session,
    *,
    name: str,
    mode: str,
    model: str,
    settings: dict[str, Any],
    rounds: int,
    quorum: int,
    round_timeout_s: float,
    scoring_job_id: str | None,
    silo_names: Sequence[str],
) -> TrainJob:
    """Create a ``draft`` training job and its members (the caller validates the spec).

    Raises:
        UnknownReferenceError: some of ``silo_names`` do not exist (all are named).
    """
    silos = _silos_named(session, silo_names)
    job = TrainJob(
        id=uuid.uuid4().hex,
        name=name,
        mode=mode,
        model=model,
        settings=settings,
        rounds=rounds,
        quorum=quorum,
        round_timeout_s=round_timeout_s,
        scoring_job_id=scoring_job_id,
        members=[TrainMember(silo=silo) for silo in silos],
    )
    session.add(job)
    session.flush()
    return job


def get_train_job(session: Session, *, job_id: str) -> TrainJob:
    """Raises `NotFoundError` when the training job does not exist."""
    job = session.get(TrainJob, job_id)
    if job is None:
        raise NotFoundError(f"training job '{job_id}' does not exist")
    return job


def list_train_jobs(session: Session, *, silo_id: int | None = None, status: str | None = None) -> list[TrainJob]:
    """Training jobs, oldest first; only the silo's when ``silo_id`` is given, only one status when ``status`` is."""
    stmt = select(TrainJob).order_by(TrainJob.created_at, TrainJob.id)
    if silo_id is not None:
        stmt = stmt.join(TrainMember).where(TrainMember.silo_id == silo_id)
    if status is not None:
        stmt = stmt.where(TrainJob.status == status)
    return list(session.scalars(stmt))


def update_train_job(session: Session, *, job_id: str, **fields: Any) -> TrainJob:
    """Set columns of a training job and ``updated_at``. Raises `NotFoundError`, or `TypeError` on a bad field."""
    return _update(session, get_train_job(session, job_id=job_id), _TRAIN_FIELDS, fields)


def get_train_member(session: Session, *, job_id: str, silo_id: int) -> TrainMember:
    """Raises `NotFoundError` when the silo is not a member of the training job."""
    member = session.get(TrainMember, (job_id, silo_id))
    if member is None:
        raise NotFoundError(f"training job '{job_id}' does not exist or silo {silo_id} is not a member of it")
    return member


def open_round(
    session: Session, *, job_id: str, round: int, lr: float, start_blob: str, deadline: Any
) -> tuple[TrainRound, bool]:
    """Open round ``round`` (idempotent: an existing round is returned as it is, with False)."""
    row = TrainRound(job_id=job_id, round=round, lr=lr, start_blob=start_blob, deadline=deadline, status="open")
    return _insert_once(session, row, lambda: session.get(TrainRound, (job_id, round), populate_existing=True))


def get_round(session: Session, *, job_id: str, round: int, refresh: bool = False) -> TrainRound:
    """Raises `NotFoundError` when the round was never opened; ``refresh`` re-reads a row already loaded."""
    row = session.get(TrainRound, (job_id, round), populate_existing=refresh)
    if row is None:
        raise NotFoundError(f"training job '{job_id}' has no round {round}")
    return row


def list_rounds(session: Session, *, job_id: str) -> list[TrainRound]:
    return list(session.scalars(select(TrainRound).where(TrainRound.job_id == job_id).order_by(TrainRound.round)))


def claim_round(session: Session, *, job_id: str, round: int) -> bool:
    """``open`` → ``aggregating`` (no update is accepted after this); True for the caller that made the change.

    A worker that finds the round ``aggregating`` already may be the redelivery of one that crashed: it goes on
    (aggregation is deterministic), and `close_round` lets exactly one finish."""
    stmt = (
        update(TrainRound)
        .where(TrainRound.job_id == job_id, TrainRound.round == round, TrainRound.status == "open")
        .values(status="aggregating")
    )
    claimed = session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
    session.flush()
    return claimed


def lock_open_round(session: Session, *, job_id: str, round: int) -> bool:
    """Keep round ``round`` open until the caller's transaction ends: True when it is open (and now row-locked),
    False when it is not.

    An upload records its update under this lock, so a worker's `claim_round` either comes first (the upload finds
    the round no longer open) or waits for the upload's commit and then aggregates its update. A no-op UPDATE takes
    the row lock on PostgreSQL and the write lock on SQLite, which a plain read does not."""
    stmt = (
        update(TrainRound)
        .where(TrainRound.job_id == job_id, TrainRound.round == round, TrainRound.status == "open")
        .values(status="open")
    )
    locked = session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
    session.flush()
    return locked


def close_round(
    session: Session,
    *,
    job_id: str,
    round: int,
    result_blob: str,
    participants: Sequence[str],
    train_loss: float,
    guard: dict[str, Any] | None = None,
) -> bool:
    """``aggregating`` → ``closed`` with its result (and what the aggregation's guard did); True for the one caller
    that closed it."""
    stmt = (
        update(TrainRound)
        .where(TrainRound.job_id == job_id, TrainRound.round == round, TrainRound.status == "aggregating")
        .values(
            status="closed",
            result_blob=result_blob,
            participants=list(participants),
            train_loss=train_loss,
            guard=guard,
            closed_at=utcnow(),
        )
    )
    closed = session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
    session.flush()
    return closed


def set_round_metrics(session: Session, *, job_id: str, round: int, metrics: dict[str, Any]) -> None:
    get_round(session, job_id=job_id, round=round).metrics = metrics
    session.flush()


def add_update(
    session: Session,
    *,
    job_id: str,
    round: int,
    silo_id: int,
    blob_key: str,
    size_bytes: int,
    num_samples: int,
    score_mass: float,
    train_loss: float,
    privacy: dict[str, Any] | None = None,
) -> bool:
    """Store a silo's update for a round (with its privacy report after a DP-SGD round); True when new, False when
    the same bytes are stored again.

    Raises:
        ConflictError: the silo already sent other bytes for this round.
    """
    row = TrainUpdate(
        job_id=job_id,
        round=round,
        silo_id=silo_id,
        blob_key=blob_key,
        size_bytes=size_bytes,
        num_samples=num_samples,
        score_mass=score_mass,
        train_loss=train_loss,
        privacy=privacy,
    )
    key = (job_id, round, silo_id)
    stored, created = _insert_once(session, row, lambda: session.get(TrainUpdate, key, populate_existing=True))
    if stored.blob_key != blob_key:
        raise ConflictError(f"round {round} of training job '{job_id}' already holds another update of this silo")
    if created:
        member = get_train_member(session, job_id=job_id, silo_id=silo_id)
        member.num_samples = num_samples
        session.flush()
    return created


def set_eval_set(session: Session, *, job_id: str, blob_key: str, num_samples: int) -> bool:
    """Set a draft training job's evaluation set if it has none (compare-and-set); False when one is set already
    (a concurrent upload got there first)."""
    stmt = (
        update(TrainJob)
        .where(TrainJob.id == job_id, TrainJob.eval_blob.is_(None))
        .values(eval_blob=blob_key, eval_num_samples=num_samples, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    done = session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
    session.expire_all()
    return done


def get_update(session: Session, *, job_id: str, round: int, silo_id: int) -> TrainUpdate | None:
    return session.get(TrainUpdate, (job_id, round, silo_id))


def list_updates(session: Session, *, job_id: str, round: int) -> list[TrainUpdate]:
    stmt = select(TrainUpdate).where(TrainUpdate.job_id == job_id, TrainUpdate.round == round)
    return list(session.scalars(stmt.order_by(TrainUpdate.silo_id)))


def add_withdrawal(
    session: Session,
    *,
    job_id: str,
    silo: str,
    sample_ids: list[str] | None,
    actor: str,
    reason: str,
    status: str,
    report: dict[str, Any],
) -> TrainWithdrawal:
    """Record a withdrawal from training job ``job_id`` (an audit row: only its status, report and error change)."""
    row = TrainWithdrawal(
        job_id=job_id,
        silo=silo,
        sample_ids=sample_ids,
        actor=actor,
        reason=reason,
        status=status,
        report=report,
        finished_at=utcnow() if status != "pending" else None,
    )
    session.add(row)
    session.flush()
    return row


def get_withdrawal(session: Session, *, withdrawal_id: int) -> TrainWithdrawal:
    row = session.get(TrainWithdrawal, withdrawal_id)
    if row is None:
        raise NotFoundError(f"withdrawal {withdrawal_id} not found")
    return row


def list_withdrawals(session: Session, *, job_id: str | None = None, silo: str | None = None) -> list[TrainWithdrawal]:
    """Withdrawals, oldest first: of one training job, of one silo, or all."""
    stmt = select(TrainWithdrawal)
    if job_id is not None:
        stmt = stmt.where(TrainWithdrawal.job_id == job_id)
    if silo is not None:
        stmt = stmt.where(TrainWithdrawal.silo == silo)
    return list(session.scalars(stmt.order_by(TrainWithdrawal.id)))


def finish_withdrawal(
    session: Session, *, withdrawal_id: int, status: str, report: dict[str, Any], error: str | None = None
) -> None:
    row = get_withdrawal(session, withdrawal_id=withdrawal_id)
    row.status, row.report, row.error, row.finished_at = status, report, error, utcnow()
    session.flush()


def remove_member(session: Session, *, job_id: str, silo_id: int) -> list[str]:
    """Delete a silo's membership of a training job and every update it sent; returns the updates' blob keys."""
    updates = list(
        session.scalars(select(TrainUpdate).where(TrainUpdate.job_id == job_id, TrainUpdate.silo_id == silo_id))
    )
    keys = [u.blob_key for u in updates]
    for u in updates:
        session.delete(u)
    member = session.get(TrainMember, (job_id, silo_id))
    if member is not None:
        session.delete(member)
    session.flush()
    return keys


def blob_in_use(session: Session, *, key: str) -> bool:
    """Whether any training job, round, update or scoring checkpoint still refers to blob ``key``."""
    from storage.models import JobCheckpoint

    columns = (
        TrainUpdate.blob_key,
        TrainRound.start_blob,
        TrainRound.result_blob,
        TrainJob.final_blob,
        TrainJob.server_state_blob,
        TrainJob.eval_blob,
        JobCheckpoint.blob_key,
    )
    return any(session.scalar(select(column).where(column == key).limit(1)) is not None for column in columns)


def replace_update(
    session: Session,
    *,
    job_id: str,
    round: int,
    silo_id: int,
    sha256: str,
    size_bytes: int,
    num_samples: int,
    score_mass: float,
    train_loss: float,
) -> str:
    """Put a silo's retrained update in place of the one it sent (a withdrawal of some of its samples); returns the
    old update's blob key."""
    row = session.get(TrainUpdate, (job_id, round, silo_id))
    if row is None:
        raise NotFoundError(f"training job {job_id}: no update of this silo in round {round}")
    old = row.blob_key
    row.blob_key, row.size_bytes, row.num_samples = sha256, size_bytes, num_samples
    row.score_mass, row.train_loss = score_mass, train_loss
    get_train_member(session, job_id=job_id, silo_id=silo_id).num_samples = num_samples
    session.flush()
    return old
