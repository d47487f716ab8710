"""Exact federated LoRA aggregation on PubMedQA (issue 22): held-out loss of ``stack`` and ``shared-basis`` against
``fedavg`` after the same federated rounds on the samples clues selected, and the bytes each silo uploads per round.

Per seed, in one process, with the functions the silos and the coordinator's worker run:

1. Selection: quality's PubMedQA split (`bench/quality.py`: clean anchors, ``--n`` candidates with 30 % noise, a
   clean held-out set), its warmup, one gradient pass at the product's projection dimension and the product's
   default score (``calibrated``, mean-anchor threshold). The candidates are dealt round-robin to ``--silos`` silos;
   each trains on the samples the score kept.
2. For each arm of ``--kinds`` (``fedavg``, ``stack-warm``, ``stack-fresh``, ``shared-basis``: the kinds, and
   ``stack``'s two ways to start a round), a federated job from the same initial adapter (the worker's
   `initial_adapter`; for ``shared-basis`` the basis `make_shared_basis` draws from the same seed): ``--rounds``
   rounds, each silo ``--steps`` AdamW steps of batch ``--batch-size`` at lr ``--lr`` per round
   (`scoring.federated.adapters.SiloAdapter` then `local_update`, as `agent.train.LocalTrainer`), its update built
   by `agent.train.update_bundle` (its bytes are the upload's), and the round combined by
   `scoring.federated.adapter_rounds.combine_round` with the product's default guard and rule (count-weighted). The
   final global adapter is evaluated on the held-out set (`evaluate_adapter`: mean response loss, PubMedQA accuracy
   by option log-likelihood), as is the untrained base (unless ``--no-base``).

The same ``--lr`` serves every arm (none is tuned). Reports, per seed and over seeds (mean, spread = max − min):
held-out loss and accuracy per arm, the loss difference to ``fedavg``, bytes per silo per round, and the targets
(each ``stack`` arm not worse than ``fedavg`` on the mean held-out loss; ``shared-basis`` uploads ≥ 10× fewer bytes
than ``fedavg`` at the same rank). Each seed is written to ``<out>.seedN.json`` as it lands; ``--summarize`` joins
such files (arms of one seed from several runs) into the result.

    python bench/fed_lora.py --seeds 0,1 --out bench/results/fed-lora-pubmedqa.json   # ~50 min a seed on 2 cores
    python bench/fed_lora.py --model tiny:0 --n 24 --anchors 6 --held-out 6 --rounds 2 --steps 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import quality  # noqa: E402  (bench/quality.py)
import torch  # noqa: E402
from common import emit, make_log  # noqa: E402

from agent.train import update_bundle  # noqa: E402
from scoring.config import DEFAULT_PROJECTION_DIM, LocalTrainConfig, LoraSettings, round_entry  # noqa: E402
from scoring.federated.adapter_rounds import combine_round, initial_global  # noqa: E402
from scoring.federated.adapters import SiloAdapter  # noqa: E402
from scoring.federated.aggregation import SiloUpdate  # noqa: E402
from scoring.federated.evaluation import evaluate_adapter  # noqa: E402
from scoring.federated.local import initial_adapter, local_update  # noqa: E402
from scoring.io import CheckpointBundle, bundle_to_bytes, read_bundle  # noqa: E402

log = make_log("fed-lora")

ARMS = {
    "fedavg": ("fedavg", {}),
    "stack-warm": ("stack", {"stack_start": "warm"}),
    "stack-fresh": ("stack", {"stack_start": "fresh"}),
    "shared-basis": ("shared-basis", {}),
}
"""Each arm: its aggregation kind and the aggregation settings beside it (``stack``'s start, docs/aggregation.md)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model reference (default smollm2; tiny:0 for a smoke run)")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="holds pubmedqa/")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--n", type=int, default=120, help="noisy candidates, dealt to the silos (default 120)")
    p.add_argument("--anchors", type=int, default=20, help="clean anchors (default 20)")
    p.add_argument("--held-out", type=int, default=60, help="clean held-out items (default 60)")
    p.add_argument("--silos", type=int, default=3, help="silos (default 3)")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds (default 4)")
    p.add_argument("--steps", type=int, default=6, help="local AdamW steps per round (default 6)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per step (default 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="constant local lr, the same for every kind (1e-3)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r of every kind (default 8, alpha 2r)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument(
        "--kinds",
        default=",".join(ARMS),
        help=f"arms: aggregation kinds, stack's two starts (default {','.join(ARMS)})",
    )
    p.add_argument("--no-base", action="store_true", help="skip the untrained base's evaluation")
    p.add_argument(
        "--summarize",
        nargs="+",
        type=Path,
        default=None,
        metavar="SEED_JSON",
        help="only merge these per-seed files (<out>.seedN.json; arms of one seed from several runs are joined) and "
        "write the summary",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument("--work", type=Path, default=REPO / "bench" / ".work" / "fed-lora", help="work directory")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(args.kinds) - set(ARMS))
    if unknown:
        p.error(f"--kinds: unknown {unknown}; choose from {list(ARMS)}")
    return args


def select(args: argparse.Namespace, seed: int, work: Path) -> tuple[quality.Split, list[list], dict]:
    """quality's split, warmup, gradient pass and default score; the kept candidates per silo."""
    qargs = quality.parse_args(
        ["--domain", "pubmedqa", "--model", args.model, "--data-dir", str(args.data_dir), "--n", str(args.n),
         "--anchors", str(args.anchors), "--held-out", str(args.held_out), "--checkpoints", "2",
         "--dims", str(DEFAULT_PROJECTION_DIM), "--max-len", str(args.max_len), "--no-unprojected", "--no-train",
         "--seed", str(seed), "--out", str(work)]
    )  # fmt: skip
    split = quality.split_data("pubmedqa", args.data_dir, args.n, args.anchors, args.held_out, seed)
    warm = quality.warmup(qargs, split.candidates, work / "run")
    feat = quality.gradient_pass(work / "run", split, qargs.dims, qargs.batch_size, qargs.nnz, unprojected=False)
    scored = quality.score_methods(feat, split, qargs.dims, "pubmedqa", seed)
    keep = scored["_keeps"][quality.DEFAULT_METHOD]
    silos: list[list] = [[] for _ in range(args.silos)]
    for i, (sample, kept) in enumerate(zip(split.candidates, keep, strict=True)):
        if kept:
            silos[i % args.silos].append(sample)
    clean = [sum(s.meta["noise"] == "clean" for s in silo) for silo in silos]
    info = {
        "warmup": warm,
        "selected": int(keep.sum()),
        "candidates": len(split.candidates),
        "selected_per_silo": [len(s) for s in silos],
        "clean_per_silo": clean,
        "auroc": scored["methods"][quality.DEFAULT_METHOD].get("auroc"),
    }
    quality.release_memory()
    return split, silos, info


def federate(args, arm: str, silos: list[list], held_out: list, seed: int, work: Path) -> dict:
    """One federated job of ``arm``; the final adapter's held-out metrics, the per-round loss and upload bytes."""
    from scoring.batching import tokenize_samples
    from scoring.models import attach_lora, load_base_model

    started = time.perf_counter()
    kind, extra = ARMS[arm]
    lora = LoraSettings(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    cfg = LocalTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed)
    data, _, _ = initial_adapter(
        args.model, lora, init_seed=seed, random_b=False, entry=round_entry(cfg, 0, args.lr, 0), work_dir=work
    )
    start = initial_global(kind, read_bundle(data, None, None, "initial adapter"), lora.rank, seed)
    base = load_base_model(args.model)
    model = attach_lora(base.model, lora, init_seed=seed, random_b=False)
    adapter = SiloAdapter(kind, model, seed, warm=extra.get("stack_start") != "fresh")
    tokenized = [tokenize_samples(s, base.tokenizer, args.max_len) for s in silos]
    pad = base.tokenizer.pad_token_id
    aggregation = {"kind": kind, "rule": "fedavg", "clip": "median", "clip_factor": 3.0, "max_count_ratio": 10.0}
    aggregation |= extra
    moments: list = [None] * len(silos)
    state, rounds = None, []
    for r in range(args.rounds):
        updates, sizes, losses = [], [], []
        for i, samples in enumerate(tokenized):
            weights = adapter.begin(start.adapter, start.adapter_config, r)
            result = local_update(
                model, samples, cfg, pad_id=pad, global_weights=weights, lr=args.lr,
                moments=moments[i] if adapter.carries_moments else None, round=r,
            )  # fmt: skip
            moments[i] = result.moments
            own = adapter.update_config(start.adapter_config)
            sent = bundle_to_bytes(update_bundle(start, result, r, 0.0, adapter_config=own))
            sizes.append(len(sent))
            losses.append(result.mean_loss)
            updates.append(SiloUpdate(f"silo-{i}", result.weights, result.num_samples, 0.0))
        done = combine_round(aggregation, start.adapter, start.adapter_config, updates, {}, state, alpha=lora.alpha)
        state = done.state
        entry = round_entry(cfg, r, args.lr, (r + 1) * cfg.steps)
        new_layout = [(n, tuple(np.shape(w))) for n, w in done.weights.items()]
        start = CheckpointBundle(new_layout, done.weights, {}, {}, done.adapter_config, entry)
        rounds.append({"round": r, "train_loss": float(np.mean(losses)), "upload_bytes": sizes, **done.report})
        log(f"seed {seed} {arm} round {r + 1}/{args.rounds}: loss {np.mean(losses):.4f}, bytes {sizes}")
    del model, base, adapter
    quality.release_memory()
    spec = {"model": args.model, "max_len": args.max_len, "template": "auto", "evaluation": {"batch_size": 8}}
    metrics = evaluate_adapter(start, held_out, spec, work_dir=work)
    return {
        "metrics": metrics,
        "rounds": rounds,
        "upload_bytes_per_silo_round": float(np.mean([b for row in rounds for b in row["upload_bytes"]])),
        "final_rank": int(np.shape(next(iter(start.adapter.values())))[0]),
        "seconds": time.perf_counter() - started,
    }


def base_metrics(args, held_out: list, work: Path) -> dict:
    """The untrained base's held-out metrics (the initial adapter changes nothing)."""
    lora = LoraSettings(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    entry = round_entry(LocalTrainConfig(), 0, args.lr, 0)
    data, _, _ = initial_adapter(args.model, lora, init_seed=0, random_b=False, entry=entry, work_dir=work)
    spec = {"model": args.model, "max_len": args.max_len, "template": "auto", "evaluation": {"batch_size": 8}}
    return evaluate_adapter(read_bundle(data, None, None, "base"), held_out, spec, work_dir=work)


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "spread": float(np.max(values) - np.min(values)), "values": values}  # fmt: skip


def summarize(per_seed: list[dict]) -> dict:
    """Mean and spread over the seeds of each arm every seed has; the loss difference to ``fedavg``; the targets."""
    arms = [a for a in ARMS if all(a in s["kinds"] for s in per_seed)]
    out: dict = {}
    for arm in arms:
        rows = [s["kinds"][arm] for s in per_seed]
        out[arm] = {
            "held_out_loss": spread([r["metrics"]["loss"] for r in rows]),
            "pubmedqa_accuracy": spread([r["metrics"].get("pubmedqa_accuracy", float("nan")) for r in rows]),
            "upload_bytes_per_silo_round": float(np.mean([r["upload_bytes_per_silo_round"] for r in rows])),
            "seconds": spread([r["seconds"] for r in rows]),
        }
        if arm != "fedavg" and "fedavg" in arms:
            diffs = [
                r["metrics"]["loss"] - s["kinds"]["fedavg"]["metrics"]["loss"]
                for r, s in zip(rows, per_seed, strict=True)
            ]
            out[arm]["loss_minus_fedavg"] = spread(diffs)
    targets = {}
    for arm in ("stack-warm", "stack-fresh"):
        if {"fedavg", arm} <= set(arms):
            targets[f"{arm}_not_worse_than_fedavg"] = (
                out[arm]["held_out_loss"]["mean"] <= out["fedavg"]["held_out_loss"]["mean"]
            )
    if {"fedavg", "shared-basis"} <= set(arms):
        ratio = out["fedavg"]["upload_bytes_per_silo_round"] / out["shared-basis"]["upload_bytes_per_silo_round"]
        targets["shared_basis_bytes_ratio"] = ratio
        targets["shared_basis_bytes_at_least_10x_smaller"] = ratio >= 10.0
    out["targets"] = targets
    return out


def merge_seeds(paths: list[Path]) -> list[dict]:
    """Per-seed files joined by seed: the arms of one seed measured in several runs (same split and selection,
    which the seed fixes) go into one row; an arm measured twice is refused."""
    seeds: dict[int, dict] = {}
    for path in paths:
        row = json.loads(path.read_text())
        have = seeds.setdefault(row["seed"], {**row, "kinds": {}})
        twice = sorted(set(have["kinds"]) & set(row["kinds"]))
        if twice:
            raise SystemExit(f"--summarize: seed {row['seed']} has {twice} in two files")
        if have["selection"]["selected_per_silo"] != row["selection"]["selected_per_silo"]:
            raise SystemExit(f"--summarize: seed {row['seed']}'s files selected differently")
        have["kinds"] |= row["kinds"]
        have["base"] = have.get("base") or row.get("base")
    return [seeds[k] for k in sorted(seeds)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        per_seed = merge_seeds(args.summarize)
        emit({"benchmark": "fed_lora", "summary": summarize(per_seed), "seeds": per_seed}, args.out)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    per_seed = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(dir=args.work, prefix=f"seed-{seed}-") as tmp:
            work = Path(tmp)
            t0 = time.perf_counter()
            split, silos, selection = select(args, seed, work / "select")
            selection["seconds"] = time.perf_counter() - t0
            base = None if args.no_base else base_metrics(args, split.held_out, work)
            row = {"seed": seed, "selection": selection, "base": base, "kinds": {}}
            for arm in args.kinds:
                row["kinds"][arm] = federate(args, arm, silos, split.held_out, seed, work)
                log(f"seed {seed} {arm}: held-out loss {row['kinds'][arm]['metrics']['loss']:.4f}")
            per_seed.append(row)
            if args.out:  # each seed as it lands
                partial = args.out.with_suffix(f".seed{seed}.json")
                partial.write_text(json.dumps(row, indent=2) + "\n")
    result = {
        "benchmark": "fed_lora",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summarize(per_seed),
        "seeds": per_seed,
        "seconds": time.perf_counter() - started,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
