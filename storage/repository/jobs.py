"""Scoring jobs: the job, its members, its checkpoint blobs and its anchor set."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.errors import ConflictError, NotFoundError, UnknownReferenceError
from storage.models import (
    AnchorSet,
    Job,
    JobCheckpoint,
    JobMember,
    Silo,
    utcnow,
)
from storage.repository._common import _insert_once, _update

_JOB_FIELDS = frozenset(Job.__table__.columns.keys()) - {"id", "created_at", "updated_at"}


def _silos_named(session: Session, silo_names: Sequence[str]) -> list[Silo]:
    """The silos of ``silo_names`` (duplicates dropped, order kept). Raises `UnknownReferenceError` naming every
    unknown one."""
    names = list(dict.fromkeys(silo_names))
    silos = {s.name: s for s in session.scalars(select(Silo).where(Silo.name.in_(names)))}
    missing = [n for n in names if n not in silos]
    if missing:
        raise UnknownReferenceError(f"silos: unknown silo(s): {', '.join(repr(n) for n in missing)}")
    return [silos[n] for n in names]


def create_job(
    session: Session,
    *,
    name: str,
    model: str,
    lora: dict[str, Any],
    projection: dict[str, Any],
    similarity: str,
    threshold: Any,
    precondition: bool,
    options: dict[str, Any],
    checkpoints: Sequence[dict[str, Any]],
    silo_names: Sequence[str],
) -> Job:
    """Create a ``draft`` job with its checkpoints (dicts with ``index, step, lr, lr_last, adam``) and members.

    The caller validates the spec (checkpoint indices 0..T-1 included); this stores it as given.

    Raises:
        UnknownReferenceError: some of ``silo_names`` do not exist (all are named).
    """
    silos = _silos_named(session, silo_names)
    job = Job(
        id=uuid.uuid4().hex,
        name=name,
        model=model,
        lora=lora,
        projection=projection,
        similarity=similarity,
        threshold=threshold,
        precondition=precondition,
        options=options,
        checkpoints=[
            JobCheckpoint(index=c["index"], step=c["step"], lr=c["lr"], lr_last=c["lr_last"], adam=c["adam"])
            for c in checkpoints
        ],
        members=[JobMember(silo=silo) for silo in silos],
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: str) -> Job:
    """Raises `NotFoundError` when the job does not exist."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"job '{job_id}' does not exist")
    return job


def list_jobs(session: Session, *, silo_id: int | None = None) -> list[Job]:
    """All jobs, oldest first; only those the silo is a member of when ``silo_id`` is given."""
    stmt = select(Job).order_by(Job.created_at, Job.id)
    if silo_id is not None:
        stmt = stmt.join(JobMember).where(JobMember.silo_id == silo_id)
    return list(session.scalars(stmt))


def update_job(session: Session, *, job_id: str, **fields: Any) -> Job:
    """Set columns of a job (``status``, ``progress``, ``message``...) and ``updated_at``.

    Raises:
        NotFoundError: the job does not exist.
        TypeError: a field is not an updatable column.
    """
    return _update(session, get_job(session, job_id=job_id), _JOB_FIELDS, fields)


def delete_job(session: Session, *, job_id: str) -> None:
    """Delete a job and, by cascade, every row that names it (blobs stay: they may be shared)."""
    session.delete(get_job(session, job_id=job_id))
    session.flush()


def get_member(session: Session, *, job_id: str, silo_id: int) -> JobMember:
    """Raises `NotFoundError` when the silo is not a member of the job (or either does not exist)."""
    member = session.get(JobMember, (job_id, silo_id))
    if member is None:
        raise NotFoundError(f"job '{job_id}' does not exist or silo {silo_id} is not a member of it")
    return member


def mark_complete(
    session: Session, *, job_id: str, silo_id: int, num_samples: int, aggregate: dict[str, Any] | None = None
) -> JobMember:
    """Mark a member's uploads complete (again: updates ``num_samples``, keeps the first ``completed_at``); a
    silo-local job's member with the ``aggregate`` it sent."""
    member = get_member(session, job_id=job_id, silo_id=silo_id)
    member.status = "complete"
    member.num_samples = num_samples
    if aggregate is not None:
        member.aggregate = aggregate
    member.completed_at = member.completed_at or utcnow()
    session.flush()
    return member


def set_checkpoint_blob(session: Session, *, job_id: str, index: int, blob_key: str, size_bytes: int) -> bool:
    """Attach the uploaded bundle to checkpoint ``index``; True when newly set, False when it already had this key.

    Raises:
        NotFoundError: the job has no such checkpoint.
        ConflictError: the checkpoint already holds other bytes.
    """
    ckpt = session.get(JobCheckpoint, (job_id, index))
    if ckpt is None:
        raise NotFoundError(f"job '{job_id}' does not exist or has no checkpoint {index}")
    if ckpt.blob_key is None:  # set only if still unset, so that of two concurrent uploads exactly one wins
        stmt = (
            update(JobCheckpoint)
            .where(JobCheckpoint.job_id == job_id, JobCheckpoint.index == index, JobCheckpoint.blob_key.is_(None))
            .values(blob_key=blob_key, size_bytes=size_bytes)
        )
        if session.execute(stmt).rowcount == 1:  # type: ignore[attr-defined]
            session.refresh(ckpt)
            return True
        session.refresh(ckpt)
    if ckpt.blob_key != blob_key:
        raise ConflictError(f"checkpoint {index} of job '{job_id}' was already uploaded with other content")
    return False


def get_anchor_set(session: Session, *, job_id: str) -> AnchorSet | None:
    """The job's anchor set, or None before it is uploaded."""
    return session.get(AnchorSet, job_id)


def set_anchor_set(session: Session, *, job_id: str, blob_key: str, size_bytes: int, sample_ids: Sequence[str]) -> bool:
    """Store the job's anchor set; True when new, False when the same key is stored again.

    Raises:
        NotFoundError: the job does not exist.
        ConflictError: another anchor set is already stored.
    """
    get_job(session, job_id=job_id)
    ids = list(sample_ids)
    row = AnchorSet(job_id=job_id, blob_key=blob_key, size_bytes=size_bytes, num_samples=len(ids), sample_ids=ids)
    stored, created = _insert_once(session, row, lambda: session.get(AnchorSet, job_id, populate_existing=True))
    if stored.blob_key != blob_key:
        raise ConflictError(f"job '{job_id}' already has an anchor set with other content")
    return created
