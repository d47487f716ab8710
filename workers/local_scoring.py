"""The coordinator's side of a silo-local scoring job (`scoring.local_scoring`): publish the reference once the anchor
projections exist, and record each silo's aggregate.

`publish_reference` runs at the end of the anchor step (`workers.pipeline.project_anchors`) of a job whose
``scoring_mode`` is ``local``: it scores the anchor samples against each other exactly as `workers.pipeline.score_job`
does (leave-one-out trace, the signal checkpoint's losses), builds the reference from them and stores it as a blob,
recording its key, bin count and threshold in the job's options. Idempotent: a stored reference is kept.
"""

from __future__ import annotations

from scoring.config import DEFAULT_FUSION, TraceConfig
from scoring.io.reference import reference_to_bytes
from scoring.local_scoring import build_reference, display_edges
from scoring.selection import threshold_from_dict
from scoring.spec import JobSpec
from scoring.traces import build_anchor_directions, score_anchor_samples
from storage import repository as repo
from workers.pipeline import Resources, aligned_values, anchor_shards, load_shard, sample_values


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
    values = {"trace": anchor_table.scores}
    if how.keeps_values:
        file = next(f for f in anchor_files if f.proj.checkpoint == how.signal_index)
        values |= aligned_values(sample_values(file, how, "anchor samples"), file.proj.ids, anchor_table.ids)
    reference = build_reference(
        build_anchor_directions(anchors, config),
        values,
        score=how.score,
        signals=how.signals,
        fusion=how.fusion or DEFAULT_FUSION,
        policy=policy,
    )
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
