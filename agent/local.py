"""The silo's side of a silo-local scoring job (``scoring_mode`` ``local``, `scoring.local_scoring`): project the local
samples as for any job, but keep the projections; download the reference the coordinator publishes from its anchors,
score the samples against it here, write the mask, and send only the aggregate (kept count, total, score histogram).
An exact job (``gradients`` ``exact``) projects nothing: its samples' exact gradients are streamed against the
reference's full anchor directions (`scoring.exact_scoring`) and never stored.

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
from scoring.local_scoring import LocalAggregate, LocalScores, ScoringReference, display_edges, score_locally
from scoring.privacy import RELEASE_LEDGER, ReleaseLedger, noisy_aggregate
from wire.files import atomic_write_bytes

LOCAL_SCORES = "local-scores.json"
AGGREGATE = "aggregate.json"
"""A noisy aggregate as drawn and sent (`aggregate_body`)."""


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
    """`agent.loop.run_agent` for a silo-local job: score the samples here against the reference the coordinator
    publishes (on the projections in ``proj_dir``, made first when missing, or, for an exact job, on exact gradients
    streamed from the run), keep the rows and send the aggregate; returns its `agent.loop.AgentResult`."""
    from agent.loop import AgentResult, prepare_run, project_local, projection_ready, write_outputs

    job_id, spec = job["id"], job["spec"]
    job_dir = proj_dir.parent
    indices = [int(c["index"]) for c in spec["checkpoints"]]
    exact = spec.get("gradients") == "exact"
    if exact or not projection_ready(proj_dir, indices):
        run_dir = prepare_run(client, job_id, spec, job_dir, progress)
        if not exact:
            project_local(run_dir, samples, proj_dir, spec, options, progress)
    dest = wait_for_reference(client, job_id, job_dir / "reference.safetensors", options.poll_interval, options.timeout)
    reference = reference_from_bytes(dest.read_bytes(), f"the reference of job {job_id}")
    ids = [s.id for s in samples]
    if exact:
        local, values = score_exact_locally(reference, job_dir / "run", samples, spec, options, progress)
    else:
        local, values = score_projections_locally(reference, proj_dir, indices, ids, int(spec["signal_checkpoint"]))
    silo = next((m["name"] for m in job.get("silos", [])), "")
    rows = score_rows(local, values, ids, silo)
    kept = {"threshold": reference.threshold, "edges": display_edges(reference.bins), "checkpoints": len(indices)}
    atomic_write_bytes(job_dir / LOCAL_SCORES, json.dumps({**kept, "rows": rows}).encode())
    scores_path, selected_path, selected = write_outputs(data_path, samples, rows, job_id, options.out_dir)
    answer = client.send_aggregate(job_id, aggregate_body(local.aggregate(reference), spec, job_dir, options))
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


def aggregate_body(aggregate: LocalAggregate, spec: dict, job_dir: Path, options) -> dict[str, Any]:
    """What the silo sends: its aggregate as counted or, for a job with ``aggregate_epsilon``, an ε-DP release of it
    (`scoring.privacy.noisy_aggregate`), charged to the silo's release ledger (``work_dir/privacy-ledger.json``)
    before it is drawn. The release is drawn once and kept in ``job_dir/aggregate.json``: a rerun sends it again, as
    a second draw would spend ε again.

    Raises:
        scoring.privacy.BudgetExceededError: the release would take the silo past ``options.max_epsilon``.
    """
    counted = {"kept": aggregate.kept, "total": aggregate.total, "histogram": list(aggregate.histogram)}
    epsilon = spec.get("aggregate_epsilon")
    if epsilon is None:
        return counted
    path = job_dir / AGGREGATE
    if path.is_file():
        return json.loads(path.read_text())["sent"]
    ReleaseLedger.open(job_dir.parent / RELEASE_LEDGER).charge(job_dir.name, float(epsilon), options.max_epsilon)
    kept, total, histogram = noisy_aggregate(aggregate.kept, aggregate.histogram, float(epsilon))
    sent = {"kept": kept, "total": total, "histogram": list(histogram)}
    atomic_write_bytes(path, json.dumps({"epsilon": epsilon, "counted": counted, "sent": sent}).encode())
    return sent


def score_exact_locally(
    reference: ScoringReference, run_dir: Path, samples: list[Sample], spec: dict, options, progress
) -> tuple[LocalScores, dict[str, np.ndarray]]:
    """Score ``samples`` on their exact gradients, streamed from the job's run against ``reference``
    (`scoring.exact_scoring`): nothing of the gradients is stored."""
    from scoring.exact_scoring import exact_local_scores
    from scoring.spec import JobSpec
    from scoring.workflow import ModelOptions, ProjectOptions

    return exact_local_scores(
        run_dir,
        samples,
        reference,
        ProjectOptions.for_job(JobSpec.from_dict(spec), options.engine, options.batch_size),
        ModelOptions(device=options.device, dtype=options.dtype, cache_dir=options.cache_dir),
        (lambda done, total: progress("gradients", done, total)) if progress else None,
    )
