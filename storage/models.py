"""The tables: `Silo`, `Job` with its `JobCheckpoint`s and `JobMember`s, `AnchorSet`, `Shard`, `Score`,
`ScorePart`, `ScoreOverride`, `DuplicatePair`; for training, `TrainJob` with its `TrainMember`s, `TrainRound`s and
`TrainUpdate`s; `TaskStep`, the task graph's steps and their leases. Portable between SQLite and PostgreSQL;
datetimes are timezone-aware UTC on both.

Deleting a `Job` deletes every row that names it (``ON DELETE CASCADE``; SQLite needs ``foreign_keys=ON``, which
`storage.db.make_engine` sets).

One module (about 490 lines) on purpose: the tables name each other in relationships and foreign keys, and one
`Base.metadata` is what the Alembic migrations are checked against; split, every module would import every other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class JobStatus(StrEnum):
    """A scoring job's life: ``draft`` → ``open`` (silos upload) → ``scoring`` → ``done`` (or ``failed``). The API's
    schemas use the same enum; the column stores the value."""

    DRAFT = "draft"
    OPEN = "open"
    SCORING = "scoring"
    DONE = "done"
    FAILED = "failed"


class AnchorStatus(StrEnum):
    """The coordinator's anchor projection of a job."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class MemberStatus(StrEnum):
    """A silo's uploads to a job."""

    PENDING = "pending"
    COMPLETE = "complete"


class TrainStatus(StrEnum):
    """A training job's life: ``draft`` → ``starting`` → ``running`` (rounds) → ``evaluating`` → ``done``."""

    DRAFT = "draft"
    STARTING = "starting"
    RUNNING = "running"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"


class RoundStatus(StrEnum):
    """A training round: ``open`` (updates arrive) → ``aggregating`` → ``closed``."""

    OPEN = "open"
    AGGREGATING = "aggregating"
    CLOSED = "closed"


SHARD_ROLES = ("candidate", "anchor")
TRAIN_MODES = ("warmup", "federated", "merge")
DECISIONS = ("keep", "drop", "auto")
STEP_STATES = (
    "queued",
    "running",
    "done",
    "failed",
)  # an owner's override of a sample's keep/drop; "auto" returns to the threshold


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always returns aware UTC datetimes (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: storage takes timezone-aware datetimes only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with constraint naming conventions (stable names for Alembic)."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


def _job_fk() -> Any:
    return ForeignKey("jobs.id", ondelete="CASCADE")


class Silo(Base):
    """A data owner. Only the sha256 of its bearer token is stored."""

    __tablename__ = "silos"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    """A scoring job: the spec (model, LoRA, projection, similarity, threshold, options) plus its life cycle.

    ``status`` is a `JobStatus`, ``anchor_status`` an `AnchorStatus`; ``progress`` is in [0, 1].
    ``checkpoints`` and ``members`` (each with its ``silo``) load with the job, so a detached job stays readable.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(500))
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)
    projection: Mapped[dict[str, Any]] = mapped_column(JSON)
    similarity: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[Any] = mapped_column(JSON)
    precondition: Mapped[bool]
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="draft")
    anchor_status: Mapped[str] = mapped_column(String(16), default="pending")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    threshold_value: Mapped[float | None] = mapped_column(Float)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    checkpoints: Mapped[list[JobCheckpoint]] = relationship(
        order_by="JobCheckpoint.index", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )
    members: Mapped[list[JobMember]] = relationship(
        order_by="JobMember.silo_id", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )


class JobCheckpoint(Base):
    """Checkpoint ``index`` of a job (0..T-1) and, once uploaded, the blob of its bundle."""

    __tablename__ = "job_checkpoints"

    job_id: Mapped[str] = mapped_column(_job_fk(), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int]
    lr: Mapped[float] = mapped_column(Float)
    lr_last: Mapped[float] = mapped_column(Float)
    adam: Mapped[dict[str, Any]] = mapped_column(JSON)
    blob_key: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)


class JobMember(Base):
    """A silo taking part in a job; ``status`` is ``pending`` until the silo marks its uploads complete (in a
    silo-local job: until it sends its aggregate)."""

    __tablename__ = "job_members"

    job_id: Mapped[str] = mapped_column(_job_fk(), primary_key=True)
    silo_id: Mapped[int] = mapped_column(ForeignKey("silos.id", ondelete="CASCADE"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    num_samples: Mapped[int | None]
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    aggregate: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """A silo-local job: what the silo sent (``kept``, ``total``, ``histogram``); None otherwise."""

    silo: Mapped[Silo] = relationship(lazy="joined")


class AnchorSet(Base):
    """The anchor samples file of a job (stored as uploaded) and its sample ids in file order."""

    __tablename__ = "anchor_sets"

    job_id: Mapped[str] = mapped_column(_job_fk(), primary_key=True)
    blob_key: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_samples: Mapped[int]
    sample_ids: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Shard(Base):
    """One projection shard: rows ``sample_ids`` of ``owner`` at checkpoint ``checkpoint``, part ``part``.

    ``owner`` is a silo name, or `ANCHOR_OWNER` for the coordinator's anchor projections; ``role`` is one of
    `SHARD_ROLES`.
    """

    __tablename__ = "shards"
    __table_args__ = (
        UniqueConstraint("job_id", "owner", "checkpoint", "part", "role"),
        Index(None, "job_id", "owner"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(_job_fk())
    owner: Mapped[str] = mapped_column(String(64))
    checkpoint: Mapped[int]
    part: Mapped[int]
    role: Mapped[str] = mapped_column(String(16))
    row_count: Mapped[int]
    sample_ids: Mapped[list[str]] = mapped_column(JSON)
    blob_key: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ShardSample(Base):
    """Which part holds each of an owner's sample ids: the index that makes "is this id already in another part?"
    one primary-key lookup per id at upload time, instead of reading every held shard's id list."""

    __tablename__ = "shard_samples"

    job_id: Mapped[str] = mapped_column(_job_fk(), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    sample_id: Mapped[str] = mapped_column(String(500), primary_key=True)
    part: Mapped[int]


class Score(Base):
    """The score of one sample: ``parts`` holds the per-checkpoint terms, ``row`` the position for stable order.

    ``selected`` is the decision in force (what masks and training jobs use): the threshold's own decision
    ``auto_selected`` unless the owner overrode it, in which case ``override_id`` names the `ScoreOverride` in force.
    ``nearest``: the anchor samples with the largest pairwise traces, ``[{"anchor_id", "trace": Σ_t η_t·sim}, ...]``
    (the API's own shape, so pages of rows are served without decoding it).

    For a job that keeps them (calibrated, or asking for signals): ``signal_values``, the raw per-sample values
    ``{"trace", "loss", "loss_uncond", "n_tokens"}`` (those the job has); for a calibrated job also ``signal_z``, the
    calibrated z of each fused signal ``{"trace", "perplexity", ...}`` (positive: worse than a typical anchor), and
    ``flagged_by``, the signal with the largest z. ``score`` is then the fused calibrated score and ``parts`` stay
    the trace score's terms. None for a pure trace job.
    """

    __tablename__ = "scores"
    __table_args__ = (
        Index(None, "job_id", "owner", "row"),
        Index(None, "job_id", "score"),
        Index(None, "job_id", "owner", "score"),
        Index(None, "job_id", "owner", "selected", "auto_selected", "override_id"),  # covers the kept counts
    )

    job_id: Mapped[str] = mapped_column(_job_fk(), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    sample_id: Mapped[str] = mapped_column(String(500), primary_key=True)
    row: Mapped[int]
    score: Mapped[float] = mapped_column(Float)
    parts: Mapped[list[float]] = mapped_column(JSON)
    selected: Mapped[bool]
    auto_selected: Mapped[bool]
    override_id: Mapped[int | None]
    nearest: Mapped[list[Any] | None] = mapped_column(JSON)
    signal_values: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    signal_z: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    flagged_by: Mapped[str | None] = mapped_column(String(32))


class ScorePart(Base):
    """Checkpoint ``t``'s term of one sample's score, one row per (sample, t): a copy of ``Score.parts[t]`` kept so
    that sorting a job's samples by one checkpoint's term walks an index instead of decoding every row's JSON."""

    __tablename__ = "score_parts"
    __table_args__ = (Index(None, "job_id", "t", "value"),)

    job_id: Mapped[str] = mapped_column(_job_fk(), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    sample_id: Mapped[str] = mapped_column(String(500), primary_key=True)
    t: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float] = mapped_column(Float)


class ScoreOverride(Base):
    """One owner decision about one sample, kept as an audit record (never updated or deleted but with its job).

    ``decision`` is one of `DECISIONS`; ``previous``/``selected`` are the decision in force before and after it;
    ``actor`` is the silo that made it.
    """

    __tablename__ = "score_overrides"
    __table_args__ = (Index(None, "job_id", "owner", "sample_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(_job_fk())
    owner: Mapped[str] = mapped_column(String(64))
    sample_id: Mapped[str] = mapped_column(String(500))
    decision: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(64))
    previous: Mapped[bool]
    selected: Mapped[bool]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DuplicatePair(Base):
    """Two samples whose projections have cosine similarity above the duplicate threshold; (a) sorts first."""

    __tablename__ = "duplicate_pairs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(_job_fk(), index=True)
    owner_a: Mapped[str] = mapped_column(String(64))
    sample_a: Mapped[str] = mapped_column(String(500))
    owner_b: Mapped[str] = mapped_column(String(64))
    sample_b: Mapped[str] = mapped_column(String(500))
    similarity: Mapped[float] = mapped_column(Float)


def _train_fk() -> Any:
    return ForeignKey("train_jobs.id", ondelete="CASCADE")


class TrainJob(Base):
    """A training job: federated warmup (its rounds become scoring checkpoints), federated training or one-shot
    adapter merging on the silos' selected samples.

    ``mode`` is one of `TRAIN_MODES`, ``status`` a `TrainStatus`. ``settings`` holds the validated job spec
    (LoRA, local training, aggregation, merge, selection, evaluation, checkpoint rounds...). ``round`` is the round
    in progress (or the last one once finished); ``layout``/``adapter_config`` describe the adapter and are set when
    the initial adapter is built. Blob columns hold content-addressed keys.
    """

    __tablename__ = "train_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(500))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    rounds: Mapped[int]
    quorum: Mapped[int]
    round_timeout_s: Mapped[float] = mapped_column(Float)
    scoring_job_id: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="draft")
    round: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    layout: Mapped[list[Any] | None] = mapped_column(JSON)
    adapter_config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    server_state_blob: Mapped[str | None] = mapped_column(String(64))
    final_blob: Mapped[str | None] = mapped_column(String(64))
    eval_blob: Mapped[str | None] = mapped_column(String(64))
    eval_num_samples: Mapped[int | None]
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    members: Mapped[list[TrainMember]] = relationship(
        order_by="TrainMember.silo_id", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )


class TrainMember(Base):
    """A silo taking part in a training job; ``num_samples`` is what it last reported training on."""

    __tablename__ = "train_members"

    job_id: Mapped[str] = mapped_column(_train_fk(), primary_key=True)
    silo_id: Mapped[int] = mapped_column(ForeignKey("silos.id", ondelete="CASCADE"), primary_key=True)
    num_samples: Mapped[int | None]

    silo: Mapped[Silo] = relationship(lazy="joined")


class TrainRound(Base):
    """Round ``round`` of a training job: the global adapter it starts from (``start_blob``), the learning rate the
    silos use, its deadline, and once aggregated the resulting adapter, who took part and the evaluation.

    ``status``: ``open`` (takes updates until every member sent one or the deadline passes), ``aggregating`` (a
    worker claimed it: no more updates), ``closed`` (``result_blob`` set).
    """

    __tablename__ = "train_rounds"

    job_id: Mapped[str] = mapped_column(_train_fk(), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    lr: Mapped[float] = mapped_column(Float)
    start_blob: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="open")
    deadline: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    result_blob: Mapped[str | None] = mapped_column(String(64))
    participants: Mapped[list[str] | None] = mapped_column(JSON)
    train_loss: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    guard: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """What aggregation's guard did (`scoring.federated.aggregation.guard_round`): ``flags``, a list of ``{silo, kind,
    detail}`` (a capped count, a clamped score mass, a clipped delta), and ``figures`` (the clip bound, each silo's
    delta norm)."""


class TrainUpdate(Base):
    """One silo's adapter after its local training in one round (a ``clues.checkpoint/1`` bundle without moments)."""

    __tablename__ = "train_updates"

    job_id: Mapped[str] = mapped_column(_train_fk(), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    silo_id: Mapped[int] = mapped_column(ForeignKey("silos.id", ondelete="CASCADE"), primary_key=True)
    blob_key: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_samples: Mapped[int]
    score_mass: Mapped[float] = mapped_column(Float)
    train_loss: Mapped[float] = mapped_column(Float)
    privacy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """After a DP-SGD round: the silo's ε ledger figures (`scoring.privacy.REPORT_FIELDS`); None otherwise."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    silo: Mapped[Silo] = relationship(lazy="joined")


class TrainWithdrawal(Base):
    """A withdrawal from a training job, kept as an audit record: ``silo`` (a whole silo when ``sample_ids`` is
    None, else those of its samples) asked by ``actor`` (``admin`` or the silo itself) for ``reason``.

    ``status``: ``pending`` (a worker re-merges), ``done``, ``failed``. ``report`` says what was done and how exact
    it is (`scoring.withdrawal`): the kind (``remerge``, ``retrain``), the upstream dependencies, the commands for a
    strict re-run, the old and new final adapters' SHA-256 and the seconds the re-merge took.
    """

    __tablename__ = "train_withdrawals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(_train_fk(), index=True)
    silo: Mapped[str] = mapped_column(String(64))
    sample_ids: Mapped[list[str] | None] = mapped_column(JSON)
    actor: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class TaskStep(Base):
    """One step of the task graph (a Celery task by name and its arguments) and its lease.

    ``key`` is the task name and its JSON arguments. ``state``: ``queued`` (sent, not yet claimed; not before
    ``not_before``), ``running`` (claimed by ``holder``, alive while ``heartbeat_at`` is fresh), ``done`` or
    ``failed``. ``attempt`` counts the sends, ``lost`` the leases that went stale (a worker died holding
    it). A worker runs a step only after claiming it with a compare-and-set
    (`storage.steps.claim`), so no step runs twice at once, and a stale lease is taken over or re-sent by the reaper.
    """

    __tablename__ = "task_steps"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    args: Mapped[list[Any]] = mapped_column(JSON)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    lost: Mapped[int] = mapped_column(Integer, default=0)
    holder: Mapped[str | None] = mapped_column(String(200))
    not_before: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)


class RevokedSession(Base):
    """A dashboard session ended by logging out (its signed cookie stays valid until ``expires_at`` otherwise)."""

    __tablename__ = "revoked_sessions"

    sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
