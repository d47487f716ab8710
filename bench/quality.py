"""The paper-style quality table: does the trace score find the noisy samples, and does training on what it keeps
give a better model? One domain per run; PubMedQA (medical) or GSM8K (math), SmolLM2-135M-Instruct.

Setup (seeded): the domain's items are shuffled; the first ``--anchors`` are the clean anchor set, the next ``--n``
the candidates, into which noise is injected (`scoring.noise.inject_noise`; ``NOISE``: PubMedQA 10 % each of
``cut``, ``delete``, ``exchange``; GSM8K 15 % each of ``wrong_answer`` and ``exchange``); a clean held-out set of
``--held-out`` items comes from the rest (PubMedQA) or from ``test.jsonl`` (GSM8K).

Warmup (`scoring.workflow.run_warmup`): ``--warmup-steps`` AdamW steps of batch 4 at a constant ``--lr`` on a random
``--warmup-fraction`` of the candidates (noise included, as CLUES warms up on the pool), from a random lora_B, LoRA
of rank ``--lora-rank`` (default the product's, 8; alpha = 2r) on ``--lora-targets`` (default: the product's, every
linear layer of a decoder block); ``--checkpoints`` evenly spaced checkpoints, each with its Adam moments.

One gradient pass per checkpoint (hooks engine, exact per-sample LoRA gradients) feeds every variant: plain and
Adam-preconditioned (m'/(√v'+ε), LESS/CLUES) gradients, each unprojected (unless ``--no-unprojected``; all P LoRA
coordinates, kept in memory-mapped files under ``<out>/run/full`` while scoring and removed after) and projected
with SJLT to every k of ``--dims``. Each variant is scored by the product's own path
(`scoring.traces.score_projections`, anchors leave-one-out by `score_anchor_samples`, CLUES threshold = mean anchor
score), with cosine and dot similarity, over all checkpoints and over the last one alone. PubMedQA also reports
anchor groups by the anchors' yes/no/maybe decision (LESS's max over groups).

Methods in the table:

- ``all``: keep everything (no ranking, so no AUROC);
- ``random``: a seeded random score;
- ``perplexity``: minus the mean response loss at the last checkpoint (every checkpoint in ``detail``);
- ``ours``: the trace variants named ``ours[sim, precond|plain, T ckpts, k]``; the *primary* one (the product's
  recipe) is cosine, Adam-preconditioned, all checkpoints, k = the product's default projection dimension
  (`scoring.config.DEFAULT_PROJECTION_DIM`) when ``--dims`` holds it, else the largest of ``--dims``.

Metrics: detection AUROC of clean against noisy, overall and per noise kind (against the clean samples only), and
precision (clean share) of the kept samples at the primary method's keep rate (mean-anchor threshold): every ranked
method keeps its top samples at that same rate. Then, unless ``--no-train``, four training arms on the candidates
— all, random, perplexity and ours (primary; the samples the threshold keeps) — each a fresh LoRA (peft's B=0, the
same seed) trained for ``--train-epochs`` epochs (`scoring.training.train_lora`, batch 4, constant ``--lr``), and
the untrained base, are evaluated on the held-out set (`scoring.federated.evaluation.evaluate`: mean response loss, and
PubMedQA accuracy by option log-likelihood or GSM8K exact match of the final number by greedy generation).

Issue 2's target is checked on PubMedQA (``targets``): primary trace AUROC >= 0.95 overall, and on every noise kind
not below the perplexity AUROC at any checkpoint.

Usage (the docs/results.md figures; about 44 and 63 min on 2 CPU cores, and ~27 GB free disk for the unprojected
matrices)::

    python bench/quality.py --domain pubmedqa > bench/results/quality-pubmedqa.json
    python bench/quality.py --domain gsm8k > bench/results/quality-gsm8k.json
    python bench/plot_quality.py   # docs/results.md and docs/img/quality-*.png from those two files

One JSON object goes to stdout (and ``<out>/result.json``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from common import emit, make_log  # bench/common.py (the script's directory is on sys.path)

from scoring.batching import make_batches, tokenize_samples
from scoring.calibration import CalibratedScores, badness, calibrate, length_buckets, log_upper_p, signal_inputs
from scoring.config import (
    DEFAULT_LORA_TARGETS,
    DEFAULT_PROJECTION_DIM,
    LoraSettings,
    ProjectionSpec,
    TraceConfig,
    TrainingConfig,
)
from scoring.data import Sample, load_gsm8k, load_pubmedqa
from scoring.federated.evaluation import evaluate
from scoring.gradients import adam_precondition, build_gradient_computer
from scoring.models import attach_lora, load_base_model
from scoring.noise import inject_noise
from scoring.projection import build_projector, flatten_grads, make_spec
from scoring.selection import (
    MeanAnchorScore,
    apply_threshold,
    auroc,
    average_ranks,
    keep_all,
    mean_anchor_threshold,
    precision_at_keep,
    random_scores,
    top_fraction_mask,
)
from scoring.signals import sample_signals
from scoring.traces import score_anchor_samples, score_projections
from scoring.training import train_lora
from scoring.types import ProjectedGrads
from scoring.workflow import ModelOptions, load_run_model, release_memory, run_warmup, use_checkpoint

REPO = Path(__file__).resolve().parents[1]
NOISE = {
    "pubmedqa": {"cut": 0.1, "delete": 0.1, "exchange": 0.1},
    "gsm8k": {"wrong_answer": 0.15, "exchange": 0.15},
}
FULL = "full"
CALIBRATED_VARIANTS = {
    "calibrated": (("trace", "perplexity", "ifd", "pmi"), "fisher"),
    "calibrated[max]": (("trace", "perplexity", "ifd", "pmi"), "max"),
    "calibrated[trace, ifd]": (("trace", "ifd"), "fisher"),
    "calibrated[trace, pmi]": (("trace", "pmi"), "fisher"),
    "calibrated[trace, perplexity, ifd]": (("trace", "perplexity", "ifd"), "fisher"),
    "calibrated[trace, perplexity, pmi]": (("trace", "perplexity", "pmi"), "fisher"),
    "calibrated[perplexity, ifd, pmi]": (("perplexity", "ifd", "pmi"), "fisher"),
}
"""The anchor-calibrated fusions measured (`scoring.calibration.calibrate`): name -> (signals, fusion)."""
FISHER_FLOORS = (0.5, 1.0)
"""Fisher fusions that count a signal's badness only beyond these z (the default counts it beyond the anchors'
median, z = 0): fewer false alarms from clean samples mildly unusual on one signal, less weight for mild evidence.
Measured, not kept (docs/results.md)."""
DEFAULT_METHOD = "calibrated"
TRACE_ARM: tuple[str, ...] = ()
"""Training arms beyond issue 16's four (all, random, perplexity, the default): ``("trace",)`` would add the pure
trace's selection, about 3 minutes a seed on 2 cores."""
log = make_log("quality")


def progress(label: str):
    """A progress callback that logs about every 10 % (and the end)."""
    state = {"next": 0.0, "start": time.perf_counter()}

    def update(done: int, total: int, *_: float) -> None:
        if total and (done / total >= state["next"] or done == total):
            log(f"{label}: {done}/{total} ({time.perf_counter() - state['start']:.0f} s)")
            state["next"] = done / total + 0.1

    return update


# --- data ------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    anchors: list[Sample]
    candidates: list[Sample]  # noisy, labelled with meta["noise"]
    held_out: list[Sample]


def split_data(domain: str, data_dir: Path, n: int, n_anchors: int, n_held_out: int, seed: int) -> Split:
    """Disjoint clean anchors, noisy candidates and a clean held-out set, from one seeded shuffle."""
    if domain == "pubmedqa":
        items = load_pubmedqa(data_dir / "pubmedqa" / "ori_pqal.json")
        need = n + n_anchors + n_held_out
        held_pool: list[Sample] | None = None
    else:
        items = load_gsm8k(data_dir / "gsm8k" / "train.jsonl")
        held_pool = load_gsm8k(data_dir / "gsm8k" / "test.jsonl")
        need = n + n_anchors
    if len(items) < need:
        raise SystemExit(f"{domain}: {len(items)} items, --n + --anchors (+ --held-out) need {need}")
    random.Random(seed).shuffle(items)
    anchors, pool = items[:n_anchors], items[n_anchors : n_anchors + n]
    if held_pool is None:
        held_out = items[n_anchors + n : need]
    else:
        random.Random(seed + 1).shuffle(held_pool)
        held_out = held_pool[:n_held_out]
    return Split(anchors, inject_noise(pool, NOISE[domain], seed=seed), held_out)


# --- warmup and the gradient pass ----------------------------------------------------------------------------


def lora_settings(args: argparse.Namespace) -> LoraSettings:
    """The run's LoRA: ``--lora-rank`` r with alpha = 2r (the product's ratio), on ``--lora-targets``."""
    return LoraSettings(rank=args.lora_rank, alpha=2.0 * args.lora_rank, target_modules=tuple(args.lora_targets))


def warmup(args: argparse.Namespace, candidates: list[Sample], run_dir: Path) -> dict:
    train = random.Random(args.seed + 1).sample(candidates, max(1, round(args.warmup_fraction * len(candidates))))
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
        args.model,
        train,
        run_dir,
        lora=lora_settings(args),
        training=training,
        projection={"kind": "sjlt", "dim": primary_dim(args.dims), "seed": 0, "nnz": 4},
        max_len=args.max_len,
        progress=progress("warmup"),
    )
    return {
        "train_samples": len(train),
        "train_noisy": sum(s.meta["noise"] != "clean" for s in train),
        "checkpoints": [{"index": c.index, "step": c.step, "lr": c.lr} for c in ckpts],
    }


@dataclass
class Features:
    """Per (role, preconditioning, dim key): one (N, d) float32 array per checkpoint; plus losses and η_t.

    role: ``anchors`` or ``candidates``; preconditioning: ``plain`` or ``adam``; dim key: an int k or `FULL`."""

    arrays: dict[tuple[str, str, object], list[np.ndarray]]
    specs: dict[object, ProjectionSpec]
    losses: list[np.ndarray]  # candidates' mean response loss per checkpoint
    lrs: list[float]
    anchor_losses: list[np.ndarray]  # the anchors' mean response loss per checkpoint
    signals: dict[str, dict[str, np.ndarray]]  # role -> `scoring.signals.sample_signals` at the last checkpoint

    def save(self, folder: Path) -> None:
        """Write the projected arrays (float16, as silos send them), losses, signals and η_t under ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        for (role, pre, key), mats in self.arrays.items():
            if key != FULL:
                for t, m in enumerate(mats):
                    np.save(folder / f"{role}-{pre}-k{key}-ckpt{t}.npy", np.asarray(m, dtype=np.float16))
        flat = {f"signal-{role}-{name}": v for role, sig in self.signals.items() for name, v in sig.items()}
        np.savez(
            folder / "scalars.npz",
            losses=np.stack(self.losses),
            anchor_losses=np.stack(self.anchor_losses),
            lrs=np.asarray(self.lrs),
            **flat,
        )
        specs = {str(k): v.to_dict() for k, v in self.specs.items() if k != FULL}
        (folder / "specs.json").write_text(json.dumps(specs))

    @classmethod
    def load(cls, folder: Path) -> Features:
        """Inverse of `save` (the projected arrays come back as float32)."""
        saved = json.loads((folder / "specs.json").read_text())
        specs = {int(k): ProjectionSpec.from_dict(v) for k, v in saved.items()}
        scalars = np.load(folder / "scalars.npz")
        n_ckpt = range(len(scalars["lrs"]))
        arrays = {
            (role, pre, k): [np.load(folder / f"{role}-{pre}-k{k}-ckpt{t}.npy").astype(np.float32) for t in n_ckpt]
            for role in ("anchors", "candidates")
            for pre in ("plain", "adam")
            for k in specs
        }
        signals: dict[str, dict[str, np.ndarray]] = {}
        for key in scalars.files:
            if key.startswith("signal-"):
                _, role, name = key.split("-", 2)
                signals.setdefault(role, {})[name] = scalars[key]
        return cls(
            arrays, specs, list(scalars["losses"]), [float(x) for x in scalars["lrs"]], list(scalars["anchor_losses"]),
            signals,
        )  # fmt: skip


def gradient_pass(
    run_dir: Path, split: Split, dims: list[int], batch_size: int, nnz: int = 4, unprojected: bool = True
) -> Features:
    """One exact per-sample gradient pass per checkpoint over anchors and candidates, kept in every variant.

    The unprojected (N, P) float32 matrices (unless not ``unprojected``) go to memory-mapped ``.npy`` files under
    ``run_dir/full`` (with every linear layer adapted at r=8, P = 2.4M for SmolLM2: 3.3 GB per matrix, 27 GB for 4
    checkpoints; four times that at r=32); the projected ones stay in memory."""
    model, tokenizer, manifest, checkpoints = load_run_model(run_dir, ModelOptions())
    layout = [(name, tuple(shape)) for name, shape in manifest["layout"]]
    specs: dict[object, ProjectionSpec] = {k: make_spec("sjlt", k, 0, layout, nnz=nnz) for k in dims}
    n_params = sum(int(np.prod(shape)) for _, shape in layout)
    # The unprojected variant is tagged with a spec of dimension P so that the product's scoring path (which checks
    # that every party used one spec) takes it unchanged; no projection is applied to it.
    if unprojected:
        specs[FULL] = unprojected_tag(make_spec("gaussian", 8, 0, layout), n_params)
    projectors = {k: build_projector(specs[k]) for k in dims}
    engine = build_gradient_computer(model, "hooks")
    roles = {"anchors": split.anchors, "candidates": split.candidates}
    arrays: dict[tuple[str, str, object], list[np.ndarray]] = {
        (role, pre, key): [] for role in roles for pre in ("plain", "adam") for key in specs
    }
    losses: dict[str, list[np.ndarray]] = {role: [] for role in roles}
    signals: dict[str, dict[str, np.ndarray]] = {}
    total, done, start = len(checkpoints) * sum(map(len, roles.values())), 0, time.perf_counter()
    for ckpt in checkpoints:
        use_checkpoint(model, ckpt)
        moments = ckpt.moments()
        for role, samples in roles.items():
            order = {s.id: i for i, s in enumerate(samples)}
            rows = {(pre, key): _matrix(run_dir / "full", f"{role}-{pre}-ckpt{ckpt.index}", len(samples),
                                        specs[key].dim, on_disk=key == FULL)
                    for pre in ("plain", "adam") for key in specs}  # fmt: skip
            loss = np.zeros(len(samples))
            tokenized = tokenize_samples(samples, tokenizer, manifest["max_len"], template=manifest["template"])
            for batch in make_batches(tokenized, batch_size, tokenizer.pad_token_id):
                idx = [order[i] for i in batch.ids]
                grads, batch_losses = engine.compute(batch.input_ids, batch.labels)
                loss[idx] = batch_losses.detach().cpu().numpy()
                for pre, g in (("plain", grads), ("adam", adam_precondition(grads, *moments, ckpt.adam))):
                    if unprojected:
                        rows[(pre, FULL)][idx] = flatten_grads(g).detach().cpu().numpy()
                    for k, projector in projectors.items():
                        rows[(pre, k)][idx] = projector.project(g).detach().cpu().numpy()
                done += len(idx)
            log(f"gradients: {done}/{total} ({time.perf_counter() - start:.0f} s)")
            for (pre, key), matrix in rows.items():
                if isinstance(matrix, np.memmap):
                    matrix.flush()
                    matrix = np.load(matrix.filename, mmap_mode="r")
                else:  # float16, as silos send it (and as `Features.save` keeps it)
                    matrix = matrix.astype(np.float16).astype(np.float32)
                arrays[(role, pre, key)].append(matrix)
            losses[role].append(loss)
            if ckpt is checkpoints[-1]:  # the product's signal checkpoint: the last
                t0 = time.perf_counter()
                signals[role] = sample_signals(
                    model, tokenizer, samples, tokenized, template=manifest["template"], batch_size=batch_size
                )
                log(f"signals of the {role}: {time.perf_counter() - t0:.0f} s")
    del model, engine
    release_memory()
    return Features(arrays, specs, losses["candidates"], [c.lr for c in checkpoints], losses["anchors"], signals)


def unprojected_tag(spec: ProjectionSpec, n_params: int) -> ProjectionSpec:
    """``spec`` with dimension P (the unprojected gradient's length): a tag that lets the unprojected rows through
    the product's scoring path, never built into a projector. Copied past the API's bound on a projection's
    dimension (2^20; P is 2.4 M for SmolLM2 at r = 8), which protects against building a dense P-dimensional
    projector."""
    tag = copy.copy(spec)  # no __post_init__: the bound is not checked
    object.__setattr__(tag, "dim", n_params)
    return tag


def _matrix(folder: Path, name: str, n: int, dim: int, on_disk: bool) -> np.ndarray:
    """A zeroed (n, dim) float32 matrix: in memory, or a memory-mapped ``folder/name.npy`` (``on_disk``)."""
    if not on_disk:
        return np.zeros((n, dim), np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, dim))


# --- scoring -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    similarity: str
    precond: str  # "adam" | "plain"
    ckpts: str  # "all" | "last"
    dim: object  # k or FULL
    groups: bool = False

    @property
    def name(self) -> str:
        dim = "unprojected" if self.dim == FULL else f"k={self.dim}"
        t = "all ckpts" if self.ckpts == "all" else "last ckpt"
        return f"ours[{self.similarity}, {self.precond}, {t}, {dim}{', anchor groups' if self.groups else ''}]"


def _projections(feat: Features, role: str, pre: str, key: object, ids: list[str], ts: list[int], as_role: str):
    return [
        ProjectedGrads(
            ids=tuple(ids),
            matrix=feat.arrays[(role, pre, key)][t],
            spec=feat.specs[key],
            checkpoint=i,
            lr=feat.lrs[t],
            role=as_role,
            preconditioned=as_role == "candidate" and pre == "adam",
        )
        for i, t in enumerate(ts)
    ]


@dataclass
class TraceResult:
    scores: np.ndarray  # (N,) candidates' trace scores
    keep: np.ndarray  # (N,) bool, at the mean-anchor threshold
    anchor_scores: np.ndarray  # (M,) the anchor samples' leave-one-out scores


def trace_scores(feat: Features, split: Split, v: Variant, ts: list[int] | None = None) -> TraceResult:
    """Candidate scores, keep mask at the mean-anchor threshold and anchor scores of one variant, by the product's
    scoring path, over the checkpoints ``ts`` (default: those the variant names, all or the last)."""
    if ts is None:
        ts = list(range(len(feat.lrs))) if v.ckpts == "all" else [len(feat.lrs) - 1]
    cand_ids, anchor_ids = [s.id for s in split.candidates], [s.id for s in split.anchors]
    anchors = _projections(feat, "anchors", "plain", v.dim, anchor_ids, ts, "anchor")
    cands = _projections(feat, "candidates", v.precond, v.dim, cand_ids, ts, "candidate")
    anchors_as_cands = _projections(feat, "anchors", v.precond, v.dim, anchor_ids, ts, "candidate")
    groups = [s.meta["label"] for s in split.anchors] if v.groups else None
    dim = feat.specs[v.dim].dim
    config = TraceConfig(similarity=v.similarity, chunk_rows=max(8, min(1024, (64 << 20) // (4 * dim))))  # <=64 MB
    table = score_projections({"pool": cands}, anchors, config, groups)
    anchor_table = score_anchor_samples(anchors_as_cands, anchors, config, groups)
    selected = apply_threshold(table, MeanAnchorScore(), anchor_table)
    return TraceResult(table.scores, np.asarray(selected.selected), anchor_table.scores)


def detection(scores: np.ndarray | None, noise: np.ndarray, keep: np.ndarray) -> dict:
    """AUROC (overall and per kind vs the clean samples) of a score; precision of the ``keep`` mask."""
    clean = noise == "clean"
    out: dict = {"precision_at_keep": precision_at_keep(keep, clean), "kept": int(keep.sum())}
    if scores is None:
        return out | {"auroc": None}
    out["auroc"] = auroc(scores, clean)
    for kind in sorted(set(noise) - {"clean"}):
        rows = clean | (noise == kind)
        out[f"auroc_{kind}"] = auroc(scores[rows], clean[rows])
    return out


def primary_dim(dims: list[int]) -> int:
    """The primary variant's k: the product's default projection dimension when measured, else the largest."""
    return DEFAULT_PROJECTION_DIM if DEFAULT_PROJECTION_DIM in dims else max(dims)


def score_methods(feat: Features, split: Split, dims: list[int], domain: str, seed: int) -> dict:
    """Every method's detection metrics; the default (`DEFAULT_METHOD`) sets the keep rate all are compared at."""
    noise = np.array([s.meta["noise"] for s in split.candidates])
    clean = noise == "clean"
    ids = [s.id for s in split.candidates]
    silos = ["pool"] * len(ids)
    primary = Variant("cosine", "adam", "all", primary_dim(dims))
    trace = trace_scores(feat, split, primary)
    last = len(feat.losses) - 1
    cand = {"trace": trace.scores, "loss": feat.losses[last], "loss_uncond": feat.signals["candidates"]["loss_uncond"]}
    anch = {"trace": trace.anchor_scores, "loss": feat.anchor_losses[last]}
    anch["loss_uncond"] = feat.signals["anchors"]["loss_uncond"]
    calibrated = {
        name: calibrate(cand, anch, signals, fusion) for name, (signals, fusion) in CALIBRATED_VARIANTS.items()
    }
    default_cands, default_anchors = calibrated[DEFAULT_METHOD]
    for floor in FISHER_FLOORS:  # the default's z, with only badness beyond z = floor counting
        floored = -2.0 * log_upper_p(np.maximum(default_cands.z, floor)).sum(axis=1)
        calibrated[f"{DEFAULT_METHOD}[fisher, z floor {floor}]"] = (CalibratedScores(
            default_cands.signals, default_cands.raw, default_cands.z, -floored
        ), default_anchors)  # fmt: skip
    default_keep = default_cands.scores >= mean_anchor_threshold(default_anchors.scores)
    rate = float(default_keep.mean())

    def at_rate(scores: np.ndarray) -> np.ndarray:
        return top_fraction_mask(scores, ids, silos, rate)[0]

    single = {name: -badness(name, **signal_inputs(cand, name)) for name in ("perplexity", "ifd", "pmi")}
    single["trace"] = trace.scores
    chance = random_scores(ids, silos, seed).scores
    hybrid = (average_ranks(trace.scores) + average_ranks(single["perplexity"])) / 2.0
    ranked = {"random": chance, **single, "hybrid_rank(trace, perplexity)": hybrid}
    ranked |= {name: cands.scores for name, (cands, _) in calibrated.items()}
    keeps = {"all": keep_all(ids, silos).scores > 0} | {name: at_rate(v) for name, v in ranked.items()}
    methods: dict[str, dict] = {"all": detection(None, noise, keeps["all"])}
    methods |= {name: detection(v, noise, keeps[name]) for name, v in ranked.items()}
    methods["trace"]["threshold_kept"] = int(trace.keep.sum())
    methods["trace"]["precision_at_threshold"] = precision_at_keep(trace.keep, clean)
    keeps[DEFAULT_METHOD] = default_keep  # the default trains on what its own threshold keeps
    methods[DEFAULT_METHOD]["threshold_kept"] = int(default_keep.sum())
    methods[DEFAULT_METHOD]["precision_at_threshold"] = precision_at_keep(default_keep, clean)
    n_tokens = feat.signals["candidates"]["n_tokens"]
    lengths = {name: length_buckets(ranked[name], clean, n_tokens) for name in (*single, DEFAULT_METHOD)}
    detail: dict = {
        "length_buckets": lengths,
        "flagged_by": _flag_counts(default_cands, noise, default_keep),
        "anchor_quantile_keep": {
            f"q{q}": precision_and_count(default_cands.scores >= np.quantile(default_anchors.scores, q), clean)
            for q in (0.05, 0.1, 0.25, 0.5)
        },
    }
    detail |= {f"perplexity@ckpt{t}": detection(-loss, noise, at_rate(-loss)) for t, loss in enumerate(feat.losses)}
    variants = [
        Variant(sim, pre, ckpts, dim)
        for sim in ("cosine", "dot")
        for pre in ("adam", "plain")
        for ckpts in ("all", "last")
        for dim in feat.specs  # every k of dims, then FULL when measured
    ]
    labels = [s.meta.get("label") for s in split.anchors]
    if domain == "pubmedqa" and min(labels.count(label) for label in set(labels)) >= 2:  # leave-one-out needs 2
        variants += [Variant("cosine", "adam", "all", primary_dim(dims), groups=True)]
    for v in variants:
        result = trace if v == primary else trace_scores(feat, split, v)
        row = detection(result.scores, noise, at_rate(result.scores)) | {"threshold_kept": int(result.keep.sum())}
        row["precision_at_threshold"] = precision_at_keep(result.keep, clean)
        detail[v.name] = row
    signals, fusion = CALIBRATED_VARIANTS[DEFAULT_METHOD]
    for label, how in WHITENINGS.items():
        white, white_anchors = whitened_trace(feat, primary.dim, **how)
        detail[f"trace[whitened: {label}]"] = detection(white, noise, at_rate(white))
        fused, _ = calibrate(cand | {"trace": white}, anch | {"trace": white_anchors}, signals, fusion)
        detail[f"{DEFAULT_METHOD}[whitened: {label}]"] = detection(fused.scores, noise, at_rate(fused.scores))
    alone = [trace_scores(feat, split, primary, ts=[t]) for t in range(len(feat.lrs))]
    detail["per_checkpoint(trace)"] = [detection(r.scores, noise, at_rate(r.scores)) for r in alone]
    for first in range(1, len(feat.lrs)):
        r = trace_scores(feat, split, primary, ts=list(range(first, len(feat.lrs))))
        span = f"checkpoints {first}..{len(feat.lrs) - 1}"
        detail[f"trace({span})"] = detection(r.scores, noise, at_rate(r.scores))
        fewer, _ = calibrate(cand | {"trace": r.scores}, anch | {"trace": r.anchor_scores}, signals, fusion)
        detail[f"{DEFAULT_METHOD}(trace over {span})"] = detection(fewer.scores, noise, at_rate(fewer.scores))
    return {
        "primary": primary.name,
        "default": DEFAULT_METHOD,
        "keep_rate": rate,
        "methods": methods,
        "detail": detail,
        "samples": per_sample_values(noise, cand, anch, n_tokens, feat.signals["anchors"]["n_tokens"]),
        "_keeps": {k: keeps[k] for k in ("all", "random", "perplexity", *TRACE_ARM, DEFAULT_METHOD)},
    }


def per_sample_values(noise: np.ndarray, cand: dict, anch: dict, n_tokens: np.ndarray, anchor_tokens) -> dict:
    """The raw per-sample values every calibrated score is computed from (the trace over all checkpoints, the
    anchors' leave-one-out; ℓ(y|x) and ℓ(y|∅) at the signal checkpoint; the response length), candidates with
    their noise kind: a few kB that let a new fusion be measured on every seed without another gradient pass."""

    def column(values) -> list[float]:
        return [float(f"{v:.7g}") for v in np.asarray(values, dtype=np.float64)]

    return {
        "candidates": {"noise": [str(k) for k in noise], **{k: column(v) for k, v in cand.items()},
                       "n_tokens": column(n_tokens)},
        "anchors": {**{k: column(v) for k, v in anch.items()}, "n_tokens": column(anchor_tokens)},
    }  # fmt: skip


# --- whitening (measured, not kept: see docs/results.md) ------------------------------------------------------

WHITENINGS = {
    "anchors (λ=1)": {"lam": 1.0, "delta": 1.0},
    "anchors (λ=1, δ=0.1)": {"lam": 1.0, "delta": 0.1},
    "anchors + pool (λ=0.5)": {"lam": 0.5, "delta": 1.0},
    "pool (λ=0)": {"lam": 0.0, "delta": 1.0},
    "top 1 anchor PC out": {"pcs": 1},
    "top 3 anchor PCs out": {"pcs": 3},
}
"""TRAK/TrackStar-style transforms of the projected gradients, applied to anchors and candidates alike before the
cosine trace: R^(-1/2) with R = λ·C_anchors + (1−λ)·C_pool + δ·mean(eig)·I (C: the centred covariance of the
anchors' plain projections or of the candidates', per checkpoint), or the top anchor principal components
projected out; rows are unit-normalised before the covariances. R − δI has rank ≤ M + N, so R^(-1/2) is applied
through a thin SVD, never as a k×k matrix."""


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def whitened_trace(feat: Features, key: object, lam: float = 1.0, delta: float = 1.0, pcs: int = 0):
    """(candidates', anchors' leave-one-out) cosine trace over every checkpoint after a `WHITENINGS` transform."""
    n_cand, n_anchor = len(feat.losses[0]), len(feat.anchor_losses[0])
    cand, anch = np.zeros(n_cand), np.zeros(n_anchor)
    for t, lr in enumerate(feat.lrs):
        # unit rows first: the cosine ignores norms, and plain and Adam-preconditioned rows differ in scale by orders
        # of magnitude (unnormalised, the pool's covariance drowns the anchors' whatever λ)
        a = _unit(feat.arrays[("anchors", "plain", key)][t].astype(np.float64))  # (M, k) anchor directions' rows
        c = _unit(feat.arrays[("candidates", "adam", key)][t].astype(np.float64))  # (N, k)
        own = _unit(feat.arrays[("anchors", "adam", key)][t].astype(np.float64))  # (M, k) anchors as candidates
        if pcs:
            _, _, vt = np.linalg.svd(a - a.mean(0), full_matrices=False)
            basis = vt[:pcs].T  # (k, pcs)

            def apply(x: np.ndarray, basis: np.ndarray = basis) -> np.ndarray:
                return x - (x @ basis) @ basis.T

        else:
            cols = [np.sqrt(lam / len(a)) * (a - a.mean(0))]
            if lam < 1.0:
                cols.append(np.sqrt((1.0 - lam) / len(c)) * (c - c.mean(0)))
            q, sv, _ = np.linalg.svd(np.concatenate(cols).T, full_matrices=False)  # R − δI = q diag(sv²) qᵀ
            d = delta * float(np.mean(sv**2))
            gain = (d + sv**2) ** -0.5 - d**-0.5

            def apply(x: np.ndarray, q: np.ndarray = q, gain: np.ndarray = gain, d: float = d) -> np.ndarray:
                return x * d**-0.5 + ((x @ q) * gain) @ q.T

        a, c, own = _unit(apply(a)), _unit(apply(c)), _unit(apply(own))
        direction = a.mean(0)
        cand += lr * (c @ direction)
        m = len(a)
        anch += lr * ((own @ direction) * m - (own * a).sum(1)) / (m - 1)  # leave-one-out, as the product does
    return cand, anch


def precision_and_count(keep: np.ndarray, clean: np.ndarray) -> dict:
    return {"kept": int(keep.sum()), "precision": precision_at_keep(keep, clean)}


def _flag_counts(cands: CalibratedScores, noise: np.ndarray, keep: np.ndarray) -> dict:
    """For the dropped samples of each noise kind: how many each signal flagged (its largest z)."""
    flagged = np.asarray(cands.flagged_by)
    out: dict = {}
    for kind in sorted(set(noise)):
        rows = (noise == kind) & ~keep
        out[kind] = {name: int((flagged[rows] == name).sum()) for name in cands.signals}
    return out


SINGLE_SIGNALS = ("perplexity", "ifd", "pmi", "trace")


def check_targets(methods: dict, default: str = DEFAULT_METHOD) -> dict:
    """Issue 16's per-seed targets (PubMedQA): the default's AUROC >= 0.97 and precision at its keep rate >= 0.97;
    per noise kind, the default against the best single signal (the cross-seed check is `quality_seeds.py`'s)."""
    ours = methods[default]
    out: dict = {
        "default_auroc_ge_0.97": {"value": ours["auroc"], "pass": ours["auroc"] >= 0.97},
        "default_precision_at_keep_ge_0.97": {
            "value": ours["precision_at_keep"],
            "pass": ours["precision_at_keep"] >= 0.97,
        },
    }
    for key in (k for k in ours if k.startswith("auroc_")):
        best = max(SINGLE_SIGNALS, key=lambda m: methods[m][key])
        out[f"default_{key[6:]}_ge_best_single"] = {
            "default": ours[key],
            "best_single": methods[best][key],
            "at": best,
            "pass": ours[key] >= methods[best][key],
        }
    out["all_pass"] = all(v["pass"] for v in out.values())
    return out


# --- training arms ---------------------------------------------------------------------------------------------


def train_and_evaluate(args: argparse.Namespace, split: Split, keep: np.ndarray | None, out_dir: Path) -> dict:
    """A fresh LoRA (B=0) trained on the kept candidates (``keep`` None: the untrained base), then evaluated."""
    start = time.perf_counter()
    base = load_base_model(args.model)
    model = attach_lora(base.model, lora_settings(args), init_seed=args.seed)
    tokenizer = base.tokenizer
    info: dict = {"train_samples": 0}
    if keep is not None:
        chosen = [s for s, k in zip(split.candidates, keep, strict=True) if k]
        info = {
            "train_samples": len(chosen),
            "train_clean": sum(s.meta["noise"] == "clean" for s in chosen),
        }
        data = tokenize_samples(chosen, tokenizer, args.max_len)
        cfg = TrainingConfig(
            epochs=args.train_epochs, batch_size=4, lr=args.lr, schedule="constant", warmup_ratio=0.0,
            num_checkpoints=1, seed=args.seed,
        )  # fmt: skip
        train_lora(model, data, cfg, out_dir, pad_id=tokenizer.pad_token_id, progress=progress(f"train {out_dir.name}"))
    metrics = evaluate(
        model, tokenizer, split.held_out, max_len=args.max_len, batch_size=8, max_new_tokens=args.max_new_tokens
    )
    del model, base
    release_memory()
    return info | {"metrics": metrics, "seconds": time.perf_counter() - start}


# --- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domain", required=True, choices=tuple(NOISE))
    p.add_argument("--model", default="smollm2", help="model reference (default smollm2; tiny:0 for a smoke test)")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="holds pubmedqa/ and gsm8k/")
    p.add_argument("--n", type=int, default=300, help="candidates (default 300)")
    p.add_argument("--anchors", type=int, default=40, help="clean anchors (default 40)")
    p.add_argument("--held-out", type=int, default=30, help="clean held-out items (default 30)")
    p.add_argument("--checkpoints", type=int, default=4, help="warmup checkpoints T (default 4)")
    p.add_argument("--warmup-steps", type=int, default=12, help="warmup AdamW steps of batch 4 (default 12)")
    p.add_argument("--warmup-fraction", type=float, default=0.2, help="share of candidates warmed up on (0.2)")
    p.add_argument("--lr", type=float, default=3e-4, help="constant learning rate (default 3e-4)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument(
        "--dims",
        default=f"1024,8192,{DEFAULT_PROJECTION_DIM}",
        help=f"SJLT dimensions k (default 1024,8192,{DEFAULT_PROJECTION_DIM})",
    )
    p.add_argument(
        "--lora-targets",
        default=",".join(DEFAULT_LORA_TARGETS),
        help="comma-separated LoRA target modules (default: the product's, every linear layer of a block)",
    )
    p.add_argument(
        "--lora-rank", type=int, default=LoraSettings.rank, help=f"LoRA rank r (default {LoraSettings.rank})"
    )
    p.add_argument("--nnz", type=int, default=4, help="SJLT non-zeros per coordinate (default 4, the product's)")
    p.add_argument("--batch-size", type=int, default=8, help="gradient batch size (default 8)")
    p.add_argument("--train-epochs", type=float, default=1.0, help="epochs of each training arm (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=192, help="GSM8K generation length (default 192)")
    p.add_argument("--no-train", action="store_true", help="detection metrics only")
    p.add_argument(
        "--no-unprojected",
        action="store_true",
        help="skip the unprojected variants (their matrices take ~27 GB of disk at r=8, four times that at r=32)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument(
        "--reuse-features",
        type=Path,
        default=None,
        help="score a previous run's saved <out>/features (same seed and settings) instead of warming up and "
        "computing gradients again",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, e.g. 0,1,2: one run per seed under <out>/seed-N, then the summary (mean and "
        "spread, issue 16's targets) on stdout; with --reuse-features DIR each seed reads DIR/seed-N/features",
    )
    p.add_argument(
        "--summarize",
        nargs="+",
        default=None,
        metavar="RESULT_JSON",
        help="only write the summary of these per-seed result files (one domain)",
    )
    p.add_argument("--summary-out", type=Path, default=None, help="also write the summary to this file")
    p.add_argument("--out", type=Path, default=None, help="work directory (default bench/.work/quality-DOMAIN)")
    args = p.parse_args(argv)
    try:
        args.dims = sorted({int(k) for k in args.dims.split(",") if k.strip()})
    except ValueError:
        p.error(f"--dims: expected comma-separated integers, got {args.dims!r}")
    args.lora_targets = [m.strip() for m in args.lora_targets.split(",") if m.strip()]
    if not args.lora_targets:
        p.error("--lora-targets: name at least one module")
    args.out = args.out or REPO / "bench" / ".work" / f"quality-{args.domain}"
    if args.seeds is not None:
        try:
            args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
        if not args.seeds or len(set(args.seeds)) != len(args.seeds):
            p.error("--seeds: name at least one seed, each once")
    return args


FEATURE_SETTINGS = (
    "domain", "model", "n", "anchors", "held_out", "checkpoints", "warmup_steps", "warmup_fraction", "lr", "max_len",
    "lora_targets", "lora_rank", "nnz", "seed",
)  # fmt: skip


def feature_settings(args: argparse.Namespace) -> dict:
    """The settings that determine a run's features (split, warmup, gradients), to check a reuse against."""
    return {k: getattr(args, k) for k in FEATURE_SETTINGS}


def load_features(args: argparse.Namespace) -> tuple[Features, dict]:
    """A previous run's saved features (``--reuse-features``), after checking it was made with these settings."""
    folder = args.reuse_features
    if not (folder / "run.json").is_file():
        raise SystemExit(f"--reuse-features: {folder} holds no run.json (a quality run's <out>/features)")
    run = json.loads((folder / "run.json").read_text())
    diff = {k: (v, run["settings"].get(k)) for k, v in feature_settings(args).items() if run["settings"].get(k) != v}
    if diff:
        raise SystemExit(f"--reuse-features: made with other settings (now, then): {diff}")
    feat = Features.load(folder)
    missing = sorted(set(args.dims) - set(feat.specs))
    if missing:
        raise SystemExit(f"--reuse-features: no projections at k = {missing} (saved: {sorted(feat.specs)})")
    return feat, run["warmup"]


def run_seed(args: argparse.Namespace) -> dict:
    """One seed's run (``args.seed``, ``args.out``): warmup, gradients (or ``--reuse-features``), scoring, arms."""
    if args.out.exists() and any(p.name != "features" or not args.reuse_features for p in args.out.iterdir()):
        raise SystemExit(f"--out: {args.out} is not empty; remove it or choose another")
    started = time.perf_counter()
    timing: dict[str, float] = {}
    split = split_data(args.domain, args.data_dir, args.n, args.anchors, args.held_out, args.seed)
    noise = np.array([s.meta["noise"] for s in split.candidates])
    if args.reuse_features:
        feat, warm = load_features(args)
    else:
        t0 = time.perf_counter()
        warm = warmup(args, split.candidates, args.out / "run")
        timing["warmup"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        feat = gradient_pass(args.out / "run", split, args.dims, args.batch_size, args.nnz, not args.no_unprojected)
        timing["gradients"] = time.perf_counter() - t0
        feat.save(args.out / "features")
        run = {"settings": feature_settings(args), "warmup": warm}
        (args.out / "features" / "run.json").write_text(json.dumps(run))
    t0 = time.perf_counter()
    scored = score_methods(feat, split, args.dims, args.domain, args.seed)
    timing["scoring"] = time.perf_counter() - t0
    keeps = scored.pop("_keeps")
    del feat
    shutil.rmtree(args.out / "run" / "full", ignore_errors=True)  # the unprojected matrices (tens of GB)
    release_memory()
    training: dict = {}
    if not args.no_train:
        training["base"] = train_and_evaluate(args, split, None, args.out / "train-base")
        for arm, keep in keeps.items():
            log(f"training arm {arm}: {int(keep.sum())} samples")
            training[arm] = train_and_evaluate(args, split, keep, args.out / f"train-{arm}")
            timing[f"train_{arm}"] = training[arm]["seconds"]
    timing["total"] = time.perf_counter() - started
    result = {
        "benchmark": "quality",
        "domain": args.domain,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "candidates": len(split.candidates),
            "anchors": len(split.anchors),
            "held_out": len(split.held_out),
            "noise": {k: int((noise == k).sum()) for k in sorted(set(noise))},
            "warmup": warm,
        },
        **scored,
        "training": training,
        "timing_s": timing,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
    }
    if args.domain == "pubmedqa":
        result["targets"] = check_targets(scored["methods"])
    return result


# --- several seeds -------------------------------------------------------------------------------------------


def _mean_spread(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(np.mean(vals)), "min": float(min(vals)), "max": float(max(vals))}


def summarize_seeds(results: list[dict]) -> dict:
    """The three-seed summary (``quality-<domain>-seeds.json``): per seed each method's AUROC, AUROC per kind and
    precision at the default's keep rate; their mean and spread; training arms; and issue 16's targets.

    Targets: PubMedQA — the default's AUROC >= 0.97 on every seed, its precision at its keep rate >= 0.97 on every
    seed, and per noise kind its mean over seeds >= the best single signal's mean; GSM8K — the default's mean AUROC
    >= every single signal's. Both — training on the default's selection gives the lowest held-out loss of the arms
    all / random / perplexity / default on at least 2 seeds (where the seeds were trained)."""
    domains = {r["domain"] for r in results}
    if len(domains) != 1:
        raise SystemExit(f"summarize: results of one domain only, got {sorted(domains)}")
    domain = domains.pop()
    default = results[0]["default"]
    kinds = sorted(k for k in results[0]["data"]["noise"] if k != "clean")
    per_seed: dict = {}
    for r in results:
        methods = {
            name: {
                "auroc": m["auroc"],
                "by_kind": {k: m.get(f"auroc_{k}") for k in kinds},
                "precision_at_keep": m["precision_at_keep"],
                "kept": m["kept"],
            }
            | ({"precision_at_threshold": m["precision_at_threshold"]} if "precision_at_threshold" in m else {})
            for name, m in r["methods"].items()
        }
        arms = {arm: t["metrics"]["loss"] for arm, t in (r.get("training") or {}).items()}
        per_seed[str(r["settings"]["seed"])] = {"methods": methods, "keep_rate": r["keep_rate"], "held_out_loss": arms}
    seeds = list(per_seed)
    names = list(per_seed[seeds[0]]["methods"])
    summary = {
        name: {
            "auroc": _mean_spread([per_seed[s]["methods"][name]["auroc"] for s in seeds]),
            "by_kind": {k: _mean_spread([per_seed[s]["methods"][name]["by_kind"][k] for s in seeds]) for k in kinds},
            "precision_at_keep": _mean_spread([per_seed[s]["methods"][name]["precision_at_keep"] for s in seeds]),
        }
        for name in names
    }
    ours = summary[default]
    targets: dict = {}
    if domain == "pubmedqa":
        aurocs = [per_seed[s]["methods"][default]["auroc"] for s in seeds]
        precisions = [per_seed[s]["methods"][default]["precision_at_keep"] for s in seeds]
        targets["default_auroc_ge_0.97_every_seed"] = {"values": aurocs, "pass": min(aurocs) >= 0.97}
        targets["default_precision_at_keep_ge_0.97_every_seed"] = {
            "values": precisions,
            "pass": min(precisions) >= 0.97,
        }
        for k in kinds:
            best = max(SINGLE_SIGNALS, key=lambda m: summary[m]["by_kind"][k]["mean"])
            targets[f"default_{k}_mean_ge_best_single"] = {
                "default": ours["by_kind"][k]["mean"],
                "best_single": summary[best]["by_kind"][k]["mean"],
                "at": best,
                "pass": ours["by_kind"][k]["mean"] >= summary[best]["by_kind"][k]["mean"],
            }
    else:
        best = max(SINGLE_SIGNALS, key=lambda m: summary[m]["auroc"]["mean"])
        targets["default_mean_auroc_ge_every_single"] = {
            "default": ours["auroc"]["mean"],
            "best_single": summary[best]["auroc"]["mean"],
            "at": best,
            "pass": ours["auroc"]["mean"] >= summary[best]["auroc"]["mean"],
        }
    trained = {s: per_seed[s]["held_out_loss"] for s in seeds if per_seed[s]["held_out_loss"]}
    if trained:
        arms = ("all", "random", "perplexity", default)
        lowest = {s: min(arms, key=lambda a: losses[a]) for s, losses in trained.items()}
        wins = [s for s, arm in lowest.items() if arm == default]
        targets["default_arm_lowest_held_out_loss_on_2_seeds"] = {"lowest": lowest, "pass": len(wins) >= 2}
    targets["three_seeds_measured"] = {"seeds": [int(s) for s in seeds], "pass": len(seeds) >= 3}
    targets["all_pass"] = all(v["pass"] for v in targets.values())
    return {
        "benchmark": "quality-seeds",
        "domain": domain,
        "seeds": [int(s) for s in seeds],
        "default": default,
        "kinds": kinds,
        "per_seed": per_seed,
        "summary": summary,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.summarize:
        emit(summarize_seeds([json.loads(Path(p).read_text()) for p in args.summarize]), args.summary_out)
        return 0
    if args.seeds is None:
        emit(run_seed(args), args.out / "result.json")
        return 0
    results = []
    for seed in args.seeds:
        one = argparse.Namespace(**{**vars(args), "seed": seed, "out": args.out / f"seed-{seed}"})
        if args.reuse_features:
            one.reuse_features = args.reuse_features / f"seed-{seed}" / "features"
        result = run_seed(one)
        emit_quiet(result, one.out / "result.json")
        results.append(result)
    emit(summarize_seeds(results), args.summary_out or args.out / "seeds.json")
    return 0


def emit_quiet(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
