"""The coordinator's work as plain functions: load by id from storage, call the scoring engine, persist.

No Celery here (the task graph, `workers.graph`, runs them under step leases; `workers.tasks` adds Celery's
retries), so every function is tested directly. Every function is idempotent: running it twice, or again after a
crash half-way, gives the same stored result (blobs are content-addressed, shard rows are keyed, scores are replaced
in one transaction). At about 510 lines it holds the three scoring-job steps and what they share (loading shards,
the run directory, the per-sample values); training's steps are `workers.training`.

- `project_anchors`: the anchor set's gradients at every checkpoint → anchor shards (owner ``__anchor__``).
- `score_job`: every silo's shards streamed part by part against the anchor directions → trace scores; for a
  ``calibrated`` job the trace and the loss signals are calibrated against the anchor samples and fused
  (`scoring.calibration`) → scores, threshold, masks, each sample's signal values, calibrated z and the signal that
  flagged it, and its nearest anchor samples by pairwise trace (what the dashboards show).
- `find_near_duplicates`: faiss over the last checkpoint's projections → near-duplicate pairs across silos, and the
  anchor nearest-neighbour index.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from scoring.calibration import CalibratedScores, calibrate, fused_signals
from scoring.config import ProjectionSpec, TraceConfig
from scoring.errors import DataError
from scoring.io import ProjectionFile, checkpoint_from_bytes, map_projection, projection_from_bytes
from scoring.selection import (
    ThresholdPolicy,
    apply_threshold,
    check_score_preconditioning,
    check_threshold_preconditioning,
    threshold_from_dict,
)
from scoring.spec import JobSpec, manifest_has_moments
from scoring.traces import (
    best_group,
    build_anchor_directions,
    nearest_anchors,
    per_anchor_directions,
    score_anchor_samples,
    trace_block,
)
from scoring.types import ProjectedGrads, ScoreTable
from storage import repository as repo
from storage.blobs import LocalBlobStore
from storage.db import make_engine, make_session_factory
from storage.errors import ConflictError
from storage.models import Shard
from storage.vector_index import VectorIndex, near_duplicates
from wire import ANCHOR_OWNER
from workers.config import ServiceSettings

log = logging.getLogger("clues.workers")


NEAR_DUPLICATE_THRESHOLD = 0.98
"""Cosine similarity of two samples' projected gradients at or above which they are reported as near-duplicates."""
NEAREST_ANCHORS = 3
"""Anchor samples recorded per sample, by pairwise trace (`scoring.traces.nearest_anchors`)."""

Progress = Callable[[float, str], None]


@dataclass
class Resources:
    """What the pipeline needs, built once per worker process."""

    settings: ServiceSettings
    sessions: sessionmaker[Session]
    blobs: LocalBlobStore

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Resources:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.storage.database_url)
        return cls(settings, make_session_factory(engine), LocalBlobStore(settings.storage.blob_dir))


class JobStateError(ConflictError):
    """The job is not in a state the step can run in: a conflict with its lifecycle, not bad data (a permanent
    failure, not retried)."""


def update_job(res: Resources, job_id: str, **fields) -> None:
    """Set the job's ``fields`` in a transaction of their own."""
    with res.sessions.begin() as session:
        repo.update_job(session, job_id=job_id, **fields)


def progress_writer(res: Resources, job_id: str, every_s: float = 1.0) -> Progress:
    """A progress callback that writes ``progress``/``message`` at most every ``every_s`` seconds (and at 1.0)."""
    last = [0.0]

    def write(fraction: float, message: str) -> None:
        now = time.monotonic()
        if fraction >= 1.0 or now - last[0] >= every_s:
            last[0] = now
            update_job(res, job_id, progress=float(min(max(fraction, 0.0), 1.0)), message=message)

    return write


def materialise_run(res: Resources, job_id: str) -> Path:
    """The job's run directory (``run.json`` + ``ckpt-NNN/``) rebuilt from its checkpoint bundles, cached under the
    work directory. Built in a temp directory and renamed into place, so a crash never leaves half a run."""
    from scoring.workflow import rebuild_run  # torch: only the worker needs it

    dest = res.settings.work_dir / "jobs" / job_id / "run"
    if (dest / "run.json").is_file():
        return dest
    with res.sessions() as session:
        job = repo.get_job(session, job_id=job_id)
        spec = JobSpec.of(job)
    missing = [c.index for c in spec.checkpoints if c.sha256 is None]
    if missing:
        raise JobStateError(f"job {job_id}: checkpoints {missing} were never uploaded")
    projection = ProjectionSpec.from_dict(spec.run.projection)
    bundles = [
        checkpoint_from_bytes(res.blobs.read_bytes(c.sha256), projection, f"checkpoint {c.index}")
        for c in spec.checkpoints
    ]
    return rebuild_run(spec, bundles, dest, concurrent=True)  # a concurrent worker's finished copy stands


def load_shard(res: Resources, shard: Shard) -> ProjectionFile:
    """A stored shard, checksum-verified, parsed and validated, its matrix memory-mapped.

    The file's SHA-256 is checked against its key first, then it is opened with `map_projection`: every field is
    checked, but the matrix is a read-only map of the blob (no copy) and is not scanned for NaN/Inf again. The upload
    route refused non-finite values, the checksum proves these are the bytes it validated, and
    `scoring.traces.trace_parts` still re-checks non-finite results in float64.

    Raises:
        NotFoundError: the blob is missing.
        IntegrityError: the file does not hash to its key.
        DataError: malformed content.
    """
    res.blobs.verify(shard.blob_key)
    where = f"shard {shard.owner}/ckpt {shard.checkpoint}/part {shard.part}"
    return map_projection(res.blobs.path(shard.blob_key), where=where)


def anchor_shards(session: Session, job_id: str, role: str) -> list[Shard]:
    return repo.list_shards(session, job_id=job_id, owner=ANCHOR_OWNER, role=role)


def project_anchors(res: Resources, job_id: str, progress: Progress | None = None) -> None:
    """Compute and store the anchor projections of every checkpoint (roles ``anchor`` and ``candidate``).

    Skips the work when they are stored already (idempotent)."""
    with res.sessions() as session:
        job = repo.get_job(session, job_id=job_id)
        n_ckpt = len(job.checkpoints)
        done = all(len(anchor_shards(session, job_id, role)) == n_ckpt for role in ("anchor", "candidate"))
        anchor_set = repo.get_anchor_set(session, job_id=job_id)
        precondition = job.precondition
        how = JobSpec.of(job)
        if anchor_set is None:
            raise JobStateError(f"job {job_id}: no anchor set was uploaded")
        anchor_key = anchor_set.blob_key
    if how.exact:  # nothing to store: the reference is built from streamed exact gradients (workers.local_scoring)
        from workers.local_scoring import publish_exact_reference

        publish_exact_reference(res, job_id, anchor_key, progress)
        return
    if done:
        update_job(res, job_id, anchor_status="done")
        _publish_if_local(res, job_id, how)
        return
    from scoring.workflow import ModelOptions, ProjectOptions, project_samples

    update_job(res, job_id, anchor_status="running")
    run_dir = materialise_run(res, job_id)
    precondition = anchor_precondition(run_dir, precondition)
    samples = anchor_samples(res, anchor_key)
    settings = res.settings
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as out:
        files = project_samples(
            run_dir,
            samples,
            Path(out),
            anchor=True,
            opts=ProjectOptions.for_job(how, settings.engine, settings.batch_size, precondition=precondition),
            model_opts=ModelOptions(device=settings.device, dtype=settings.dtype, cache_dir=settings.model_cache_dir),
            progress=(lambda d, t: progress(d / t, f"anchor gradients {d}/{t}")) if progress else None,
        )
        _store_anchor_files(res, job_id, files)
    _publish_if_local(res, job_id, how)


def _publish_if_local(res: Resources, job_id: str, how: JobSpec) -> None:
    """A silo-local job's reference, once its anchor projections exist (`workers.local_scoring`)."""
    if how.scoring_mode == "local":
        from workers.local_scoring import publish_reference  # it builds on this module

        publish_reference(res, job_id)


def _store_anchor_files(res: Resources, job_id: str, files: list[Path]) -> None:
    """Store the anchor projection files as the job's anchor shards (owner ``__anchor__``) and mark them done."""
    with res.sessions.begin() as session:
        for path in files:
            data = path.read_bytes()
            proj = projection_from_bytes(data, where=str(path)).proj
            ref = res.blobs.put_bytes(data)
            repo.add_shard(
                session,
                job_id=job_id,
                owner=ANCHOR_OWNER,
                checkpoint=proj.checkpoint,
                part=0,
                role=proj.role,
                sample_ids=list(proj.ids),
                blob_key=ref.key,
                size_bytes=ref.size,
            )
        repo.update_job(session, job_id=job_id, anchor_status="done")


def anchor_precondition(run_dir: Path, precondition: bool) -> bool:
    """Whether the anchor samples are scored (as candidates) on preconditioned gradients: as the job asks, unless
    its run has no Adam moments. That is a job made from a federated warmup: every silo preconditions with the
    moments of its own local training, which never leave it, so the coordinator has none, and its anchor samples are
    scored with plain gradients (the anchor directions are plain gradients in every case)."""
    from scoring.training import read_run

    manifest, _ = read_run(run_dir)
    return precondition and manifest_has_moments(manifest)


def anchor_samples(res: Resources, anchor_key: str) -> list:
    """The job's anchor set (`scoring.data.Sample`), its blob checked first."""
    from scoring.data import read_samples

    res.blobs.verify(anchor_key)
    return read_samples(res.blobs.path(anchor_key))


def shards_by_part(shards: list[Shard]) -> dict[int, list[Shard]]:
    parts: dict[int, list[Shard]] = {}
    for shard in shards:
        parts.setdefault(shard.part, []).append(shard)
    return {p: sorted(s, key=lambda s: s.checkpoint) for p, s in sorted(parts.items())}


def sample_values(file: ProjectionFile, how: JobSpec, where: str) -> dict[str, np.ndarray]:
    """The raw per-sample values a shard of the signal checkpoint carries: ``loss`` (ℓ(y|x)) and each signal.

    Raises:
        DataError: naming the missing one (anchor projections made before the job asked for it).
    """
    values = {"loss": file.losses, **{name: file.signals.get(name) for name in how.signals}}
    missing = [name for name, v in values.items() if v is None]
    if missing:
        raise DataError(f"{where}: the projections of checkpoint {how.signal_index} carry no {missing}")
    return {name: np.asarray(v, dtype=np.float64) for name, v in values.items()}


@dataclass
class _Gathered:
    """What scoring every silo's shard parts gives, in row order."""

    ids: list[str]
    silos: list[str]
    scores: list[np.ndarray]
    parts: list[np.ndarray]
    nearest: list[list[dict]]
    values: list[dict[str, np.ndarray]]
    preconditioned: set[bool]


def score_job(res: Resources, job_id: str, progress: Progress | None = None) -> ScoreTable:
    """Score every member silo's shards against the anchors, apply the threshold and persist scores and masks.

    Shards are streamed one part at a time (T checkpoints of one part in memory), so memory is bounded by the
    largest part, not by the number of samples. A ``trace`` job's score is the trace score; a ``calibrated`` job's
    is the fused calibrated score (`scoring.calibration.calibrate`: the candidates against the anchor samples, whose
    own fused scores are leave-one-out), and every threshold policy applies to it unchanged.

    Returns:
        The silos' `ScoreTable` with the selection applied (anchor samples not included).
    """
    progress = progress or (lambda fraction, message: None)
    with res.sessions() as session:
        job = repo.get_job(session, job_id=job_id)
        if job.status not in ("scoring", "done"):
            raise JobStateError(f"job {job_id} is {job.status!r}, not 'scoring'")
        members = [(m.silo.name, m.status) for m in job.members]
        config = TraceConfig(similarity=job.similarity)
        policy = threshold_from_dict(job.threshold)
        how = JobSpec.of(job)
    incomplete = [name for name, status in members if status != "complete"]
    if incomplete:
        raise JobStateError(f"job {job_id}: silos {incomplete} have not completed their uploads")
    progress(0.0, "anchor projections")
    project_anchors(res, job_id)
    with res.sessions() as session:
        anchor_rows = anchor_shards(session, job_id, "anchor")
        anchor_cand_rows = anchor_shards(session, job_id, "candidate")
        silo_parts = {name: shards_by_part(repo.list_shards(session, job_id=job_id, owner=name)) for name, _ in members}
    anchors = [load_shard(res, s).proj for s in anchor_rows]
    anchor_files = [load_shard(res, s) for s in anchor_cand_rows]
    anchor_cands = [f.proj for f in anchor_files]
    anchor_table = score_anchor_samples(anchor_cands, anchors, config)
    got = _score_parts(res, silo_parts, anchors, config, how, progress)
    _check_scored_alike(got.preconditioned, all(a.preconditioned for a in anchor_cands), how, policy)
    table = ScoreTable(
        ids=tuple(got.ids), silos=tuple(got.silos), scores=np.concatenate(got.scores), parts=np.concatenate(got.parts)
    )
    columns: tuple[list[dict], list[dict]] = ([{}] * len(table.ids), [{}] * len(anchor_table.ids))
    if how.keeps_values:
        table, anchor_table, columns = _with_signals(table, got.values, anchor_table, anchor_files, how)
    table = apply_threshold(table, policy, anchor_table)
    assert table.selected is not None and table.threshold is not None
    rows = _score_rows(table, table.selected, columns[0])
    for row, near in zip(rows, got.nearest, strict=True):
        row["nearest"] = near
    rows += _score_rows(anchor_table, anchor_table.scores >= table.threshold, columns[1])
    progress(0.95, "saving scores")
    with res.sessions.begin() as session:  # threshold first: replace_scores summarises against it
        repo.update_job(
            session,
            job_id=job_id,
            status="done",
            progress=1.0,
            message=f"{int(table.selected.sum())} of {len(table.ids)} samples selected",
            error=None,
            threshold_value=float(table.threshold),
            finished_at=datetime.now(UTC),
        )
        repo.replace_scores(session, job_id=job_id, rows=rows)
    return table


def _check_scored_alike(candidates: set[bool], anchors: bool, how: JobSpec, policy: ThresholdPolicy) -> None:
    """Refuse silos that differ in Adam preconditioning, and a calibrated score or a mean-anchor threshold when the
    candidates (``candidates``: the set of the silos' flags) and the anchor samples were not scored alike."""
    if len(candidates) > 1:
        raise DataError("some silos sent Adam-preconditioned gradients and others did not")
    for preconditioned in candidates:
        check_score_preconditioning(how.score, preconditioned, anchors)
        check_threshold_preconditioning(policy, preconditioned, anchors)


def _score_parts(
    res: Resources,
    silo_parts: dict[str, dict[int, list[Shard]]],
    anchors: list[ProjectedGrads],
    config: TraceConfig,
    how: JobSpec,
    progress: Progress,
) -> _Gathered:
    """Trace scores, per-checkpoint parts and nearest anchors of every silo's shard parts (and, when the job keeps
    them, the raw values of its signal checkpoint's shards), in row order."""
    directions = build_anchor_directions(anchors, config)
    per_anchor = per_anchor_directions(anchors, config)
    got = _Gathered([], [], [np.zeros(0)], [np.zeros((0, len(anchors)))], [], [], set())
    blocks = [(name, part, shards) for name, parts in silo_parts.items() for part, shards in parts.items()]
    total = len(blocks) or 1
    for done, (name, part, files) in enumerate(prefetched(res, blocks), start=1):
        seq = [f.proj for f in files]
        got.preconditioned.add(seq[0].preconditioned)
        block_scores, block_parts, _ = best_group(trace_block(directions, seq, config, f"{name} part {part}"))
        got.ids.extend(seq[0].ids)
        got.silos.extend([name] * len(seq[0]))
        got.scores.append(block_scores)
        got.parts.append(block_parts)
        if how.keeps_values:
            got.values.append(sample_values(files[how.signal_index], how, f"silo {name} part {part}"))
        near_ids, near_values = nearest_anchors(per_anchor, seq, config, k=NEAREST_ANCHORS)
        for anchor_ids, values in zip(near_ids, near_values.tolist(), strict=True):
            got.nearest.append([{"anchor_id": a, "trace": v} for a, v in zip(anchor_ids, values, strict=True)])
        progress(0.05 + 0.85 * done / total, f"scored {done}/{total} shard parts")
    return got


def aligned_values(
    values: dict[str, np.ndarray], ids: tuple[str, ...], order: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """``values`` (rows in ``ids`` order) reordered to ``order``."""
    position = {sid: i for i, sid in enumerate(ids)}
    rows = [position[sid] for sid in order]
    return {name: v[rows] for name, v in values.items()}


def _with_signals(
    table: ScoreTable,
    values: list[dict[str, np.ndarray]],
    anchor_table: ScoreTable,
    anchor_files: list[ProjectionFile],
    how: JobSpec,
) -> tuple[ScoreTable, ScoreTable, tuple[list[dict], list[dict]]]:
    """Each row's stored signal columns (`_signal_columns`) from the silos' ``values`` (`sample_values` of each part,
    in row order) and the anchor samples' own; for a calibrated job also both tables with the fused calibrated
    scores (the anchors' leave-one-out) in place of the trace scores (the parts stay the trace's terms)."""
    names = ("loss", *how.signals)
    cand = {k: np.concatenate([v[k] for v in values]) if values else np.zeros(0) for k in names}
    cand["trace"] = table.scores
    anch = anchor_values(anchor_files, anchor_table, how)
    if how.score != "calibrated":
        return table, anchor_table, (_signal_columns(cand, None), _signal_columns(anch, None))
    assert how.fusion is not None
    calibrated, anchors = calibrate(cand, anch, fused_signals(how.signals), how.fusion)
    return (
        replace(table, scores=calibrated.scores),
        replace(anchor_table, scores=anchors.scores),
        (_signal_columns(cand, calibrated), _signal_columns(anch, anchors)),
    )


def anchor_values(anchor_files: list[ProjectionFile], anchor_table: ScoreTable, how: JobSpec) -> dict[str, np.ndarray]:
    """The anchor samples' raw values in ``anchor_table``'s row order: their leave-one-out ``trace`` and, when the
    job keeps values, ``loss`` and the signals of its signal checkpoint's file."""
    values = {"trace": anchor_table.scores}
    if how.keeps_values:
        file = next(f for f in anchor_files if f.proj.checkpoint == how.signal_index)
        values |= aligned_values(sample_values(file, how, "anchor samples"), file.proj.ids, anchor_table.ids)
    return values


def _signal_columns(values: dict[str, np.ndarray], calibrated: CalibratedScores | None) -> list[dict]:
    """Per row: ``signal_values`` (trace, loss and the signals sent), ``signal_z`` (each fused signal's calibrated
    z) and ``flagged_by`` (the signal with the largest z); the last two None for a trace job."""
    names = sorted(values)
    raw = np.stack([values[n] for n in names], axis=1) if names else np.zeros((0, 0))  # (N, V)
    rows = []
    flagged = calibrated.flagged_by if calibrated is not None else None
    for i in range(raw.shape[0]):
        row: dict = {
            "signal_values": {n: int(raw[i, j]) if n == "n_tokens" else float(raw[i, j]) for j, n in enumerate(names)}
        }
        if calibrated is not None and flagged is not None:
            row["signal_z"] = {s: float(z) for s, z in zip(calibrated.signals, calibrated.z[i], strict=True)}
            row["flagged_by"] = flagged[i]
        rows.append(row)
    return rows


def prefetched(res: Resources, blocks: list[tuple[str, int, list[Shard]]]):
    """Yield ``(silo, part, projection files)`` for each block, loading (checksum + map) the next block in a thread
    while the caller scores this one: the SHA-256 of part p+1 runs beside the trace of part p (hashlib and numpy
    release the GIL). At most two blocks are held."""
    from concurrent.futures import ThreadPoolExecutor

    def load(shards: list[Shard]) -> list[ProjectionFile]:
        return [load_shard(res, s) for s in shards]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = pool.submit(load, blocks[0][2]) if blocks else None
        for i, (name, part, _) in enumerate(blocks):
            seq = pending.result()
            pending = pool.submit(load, blocks[i + 1][2]) if i + 1 < len(blocks) else None
            yield name, part, seq


def _score_rows(table: ScoreTable, selected: np.ndarray, columns: list[dict]) -> list[dict]:
    """One storage row per sample (with its ``columns``: `_signal_columns`); ``row`` keeps each silo's upload
    order."""
    rows, position = [], {}
    for i, (sid, silo) in enumerate(zip(table.ids, table.silos, strict=True)):
        row = position[silo] = position.get(silo, -1) + 1
        rows.append(
            {
                "owner": silo,
                "sample_id": sid,
                "row": row,
                "score": float(table.scores[i]),
                "parts": [float(x) for x in table.parts[i]],
                "selected": bool(selected[i]),
                **columns[i],
            }
        )
    return rows


def anchor_index_path(res: Resources, job_id: str) -> Path:
    return res.settings.storage.index_dir / f"{job_id}.anchors.faiss"


def find_near_duplicates(res: Resources, job_id: str, threshold: float = NEAR_DUPLICATE_THRESHOLD) -> int:
    """Near-duplicate pairs across silos from the last checkpoint's projections, and the anchor index.

    Returns:
        The number of pairs stored.
    """
    with res.sessions() as session:
        job = repo.get_job(session, job_id=job_id)
        last = len(job.checkpoints) - 1
        spec = ProjectionSpec.from_dict(job.projection)
        names = [m.silo.name for m in job.members]
        shards = {
            name: [s for s in repo.list_shards(session, job_id=job_id, owner=name) if s.checkpoint == last]
            for name in [*names, ANCHOR_OWNER]
        }
    groups: dict[str, tuple[list[str], np.ndarray]] = {}
    for name in names:
        loaded = [load_shard(res, s).proj for s in shards[name] if s.role == "candidate"]
        if loaded:
            groups[name] = ([i for p in loaded for i in p.ids], np.concatenate([p.matrix for p in loaded]))
    pairs = near_duplicates(groups, threshold=threshold) if len(groups) > 1 else []
    anchor = [load_shard(res, s).proj for s in shards[ANCHOR_OWNER] if s.role == "candidate"]
    if anchor:
        index = VectorIndex.build(
            list(anchor[0].ids), anchor[0].matrix.astype(np.float32), fingerprint=spec.fingerprint()
        )
        index.save(anchor_index_path(res, job_id))
    with res.sessions.begin() as session:
        repo.replace_duplicates(session, job_id=job_id, pairs=pairs)
    return len(pairs)
