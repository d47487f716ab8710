"""The silo's side of a silo-local scoring job (``scoring_mode`` ``local``, `scoring.local_scoring`): project the local
samples as for any job, but keep the projections; download the reference the coordinator publishes from its anchors,
score the samples against it here, write the mask, and send only the aggregate (kept count, total, score histogram).

Nothing per-sample leaves the silo: no ids, no projections, no losses. Under ``work_dir/<job>/`` it keeps, besides
what `agent.loop` keeps, ``reference.safetensors`` and ``local-scores.json``: the silo's score rows, shaped as the
coordinator's score rows (`app.schemas.ScoreRow`), with the threshold and the reference's histogram edges, which the
silo's dashboard shows in place of the coordinator's (`local_rows`, `local_summary`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.client import CoordinatorError, SiloClient
from scoring.calibration import EXPLANATIONS
from scoring.data import Sample
from scoring.io import load_projection
from scoring.io.reference import reference_from_bytes
from scoring.local_scoring import LocalScores, ScoringReference, display_edges, score_locally
from wire.files import atomic_write_bytes

LOCAL_SCORES = "local-scores.json"


def wait_for_reference(client: SiloClient, job_id: str, dest: Path, poll: float, timeout: float | None) -> Path:
    """Download the job's reference to ``dest``, waiting while the coordinator has not published it (409); a job
    whose anchor step failed stops the wait with its error."""
    started = time.monotonic()
    while True:
        try:
            client.download_reference(job_id, dest)
            return dest
        except CoordinatorError as exc:
            if exc.status != 409:
                raise
            job = client.job(job_id)
            if job["status"] == "failed" or job.get("anchor_status") == "failed":
                raise CoordinatorError(
                    None, f"job {job_id}: the coordinator could not publish the reference: {job.get('error')}"
                ) from exc
            if timeout is not None and time.monotonic() - started > timeout:
                raise CoordinatorError(
                    None, f"job {job_id}: no reference after {timeout:.0f} s ({exc.detail})"
                ) from exc
            time.sleep(poll)


def score_projections_locally(
    reference: ScoringReference, proj_dir: Path, indices: list[int], ids: list[str], signal_index: int
) -> tuple[LocalScores, dict[str, np.ndarray]]:
    """Score the projections in ``proj_dir`` (``ckpt-NNN.candidate.safetensors``) against ``reference``; also returns
    the raw values of the signal checkpoint's files (``loss`` and the signals sent)."""
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
    return score_locally(reference, matrices, values), values


def score_rows(local: LocalScores, values: dict[str, np.ndarray], ids: list[str], silo: str) -> list[dict[str, Any]]:
    """The silo's rows as the coordinator would store them (`app.schemas.ScoreRow`; no nearest anchors, no
    override): score, per-checkpoint terms, decision, raw values and, for a calibrated job, z and the flagging
    signal."""
    cal = local.calibrated
    flags = cal.flagged_by if cal is not None else None  # a list built once (the property builds it on each call)
    raw = {"trace": local.trace, **values}
    rows = []
    for i, sid in enumerate(ids):
        flagged = flags[i] if flags is not None else None
        selected = bool(local.selected[i])
        rows.append(
            {
                "silo": silo,
                "sample_id": sid,
                "score": float(local.scores[i]),
                "parts": local.parts[i].tolist(),
                "selected": selected,
                "auto_selected": selected,
                "override": None,
                "nearest_anchors": None,
                "values": {k: int(v[i]) if k == "n_tokens" else float(v[i]) for k, v in raw.items()},
                "z": None if cal is None else {s: float(z) for s, z in zip(cal.signals, cal.z[i], strict=True)},
                "flagged_by": flagged,
                "flag_reason": EXPLANATIONS.get(flagged) if flagged and not selected else None,
            }
        )
    return rows


def local_rows(work_dir: Path, job_id: str) -> dict[str, Any] | None:
    """``local-scores.json`` of a silo-local job this silo scored (None when there is none)."""
    path = Path(work_dir) / job_id / LOCAL_SCORES
    return json.loads(path.read_text()) if path.is_file() else None


def local_summary(job_id: str, silo: str, answer: dict[str, Any]) -> dict[str, Any]:
    """This silo's `app.schemas.ScoreSummary` computed from its local rows, on the reference's edges."""
    rows = answer["rows"]
    scores = np.asarray([r["score"] for r in rows], dtype=np.float64)
    kept = np.asarray([r["selected"] for r in rows], dtype=bool)
    parts = np.asarray([r["parts"] for r in rows], dtype=np.float64).reshape(len(rows), -1)
    edges = np.asarray(answer["edges"], dtype=np.float64)

    def means(mask: np.ndarray) -> list[float] | None:
        return parts[mask].mean(axis=0).tolist() if mask.any() else None

    owner = {
        "n": len(rows),
        "kept": int(kept.sum()),
        "auto_kept": int(kept.sum()),
        "overridden": 0,
        "counts": np.histogram(np.clip(scores, edges[0], edges[-1]), bins=edges)[0].tolist(),
        "mean": float(scores.mean()) if len(rows) else 0.0,
        "median": float(np.median(scores)) if len(rows) else 0.0,
        "part_means": means(np.ones(len(rows), dtype=bool)),
        "part_means_kept": means(kept),
        "part_means_dropped": means(~kept),
    }
    return {
        "job": job_id,
        "threshold": answer["threshold"],
        "checkpoints": answer["checkpoints"],
        "edges": edges.tolist(),
        "silos": {silo: owner},
        "anchor_scores": [],
    }


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
    local, values = score_projections_locally(reference, proj_dir, indices, ids, int(spec["signal_checkpoint"]))
    silo = next((m["name"] for m in job.get("silos", [])), "")
    rows = score_rows(local, values, ids, silo)
    kept = {"threshold": reference.threshold, "edges": display_edges(reference.bins), "checkpoints": len(indices)}
    atomic_write_bytes(proj_dir.parent / LOCAL_SCORES, json.dumps({**kept, "rows": rows}).encode())
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
