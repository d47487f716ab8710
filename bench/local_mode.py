"""Silo-local scoring on the quality bench (issue 19): does scoring at the silos, on exact gradients, find the noisy
samples at least as well as the projected shared mode, and does it decide the same mask as the coordinator would?

Per seed, on `bench/quality.py`'s PubMedQA split and warmup (its defaults: 300 noisy candidates, 40 clean anchors,
SmolLM2-135M-Instruct, all-linear LoRA r = 8, 4 checkpoints):

1. One gradient pass (quality's ``gradient_pass``) keeps every unprojected gradient (memory-mapped, ~26 GB) and its
   SJLT projection at k = 32768: the data the coordinator would score with everything in hand.
2. **Shared, projected** (today's default): the coordinator-side calibrated score of the projections
   (`score_anchor_samples`, `calibrate`, mean-anchor threshold). **Silo-local, projected**: the same projections
   scored by the product's silo path (`build_reference`, the reference's wire format, `score_locally`): it must
   equal the shared mode.
3. **Silo-local, exact** by the product's streamed path (`scoring.exact_scoring`): the coordinator's two anchor
   passes build the reference, three silos (the candidates dealt round-robin) each stream their own samples against
   it and keep only the aggregate. Compared with the **coordinator-side computation of the same unprojected score**
   (the kept matrices of step 1 scored by `score_anchor_samples`/`calibrate`): the masks must be identical. The
   streamed pass is a second gradient pass, so it runs on ``--stream-seeds`` (default seed 0); on the other seeds the
   silo-local exact scores are `score_locally`'s on the kept exact gradients (the arithmetic a streaming silo runs
   batch by batch, `scoring.local_scoring.score_parts`).

Reports per mode: detection AUROC (overall and per noise kind) and precision of the kept samples; the exact mode's
largest score difference and mask disagreements against the coordinator side; and what leaves a silo: bytes per
sample (0 in local mode) and the aggregate's size. ``--seeds 0,1,2`` runs each seed and adds the summary (issue
19's target: the exact silo-local AUROC >= the projected mode's on every seed).

Usage (on 2 CPU cores about 35 min a seed, and 25 min more for a streamed seed)::

    python bench/local_mode.py --seeds 0,1,2 --result bench/results/local-mode-pubmedqa.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import quality  # bench/quality.py (the script's directory is on sys.path)
from common import emit, make_log

from scoring.calibration import calibrate, fused_signals
from scoring.config import DEFAULT_FUSION, DEFAULT_SIGNALS, TraceConfig
from scoring.exact_scoring import exact_anchor_values, exact_local_scores
from scoring.io.reference import reference_from_bytes, reference_to_bytes
from scoring.local_scoring import LocalAggregate, build_reference, score_locally
from scoring.selection import MeanAnchorScore, mean_anchor_threshold
from scoring.traces import build_anchor_directions
from scoring.workflow import ProjectOptions, release_memory

log = make_log("local-mode")
SILOS = 3


def coordinator_side(feat: quality.Features, split: quality.Split, key: object) -> dict:
    """The calibrated score of the job's default, scored at the coordinator with every gradient (of ``key``) in
    hand, and its mean-anchor mask."""
    last = len(feat.losses) - 1
    trace = quality.trace_scores(feat, split, quality.Variant("cosine", "adam", "all", key))
    cand = {"trace": trace.scores, "loss": feat.losses[last], **_signals(feat, "candidates")}
    anch = {"trace": trace.anchor_scores, "loss": feat.anchor_losses[last], **_signals(feat, "anchors")}
    cands, anchors = calibrate(cand, anch, fused_signals(DEFAULT_SIGNALS), DEFAULT_FUSION)
    return {
        "scores": cands.scores,
        "keep": cands.scores >= mean_anchor_threshold(anchors.scores),
        "anchor_values": anch,
        "values": {k: v for k, v in cand.items() if k != "trace"},
    }


def _signals(feat: quality.Features, role: str) -> dict:
    return {name: np.asarray(feat.signals[role][name], dtype=np.float64) for name in DEFAULT_SIGNALS}


def local_projected(feat: quality.Features, split: quality.Split, key: object, shared: dict) -> dict:
    """The product's silo path on the kept gradients of ``key`` (projections, or the exact ones): the reference from
    the anchors, through its wire format, and `score_locally`."""
    anchors = quality._projections(feat, "anchors", "plain", key, [s.id for s in split.anchors], _ts(feat), "anchor")
    reference = build_reference(
        build_anchor_directions(anchors, TraceConfig()),
        shared["anchor_values"],
        score="calibrated",
        signals=DEFAULT_SIGNALS,
        fusion=DEFAULT_FUSION,
        policy=MeanAnchorScore(),
    )
    wire = reference_from_bytes(reference_to_bytes(reference))
    chunk_rows = max(8, min(1024, (64 << 20) // (4 * wire.dim)))  # <= 64 MB at a time, as quality's scoring
    local = score_locally(wire, feat.arrays[("candidates", "adam", key)], shared["values"], chunk_rows)
    return {"scores": local.scores, "keep": local.selected}


def _ts(feat: quality.Features) -> list[int]:
    return list(range(len(feat.lrs)))


def local_exact(run_dir: Path, split: quality.Split, batch_size: int) -> dict:
    """The product's exact silo-local path: the coordinator's streamed anchor passes, then each silo's stream."""
    opts = ProjectOptions(batch_size=batch_size, precondition=True, signals=DEFAULT_SIGNALS)
    t0 = time.perf_counter()
    directions, anchor_values = exact_anchor_values(run_dir, split.anchors, "cosine", opts)
    reference = build_reference(
        directions,
        anchor_values,
        score="calibrated",
        signals=DEFAULT_SIGNALS,
        fusion=DEFAULT_FUSION,
        policy=MeanAnchorScore(),
    )
    blob = reference_to_bytes(reference)
    anchor_seconds = time.perf_counter() - t0
    log(f"exact reference: {len(blob) / 1e6:.1f} MB, {anchor_seconds:.0f} s")
    wire = reference_from_bytes(blob)
    n = len(split.candidates)
    scores, keep = np.zeros(n), np.zeros(n, dtype=bool)
    aggregates: list[LocalAggregate] = []
    t0 = time.perf_counter()
    for silo in range(SILOS):
        rows = list(range(silo, n, SILOS))
        local, _ = exact_local_scores(run_dir, [split.candidates[i] for i in rows], wire, opts)
        scores[rows], keep[rows] = local.scores, local.selected
        aggregates.append(local.aggregate(wire))
        log(f"silo {silo}: {len(rows)} samples scored, {aggregates[-1].kept} kept")
    silo_seconds = time.perf_counter() - t0
    sizes = [len(json.dumps({"kept": a.kept, "total": a.total, "histogram": list(a.histogram)})) for a in aggregates]
    return {
        "scores": scores,
        "keep": keep,
        "reference_bytes": len(blob),
        "aggregate_bytes": sizes,
        "aggregate_counts_add_up": sum(a.total for a in aggregates) == n
        and int(np.sum([a.histogram for a in aggregates])) == n,
        "kept_from_aggregates": sum(a.kept for a in aggregates),
        "seconds": {"anchor_passes": anchor_seconds, "silo_streams": silo_seconds},
    }


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    out = args.out / f"seed-{seed}"
    if out.exists():
        raise SystemExit(f"--out: {out} exists; remove it or choose another")
    qargs = quality.parse_args([
        "--domain", "pubmedqa", "--seed", str(seed), "--dims", str(args.dim), "--no-train", "--out", str(out),
        "--data-dir", str(args.data_dir), "--n", str(args.n), "--anchors", str(args.anchors), "--model", args.model,
        "--max-len", str(args.max_len), "--warmup-steps", str(args.warmup_steps),
    ])  # fmt: skip
    started, timing = time.perf_counter(), {}
    split = quality.split_data("pubmedqa", args.data_dir, args.n, args.anchors, qargs.held_out, seed)
    noise = np.array([s.meta["noise"] for s in split.candidates])
    warm = quality.warmup(qargs, split.candidates, out / "run")
    timing["warmup"] = time.perf_counter() - started
    t0 = time.perf_counter()
    feat = quality.gradient_pass(out / "run", split, [args.dim], qargs.batch_size, qargs.nnz, unprojected=True)
    timing["gradients_kept"] = time.perf_counter() - t0
    shared = {
        "projected": coordinator_side(feat, split, args.dim),
        "exact": coordinator_side(feat, split, quality.FULL),
    }
    modes = {
        "shared, projected": shared["projected"],
        "silo-local, projected": local_projected(feat, split, args.dim, shared["projected"]),
        "coordinator-side, exact": shared["exact"],
    }
    streamed = seed in args.stream_seeds
    if not streamed:  # the silo path on the kept exact gradients: score_locally, as a streaming silo computes it
        exact = local_projected(feat, split, quality.FULL, shared["exact"])
    del feat
    shutil.rmtree(out / "run" / "full", ignore_errors=True)
    release_memory()
    if streamed:
        exact = local_exact(out / "run", split, qargs.batch_size)
        timing |= {f"exact_{k}": v for k, v in exact["seconds"].items()}
    modes["silo-local, exact"] = exact
    table = {name: quality.detection(m["scores"], noise, m["keep"]) for name, m in modes.items()}
    checks = {
        "local_projected_equals_shared": {
            "max_abs_score_diff": _max_diff(modes["silo-local, projected"], shared["projected"]),
            "mask_disagreements": _disagree(modes["silo-local, projected"], shared["projected"]),
        },
        "local_exact_equals_coordinator_side": {
            "max_abs_score_diff": _max_diff(exact, shared["exact"]),
            "mask_disagreements": _disagree(exact, shared["exact"]),
        },
        "exact_auroc_at_least_projected": table["silo-local, exact"]["auroc"] >= table["shared, projected"]["auroc"],
    }
    timing["total"] = time.perf_counter() - started
    k, t = args.dim, len(warm["checkpoints"])
    return {
        "seed": seed,
        "data": {"candidates": len(split.candidates), "anchors": len(split.anchors), "warmup": warm},
        "modes": table,
        "checks": checks,
        "exact_path": "streamed (scoring.exact_scoring)" if streamed else "score_locally on the kept exact gradients",
        "leaves_a_silo": {
            # T float16 projections of k values, and the signal checkpoint's loss and signals as float32
            "shared, projected": {"bytes_per_sample": t * 2 * k + 4 * (1 + len(DEFAULT_SIGNALS))},
            "silo-local": {"bytes_per_sample": 0, "aggregate_bytes_per_silo": exact.get("aggregate_bytes")},
            "aggregates_add_up": exact.get("aggregate_counts_add_up"),
            "reference_bytes": exact.get("reference_bytes"),
        },
        "timing_s": timing,
    }


def _max_diff(a: dict, b: dict) -> float:
    return float(np.max(np.abs(a["scores"] - b["scores"])))


def _disagree(a: dict, b: dict) -> int:
    return int((a["keep"] != b["keep"]).sum())


def summarize(results: list[dict]) -> dict:
    modes = list(results[0]["modes"])
    rows = {m: [r["modes"][m]["auroc"] for r in results] for m in modes}
    return {
        "auroc": {m: {"per_seed": v, "mean": float(np.mean(v))} for m, v in rows.items()},
        "targets": {
            "exact_auroc_at_least_projected_every_seed": all(
                r["checks"]["exact_auroc_at_least_projected"] for r in results
            ),
            "masks_identical_to_coordinator_side": all(
                r["checks"]["local_exact_equals_coordinator_side"]["mask_disagreements"] == 0 for r in results
            ),
            "bytes_per_sample_leaving_a_silo": 0,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=quality.REPO.parent / "shared" / "data")
    p.add_argument("--model", default="smollm2", help="model reference (default smollm2; tiny:0 for a smoke test)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument(
        "--stream-seeds",
        default="0",
        help="seeds whose silo-local exact scores come from the product's streamed path (a second gradient pass, "
        "about 25 min a seed); the others score the kept exact gradients with the same score_locally (default 0)",
    )
    p.add_argument("--max-len", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument("--warmup-steps", type=int, default=12, help="warmup AdamW steps of batch 4 (default 12)")
    p.add_argument("--n", type=int, default=300, help="candidates (default 300)")
    p.add_argument("--anchors", type=int, default=40, help="clean anchors (default 40)")
    p.add_argument("--dim", type=int, default=32768, help="the projected mode's k (default 32768, the product's)")
    p.add_argument("--out", type=Path, default=quality.REPO / "bench" / ".work" / "local-mode")
    p.add_argument("--result", type=Path, default=None, help="also write the result JSON to this file")
    p.add_argument(
        "--summarize",
        nargs="+",
        type=Path,
        default=None,
        metavar="SEED_JSON",
        help="only combine these per-seed results (<out>/seed-N.json) into one result with its summary",
    )
    args = p.parse_args(argv)
    if args.summarize:
        results = [json.loads(path.read_text()) for path in args.summarize]
        emit(
            {"benchmark": "local_mode", "domain": "pubmedqa", "seeds": results, "summary": summarize(results)},
            args.result,
        )
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.stream_seeds = [int(s) for s in args.stream_seeds.split(",") if s.strip()]
    results = []
    for seed in seeds:
        results.append(run_seed(args, seed))
        quality.emit_quiet(results[-1], args.out / f"seed-{seed}.json")  # each seed's result as it lands
    result = {"benchmark": "local_mode", "domain": "pubmedqa", "settings": vars(args) | {"seeds": seeds}}
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in result["settings"].items()}
    result |= {"seeds": results, "summary": summarize(results)}
    quality.emit_quiet(result, args.out / "result.json")
    emit(result, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
