"""Training jobs: federated warmup (its rounds become scoring checkpoints), federated training and one-shot merging
on the selected samples.

The round protocol (docs/training.md): the admin creates a job (``draft``), may upload a held-out evaluation set,
and starts it; a worker builds the initial adapter and opens round 0. Each member silo downloads the round's global
adapter, trains locally and uploads its adapter (a ``clues.checkpoint/1`` bundle without Adam moments, whose
``update`` field says the round, its sample count, score mass and loss). The round is aggregated once every member
has sent one, or at its deadline with at least ``quorum`` updates; a late update is refused with 409.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from app.deps import AdminDep, AppState, PrincipalDep, Round, SessionDep, SiloDep, StateDep, TrainId
from app.metrics import TASKS
from app.openapi import BINARY
from app.schemas import (
    JobPublic,
    ScoringFromWarmup,
    TrainCreate,
    TrainPublic,
    UploadResult,
)
from app.services import QueueUnavailable
from app.services.jobs import engine_check, job_public, transition
from app.services.training import train_for, train_public, train_settings
from app.uploads import SHA256_HEADER, already_held, expected_sha256, receive, upload_answer
from scoring.config import (
    LocalTrainConfig,
    ProjectionSpec,
    parameter_layout_hash,
)
from scoring.data import read_samples
from scoring.errors import ConfigError, DataError
from scoring.io import CheckpointBundle, bundle_to_bytes, read_bundle
from scoring.selection import check_score_preconditioning, check_threshold_preconditioning, threshold_from_dict
from storage import repository as repo
from storage import steps as leases
from storage.errors import ConflictError
from storage.models import TrainJob, TrainRound, utcnow
from wire import API_PREFIX
from workers import names
from workers.steps import train_waits_for

router = APIRouter(prefix=f"{API_PREFIX}/train", tags=["training"])


@router.post("", status_code=201, operation_id="create_train_job")
def create_train_job(body: TrainCreate, session: SessionDep, principal: AdminDep) -> TrainPublic:
    """Create a training job in ``draft``."""
    model, settings, scoring_job = train_settings(body, session)
    job = repo.create_train_job(
        session,
        name=body.name,
        mode=body.mode,
        model=model,
        settings=settings,
        rounds=body.rounds,
        quorum=body.quorum or len(body.silos),
        round_timeout_s=body.round_timeout_s,
        scoring_job_id=scoring_job,
        silo_names=body.silos,
    )
    session.commit()
    session.refresh(job)
    return train_public(job, principal, session)


@router.get("", operation_id="list_train_jobs")
def list_train_jobs(session: SessionDep, principal: PrincipalDep) -> list[TrainPublic]:
    """All training jobs (admin), or those a silo is a member of."""
    jobs = repo.list_train_jobs(session, silo_id=None if principal.is_admin else principal.silo.id)
    return [train_public(j, principal, session) for j in jobs]


@router.get("/{job_id}", operation_id="get_train_job")
def get_train_job(job_id: TrainId, state: StateDep, session: SessionDep, principal: PrincipalDep) -> TrainPublic:
    """The job, its rounds (with evaluation) and the final metrics. A round found open past its deadline is handed
    to the workers again (in case its deadline task was lost)."""
    job = train_for(session, job_id, principal)
    if job.status == "running":
        row = repo.get_round(session, job_id=job_id, round=job.round)
        if row.status == "open" and utcnow() > row.deadline:
            _enqueue_quietly(state, names.TRAIN_AGGREGATE, job_id, job.round)
    return train_public(job, principal, session)


def _enqueue_quietly(state: AppState, task: str, *args: Any) -> None:
    """Queue a nudge that is safe to repeat; an unreachable queue is not the caller's problem here."""
    try:
        state.dispatcher.enqueue(task, *args)
        TASKS.labels(task).inc()
    except Exception:
        pass


@router.put(
    "/{job_id}/eval",
    operation_id="upload_eval_set",
    openapi_extra={"requestBody": BINARY},
    responses={201: {"model": UploadResult}},
)
async def upload_eval_set(
    job_id: TrainId, request: Request, state: StateDep, session: SessionDep, _: AdminDep
) -> UploadResult:
    """The held-out evaluation set (JSON/JSONL samples; PubMedQA labels or GSM8K finals in ``meta`` enable those
    metrics). Only in ``draft``."""
    job = repo.get_train_job(session, job_id=job_id)
    if job.status != "draft":
        raise ConflictError(f"training job {job_id} is {job.status!r}; the evaluation set is set in 'draft'")
    sha = expected_sha256(request)
    if already_held(job.eval_blob, sha, f"the evaluation set of training job {job_id}"):
        return upload_answer(sha, None, False)

    def validate(path: Path) -> int:
        try:
            return len(read_samples(path))
        except DataError as exc:
            raise DataError(str(exc).replace(str(path), "eval")) from exc

    def record(count: int, size: int) -> bool:
        if repo.set_eval_set(session, job_id=job_id, blob_key=sha, num_samples=count):
            return True
        already_held(repo.get_train_job(session, job_id=job_id).eval_blob, sha, "the evaluation set")  # 409 if other
        return False

    ref, _, created = await receive(request, state, "eval", sha, validate, record)
    session.commit()
    return upload_answer(ref.key, ref.size, created)


@router.post("/{job_id}/start", status_code=202, operation_id="start_train_job")
def start_train_job(job_id: TrainId, state: StateDep, session: SessionDep, principal: AdminDep) -> TrainPublic:
    """``draft`` → ``starting``: a worker builds the initial adapter and opens round 0."""
    job = repo.get_train_job(session, job_id=job_id)
    if job.status == "draft" or (job.status == "failed" and job.layout is None):
        transition(
            state,
            session,
            job,
            names.TRAIN_INIT,
            update=repo.update_train_job,
            status="starting",
            message="queued",
            error=None,
        )
    elif job.status != "starting" and job.layout is None:
        raise ConflictError(f"training job {job_id} is {job.status!r}")
    return train_public(job, principal, session)


RESUMED_STATUS = {names.TRAIN_INIT: "starting", names.TRAIN_AGGREGATE: "running", names.TRAIN_EVALUATE: "evaluating"}


@router.post("/{job_id}/retry", status_code=202, operation_id="retry_train_job")
def retry_train_job(job_id: TrainId, state: StateDep, session: SessionDep, principal: AdminDep) -> TrainPublic:
    """Send the step this training job waits for again: its start, its open round's aggregation (at the deadline
    if not all updates are in) or its evaluation. A ``failed`` job whose last step failed (an error in a worker, or
    a worker that kept dying) goes back to that step. Idempotent: a step that a live worker is running is left
    alone. Answers 409 when there is nothing to retry (draft, done, or failed for want of a quorum)."""
    job = repo.get_train_job(session, job_id=job_id)
    failed = [s for s in leases.for_job(session, job_id) if s.state == "failed" and s.task in RESUMED_STATUS]
    if job.status == "failed" and failed:
        step = failed[-1]
        task, args, force = step.task, step.args[1:], True
        repo.update_train_job(session, job_id=job_id, status=RESUMED_STATUS[task], error=None, message="retrying")
        session.commit()
        wait = train_waits_for(session, job) if task == names.TRAIN_AGGREGATE else None
        countdown = wait[2] if wait is not None else None  # an open round: its deadline
    elif (wait := train_waits_for(session, job)) is not None:
        (task, (_, *args), countdown), force = wait, False
    else:
        raise ConflictError(f"training job {job_id} is {job.status!r}: nothing to retry ({job.error or 'no error'})")
    try:
        state.dispatcher.enqueue(task, job_id, *args, countdown=countdown, force=force)
    except Exception as exc:
        raise QueueUnavailable(exc) from exc
    TASKS.labels(task).inc()
    session.refresh(job)
    return train_public(job, principal, session)


def _round_for(session, job: TrainJob, index: int) -> TrainRound:
    if job.layout is None:
        raise ConflictError(f"training job {job.id} is {job.status!r}: round 0 is not open yet")
    return repo.get_round(session, job_id=job.id, round=index)


def _bundle_response(key: str, state: AppState, filename: str) -> FileResponse:
    state.blobs.verify(key)
    return FileResponse(
        state.blobs.path(key),
        media_type="application/octet-stream",
        headers={SHA256_HEADER: key},
        filename=filename,
    )


@router.get(
    "/{job_id}/rounds/{index}/adapter",
    operation_id="download_round_adapter",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_round_adapter(
    job_id: TrainId, index: Round, state: StateDep, session: SessionDep, principal: PrincipalDep
) -> FileResponse:
    """The global adapter round ``index`` starts from (a ``clues.checkpoint/1`` bundle; SHA-256 in the header)."""
    job = train_for(session, job_id, principal)
    row = _round_for(session, job, index)
    return _bundle_response(row.start_blob, state, f"{job_id}-round-{index:04d}.safetensors")


@router.get(
    "/{job_id}/adapter",
    operation_id="download_final_adapter",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_final_adapter(job_id: TrainId, state: StateDep, session: SessionDep, principal: PrincipalDep):
    """The final adapter (once the last round is aggregated or merged); ``clues admin train-export`` turns it into
    a peft adapter directory or a merged full model."""
    job = train_for(session, job_id, principal)
    if job.final_blob is None:
        raise ConflictError(f"training job {job_id} is {job.status!r}; the final adapter exists after the last round")
    return _bundle_response(job.final_blob, state, f"{job_id}-final.safetensors")


@router.put(
    "/{job_id}/rounds/{index}/update",
    operation_id="upload_round_update",
    openapi_extra={"requestBody": BINARY},
    responses={201: {"model": UploadResult}},
)
async def upload_round_update(
    job_id: TrainId, index: Round, request: Request, state: StateDep, session: SessionDep, principal: SiloDep
) -> UploadResult:
    """This silo's adapter after local training in round ``index``: same layout as the global adapter, no Adam
    moments, ``update.round`` = ``index`` and ``update.num_samples`` ≥ 1. Re-sending the same bytes answers 200;
    an update for a round that is closed or not open yet, or one past the round's deadline, is refused (409)."""
    silo = principal.silo
    job = train_for(session, job_id, principal)
    sha = expected_sha256(request)
    held = repo.get_update(session, job_id=job_id, round=index, silo_id=silo.id)
    if already_held(held.blob_key if held else None, sha, f"the update of {silo.name} for round {index}"):
        return upload_answer(sha, held.size_bytes, False)
    if job.layout is not None and index > job.round:  # a round not opened yet: refused like a closed one
        raise ConflictError(f"round {index} of training job {job_id} is not open (round {job.round} is the latest)")
    row = _round_for(session, job, index)
    if job.status != "running" or row.status != "open" or index != job.round:
        raise ConflictError(f"round {index} of training job {job_id} is closed ({row.status}); late update refused")
    if utcnow() > row.deadline:
        _enqueue_quietly(state, names.TRAIN_AGGREGATE, job_id, index)
        raise ConflictError(f"round {index} of training job {job_id} passed its deadline {row.deadline.isoformat()}")
    layout = [(name, tuple(shape)) for name, shape in job.layout]
    param_hash = parameter_layout_hash(layout)
    param_count = sum(math.prod(shape) for _, shape in layout)

    def validate(path: Path) -> dict[str, Any]:
        where = f"update for round {index}"
        bundle = read_bundle(path.read_bytes(), param_hash, param_count, where)
        if bundle.has_moments:
            raise DataError(f"{where}: carries Adam moments; they stay in the silo (send the adapter only)")
        if bundle.update is None:
            raise DataError(f"{where}: metadata field 'update' is missing (round, num_samples, score_mass, train_loss)")
        if bundle.update["round"] != index:
            raise DataError(f"{where}: the bundle says round {bundle.update['round']}")
        if bundle.update["num_samples"] < 1:
            raise DataError(f"{where}: num_samples must be at least 1")
        return bundle.update

    def record(update: dict[str, Any], size: int) -> bool:
        if not repo.lock_open_round(session, job_id=job_id, round=index):  # held until the commit below
            raise ConflictError(f"round {index} of training job {job_id} closed during the upload; late update refused")
        return repo.add_update(
            session,
            job_id=job_id,
            round=index,
            silo_id=silo.id,
            blob_key=sha,
            size_bytes=size,
            num_samples=update["num_samples"],
            score_mass=float(update["score_mass"]),
            train_loss=float(update["train_loss"]),
        )

    ref, _, created = await receive(request, state, "update", sha, validate, record)
    session.commit()
    if len(repo.list_updates(session, job_id=job_id, round=index)) == len(job.members):
        _enqueue_quietly(state, names.TRAIN_AGGREGATE, job_id, index)  # the deadline task would do it otherwise
    return upload_answer(ref.key, ref.size, created)


@router.post("/{job_id}/scoring-job", status_code=201, operation_id="create_scoring_job_from_warmup")
def create_scoring_job(
    job_id: TrainId, body: ScoringFromWarmup, state: StateDep, session: SessionDep, principal: AdminDep
) -> JobPublic:
    """A scoring job (``draft``, checkpoints uploaded) from a finished warmup job: checkpoint t is the global
    adapter after checkpoint round r_t with that round's learning rate as η_t. Upload the anchor set and open it
    as any other job. With ``precondition`` each silo uses the Adam moments of its own warmup training."""
    warm = repo.get_train_job(session, job_id=job_id)
    if warm.mode != "warmup" or warm.final_blob is None:
        raise ConflictError(f"training job {job_id} is a {warm.mode} job in {warm.status!r}; need a finished warmup")
    settings = warm.settings
    silos = body.silos or [m.silo.name for m in warm.members]
    outside = sorted(set(silos) - {m.silo.name for m in warm.members})
    if body.precondition and outside:
        raise ConfigError(f"silos: {outside} did not take part in the warmup, so they hold no Adam moments")
    layout = [(name, tuple(shape)) for name, shape in warm.layout]
    projection = {
        **body.projection,
        "param_hash": parameter_layout_hash(layout),
        "param_count": sum(math.prod(shape) for _, shape in layout),
    }
    engine_check("projection", lambda: ProjectionSpec.from_dict(projection))
    policy = engine_check("threshold", lambda: threshold_from_dict(body.threshold))
    score = body.score_options(len(settings["checkpoint_rounds"]))  # ConfigError naming the field: 422
    # each silo preconditions with its own warmup moments; the coordinator has none for its anchor samples
    check_score_preconditioning(score["score"], body.precondition, False)  # ConfigError: 422
    check_threshold_preconditioning(policy, body.precondition, False)
    local = LocalTrainConfig.from_dict(settings["local"])
    rounds = {r.round: r for r in repo.list_rounds(session, job_id=job_id)}
    entries, blobs = [], []
    for t, r in enumerate(settings["checkpoint_rounds"]):
        row = rounds[r]
        entry = {
            "index": t,
            "step": (r + 1) * local.steps,
            "lr": row.lr,
            "lr_last": row.lr,
            "adam": local.adam.to_dict(),
        }
        bundle = read_bundle(state.blobs.read_bytes(row.result_blob), None, None, f"round {r}")
        data = bundle_to_bytes(
            CheckpointBundle(bundle.layout, bundle.adapter, {}, {}, bundle.adapter_config, entry, bundle.dtypes)
        )
        blobs.append(state.blobs.put_bytes(data))
        entries.append(entry)
    job = repo.create_job(
        session,
        name=body.name,
        model=warm.model,
        lora=settings["lora"],
        projection=projection,
        similarity=body.similarity,
        threshold=body.threshold,
        precondition=body.precondition,
        options={
            "lora_init_seed": settings["lora_init_seed"],
            "max_len": settings["max_len"],
            "template": settings["template"],
            "auto_score": body.auto_score,
            "warmup": {"job": job_id, "rounds": settings["checkpoint_rounds"]},
            **score,
        },
        checkpoints=entries,
        silo_names=silos,
    )
    for entry, ref in zip(entries, blobs, strict=True):
        repo.set_checkpoint_blob(session, job_id=job.id, index=entry["index"], blob_key=ref.key, size_bytes=ref.size)
    session.commit()
    session.refresh(job)
    return job_public(job, principal, session)
