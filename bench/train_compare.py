"""Held-out loss after federated LoRA training on all, CLUES-selected and random data (PubMedQA, 30 % noise).

Setup (seeded): the PubMedQA PQA-L items are split as in `quality.py` (`quality.split_data`): ``--anchors`` clean
anchors, then ``--n`` candidates of which 10 % each are corrupted by ``cut``, ``delete`` and ``exchange``; the next
``--eval`` items of the same shuffle are a clean held-out set, disjoint from both. SmolLM2-135M-Instruct.

Scoring, exactly as `quality.py` with its defaults (its own functions: warmup on 10 % of the candidates from a
random lora_B, 2 checkpoints, hooks + SJLT k=8192, Adam preconditioning; ``--max-len`` 512), then the library's
primary score: trace score with cosine similarity on the preconditioned gradients (`scoring.steps.score_dirs`)
and the CLUES threshold, the mean score of the anchors (`scoring.selection.MeanAnchorScore`, the default policy).

Training: the candidates are dealt round-robin into ``--silos`` silos. Each arm trains one fresh LoRA adapter
(r=8 on q_proj and v_proj, peft's lora_B=0, the same ``--lora-init-seed`` in every arm) for ``--rounds`` FedAvg
rounds, in process, with the product's functions: each silo runs `scoring.federated.local_update` (``--local-steps``
AdamW steps of batch ``--batch-size`` at `round_lr`, constant ``--lr``) from the round's global weights, keeping
its own Adam moments across rounds as the silo agent does; `scoring.aggregation.FedAvg` averages the silos'
weights by their sample counts. A silo with no sample in an arm sits the round out. Arms:

- ``all``: every candidate;
- ``selected``: the candidates the CLUES threshold keeps;
- ``random``: per silo, as many random candidates as it has selected (seeded), so the sizes match.

Each final adapter, and once the untrained adapter (B=0: the base model), is evaluated on the held-out set with
`scoring.evaluation.evaluate`: mean response loss, perplexity over response tokens, and PubMedQA accuracy by
option log-likelihood.

Usage (the defaults take several hours on 2 shared CPU cores; the second line is the ~41 min run in
bench/README.md)::

    python bench/train_compare.py --out bench/.work/train-compare > bench/results/train-compare-n50.json
    python bench/train_compare.py --n 50 --anchors 20 --eval 20 --rounds 2 --local-steps 3 --threads 1 \
        --out bench/.work/train-compare > bench/results/train-compare-n50.json

One JSON object goes to stdout (and ``<out>/result.json``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import quality  # bench/quality.py (sets the offline environment before torch and transformers load)
import torch
from common import emit, make_log

from scoring.aggregation import FedAvg, ServerState, SiloUpdate
from scoring.batching import TokenizedSample, tokenize_samples
from scoring.config import LocalTrainConfig, LoraSettings, TraceConfig, round_lr
from scoring.data import Sample
from scoring.evaluation import evaluate
from scoring.federated import LocalMoments, Weights, get_lora_weights, local_update, set_lora_weights
from scoring.models import attach_lora, load_base_model
from scoring.selection import MeanAnchorScore, apply_threshold
from scoring.steps import score_dirs

REPO = Path(__file__).resolve().parents[1]
ARMS = ("all", "selected", "random")

log = make_log("train-compare")


def split_all(args: argparse.Namespace, path: Path) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(clean anchors, noisy candidates, clean held-out), disjoint slices of one seeded shuffle."""
    anchors, candidates = quality.split_data(path, args.n, args.anchors, args.seed)
    start = args.anchors + args.n
    items = quality.shuffled_items(path, start + args.eval, "--anchors + --n + --eval", args.seed)
    return anchors, candidates, items[start : start + args.eval]


def quality_args(args: argparse.Namespace) -> argparse.Namespace:
    """quality.py's own settings (its defaults) for our split, seed, max_len and work directory."""
    opts = {"--n": args.n, "--anchors": args.anchors, "--max-len": args.max_len, "--seed": args.seed}
    opts["--out"] = args.out / "scoring"
    return quality.parse_args([str(x) for pair in opts.items() for x in pair])


def score_and_select(args: argparse.Namespace, anchors: list[Sample], candidates: list[Sample]) -> dict:
    """Warm up, project and score as quality.py does, then apply the mean-anchor threshold."""
    qargs = quality_args(args)
    work = qargs.out
    warm = quality.warmup(qargs, candidates, work / "run")
    quality.project_all(qargs, work / "run", anchors, candidates, work)
    table, anchor_table = score_dirs({"pool": work / "proj" / "candidates"}, work / "proj" / "anchors", TraceConfig())
    if list(table.ids) != [s.id for s in candidates]:
        raise SystemExit("scores are not in candidate order")
    chosen = apply_threshold(table, MeanAnchorScore(), anchor_table)
    noise = np.array([s.meta["noise"] for s in candidates])
    return {
        "selected": chosen.selected,
        "threshold": chosen.threshold,
        "noise": noise,
        "warmup": warm,
        "auroc": quality.detection(chosen.scores, noise),
    }


def selection_stats(sel: dict, silos: list[np.ndarray]) -> dict:
    """Selected count, precision and recall of clean samples among the selected, per kind and per silo."""
    selected, noise = sel["selected"], sel["noise"]
    clean = noise == "clean"
    kept = int(selected.sum())
    return {
        "policy": "mean-anchor",
        "score": "trace, cosine, Adam-preconditioned",
        "threshold": sel["threshold"],
        "selected": kept,
        "candidates": len(selected),
        "clean_selected": int((selected & clean).sum()),
        "precision_clean": float((selected & clean).sum() / kept) if kept else float("nan"),
        "recall_clean": float((selected & clean).sum() / clean.sum()),
        "clean_share_of_candidates": float(clean.mean()),
        "selected_by_kind": {k: int((selected & (noise == k)).sum()) for k in ("clean", *quality.KINDS)},
        "selected_by_silo": [int(selected[rows].sum()) for rows in silos],
        "auroc": sel["auroc"],
    }


def arm_indices(selected: np.ndarray, silos: list[np.ndarray], seed: int) -> dict[str, list[np.ndarray]]:
    """Each arm's candidate indices per silo (random: the silo's selected count, drawn with a seeded RNG)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {"all": list(silos), "selected": [rows[selected[rows]] for rows in silos]}
    out["random"] = [np.sort(rng.choice(rows, size=int(selected[rows].sum()), replace=False)) for rows in silos]
    return out


def federated_train(
    model: torch.nn.Module,
    data: list[list[TokenizedSample]],
    cfg: LocalTrainConfig,
    rounds: int,
    pad_id: int,
    init: Weights,
) -> tuple[Weights, list[dict]]:
    """FedAvg over the silos' ``data`` from ``init``; returns the final global weights and per-round records."""
    weights, state, history = dict(init), ServerState(), []
    moments: list[LocalMoments | None] = [None] * len(data)
    for r in range(rounds):
        lr, updates, losses = round_lr(cfg, r, rounds), [], []
        for s, silo_data in enumerate(data):
            if not silo_data:
                continue  # nothing to train on in this arm: the silo sits the round out
            res = local_update(
                model, silo_data, cfg, pad_id=pad_id, global_weights=weights, lr=lr, moments=moments[s], round=r
            )
            moments[s] = res.moments
            updates.append(SiloUpdate(f"silo{s}", res.weights, res.num_samples))
            losses.append(res.mean_loss)
        weights, state = FedAvg().aggregate(weights, updates, state)
        history.append({"round": r, "lr": lr, "participants": len(updates), "train_loss": losses})
        log(f"  round {r + 1}/{rounds}: lr {lr:.2e}, silo train losses {[round(x, 3) for x in losses]}")
    return weights, history


def held_out_metrics(model, tokenizer, weights: Weights, held: list[Sample], args: argparse.Namespace) -> dict:
    """`evaluate` of ``weights`` on the held-out set (loss, perplexity, PubMedQA accuracy by log-likelihood)."""
    set_lora_weights(model, weights)
    start = time.perf_counter()
    metrics = evaluate(
        model, tokenizer, held, max_len=args.max_len, batch_size=args.eval_batch_size, pubmedqa_method="loglik"
    )
    return metrics | {"eval_s": time.perf_counter() - start}


def train_arms(args: argparse.Namespace, candidates: list[Sample], held: list[Sample], arms: dict) -> dict:
    """The baseline and each arm's federated training and held-out metrics."""
    base = load_base_model("smollm2")
    lora = LoraSettings()  # r=8, q_proj and v_proj
    model = attach_lora(base.model, lora, init_seed=args.lora_init_seed, random_b=False)
    tokenizer, pad_id = base.tokenizer, base.tokenizer.pad_token_id
    init = get_lora_weights(model)
    tokenized = tokenize_samples(candidates, tokenizer, args.max_len)
    cfg = LocalTrainConfig(
        steps=args.local_steps, batch_size=args.batch_size, lr=args.lr, schedule="constant", seed=args.seed
    )
    log("baseline: evaluating the untrained adapter (B=0)")
    baseline = held_out_metrics(model, tokenizer, init, held, args)
    log(f"baseline: {_brief(baseline)}")
    out: dict = {"training": {"lora": lora.to_dict(), "local": cfg.to_dict()}, "baseline": baseline, "arms": {}}
    for arm in ARMS:
        silos = arms[arm]
        log(f"{arm}: training on {sum(len(rows) for rows in silos)} samples ({[len(rows) for rows in silos]} per silo)")
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        weights, history = federated_train(
            model, [[tokenized[i] for i in rows] for rows in silos], cfg, args.rounds, pad_id, init
        )
        train_s = time.perf_counter() - start
        metrics = held_out_metrics(model, tokenizer, weights, held, args)
        log(f"{arm}: {_brief(metrics)} (train {train_s:.0f} s)")
        out["arms"][arm] = {
            "train_samples": sum(len(rows) for rows in silos),
            "train_samples_by_silo": [len(rows) for rows in silos],
            "clean_train_samples": sum(candidates[i].meta["noise"] == "clean" for rows in silos for i in rows),
            "metrics": metrics,
            "rounds": history,
            "train_s": train_s,
            "wall_s": train_s + metrics["eval_s"],
        }
    return out


def _brief(m: dict) -> str:
    return f"loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f}, accuracy {m['pubmedqa_accuracy']:.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="holds pubmedqa/")
    p.add_argument("--n", type=int, default=240, help="candidates (default 240)")
    p.add_argument("--anchors", type=int, default=40, help="clean anchors (default 40)")
    p.add_argument("--eval", type=int, default=100, help="clean held-out items (default 100)")
    p.add_argument("--silos", type=int, default=3, help="silos, dealt round-robin (default 3)")
    p.add_argument("--rounds", type=int, default=4, help="FedAvg rounds (default 4)")
    p.add_argument("--local-steps", type=int, default=8, help="AdamW steps per silo and round (default 8)")
    p.add_argument("--batch-size", type=int, default=4, help="local training batch (default 4)")
    p.add_argument("--lr", type=float, default=3e-4, help="constant local learning rate (default 3e-4)")
    p.add_argument("--lora-init-seed", type=int, default=0, help="seed of the LoRA init, same in every arm")
    p.add_argument("--max-len", type=int, default=512, help="tokens per sample: scoring, training, eval (512)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="held-out evaluation batch (default 8)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / ".work" / "train-compare", help="work directory")
    return p.parse_args(argv)


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
    anchors, candidates, held = split_all(args, data_path)
    silos = [np.arange(s, len(candidates), args.silos) for s in range(args.silos)]
    log(f"scoring {len(candidates)} candidates against {len(anchors)} anchors")
    sel = score_and_select(args, anchors, candidates)
    scoring_s = time.perf_counter() - started
    stats = selection_stats(sel, silos)
    log(f"selected {stats['selected']}/{len(candidates)}, precision {stats['precision_clean']:.3f} ({scoring_s:.0f} s)")
    arms = arm_indices(sel["selected"], silos, args.seed + 2)
    training = train_arms(args, candidates, held, arms)
    result = {
        "benchmark": "train_compare",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "anchors": len(anchors),
            "candidates": len(candidates),
            "held_out": len(held),
            "noise": {k: int((sel["noise"] == k).sum()) for k in ("clean", *quality.KINDS)},
            "scoring_warmup": sel["warmup"],
        },
        "selection": stats,
        **training,
        "timing_s": {"scoring": scoring_s, "total": time.perf_counter() - started},
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
