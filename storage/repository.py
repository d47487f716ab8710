"""Keyword-only data access functions, one group per aggregate: silos, jobs (checkpoints, members, anchor set),
shards, scores, duplicate pairs, training jobs (members, rounds, updates).

Every function takes the `Session` first and flushes, but never commits: the caller owns the transaction and commits
(or rolls back) once per request or task. Uploads are idempotent: storing the same blob key again is a no-op that
returns ``False``; another key for a slot already filled raises `ConflictError`.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from itertools import islice
from typing import Any, TypeVar

from sqlalchemy import delete, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from storage import scores
from storage.errors import ConflictError, NotFoundError
from storage.models import (
    AnchorSet,
    DuplicatePair,
    Job,
    JobCheckpoint,
    JobMember,
    RevokedSession,
    Score,
    ScorePart,
    Shard,
    ShardSample,
    Silo,
    TrainJob,
    TrainMember,
    TrainRound,
    TrainUpdate,
    utcnow,
)

T = TypeVar("T")
BATCH_ROWS = 10_000
TOKEN_PREFIX = "clues_"
_JOB_FIELDS = frozenset(Job.__table__.columns.keys()) - {"id", "created_at", "updated_at"}
_TRAIN_FIELDS = frozenset(TrainJob.__table__.columns.keys()) - {"id", "created_at", "updated_at"}


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


def find_silo(session: Session, *, name: str) -> Silo | None:
    """The silo of this name, or None."""
    return session.scalar(select(Silo).where(Silo.name == name))


def get_silo_by_name(session: Session, *, name: str) -> Silo:
    """Raises `NotFoundError` when no silo has this name."""
    silo = find_silo(session, name=name)
    if silo is None:
        raise NotFoundError(f"silo '{name}' does not exist")
    return silo


def list_silos(session: Session) -> list[Silo]:
    """All silos by name."""
    return list(session.scalars(select(Silo).order_by(Silo.name)))


# --- jobs --------------------------------------------------------------------------------------------------------


def _silos_named(session: Session, silo_names: Sequence[str]) -> list[Silo]:
    """The silos of ``silo_names`` (duplicates dropped, order kept). Raises `NotFoundError` naming every unknown."""
    names = list(dict.fromkeys(silo_names))
    silos = {s.name: s for s in session.scalars(select(Silo).where(Silo.name.in_(names)))}
    missing = [n for n in names if n not in silos]
    if missing:
        raise NotFoundError(f"unknown silo(s): {', '.join(repr(n) for n in missing)}")
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
        NotFoundError: some of ``silo_names`` do not exist (all are named).
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


def _update(session: Session, row: T, allowed: frozenset[str], fields: dict[str, Any]) -> T:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise TypeError(f"not updatable field(s) of {type(row).__name__}: {unknown}")
    for key, value in fields.items():
        setattr(row, key, value)
    row.updated_at = utcnow()  # type: ignore[attr-defined]
    session.flush()
    return row


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


def _replace(
    session: Session, model: type[Score | ScorePart | DuplicatePair], job_id: str, rows: Iterable[dict]
) -> int:
    session.execute(delete(model).where(model.job_id == job_id))
    count, it = 0, iter(rows)
    while batch := [{**r, "job_id": job_id} for r in islice(it, BATCH_ROWS)]:
        session.execute(insert(model), batch)
        count += len(batch)
    session.flush()
    return count


def replace_scores(session: Session, *, job_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """Replace all scores of a job; rows have ``owner, sample_id, row, score, parts, selected`` and optionally
    ``nearest``, ``signal_values``, ``signal_z``, ``flagged_by`` (see `Score`). ``selected`` is the threshold's
    decision: the owners' overrides are put back in force over it, and the job's summary is rebuilt. Returns the
    count."""
    optional = {"nearest": None, "signal_values": None, "signal_z": None, "flagged_by": None}
    rows = [{**optional, **r, "auto_selected": r["selected"], "override_id": None} for r in rows]
    count = _replace(session, Score, job_id, rows)
    _replace(
        session,
        ScorePart,
        job_id,
        (
            {"owner": r["owner"], "sample_id": r["sample_id"], "t": t, "value": float(v)}
            for r in rows
            for t, v in enumerate(r["parts"])
        ),
    )
    scores.reapply_overrides(session, job_id=job_id)
    scores.store_summary(
        session, job_id=job_id, rows=((r["owner"], r["score"], r["parts"], r["auto_selected"]) for r in rows)
    )
    scores.refresh_statistics(session)
    return count


def replace_duplicates(session: Session, *, job_id: str, pairs: Iterable[dict[str, Any]]) -> int:
    """Replace a job's near-duplicate pairs (dicts as `vector_index.near_duplicates` gives them); return the count."""
    return _replace(session, DuplicatePair, job_id, pairs)


def list_duplicates(session: Session, *, job_id: str) -> list[DuplicatePair]:
    """A job's near-duplicate pairs, most similar first."""
    stmt = select(DuplicatePair).where(DuplicatePair.job_id == job_id)
    return list(session.scalars(stmt.order_by(DuplicatePair.similarity.desc(), DuplicatePair.id)))


# --- training jobs -------------------------------------------------------------------------------------------------


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
        NotFoundError: some of ``silo_names`` do not exist (all are named).
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
) -> bool:
    """Store a silo's update for a round; True when new, False when the same bytes are stored again.

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


def revoke_session(session: Session, *, sid: str, expires_at: datetime) -> None:
    """Record a logged-out dashboard session (idempotent), and forget those past their expiry."""
    now = utcnow()
    session.execute(delete(RevokedSession).where(RevokedSession.expires_at < now))
    if session.get(RevokedSession, sid) is None and expires_at > now:
        session.add(RevokedSession(sid=sid, expires_at=expires_at))
    session.flush()


def session_revoked(session: Session, *, sid: str) -> bool:
    return session.get(RevokedSession, sid) is not None
