"""A scoring job made from a finished warmup: checkpoint t is the global adapter after checkpoint round r_t, with
that round's learning rate as η_t, and the projection spec hashes the warmup's adapter layout."""

from __future__ import annotations

import math

from app.deps import AppState
from app.schemas import ScoringFromWarmup
from app.services.jobs import engine_check
from scoring.config import LocalTrainConfig, ProjectionSpec, parameter_layout_hash
from scoring.errors import ConfigError
from scoring.io import CheckpointBundle, bundle_to_bytes, read_bundle
from scoring.local_scoring import check_local_threshold
from scoring.selection import check_score_preconditioning, check_threshold_preconditioning, threshold_from_dict
from storage import repository as repo
from storage.errors import ConflictError
from storage.models import Job, TrainJob


def scoring_job_from_warmup(state: AppState, session, warm: TrainJob, body: ScoringFromWarmup) -> Job:
    """A new scoring job (``draft``, its checkpoints uploaded) from the warmup job ``warm``: ``ConflictError`` unless
    ``warm`` is a finished warmup, ``ConfigError`` naming the field for settings the engine refuses."""
    job_id = warm.id
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
    check_local_threshold(body.scoring_mode, policy)
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
    return job
