"""The worker's side of a silo-local scoring job (`scoring.local_scoring`): publish the reference once the anchor
projections exist (the aggregates the silos send are recorded by the API, `app.services.local_scoring`).

`publish_reference` runs at the end of the anchor step (`workers.pipeline.project_anchors`) of a job whose
``scoring_mode`` is ``local``: it scores the anchor samples against each other exactly as `workers.pipeline.score_job`
does (`workers.pipeline.anchor_values`: the leave-one-out trace and the signal checkpoint's losses), builds the
reference from them and stores it as a blob, recording its key, bin count, threshold and display edges in the
job's options. Idempotent: a stored reference is kept.

An exact job (``gradients: exact``) stores no anchor shards: its anchor step is `publish_exact_reference`, which
streams the anchors' exact gradients (`scoring.exact_scoring`) and stores only the reference.
"""

from __future__ import annotations

from scoring.config import DEFAULT_FUSION, TraceConfig
from scoring.io.reference import reference_to_bytes
from scoring.local_scoring import ScoringReference, build_reference, display_edges
from scoring.selection import threshold_from_dict
from scoring.spec import JobSpec
from scoring.traces import build_anchor_directions, score_anchor_samples
from storage import repository as repo
from workers.pipeline import (
    Progress,
    Resources,
    anchor_precondition,
    anchor_samples,
    anchor_shards,
    anchor_values,
    load_shard,
    materialise_run,
    update_job,
)


def publish_reference(res: Resources, job_id: str) -> str:
    """Build and store the job's `scoring.local_scoring.ScoringReference`; returns its blob key."""
    with res.sessions() as session:
        job = repo.get_job(session, job_id=job_id)
        if job.options.get("reference"):
            return job.options["reference"]
        how = JobSpec.of(job)
        config = TraceConfig(similarity=job.similarity)
        policy = threshold_from_dict(job.threshold)
        anchor_rows = anchor_shards(session, job_id, "anchor")
        anchor_cand_rows = anchor_shards(session, job_id, "candidate")
    anchors = [load_shard(res, s).proj for s in anchor_rows]
    anchor_files = [load_shard(res, s) for s in anchor_cand_rows]
    anchor_table = score_anchor_samples([f.proj for f in anchor_files], anchors, config)
    reference = build_reference(
        build_anchor_directions(anchors, config),
        anchor_values(anchor_files, anchor_table, how),
        score=how.score,
        signals=how.signals,
        fusion=how.fusion or DEFAULT_FUSION,
        policy=policy,
    )
    return _store_reference(res, job_id, reference)


def publish_exact_reference(res: Resources, job_id: str, anchor_key: str, progress: Progress | None = None) -> str:
    """The anchor step of an exact silo-local job (``gradients: exact``): stream the anchor samples' exact gradients
    twice per checkpoint (`scoring.exact_scoring.exact_anchor_values`), build the reference from the directions and
    the anchors' own values, and store it; no anchor shard is stored. Idempotent: a stored reference is kept."""
    with res.sessions() as session:
        job = repo.get_job(session, job_id=job_id)
        key = job.options.get("reference")
        how = JobSpec.of(job)
        policy = threshold_from_dict(job.threshold)
    if key:
        update_job(res, job_id, anchor_status="done")
        return key
    from scoring.exact_scoring import exact_anchor_values
    from scoring.workflow import ModelOptions, ProjectOptions

    update_job(res, job_id, anchor_status="running")
    run_dir = materialise_run(res, job_id)
    settings = res.settings
    directions, values = exact_anchor_values(
        run_dir,
        anchor_samples(res, anchor_key),
        how.similarity,
        ProjectOptions.for_job(
            how, settings.engine, settings.batch_size, precondition=anchor_precondition(run_dir, how.precondition)
        ),
        ModelOptions(device=settings.device, dtype=settings.dtype, cache_dir=settings.model_cache_dir),
        progress=(lambda d, t: progress(d / t, f"anchor gradients {d}/{t}")) if progress else None,
    )
    reference = build_reference(
        directions,
        values,
        score=how.score,
        signals=how.signals,
        fusion=how.fusion or DEFAULT_FUSION,
        policy=policy,
    )
    key = _store_reference(res, job_id, reference)
    update_job(res, job_id, anchor_status="done")
    return key


def _store_reference(res: Resources, job_id: str, reference: ScoringReference) -> str:
    """Store the reference as a blob and record its key, bin count, threshold and display edges in the job's
    options."""
    ref = res.blobs.put_bytes(reference_to_bytes(reference))
    with res.sessions.begin() as session:
        job = repo.get_job(session, job_id=job_id)
        options = {
            **job.options,
            "reference": ref.key,
            "reference_bins": len(reference.bins) - 1,
            "reference_threshold": reference.threshold,
            "reference_edges": display_edges(reference.bins),
        }
        repo.update_job(session, job_id=job_id, options=options)
    return ref.key
