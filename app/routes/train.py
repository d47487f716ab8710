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
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from app.deps import AdminDep, AppState, Principal, PrincipalDep, SessionDep, SiloDep, StateDep
from app.errors import ApiError
from app.metrics import TASKS
from app.routes.jobs import BINARY, _engine_check, _public, _transition, _upload_answer, steps_public
from app.schemas import (
    JobPublic,
    RoundFlag,
    RoundPublic,
    ScoringFromWarmup,
    TrainCreate,
    TrainMemberPublic,
    TrainPublic,
    UploadResult,
)
from app.uploads import SHA256_HEADER, already_held, expected_sha256, receive
from scoring.aggregation import GUARD_FIELDS, RoundGuard, build_aggregator
from scoring.config import DENSITY_MERGE_KINDS, LocalTrainConfig, LoraSettings, ProjectionSpec, parameter_layout_hash
from scoring.data import read_samples
from scoring.errors import ConfigError, DataError
from scoring.io import CheckpointBundle, bundle_to_bytes, read_bundle
from scoring.selection import check_score_preconditioning, check_threshold_preconditioning, threshold_from_dict
from storage import repository as repo
from storage import steps as leases
from storage.models import TrainJob, TrainRound, utcnow
from workers import names

router = APIRouter(prefix="/v1/train", tags=["training"])

TrainId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="the training job id")]
Round = Annotated[int, PathParam(ge=0, le=100_000)]
MAX_CHECKPOINTS = 4
"""Default number of warmup rounds that become scoring checkpoints (evenly spaced, the last round included)."""


def default_checkpoint_rounds(rounds: int, count: int = MAX_CHECKPOINTS) -> list[int]:
    """Up to ``count`` evenly spaced rounds ending with the last one."""
    count = min(count, rounds)
    return sorted({round(rounds * (i + 1) / count) - 1 for i in range(count)})


def _train_for(session, job_id: str, principal: Principal) -> TrainJob:
    job = repo.get_train_job(session, job_id=job_id)
    if not principal.is_admin and all(m.silo_id != principal.silo.id for m in job.members):
        raise ApiError(404, f"training job '{job_id}' does not exist")  # as for a job that does not
    return job


def _round_public(row: TrainRound, received: list[str], mine: str | None) -> RoundPublic:
    """A round as ``mine`` (a silo's name; None: the admin) may see it: a silo sees itself among the received and
    the participants, and only its own guard flags; the admin sees everything, with the clip bound."""
    guard = row.guard or {}
    flags = [RoundFlag(**f) for f in guard.get("flags", []) if mine in (None, f["silo"])]
    participants = (
        row.participants if mine is None or row.participants is None else [p for p in row.participants if p == mine]
    )
    return RoundPublic(
        round=row.round,
        lr=row.lr,
        status=row.status,
        deadline=row.deadline,
        started_at=row.started_at,
        closed_at=row.closed_at,
        received=received,
        participants=participants,
        flags=flags,
        clip_bound=guard.get("figures", {}).get("clip_bound") if mine is None else None,
        train_loss=row.train_loss,
        metrics=row.metrics,
        start_sha256=row.start_blob,
        result_sha256=row.result_blob,
    )


def _train_public(job: TrainJob, principal: Principal, session) -> TrainPublic:
    mine = None if principal.is_admin else principal.silo.name
    history = []
    for row in repo.list_rounds(session, job_id=job.id):
        received = [u.silo.name for u in repo.list_updates(session, job_id=job.id, round=row.round)]
        history.append(_round_public(row, [n for n in received if mine in (None, n)], mine))
    members = [m for m in job.members if mine in (None, m.silo.name)]
    return TrainPublic(
        id=job.id,
        name=job.name,
        mode=job.mode,
        status=job.status,
        round=job.round,
        rounds=job.rounds,
        progress=job.progress,
        message=job.message,
        error=job.error,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        spec=train_spec(job),
        silos=[TrainMemberPublic(name=m.silo.name, num_samples=m.num_samples) for m in members],
        history=history,
        metrics=job.metrics,
        eval_samples=job.eval_num_samples,
        final_sha256=job.final_blob,
        steps=steps_public(session, job.id) if principal.is_admin else None,
    )


def train_spec(job: TrainJob) -> dict[str, Any]:
    """What every silo trains under: the job's settings plus its mode, model, quorum and deadline length."""
    return {
        "mode": job.mode,
        "model": job.model,
        **job.settings,
        "rounds": job.rounds,
        "quorum": job.quorum,
        "round_timeout_s": job.round_timeout_s,
    }


def _settings_from(body: TrainCreate, session) -> tuple[str, dict[str, Any], str | None]:
    """(model, settings, scoring job id) of a new job: defaults filled in from the scoring job, every part checked
    by the engine's own config classes (422 naming the field)."""
    selection = body.selection.model_dump() if body.selection else None
    if selection is None:
        if body.mode != "warmup":
            raise ApiError(422, "selection: required for federated and merge jobs (e.g. {'source': 'selected'})")
        selection = {"source": "fraction", "fraction": 0.05, "seed": 0, "scoring_job": None}
    scoring_job = selection.get("scoring_job")
    if selection["source"] in ("selected", "random") and scoring_job is None:
        raise ApiError(422, f"selection.scoring_job: source {selection['source']!r} needs a finished scoring job")
    base: dict[str, Any] = {}
    if scoring_job is not None:
        scored = repo.get_job(session, job_id=scoring_job)
        if scored.status != "done":
            raise ApiError(409, f"selection.scoring_job: job {scoring_job} is {scored.status!r}, not 'done'")
        members = {m.silo.name for m in scored.members}
        outside = [s for s in body.silos if s not in members]
        if outside:
            raise ApiError(422, f"silos: {outside} took no part in scoring job {scoring_job}")
        spec = scored.spec()
        base = {k: spec[k] for k in ("model", "lora", "lora_init_seed", "max_len", "template")}
    model = body.model or base.get("model")
    if model is None:
        raise ApiError(422, "model: required when no selection.scoring_job gives it")
    lora = body.lora.model_dump() if body.lora else base.get("lora", LoraSettings().to_dict())
    _engine_check("lora", lambda: LoraSettings.from_dict(lora))
    _engine_check("local", lambda: LocalTrainConfig.from_dict(body.local.model_dump()))
    aggregation = {k: v for k, v in body.aggregation.model_dump().items() if v is not None}
    rule = aggregation.pop("rule")
    if rule == "fedprox" and body.local.prox_mu <= 0:
        raise ApiError(422, "aggregation.rule: 'fedprox' needs local.prox_mu > 0 (the silos' proximal term)")
    if rule == "quality-fedavg" and scoring_job is None:
        raise ApiError(422, "aggregation.rule: 'quality-fedavg' weighs by score mass and needs selection.scoring_job")
    options = {k: v for k, v in aggregation.items() if k not in GUARD_FIELDS}
    _engine_check("aggregation", lambda: build_aggregator("fedavg" if rule == "fedprox" else rule, **options))
    _engine_check("aggregation", lambda: RoundGuard.from_dict(aggregation))
    merge = body.merge.model_dump()
    if body.mode == "merge":
        if body.rounds != 1:
            raise ApiError(422, "rounds: a merge job has exactly one round (each silo trains once)")
        if merge["kind"] in DENSITY_MERGE_KINDS and merge["density"] is None:
            raise ApiError(422, f"merge.density: kind {merge['kind']!r} needs a density in (0, 1]")
    checkpoint_rounds = body.checkpoint_rounds
    if body.mode == "warmup":
        checkpoint_rounds = checkpoint_rounds or default_checkpoint_rounds(body.rounds)
        bad = [r for r in checkpoint_rounds if not 0 <= r < body.rounds]
        if bad or len(set(checkpoint_rounds)) != len(checkpoint_rounds):
            raise ApiError(
                422, f"checkpoint_rounds: need distinct rounds in 0..{body.rounds - 1}, got {bad or 'repeats'}"
            )
        checkpoint_rounds = sorted(checkpoint_rounds)
    elif checkpoint_rounds is not None:
        raise ApiError(422, "checkpoint_rounds: only warmup jobs make scoring checkpoints")
    if body.quorum is not None and body.quorum > len(body.silos):
        raise ApiError(422, f"quorum: {body.quorum} exceeds the {len(body.silos)} silos")
    settings = {
        "lora": lora,
        "lora_init_seed": body.lora_init_seed if body.lora_init_seed is not None else base.get("lora_init_seed", 0),
        "random_b": body.random_b if body.random_b is not None else body.mode == "warmup",
        "max_len": body.max_len or base.get("max_len", 768),
        "template": body.template or base.get("template", "auto"),
        "local": LocalTrainConfig.from_dict(body.local.model_dump()).to_dict(),
        "aggregation": {"rule": rule, **aggregation},
        "merge": merge,
        "selection": selection,
        "checkpoint_rounds": checkpoint_rounds,
        "evaluation": body.evaluation.model_dump(),
    }
    return model, settings, scoring_job


@router.post("", status_code=201, operation_id="create_train_job")
def create_train_job(body: TrainCreate, session: SessionDep, principal: AdminDep) -> TrainPublic:
    """Create a training job in ``draft``."""
    model, settings, scoring_job = _settings_from(body, session)
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
    return _train_public(job, principal, session)


@router.get("", operation_id="list_train_jobs")
def list_train_jobs(session: SessionDep, principal: PrincipalDep) -> list[TrainPublic]:
    """All training jobs (admin), or those a silo is a member of."""
    jobs = repo.list_train_jobs(session, silo_id=None if principal.is_admin else principal.silo.id)
    return [_train_public(j, principal, session) for j in jobs]


@router.get("/{job_id}", operation_id="get_train_job")
def get_train_job(job_id: TrainId, state: StateDep, session: SessionDep, principal: PrincipalDep) -> TrainPublic:
    """The job, its rounds (with evaluation) and the final metrics. A round found open past its deadline is handed
    to the workers again (in case its deadline task was lost)."""
    job = _train_for(session, job_id, principal)
    if job.status == "running":
        row = repo.get_round(session, job_id=job_id, round=job.round)
        if row.status == "open" and utcnow() > row.deadline:
            _enqueue_quietly(state, names.TRAIN_AGGREGATE, job_id, job.round)
    return _train_public(job, principal, session)


def _enqueue_quietly(state: AppState, task: str, *args: Any) -> None:
    """Queue a nudge that is safe to repeat; an unreachable queue is not the caller's problem here."""
    try:
        state.enqueue(task, *args)
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
        raise ApiError(409, f"training job {job_id} is {job.status!r}; the evaluation set is set in 'draft'")
    sha = expected_sha256(request)
    if already_held(job.eval_blob, sha, f"the evaluation set of training job {job_id}"):
        return _upload_answer(sha, None, False)

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
    return _upload_answer(ref.key, ref.size, created)


@router.post("/{job_id}/start", status_code=202, operation_id="start_train_job")
def start_train_job(job_id: TrainId, state: StateDep, session: SessionDep, principal: AdminDep) -> TrainPublic:
    """``draft`` → ``starting``: a worker builds the initial adapter and opens round 0."""
    job = repo.get_train_job(session, job_id=job_id)
    if job.status == "draft" or (job.status == "failed" and job.layout is None):
        _transition(
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
        raise ApiError(409, f"training job {job_id} is {job.status!r}")
    return _train_public(job, principal, session)


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
    elif job.status in ("starting", "running", "evaluating"):
        task = {"starting": names.TRAIN_INIT, "running": names.TRAIN_AGGREGATE, "evaluating": names.TRAIN_EVALUATE}
        task, args, force = task[job.status], ([] if job.status == "starting" else [job.round]), False
    else:
        raise ApiError(409, f"training job {job_id} is {job.status!r}: nothing to retry ({job.error or 'no error'})")
    countdown = None
    if task == names.TRAIN_AGGREGATE:
        row = repo.get_round(session, job_id=job_id, round=args[0])
        if row.status == "open":
            countdown = max(0.0, (row.deadline - utcnow()).total_seconds())
    try:
        if state.dispatcher is not None:
            state.dispatcher.enqueue(task, job_id, *args, countdown=countdown, force=force)
        else:
            state.enqueue(task, job_id, *args, countdown=countdown)
    except Exception as exc:
        raise ApiError(503, f"the task queue is unreachable ({type(exc).__name__}: {exc}); try again") from exc
    TASKS.labels(task).inc()
    session.refresh(job)
    return _train_public(job, principal, session)


def _round_for(session, job: TrainJob, index: int) -> TrainRound:
    if job.layout is None:
        raise ApiError(409, f"training job {job.id} is {job.status!r}: round 0 is not open yet")
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
    job = _train_for(session, job_id, principal)
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
    job = _train_for(session, job_id, principal)
    if job.final_blob is None:
        raise ApiError(409, f"training job {job_id} is {job.status!r}; the final adapter exists after the last round")
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
    job = _train_for(session, job_id, principal)
    sha = expected_sha256(request)
    held = repo.get_update(session, job_id=job_id, round=index, silo_id=silo.id)
    if already_held(held.blob_key if held else None, sha, f"the update of {silo.name} for round {index}"):
        return _upload_answer(sha, held.size_bytes, False)
    if job.layout is not None and index > job.round:  # a round not opened yet: refused like a closed one
        raise ApiError(409, f"round {index} of training job {job_id} is not open (round {job.round} is the latest)")
    row = _round_for(session, job, index)
    if job.status != "running" or row.status != "open" or index != job.round:
        raise ApiError(409, f"round {index} of training job {job_id} is closed ({row.status}); late update refused")
    if utcnow() > row.deadline:
        _enqueue_quietly(state, names.TRAIN_AGGREGATE, job_id, index)
        raise ApiError(409, f"round {index} of training job {job_id} passed its deadline {row.deadline.isoformat()}")
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
            raise ApiError(409, f"round {index} of training job {job_id} closed during the upload; late update refused")
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
    return _upload_answer(ref.key, ref.size, created)


@router.post("/{job_id}/scoring-job", status_code=201, operation_id="create_scoring_job_from_warmup")
def create_scoring_job(
    job_id: TrainId, body: ScoringFromWarmup, state: StateDep, session: SessionDep, principal: AdminDep
) -> JobPublic:
    """A scoring job (``draft``, checkpoints uploaded) from a finished warmup job: checkpoint t is the global
    adapter after checkpoint round r_t with that round's learning rate as η_t. Upload the anchor set and open it
    as any other job. With ``precondition`` each silo uses the Adam moments of its own warmup training."""
    warm = repo.get_train_job(session, job_id=job_id)
    if warm.mode != "warmup" or warm.final_blob is None:
        raise ApiError(409, f"training job {job_id} is a {warm.mode} job in {warm.status!r}; need a finished warmup")
    settings = warm.settings
    silos = body.silos or [m.silo.name for m in warm.members]
    outside = sorted(set(silos) - {m.silo.name for m in warm.members})
    if body.precondition and outside:
        raise ApiError(422, f"silos: {outside} did not take part in the warmup, so they hold no Adam moments")
    layout = [(name, tuple(shape)) for name, shape in warm.layout]
    projection = {
        **body.projection,
        "param_hash": parameter_layout_hash(layout),
        "param_count": sum(math.prod(shape) for _, shape in layout),
    }
    _engine_check("projection", lambda: ProjectionSpec.from_dict(projection))
    policy = _engine_check("threshold", lambda: threshold_from_dict(body.threshold))
    score = body.score_options(len(settings["checkpoint_rounds"]))  # ConfigError naming the field: 422
    # each silo preconditions with its own warmup moments; the coordinator has none for its anchor samples
    try:
        check_score_preconditioning(score["score"], body.precondition, False)
        check_threshold_preconditioning(policy, body.precondition, False)
    except ConfigError as exc:
        raise ApiError(422, str(exc)) from exc
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
    return _public(job, principal, session)


def resume_training(state: AppState) -> int:
    """On start-up, hand the workers every training step a restart may have orphaned (a lost broker message):
    the open round's deadline check of each running job (at its deadline), the start of each starting job, the
    final evaluation of each evaluating job. Every one is idempotent. Returns the number of tasks queued."""
    queued = 0
    with state.sessions() as session:
        for job in repo.list_train_jobs(session):
            if job.status == "running":
                row = repo.get_round(session, job_id=job.id, round=job.round)
                if row.status in ("open", "aggregating"):
                    delay = max(0.0, (row.deadline - utcnow()).total_seconds()) if row.status == "open" else 0.0
                    state.enqueue(names.TRAIN_AGGREGATE, job.id, job.round, countdown=delay + 1.0)
                    queued += 1
            elif job.status == "starting":
                state.enqueue(names.TRAIN_INIT, job.id)
                queued += 1
            elif job.status == "evaluating":
                state.enqueue(names.TRAIN_EVALUATE, job.id, job.round)
                queued += 1
    return queued
