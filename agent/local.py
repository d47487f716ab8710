"""The silo's side of a silo-local scoring job (``scoring_mode`` ``local``, `scoring.local_scoring`): project the local
samples as for any job, but keep the projections; download the reference the coordinator publishes from its anchors,
score the samples against it here, write the mask, and send only the aggregate (kept count, total, score histogram).

Nothing per-sample leaves the silo: no ids, no projections, no losses. Under ``work_dir/<job>/`` it keeps, besides
what `agent.loop` keeps, ``reference.safetensors`` (reused when its SHA-256 is the one the coordinator announces).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from agent.client import CoordinatorError, SiloClient
from scoring.data import Sample
from scoring.io import load_projection
from scoring.io.reference import reference_from_bytes
from scoring.local_scoring import LocalScores, ScoringReference, score_locally


def wait_for_reference(client: SiloClient, job_id: str, dest: Path, poll: float, timeout: float | None) -> Path:
    """Download the job's reference to ``dest``, waiting while the coordinator has not published it (409)."""
    started = time.monotonic()
    while True:
        try:
            client.download_reference(job_id, dest)
            return dest
        except CoordinatorError as exc:
            if exc.status != 409:
                raise
            if timeout is not None and time.monotonic() - started > timeout:
                raise CoordinatorError(
                    None, f"job {job_id}: no reference after {timeout:.0f} s ({exc.detail})"
                ) from exc
            time.sleep(poll)


def score_projections_locally(
    reference: ScoringReference, proj_dir: Path, indices: list[int], ids: list[str], signal_index: int
) -> LocalScores:
    """Score the projections in ``proj_dir`` (``ckpt-NNN.candidate.safetensors``) against ``reference``."""
    from agent.loop import AgentError

    matrices, values = [], {}
    for t in indices:
        proj, losses, signals = load_projection(proj_dir / f"ckpt-{t:03d}.candidate.safetensors")
        if list(proj.ids) != ids:
            raise AgentError(f"{proj_dir}: the projections' ids differ from the data file's (delete the directory)")
        matrices.append(proj.matrix)
        if t == signal_index:
            values = {"loss": losses, **signals}
    values = {name: np.asarray(v, dtype=np.float64) for name, v in values.items() if v is not None}
    return score_locally(reference, matrices, values)


def run_local(client: SiloClient, job: dict, samples: list[Sample], data_path: Path, proj_dir: Path, options, progress):
    """`agent.loop.run_agent` for a silo-local job, once the projections are in ``proj_dir``; returns its
    `agent.loop.AgentResult`."""
    from agent.loop import AgentResult, write_outputs

    job_id, spec = job["id"], job["spec"]
    indices = [int(c["index"]) for c in spec["checkpoints"]]
    dest = wait_for_reference(
        client, job_id, proj_dir.parent / "reference.safetensors", options.poll_interval, options.timeout
    )
    reference = reference_from_bytes(dest.read_bytes(), f"the reference of job {job_id}")
    ids = [s.id for s in samples]
    local = score_projections_locally(reference, proj_dir, indices, ids, int(spec["signal_checkpoint"]))
    rows = [
        {"sample_id": sid, "score": float(score), "parts": parts, "selected": bool(keep)}
        for sid, score, parts, keep in zip(ids, local.scores, local.parts.tolist(), local.selected, strict=True)
    ]
    scores_path, selected_path, selected = write_outputs(data_path, samples, rows, job_id, options.out_dir)
    aggregate = local.aggregate(reference)
    answer = client.send_aggregate(
        job_id, {"kept": aggregate.kept, "total": aggregate.total, "histogram": list(aggregate.histogram)}
    )
    if progress:
        progress("scoring", 100, 100)
    return AgentResult(
        job_id,
        answer["status"],
        len(samples),
        0,
        0,
        selected=selected,
        threshold=reference.threshold,
        scores_path=scores_path,
        selected_path=selected_path,
    )
