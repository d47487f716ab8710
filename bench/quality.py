"""Detection quality of the trace score on PubMedQA with 30 % injected noise, against perplexity filtering.

Setup (seeded): the 1000 PubMedQA PQA-L items are shuffled; the first ``--anchors`` are the clean anchor set, the
next ``--n`` the candidates, of which 10 % each are corrupted by ``cut``, ``delete`` and ``exchange``
(`scoring.noise.inject_noise`). SmolLM2-135M-Instruct, LoRA r=8 on q_proj and v_proj.

Pipeline, through `scoring.steps`: warmup (``--warmup-steps`` AdamW steps of batch 4 at a constant 3e-4 on a
random ``--warmup-fraction`` of the candidates, noise included, as CLUES warms up on the pool; ``--checkpoints``
evenly spaced checkpoints) -> project anchors and candidates (hooks engine, SJLT to ``--proj-dim``) -> score.
``--no-warmup`` instead takes one checkpoint at the initial adapter with random lora_B and plain gradients;
warmup starts from a random lora_B, the library default (``--zero-b``: peft's B=0, where every lora_A gradient is
zero until B moves).

Candidates are projected with ``anchor=True``, so the projection directory holds both the Adam-preconditioned
gradients (role ``candidate``) and the plain ones (role ``anchor``) of the same samples: the "with" and "without
preconditioning" variants come from one gradient pass.

Scores reported (AUROC of clean against noisy, overall and per noise kind against the clean samples only):

- ``trace_{cosine,dot}_{precond,plain}``: the influence-trace score Σ_t η_t · sim(g_t(z), mean anchor gradient at
  t), with per-checkpoint AUROCs of each term alone. The *primary* trace score is cosine with preconditioning
  (plain when there is no Adam state): the library's defaults.
- ``perplexity_ckpt{t}``: score = -(mean response loss at checkpoint t). The primary perplexity baseline is the
  last checkpoint (the warmed-up model); every checkpoint is reported.
- ``hybrid_rank_cosine_perplexity``: the average of the rank vectors of the primary trace score and the primary
  perplexity score. A documented combination reported beside, never instead of, the trace score.

Targets (pass/fail printed under ``targets``, no tuning on the evaluation labels): primary trace AUROC >= 0.95
overall, and on every noise kind not below the perplexity AUROC at any checkpoint.

Usage::

    python bench/quality.py --out bench/.work/quality > bench/results/quality.json
    python bench/quality.py --no-warmup --out bench/.work/quality-nowarmup > bench/results/quality-nowarmup.json

One JSON object goes to stdout (and ``<out>/result.json``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from common import emit, make_log  # bench/common.py (the script's directory is on sys.path)

from scoring.config import LoraSettings, TraceConfig, TrainingConfig
from scoring.data import Sample, load_pubmedqa
from scoring.io import load_projection
from scoring.noise import inject_noise
from scoring.selection import auroc, average_ranks
from scoring.steps import ProjectOptions, project_samples, run_warmup
from scoring.traces import score_projections
from scoring.types import ProjectedGrads

REPO = Path(__file__).resolve().parents[1]
NOISE_RATES = {"cut": 0.1, "delete": 0.1, "exchange": 0.1}
KINDS = tuple(NOISE_RATES)


log = make_log("quality")


def progress(label: str):
    """A progress callback that logs about every 10 % (and the end)."""
    state = {"next": 0.0, "start": time.perf_counter()}

    def update(done: int, total: int, *_: float) -> None:
        if total and (done / total >= state["next"] or done == total):
            log(f"{label}: {done}/{total} ({time.perf_counter() - state['start']:.0f} s)")
            state["next"] = done / total + 0.1

    return update


def shuffled_items(path: Path, need: int, what: str, seed: int) -> list[Sample]:
    """Every PubMedQA item of ``path`` after the seeded shuffle the splits take their slices from (at least
    ``need`` of them; ``what`` names the options that ask for them)."""
    items = load_pubmedqa(path)
    if len(items) < need:
        raise SystemExit(f"{what} = {need} exceeds the {len(items)} items of {path}")
    random.Random(seed).shuffle(items)
    return items


def split_data(path: Path, n: int, n_anchors: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(clean anchors, noisy candidates): disjoint, after a seeded shuffle of all items."""
    items = shuffled_items(path, n + n_anchors, "--n + --anchors", seed)
    anchors, pool = items[:n_anchors], items[n_anchors : n_anchors + n]
    return anchors, inject_noise(pool, NOISE_RATES, seed=seed)


def warmup(args: argparse.Namespace, candidates: list[Sample], run_dir: Path) -> dict:
    """Run (or skip, with --no-warmup) the LoRA warmup; returns what was done."""
    rng = random.Random(args.seed + 1)
    train = rng.sample(candidates, max(1, round(args.warmup_fraction * len(candidates))))
    training = None
    if not args.no_warmup:
        training = TrainingConfig(
            epochs=1000,  # bounded by max_steps
            batch_size=4,
            lr=args.lr,
            schedule="constant",
            warmup_ratio=0.0,
            num_checkpoints=args.checkpoints,
            max_steps=args.warmup_steps,
            seed=args.seed,
        )
    ckpts = run_warmup(
        "smollm2",
        train,
        run_dir,
        lora=LoraSettings(),
        training=training,
        projection={"kind": "sjlt", "dim": args.proj_dim, "seed": 0, "nnz": 4},
        max_len=args.max_len,
        random_b=not args.zero_b,
        progress=progress("warmup"),
    )
    noisy = sum(s.meta["noise"] != "clean" for s in train)
    return {
        "train_samples": 0 if args.no_warmup else len(train),
        "train_noisy": 0 if args.no_warmup else noisy,
        "checkpoints": [{"index": c.index, "step": c.step, "lr": c.lr} for c in ckpts],
    }


def load_role(proj_dir: Path, role: str) -> tuple[list[ProjectedGrads], list[np.ndarray]]:
    """Projections of one role in checkpoint order, and each checkpoint's per-sample losses."""
    loaded = [load_projection(f) for f in sorted(proj_dir.glob(f"ckpt-*.{role}.safetensors"))]
    if not loaded:
        raise SystemExit(f"{proj_dir}: no {role} projections")
    return [p for p, _ in loaded], [loss for _, loss in loaded]


def detection(scores: np.ndarray, noise: np.ndarray) -> dict[str, float]:
    """AUROC of clean vs all noisy, and of clean vs each kind alone."""
    clean = noise == "clean"
    out = {"overall": auroc(scores, clean)}
    for kind in KINDS:
        rows = clean | (noise == kind)
        if (noise == kind).any():
            out[kind] = auroc(scores[rows], clean[rows])
    return out


def trace_variant(cands: list[ProjectedGrads], anchors: list[ProjectedGrads], sim: str, noise: np.ndarray) -> dict:
    """Trace-score AUROCs (total and per checkpoint) of one candidate variant and similarity."""
    table = score_projections({"pool": cands}, anchors, TraceConfig(similarity=sim))
    out = detection(table.scores, noise)
    out["per_checkpoint"] = [detection(table.parts[:, t], noise) for t in range(table.parts.shape[1])]
    out["_scores"] = table.scores
    return out


def score_all(cand_dir: Path, anchor_dir: Path, noise: np.ndarray, ids: list[str]) -> dict:
    """Every reported score's AUROCs; the primary trace is cosine on preconditioned gradients if there are any."""
    anchors, _ = load_role(anchor_dir, "anchor")
    precond, losses = load_role(cand_dir, "candidate")
    plain, _ = load_role(cand_dir, "anchor")
    plain = [dataclasses.replace(p, role="candidate") for p in plain]  # same samples, plain gradients
    if list(precond[0].ids) != ids:
        raise SystemExit("projection ids are not in sample order")
    variants = {"plain": plain}
    if precond[0].preconditioned:
        variants = {"precond": precond, "plain": plain}
    results: dict = {}
    for name, cands in variants.items():
        for sim in ("cosine", "dot"):
            results[f"trace_{sim}_{name}"] = trace_variant(cands, anchors, sim, noise)
    for t, loss in enumerate(losses):
        results[f"perplexity_ckpt{t}"] = detection(-loss.astype(np.float64), noise)
    primary = {"trace": f"trace_cosine_{next(iter(variants))}", "perplexity": f"perplexity_ckpt{len(losses) - 1}"}
    trace_scores = results[primary["trace"]]["_scores"]
    hybrid = (average_ranks(trace_scores) + average_ranks(-losses[-1].astype(np.float64))) / 2.0
    results["hybrid_rank_cosine_perplexity"] = detection(hybrid, noise)
    for value in results.values():
        value.pop("_scores", None)
    return {"auroc": results, "primary": primary}


def check_targets(scores: dict) -> dict:
    """Primary trace AUROC >= 0.95 overall; per kind not below perplexity at any checkpoint."""
    auc, primary = scores["auroc"], scores["primary"]
    trace = auc[primary["trace"]]
    ppl = {k: v for k, v in auc.items() if k.startswith("perplexity_")}
    out: dict = {"trace_overall_ge_0.95": {"value": trace["overall"], "pass": trace["overall"] >= 0.95}}
    for kind in KINDS:
        best = max(ppl, key=lambda k: ppl[k][kind])
        out[f"trace_{kind}_ge_perplexity"] = {
            "trace": trace[kind],
            "best_perplexity": ppl[best][kind],
            "at": best,
            "pass": trace[kind] >= ppl[best][kind],
        }
    out["all_pass"] = all(v["pass"] for v in out.values())
    return out


def project_all(args: argparse.Namespace, run_dir: Path, anchors: list, candidates: list, out: Path) -> dict:
    """Project anchors and candidates (both with anchor=True); returns seconds per stage."""
    opts = ProjectOptions(engine="hooks", batch_size=args.batch_size, precondition=args.precondition)
    timing = {}
    for label, samples in (("anchors", anchors), ("candidates", candidates)):
        start = time.perf_counter()
        project_samples(run_dir, samples, out / "proj" / label, anchor=True, opts=opts, progress=progress(label))
        timing[f"project_{label}"] = time.perf_counter() - start
    return timing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="holds pubmedqa/")
    p.add_argument("--n", type=int, default=200, help="candidates (default 200)")
    p.add_argument("--anchors", type=int, default=40, help="clean anchors (default 40)")
    p.add_argument("--checkpoints", type=int, default=2, help="warmup checkpoints T (default 2)")
    p.add_argument("--warmup-steps", type=int, default=12, help="optimizer steps of batch 4 (default 12)")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="share of candidates trained on (0.1)")
    p.add_argument("--lr", type=float, default=3e-4, help="constant warmup learning rate (default 3e-4)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per sample (default 512)")
    p.add_argument("--proj-dim", type=int, default=8192, help="projection dimension k (default 8192)")
    p.add_argument("--batch-size", type=int, default=8, help="gradient batch size (default 8)")
    p.add_argument("--no-warmup", action="store_true", help="one checkpoint at init, random lora_B, plain grads")
    p.add_argument("--zero-b", action="store_true", help="warm up from peft's lora_B=0 (default: random lora_B)")
    p.add_argument("--precondition", action=argparse.BooleanOptionalAction, default=True, help="Adam (default on)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / ".work" / "quality", help="work directory")
    args = p.parse_args(argv)
    if args.no_warmup:
        args.precondition = False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_path = args.data_dir / "pubmedqa" / "ori_pqal.json"
    if not data_path.is_file():
        raise SystemExit(f"--data-dir: {data_path} not found")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out: {args.out} is not empty; remove it or choose another")
    started = time.perf_counter()
    anchors, candidates = split_data(data_path, args.n, args.anchors, args.seed)
    noise = np.array([s.meta["noise"] for s in candidates])
    timing: dict[str, float] = {}
    start = time.perf_counter()
    warm = warmup(args, candidates, args.out / "run")
    timing["warmup"] = time.perf_counter() - start
    timing |= project_all(args, args.out / "run", anchors, candidates, args.out)
    start = time.perf_counter()
    scores = score_all(
        args.out / "proj" / "candidates", args.out / "proj" / "anchors", noise, [s.id for s in candidates]
    )
    timing["score"] = time.perf_counter() - start
    timing["total"] = time.perf_counter() - started
    n_ckpt = len(warm["checkpoints"])
    projected = (len(anchors) + len(candidates)) * n_ckpt
    result = {
        "benchmark": "quality",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "candidates": len(candidates),
            "anchors": len(anchors),
            "noise": {k: int((noise == k).sum()) for k in ("clean", *KINDS)},
            **warm,
        },
        "timing_s": timing,
        "projection_s_per_sample_per_checkpoint": (timing["project_anchors"] + timing["project_candidates"])
        / projected,
        **scores,
        "targets": check_targets(scores),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_at_end": os.getloadavg(),
        },
    }
    emit(result, args.out / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
