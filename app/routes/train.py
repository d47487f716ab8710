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

from app.deps import AdminDep, AppState, PrincipalDep, Round, SessionDep, SiloDep, StateDep, TrainId, WithdrawalId
from app.openapi import BINARY
from app.schemas import (
    JobPublic,
    ScoringFromWarmup,
    TrainCreate,
    TrainPublic,
    UploadResult,
    WithdrawalCreate,
    WithdrawalPublic,
)
from app.services import training as lifecycle
from app.services.jobs import job_public
from app.services.training import train_for, train_public, train_settings
from app.services.warmup import scoring_job_from_warmup
from app.services.withdrawal import accept_update, queue_remerge, withdraw, withdrawal_public
from app.uploads import SHA256_HEADER, already_held, expected_sha256, receive, upload_answer
from scoring.config import (
    parameter_layout_hash,
)
from scoring.data import read_samples
from scoring.errors import DataError
from scoring.federated.adapter_rounds import silo_rank
from scoring.federated.lora_algebra import update_layout
from scoring.io import read_bundle
from storage import repository as repo
from storage.errors import ConflictError, NotFoundError
from storage.models import utcnow
from wire import API_PREFIX
from workers import names

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


@router.get("/withdrawals", operation_id="list_all_withdrawals")
def list_all_withdrawals(session: SessionDep, principal: PrincipalDep) -> list[WithdrawalPublic]:
    """Every withdrawal from any training job, oldest first: all for the admin, a silo's own for a silo (its
    dashboard shows them, including those from jobs it has left)."""
    mine = None if principal.is_admin else principal.silo.name
    return [withdrawal_public(w) for w in repo.list_withdrawals(session, silo=mine)]


@router.get("/{job_id}", operation_id="get_train_job")
def get_train_job(job_id: TrainId, state: StateDep, session: SessionDep, principal: PrincipalDep) -> TrainPublic:
    """The job, its rounds (with evaluation) and the final metrics. A round found open past its deadline is handed
    to the workers again (in case its deadline task was lost)."""
    job = train_for(session, job_id, principal)
    if job.status == "running":
        row = repo.get_round(session, job_id=job_id, round=job.round)
        if row.status == "open" and utcnow() > row.deadline:
            lifecycle.nudge(state, names.TRAIN_AGGREGATE, job_id, job.round)
    return train_public(job, principal, session)


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
    lifecycle.start(state, session, job)
    return train_public(job, principal, session)


@router.post("/{job_id}/retry", status_code=202, operation_id="retry_train_job")
def retry_train_job(job_id: TrainId, state: StateDep, session: SessionDep, principal: AdminDep) -> TrainPublic:
    """Send the step this training job waits for again: its start, its open round's aggregation (at the deadline
    if not all updates are in) or its evaluation. A ``failed`` job whose last step failed (an error in a worker, or
    a worker that kept dying) goes back to that step. Idempotent: a step that a live worker is running is left
    alone. Answers 409 when there is nothing to retry (draft, done, or failed for want of a quorum)."""
    job = repo.get_train_job(session, job_id=job_id)
    lifecycle.retry(state, session, job)
    return train_public(job, principal, session)


def update_validator(job, index: int, where: str, silo: str | None = None):
    """What checks an uploaded update bundle of round ``index`` from ``silo``: the layout its aggregation kind
    expects of it (`scoring.federated.lora_algebra.update_layout`: the job's, the silo's own rank under ``stack``,
    R only under ``shared-basis``), no Adam moments, an ``update`` field for that round with ``num_samples`` ≥ 1;
    returns the field."""
    aggregation = job.settings.get("aggregation") or {}
    kind = aggregation.get("kind", "fedavg")
    rank = silo_rank(job.settings, silo)
    layout = update_layout(kind, job.layout, rank)
    param_hash = parameter_layout_hash(layout)
    param_count = sum(math.prod(shape) for _, shape in layout)

    expected = {"stack": f"this silo's own rank-{rank} adapter", "shared-basis": "the R matrices only"}

    def validate(path: Path) -> dict[str, Any]:
        try:
            bundle = read_bundle(path.read_bytes(), param_hash, param_count, where)
        except DataError as exc:
            if kind not in expected or "'layout'" not in str(exc):
                raise
            raise DataError(f"{exc}; aggregation kind {kind!r} takes {expected[kind]}") from None
        if bundle.has_moments:
            raise DataError(f"{where}: carries Adam moments; they stay in the silo (send the adapter only)")
        if bundle.update is None:
            raise DataError(f"{where}: metadata field 'update' is missing (round, num_samples, score_mass, train_loss)")
        if bundle.update["round"] != index:
            raise DataError(f"{where}: the bundle says round {bundle.update['round']}")
        if bundle.update["num_samples"] < 1:
            raise DataError(f"{where}: num_samples must be at least 1")
        return bundle.update

    return validate


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
    row = lifecycle.round_of(session, job, index)
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
    if any(w.status == "pending" for w in repo.list_withdrawals(session, job_id=job_id)):
        raise ConflictError(f"training job {job_id}: a silo is being withdrawn; its adapter is merged again first")
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
    lifecycle.require_open_round(state, session, job, index)
    validate = update_validator(job, index, f"update for round {index}", silo.name)

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
            privacy=update.get("privacy"),
        )

    ref, _, created = await receive(request, state, "update", sha, validate, record)
    session.commit()
    if len(repo.list_updates(session, job_id=job_id, round=index)) == len(job.members):
        lifecycle.nudge(state, names.TRAIN_AGGREGATE, job_id, index)  # the deadline task would do it otherwise
    return upload_answer(ref.key, ref.size, created)


@router.post("/{job_id}/scoring-job", status_code=201, operation_id="create_scoring_job_from_warmup")
def create_scoring_job(
    job_id: TrainId, body: ScoringFromWarmup, state: StateDep, session: SessionDep, principal: AdminDep
) -> JobPublic:
    """A scoring job (``draft``, checkpoints uploaded) from a finished warmup job: checkpoint t is the global
    adapter after checkpoint round r_t with that round's learning rate as η_t. Upload the anchor set and open it
    as any other job. With ``precondition`` each silo uses the Adam moments of its own warmup training."""
    job = scoring_job_from_warmup(state, session, repo.get_train_job(session, job_id=job_id), body)
    return job_public(job, principal, session)


@router.post("/{job_id}/withdrawals", status_code=202, operation_id="withdraw_from_train_job")
def withdraw_from_train_job(
    job_id: TrainId, body: WithdrawalCreate, state: StateDep, session: SessionDep, principal: PrincipalDep
) -> WithdrawalPublic:
    """Withdraw a silo, or some of its samples, from the job (docs/withdrawal.md): the admin names the silo, a member
    silo withdraws itself. A finished merge job is merged again without the silo by a worker (``pending``, then
    ``done``; the final adapter is not served meanwhile); with ``sample_ids`` it waits (``pending``) for the silo's
    retrained adapter (``PUT .../withdrawals/{id}/update``) first. A federated or warmup job gets a new draft job
    without the silo (``report.new_job``: a full retrain). ``report`` says how exact the result is and what upstream
    used the silo's data. 422 for sample ids of a federated or warmup job and for merge kinds without exact
    withdrawal."""
    job = train_for(session, job_id, principal)
    return withdrawal_public(withdraw(state, session, job, principal, body))


@router.put(
    "/{job_id}/withdrawals/{withdrawal_id}/update",
    operation_id="upload_withdrawal_update",
    openapi_extra={"requestBody": BINARY},
    responses={201: {"model": UploadResult}},
)
async def upload_withdrawal_update(
    job_id: TrainId, withdrawal_id: WithdrawalId, request: Request, state: StateDep, session: SessionDep,
    principal: SiloDep,
) -> UploadResult:  # fmt: skip
    """This silo's adapter retrained without the samples of its pending withdrawal ``withdrawal_id`` (a merge job):
    the same layout as the job's, no Adam moments, ``update.round`` 0. The re-merge is then queued. Re-sending the
    same bytes answers 200; other bytes once one is in, or a withdrawal that is not this silo's pending sample
    withdrawal, 409."""
    job = train_for(session, job_id, principal)
    withdrawal = repo.get_withdrawal(session, withdrawal_id=withdrawal_id)
    if withdrawal.job_id != job_id or withdrawal.silo != principal.silo.name or withdrawal.sample_ids is None:
        raise NotFoundError(f"withdrawal {withdrawal_id} of {principal.silo.name} from training job {job_id} not found")
    sha = expected_sha256(request)
    held = (withdrawal.report.get("update") or {}).get("sha256")
    if already_held(held, sha, f"the retrained adapter of withdrawal {withdrawal_id}"):
        return upload_answer(sha, withdrawal.report["update"]["size_bytes"], False)
    if withdrawal.status != "pending":
        raise ConflictError(f"withdrawal {withdrawal_id} is {withdrawal.status!r}; it takes no adapter now")
    validate = update_validator(job, 0, f"retrained adapter of withdrawal {withdrawal_id}")

    def record(update: dict[str, Any], size: int) -> bool:
        accept_update(session, withdrawal_id, sha, size, update)
        return True

    ref, _, created = await receive(request, state, "update", sha, validate, record)
    session.commit()
    queue_remerge(state, session, job_id, withdrawal_id)
    return upload_answer(ref.key, ref.size, created)


@router.get("/{job_id}/withdrawals", operation_id="list_train_withdrawals")
def list_train_withdrawals(job_id: TrainId, session: SessionDep, principal: PrincipalDep) -> list[WithdrawalPublic]:
    """The job's withdrawals, oldest first (the audit record): all of them for the admin, a silo's own for a silo
    (which may read them after it left the job)."""
    if principal.is_admin:
        repo.get_train_job(session, job_id=job_id)
        return [withdrawal_public(w) for w in repo.list_withdrawals(session, job_id=job_id)]
    rows = repo.list_withdrawals(session, job_id=job_id, silo=principal.silo.name)
    if not rows:
        train_for(session, job_id, principal)  # 404 unless a member
    return [withdrawal_public(w) for w in rows]
