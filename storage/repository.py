"""Keyword-only data access functions, one group per aggregate: silos, jobs (checkpoints, members, anchor set),
shards, scores, duplicate pairs.

Every function takes the `Session` first and flushes, but never commits: the caller owns the transaction and commits
(or rolls back) once per request or task. Uploads are idempotent: storing the same blob key again is a no-op that
returns ``False``; another key for a slot already filled raises `ConflictError`.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any, TypeVar

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from storage.errors import ConflictError, NotFoundError
from storage.models import (
    AnchorSet,
    DuplicatePair,
    Job,
    JobCheckpoint,
    JobMember,
    Score,
    Shard,
    ShardSample,
    Silo,
    utcnow,
)

T = TypeVar("T")
BATCH_ROWS = 10_000
TOKEN_PREFIX = "clues_"
_JOB_FIELDS = frozenset(Job.__table__.columns.keys()) - {"id", "created_at", "updated_at"}


def _insert_once(session: Session, row: T, existing: Callable[[], T | None]) -> tuple[T, bool]:
    """Insert ``row`` unless ``existing()`` finds one; on a concurrent insert (unique violation), return the winner."""
    found = existing()
    if found is not None:
        return found, False
    try:
        with session.begin_nested():  # a SAVEPOINT: the violation must not abort the caller's transaction
            session.add(row)
    except sa_exc.IntegrityError:
        found = existing()
        if found is None:
            raise
        return found, False
    return row, True


# --- silos -------------------------------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    """The sha256 hex digest of a bearer token: what is stored and looked up, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_silo(session: Session, *, name: str) -> tuple[Silo, str]:
    """Create a silo and its bearer token; return both (the token cannot be recovered later).

    Raises:
        ConflictError: ``name`` is taken.
    """
    taken = ConflictError(f"silo name '{name}' is already taken")
    if session.scalar(select(Silo.id).where(Silo.name == name)) is not None:
        raise taken
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    silo = Silo(name=name, token_hash=hash_token(token))
    try:
        with session.begin_nested():
            session.add(silo)
    except sa_exc.IntegrityError as exc:  # created concurrently
        raise taken from exc
    return silo, token


def silo_by_token(session: Session, *, token: str) -> Silo | None:
    """The silo whose token this is, or None."""
    return session.scalar(select(Silo).where(Silo.token_hash == hash_token(token)))


def get_silo_by_name(session: Session, *, name: str) -> Silo:
    """Raises `NotFoundError` when no silo has this name."""
    silo = session.scalar(select(Silo).where(Silo.name == name))
    if silo is None:
        raise NotFoundError(f"silo '{name}' does not exist")
    return silo


def list_silos(session: Session) -> list[Silo]:
    """All silos by name."""
    return list(session.scalars(select(Silo).order_by(Silo.name)))


# --- jobs --------------------------------------------------------------------------------------------------------


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
        NotFoundError: some of ``silo_names`` do not exist (all are named).
    """
    names = list(dict.fromkeys(silo_names))
    silos = {s.name: s for s in session.scalars(select(Silo).where(Silo.name.in_(names)))}
    missing = [n for n in names if n not in silos]
    if missing:
        raise NotFoundError(f"unknown silo(s): {', '.join(repr(n) for n in missing)}")
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
        members=[JobMember(silo=silos[n]) for n in names],
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
    unknown = sorted(set(fields) - _JOB_FIELDS)
    if unknown:
        raise TypeError(f"update_job: not updatable job field(s) {unknown}")
    job = get_job(session, job_id=job_id)
    for key, value in fields.items():
        setattr(job, key, value)
    job.updated_at = utcnow()
    session.flush()
    return job


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


def mark_complete(session: Session, *, job_id: str, silo_id: int, num_samples: int) -> JobMember:
    """Mark a member's uploads complete (again: updates ``num_samples``, keeps the first ``completed_at``)."""
    member = get_member(session, job_id=job_id, silo_id=silo_id)
    member.status = "complete"
    member.num_samples = num_samples
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


# --- shards ------------------------------------------------------------------------------------------------------


def add_shard(
    session: Session,
    *,
    job_id: str,
    owner: str,
    checkpoint: int,
    part: int,
    role: str,
    sample_ids: Sequence[str],
    blob_key: str,
    size_bytes: int,
) -> tuple[Shard, bool]:
    """Record a shard; returns it and whether it is new (the same key again gives the stored row and False).

    Raises:
        NotFoundError: the job does not exist.
        ConflictError: this (owner, checkpoint, part, role) already holds other bytes.
    """
    get_job(session, job_id=job_id)
    key = (Shard.job_id == job_id, Shard.owner == owner, Shard.checkpoint == checkpoint, Shard.part == part)
    row = Shard(
        job_id=job_id,
        owner=owner,
        checkpoint=checkpoint,
        part=part,
        role=role,
        row_count=len(sample_ids),
        sample_ids=list(sample_ids),
        blob_key=blob_key,
        size_bytes=size_bytes,
    )
    shard, created = _insert_once(session, row, lambda: session.scalar(select(Shard).where(*key, Shard.role == role)))
    if shard.blob_key != blob_key:
        raise ConflictError(
            f"{role} shard (checkpoint {checkpoint}, part {part}) of '{owner}' in job '{job_id}' "
            "was already uploaded with other content"
        )
    if created and role == "candidate":
        _index_part(session, job_id=job_id, owner=owner, part=part, sample_ids=sample_ids)
    return shard, created


def _index_part(session: Session, *, job_id: str, owner: str, part: int, sample_ids: Sequence[str]) -> None:
    """Record which part holds each id (once per part: every checkpoint's shard of a part holds the same ids).

    Raises:
        ConflictError: an id is already in another part of this owner.
    """
    known = session.scalar(
        select(ShardSample.sample_id)
        .where(ShardSample.job_id == job_id, ShardSample.owner == owner, ShardSample.part == part)
        .limit(1)
    )
    if known is not None:
        return
    try:
        with session.begin_nested():  # the primary key refuses an id held by another part; the SAVEPOINT undoes it
            _insert_part_ids(session, job_id, owner, part, sample_ids)
    except sa_exc.IntegrityError:
        taken = sorted(parts_of_samples(session, job_id=job_id, owner=owner, sample_ids=sample_ids).items())
        raise ConflictError(f"ids of part {part} of '{owner}' are already in other parts: {taken[:5]}") from None


def _insert_part_ids(session: Session, job_id: str, owner: str, part: int, sample_ids: Sequence[str]) -> None:
    """One DB-API ``executemany``: SQLAlchemy's per-row parameter processing cost ~10 µs a row (0.16 s per 16k-id
    part), more than the insert itself."""
    dialect = session.get_bind().dialect
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    sql = f"INSERT INTO shard_samples (job_id, owner, sample_id, part) VALUES ({mark}, {mark}, {mark}, {mark})"
    cursor = session.connection().connection.cursor()
    try:
        cursor.executemany(sql, [(job_id, owner, sid, part) for sid in sample_ids])
    except dialect.loaded_dbapi.IntegrityError as exc:  # raw DB-API errors are not wrapped by SQLAlchemy
        raise sa_exc.IntegrityError(sql, None, exc) from exc
    finally:
        cursor.close()


ID_CHUNK = 500
"""Ids per ``IN (...)`` lookup (well under SQLite's and PostgreSQL's bound-parameter limits)."""


def parts_of_samples(session: Session, *, job_id: str, owner: str, sample_ids: Iterable[str]) -> dict[str, int]:
    """The part already holding each of ``sample_ids`` (ids held by no part are absent): key lookups, chunked."""
    ids = list(sample_ids)
    found: dict[str, int] = {}
    for start in range(0, len(ids), ID_CHUNK):
        rows = session.execute(
            select(ShardSample.sample_id, ShardSample.part).where(
                ShardSample.job_id == job_id,
                ShardSample.owner == owner,
                ShardSample.sample_id.in_(ids[start : start + ID_CHUNK]),
            )
        )
        found.update({sid: part for sid, part in rows})
    return found


def get_shard(session: Session, *, job_id: str, owner: str, checkpoint: int, part: int, role: str) -> Shard | None:
    """One shard by its key, or None."""
    return session.scalar(
        select(Shard).where(
            Shard.job_id == job_id,
            Shard.owner == owner,
            Shard.checkpoint == checkpoint,
            Shard.part == part,
            Shard.role == role,
        )
    )


def part_sample_ids(session: Session, *, job_id: str, owner: str, part: int, role: str = "candidate"):
    """``(checkpoint, ids)`` of one held shard of this part (every checkpoint's holds the same ids), or None."""
    row = session.execute(
        select(Shard.checkpoint, Shard.sample_ids)
        .where(Shard.job_id == job_id, Shard.owner == owner, Shard.part == part, Shard.role == role)
        .order_by(Shard.checkpoint)
        .limit(1)
    ).first()
    return None if row is None else (row[0], list(row[1]))


def list_shards(session: Session, *, job_id: str, owner: str | None = None, role: str | None = None) -> list[Shard]:
    """A job's shards, optionally of one owner and/or role, ordered by owner, part, checkpoint."""
    stmt = select(Shard).where(Shard.job_id == job_id)
    if owner is not None:
        stmt = stmt.where(Shard.owner == owner)
    if role is not None:
        stmt = stmt.where(Shard.role == role)
    return list(session.scalars(stmt.order_by(Shard.owner, Shard.part, Shard.checkpoint)))


# --- scores and duplicates ---------------------------------------------------------------------------------------


def _replace(session: Session, model: type[Score] | type[DuplicatePair], job_id: str, rows: Iterable[dict]) -> int:
    session.execute(delete(model).where(model.job_id == job_id))
    count, it = 0, iter(rows)
    while batch := [{**r, "job_id": job_id} for r in islice(it, BATCH_ROWS)]:
        session.execute(insert(model), batch)
        count += len(batch)
    session.flush()
    return count


def replace_scores(session: Session, *, job_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """Replace all scores of a job; rows have ``owner, sample_id, row, score, parts, selected``. Returns the count."""
    return _replace(session, Score, job_id, rows)


def list_scores(
    session: Session, *, job_id: str, owner: str | None = None, limit: int | None = None, offset: int = 0
) -> list[Score]:
    """A job's scores, optionally of one owner, ordered by owner then row."""
    stmt = select(Score).where(Score.job_id == job_id)
    if owner is not None:
        stmt = stmt.where(Score.owner == owner)
    stmt = stmt.order_by(Score.owner, Score.row).offset(offset).limit(limit)
    return list(session.scalars(stmt))


def count_scores(session: Session, *, job_id: str, owner: str | None = None) -> int:
    """How many scores a job (or one owner in it) has."""
    stmt = select(func.count()).select_from(Score).where(Score.job_id == job_id)
    if owner is not None:
        stmt = stmt.where(Score.owner == owner)
    return session.scalar(stmt) or 0


def replace_duplicates(session: Session, *, job_id: str, pairs: Iterable[dict[str, Any]]) -> int:
    """Replace a job's near-duplicate pairs (dicts as `vector_index.near_duplicates` gives them); return the count."""
    return _replace(session, DuplicatePair, job_id, pairs)


def list_duplicates(session: Session, *, job_id: str) -> list[DuplicatePair]:
    """A job's near-duplicate pairs, most similar first."""
    stmt = select(DuplicatePair).where(DuplicatePair.job_id == job_id)
    return list(session.scalars(stmt.order_by(DuplicatePair.similarity.desc(), DuplicatePair.id)))
