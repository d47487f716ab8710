"""Scoring jobs: the admin's set-up and start, the silos' downloads, shard uploads and results.

A silo sees only jobs it is a member of (others answer 404, as if they did not exist) and only its own scores.
"""

from __future__ import annotations

import math
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from app.deps import AdminDep, Index, JobId, PrincipalDep, SessionDep, SiloDep, StateDep
from app.openapi import BINARY
from app.schemas import (
    JobCreate,
    JobPublic,
    LocalAggregate,
    ShardPublic,
    UploadResult,
)
from app.services import jobs as lifecycle
from app.services import local_scoring as local
from app.services.jobs import checkpoint_of, engine_check, job_for, job_public, require_status
from app.uploads import SHA256_HEADER, already_held, expected_sha256, receive, upload_answer
from scoring.config import ProjectionSpec
from scoring.data import read_samples
from scoring.errors import DataError
from scoring.io import checkpoint_from_bytes, map_projection
from scoring.local_scoring import check_local_threshold
from scoring.selection import threshold_from_dict
from scoring.spec import JobSpec
from scoring.traces import LR_REL_TOL
from storage import repository as repo
from storage.errors import ConflictError, NotFoundError
from wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/jobs", tags=["jobs"])


@router.post("", status_code=201, operation_id="create_job")
def create_job(body: JobCreate, session: SessionDep, principal: AdminDep) -> JobPublic:
    """Create a job in ``draft``: the spec every party computes projections under, and how to select."""
    policy = engine_check("threshold", lambda: threshold_from_dict(body.threshold))
    score = body.score_options(len(body.checkpoints))  # ConfigError naming the field: 422
    check_local_threshold(body.scoring_mode, policy)
    job = repo.create_job(
        session,
        name=body.name,
        model=body.model,
        lora=body.lora.to_dict(),
        projection=body.projection.to_dict(),
        similarity=body.similarity,
        threshold=body.threshold,
        precondition=body.precondition,
        options={
            "lora_init_seed": body.lora_init_seed,
            "max_len": body.max_len,
            "template": body.template,
            "auto_score": body.auto_score,
            **score,
        },
        checkpoints=[c.model_dump() for c in body.checkpoints],
        silo_names=body.silos,
    )
    session.commit()
    session.refresh(job)
    return job_public(job, principal, session)


@router.get("", operation_id="list_jobs")
def list_jobs(session: SessionDep, principal: PrincipalDep) -> list[JobPublic]:
    """All jobs (admin), or the jobs a silo is a member of."""
    jobs = repo.list_jobs(session, silo_id=None if principal.is_admin else principal.silo.id)
    return [job_public(j, principal, session) for j in jobs]


@router.get("/{job_id}", operation_id="get_job")
def get_job(job_id: JobId, session: SessionDep, principal: PrincipalDep) -> JobPublic:
    """The job's spec, status and progress."""
    return job_public(job_for(session, job_id, principal), principal, session)


@router.put(
    "/{job_id}/checkpoints/{index}",
    operation_id="upload_checkpoint",
    openapi_extra={"requestBody": BINARY},
    responses={201: {"model": UploadResult}},
)
async def upload_checkpoint(
    job_id: JobId, index: Index, request: Request, state: StateDep, session: SessionDep, _: AdminDep
) -> UploadResult:
    """A checkpoint bundle (``clues.checkpoint/1``); its layout must hash to the job's projection spec."""
    job = repo.get_job(session, job_id=job_id)
    require_status(job, "draft")
    ckpt = checkpoint_of(job, index)
    spec = ProjectionSpec.from_dict(job.projection)
    sha = expected_sha256(request)
    if already_held(ckpt.blob_key, sha, f"checkpoint {index} of job {job_id}"):
        return upload_answer(sha, ckpt.size_bytes, False)

    def validate(path: Path) -> None:
        bundle = checkpoint_from_bytes(path.read_bytes(), spec, f"checkpoint {index}")
        if int(bundle.entry.get("index", -1)) != index:
            raise DataError(f"checkpoint {index}: the bundle is checkpoint {bundle.entry.get('index')}")
        if not math.isclose(float(bundle.entry["lr"]), ckpt.lr, rel_tol=LR_REL_TOL):
            raise DataError(f"checkpoint {index}: lr {bundle.entry['lr']} differs from the job's {ckpt.lr}")

    ref, _, _ = await receive(request, state, "checkpoint", sha, validate)
    created = repo.set_checkpoint_blob(session, job_id=job_id, index=index, blob_key=ref.key, size_bytes=ref.size)
    session.commit()
    return upload_answer(ref.key, ref.size, created)


@router.put(
    "/{job_id}/anchors",
    operation_id="upload_anchors",
    openapi_extra={"requestBody": BINARY},
    responses={201: {"model": UploadResult}},
)
async def upload_anchors(
    job_id: JobId, request: Request, state: StateDep, session: SessionDep, _: AdminDep
) -> UploadResult:
    """The anchor set: a JSON or JSONL samples file (Alpaca or chat records), at least two samples (three for a
    calibrated job)."""
    job = repo.get_job(session, job_id=job_id)
    require_status(job, "draft")
    sha = expected_sha256(request)
    held = repo.get_anchor_set(session, job_id=job_id)
    if already_held(held.blob_key if held else None, sha, f"the anchor set of job {job_id}"):
        return upload_answer(sha, held.size_bytes, False)

    calibrated = JobSpec.of(job).score == "calibrated"

    def validate(path: Path) -> list[str]:
        try:
            samples = read_samples(path)
        except DataError as exc:
            raise DataError(str(exc).replace(str(path), "anchors")) from exc
        if len(samples) < 2:
            raise DataError("anchors: need at least two anchor samples (each is scored against the others)")
        if calibrated and len(samples) < 3:  # each anchor is calibrated against the median and MAD of the others
            raise DataError("anchors: a calibrated job needs at least three anchor samples")
        return [s.id for s in samples]

    ref, ids, _ = await receive(request, state, "anchors", sha, validate)
    created = repo.set_anchor_set(session, job_id=job_id, blob_key=ref.key, size_bytes=ref.size, sample_ids=ids)
    session.commit()
    return upload_answer(ref.key, ref.size, created)


@router.post("/{job_id}/open", operation_id="open_job")
def open_job(job_id: JobId, state: StateDep, session: SessionDep, principal: AdminDep) -> JobPublic:
    """``draft`` → ``open``: every checkpoint and the anchor set must be uploaded. Queues the anchor projection."""
    job = repo.get_job(session, job_id=job_id)
    lifecycle.open_job(state, session, job)
    return job_public(job, principal, session)


@router.post("/{job_id}/score", status_code=202, operation_id="score_job")
def score_job(job_id: JobId, state: StateDep, session: SessionDep, principal: AdminDep) -> JobPublic:
    """Start scoring (``open`` or ``failed`` → ``scoring``); every silo must have completed its upload. On a job
    that is ``scoring`` already it is `retry_job`: the step is sent again unless a live worker runs it."""
    job = repo.get_job(session, job_id=job_id)
    lifecycle.start_scoring(state, session, job)
    return job_public(job, principal, session)


@router.post("/{job_id}/retry", status_code=202, operation_id="retry_job")
def retry_job(job_id: JobId, state: StateDep, session: SessionDep, principal: AdminDep) -> JobPublic:
    """Send the step this job waits for again: scoring (a job in ``scoring``, or ``failed`` with every upload
    complete), or the anchor projection (an ``open`` job whose projection is pending, running or failed).
    Idempotent: a step that a live worker is running (a heartbeat within the lease timeout) is left alone, and the
    answer's ``steps`` say so. Answers 409 when the job waits for nothing (draft, open with its anchors done, done)."""
    job = repo.get_job(session, job_id=job_id)
    lifecycle.retry(state, session, job)
    return job_public(job, principal, session)


@router.get(
    "/{job_id}/checkpoints/{index}",
    operation_id="download_checkpoint",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_checkpoint(
    job_id: JobId, index: Index, state: StateDep, session: SessionDep, principal: PrincipalDep
) -> FileResponse:
    """A checkpoint bundle (checksum-verified before it is sent; the checksum is in ``X-Content-SHA256``)."""
    job = job_for(session, job_id, principal)
    if not principal.is_admin:
        require_status(job, "open", "scoring", "done", "failed")
    ckpt = checkpoint_of(job, index)
    if ckpt.blob_key is None:
        raise NotFoundError(f"checkpoint {index} of job {job_id} has not been uploaded")
    state.blobs.verify(ckpt.blob_key)
    return FileResponse(
        state.blobs.path(ckpt.blob_key),
        media_type="application/octet-stream",
        headers={SHA256_HEADER: ckpt.blob_key},
        filename=f"{job_id}-ckpt-{index:03d}.safetensors",
    )


@router.put(
    "/{job_id}/shards/{checkpoint}/{part}",
    operation_id="upload_shard",
    openapi_extra={"requestBody": BINARY},
    responses={201: {"model": UploadResult}},
)
async def upload_shard(
    job_id: JobId,
    checkpoint: Index,
    part: Index,
    request: Request,
    state: StateDep,
    session: SessionDep,
    principal: SiloDep,
) -> UploadResult:
    """A projection shard (``clues.projection/1``: ids + fp16 matrix + spec) of part ``part`` at ``checkpoint``.

    Re-sending the same bytes is a no-op (200); other bytes for a held shard are refused (409)."""
    silo = principal.silo
    job = job_for(session, job_id, principal)
    lifecycle.refuse_if_local(job, "nothing per-sample is uploaded")
    require_status(job, "open")
    member = repo.get_member(session, job_id=job_id, silo_id=silo.id)
    ckpt = checkpoint_of(job, checkpoint)
    sha = expected_sha256(request)
    key = {"job_id": job_id, "owner": silo.name, "part": part}
    same = repo.get_shard(session, checkpoint=checkpoint, role="candidate", **key)
    if already_held(same.blob_key if same else None, sha, f"shard (checkpoint {checkpoint}, part {part})"):
        return upload_answer(sha, same.size_bytes, False)
    if member.status == "complete":
        raise ConflictError(f"silo {silo.name} already completed its upload for job {job_id}")
    spec = ProjectionSpec.from_dict(job.projection)
    needs = signals_needed(JobSpec.of(job), checkpoint)
    part_ids = repo.part_sample_ids(session, **key)  # the ids this part holds at another checkpoint, if any

    def validate(path: Path) -> list[str]:
        where = f"shard ckpt {checkpoint} part {part}"
        proj, losses, signals = map_projection(path, where=where, check_finite=True)  # no copy: pages are cached
        missing = [name for name in needs if (losses if name == "losses" else signals.get(name)) is None]
        if missing:
            raise DataError(
                f"{where}: {', '.join(repr(m) for m in missing)} missing; job {job_id} asks each silo for "
                f"{' and '.join(needs)} at checkpoint {checkpoint} (an agent that predates the signals?)"
            )
        if proj.spec != spec:
            raise DataError(f"{where}: projection spec {proj.spec.to_json()} differs from the job's {spec.to_json()}")
        if proj.role != "candidate":
            raise DataError(f"{where}: role must be 'candidate', got {proj.role!r}")
        if proj.checkpoint != checkpoint:
            raise DataError(f"{where}: the file is for checkpoint {proj.checkpoint}")
        if not math.isclose(proj.lr, ckpt.lr, rel_tol=LR_REL_TOL):
            raise DataError(f"{where}: lr {proj.lr} differs from the job's {ckpt.lr}")
        if proj.preconditioned != job.precondition:
            raise DataError(f"{where}: preconditioned={proj.preconditioned}, the job asks {job.precondition}")
        if len(proj) == 0:
            raise DataError(f"{where}: no rows")
        ids = list(proj.ids)
        if part_ids is not None:
            _check_same_ids(ids, *part_ids, part, where)
        return ids

    def record(ids: list[str], size: int) -> bool:  # an id already in another part: ConflictError -> 409
        _, created = repo.add_shard(
            session, checkpoint=checkpoint, role="candidate", sample_ids=ids, blob_key=sha, size_bytes=size, **key
        )
        return created

    ref, _, created = await receive(request, state, "shard", sha, validate, record)
    session.commit()
    return upload_answer(ref.key, ref.size, created)


def signals_needed(spec: JobSpec, checkpoint: int) -> list[str]:
    """The per-sample tensors a shard of ``checkpoint`` must carry under the job ``spec``: at the signal checkpoint,
    ``losses`` (ℓ(y|x)) when the job is calibrated or asks for signals, and each signal it asks for; elsewhere
    none (the losses stay optional, as for a pure trace job)."""
    if checkpoint != spec.signal_index or not spec.keeps_values:
        return []
    return ["losses", *spec.signals]


def _check_same_ids(ids: list[str], other_checkpoint: int, known: list[str], part: int, where: str) -> None:
    """Part ``part`` must hold the same ids, in the same order, at every checkpoint."""
    if ids != known:
        held = set(known)
        unknown = [i for i in ids if i not in held][:5]
        raise DataError(
            f"{where}: ids differ from part {part} at checkpoint {other_checkpoint}"
            + (f" (unknown ids {unknown})" if unknown else " (order or missing ids)")
        )


@router.get("/{job_id}/shards", operation_id="list_shards")
def list_shards(job_id: JobId, session: SessionDep, principal: SiloDep) -> list[ShardPublic]:
    """The shards this silo has uploaded (to resume an interrupted upload)."""
    job_for(session, job_id, principal)
    shards = repo.list_shards(session, job_id=job_id, owner=principal.silo.name)
    return [ShardPublic(checkpoint=s.checkpoint, part=s.part, rows=s.row_count, sha256=s.blob_key) for s in shards]


@router.get(
    "/{job_id}/reference",
    operation_id="download_reference",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_reference(job_id: JobId, state: StateDep, session: SessionDep, principal: PrincipalDep) -> FileResponse:
    """A silo-local job's reference (``clues.reference/1``: the anchor directions, learning rates, the anchors'
    calibration, the threshold and the histogram bins; SHA-256 in the header). 409 until the anchor step has
    published it, and for a shared job."""
    key = local.reference_key(job_for(session, job_id, principal))
    state.blobs.verify(key)
    return FileResponse(
        state.blobs.path(key),
        media_type="application/octet-stream",
        headers={SHA256_HEADER: key},
        filename=f"{job_id}-reference.safetensors",
    )


@router.put(
    "/{job_id}/aggregate",
    status_code=201,
    operation_id="send_aggregate",
    responses={200: {"model": JobPublic, "description": "the same aggregate was recorded before"}},
)
def send_aggregate(
    job_id: JobId, body: LocalAggregate, response: Response, session: SessionDep, principal: SiloDep
) -> JobPublic:
    """This silo's aggregate in a silo-local job (all it sends): kept count, total and the histogram of its scores
    on the reference's bins. 201 when recorded, 200 when the same aggregate was recorded before, 409 for another one
    or a shared job; the job is ``done`` once every silo has sent its aggregate."""
    job = job_for(session, job_id, principal)
    response.status_code = 201 if local.record_aggregate(session, job, principal.silo, body) else 200
    session.refresh(job)
    return job_public(job, principal, session)


@router.post("/{job_id}/complete", operation_id="complete_upload")
def complete_upload(job_id: JobId, state: StateDep, session: SessionDep, principal: SiloDep) -> JobPublic:
    """Mark this silo's upload complete: every checkpoint must hold the same parts. Starts scoring when the job says
    ``auto_score`` and this was the last silo."""
    job = job_for(session, job_id, principal)
    lifecycle.complete_upload(state, session, job, principal.silo)
    return job_public(job, principal, session)
