"""What exact withdrawal from a merge job costs, against retraining every silo: a whole silo (a re-merge, no
training) and some samples of one silo (that silo's local training, then the re-merge).

    python bench/withdrawal.py --out bench/results/withdrawal-smollm2.json     # SmolLM2, a few minutes on 2 cores
    python bench/withdrawal.py --model tiny:0 --silo-samples 12 --steps 2      # a smoke run

What it runs, in one process, with the functions the coordinator's worker and the silos run
(`scoring.federated.local.local_update`, `scoring.federated.merging.merge_adapters` on a freshly loaded base
model, as `workers.training` merges):

- `--silos` PubMedQA silos of `--silo-samples` samples each (`--data-dir/pubmedqa/ori_pqal.json`, seeded) train one
  merge round of `--steps` AdamW steps from the same LoRA initialisation (`full_retrain_s`: every silo's training
  and the merge, the reference);
- whole silo: the last silo leaves, and the rest are merged again (`remerge_s`);
- samples: `--withdraw` samples of the first silo leave; that silo trains again without them, and all are merged
  again (`sample_withdrawal_s`);
- ratios over the full retrain, and the check that the whole-silo re-merge equals a merge of the others made from
  scratch (`remerge_equals_fresh_merge`).

Run it alone on the machine: the timings are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit, make_log  # noqa: E402

log = make_log("withdrawal")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model reference (default smollm2; tiny:0 for a smoke run)")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="holds pubmedqa/")
    p.add_argument("--silos", type=int, default=3, help="silos (default 3)")
    p.add_argument("--silo-samples", type=int, default=40, help="samples per silo (default 40)")
    p.add_argument("--withdraw", type=int, default=5, help="samples the first silo withdraws (default 5)")
    p.add_argument("--steps", type=int, default=10, help="local AdamW steps of the merge round (default 10)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per step (default 4)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument("--kind", default="cat", choices=("cat", "linear"), help="merge kind (default cat)")
    p.add_argument("--seed", type=int, default=0, help="data split seed (default 0)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    from scoring.batching import tokenize_samples
    from scoring.config import LocalTrainConfig, LoraSettings
    from scoring.data import load_pubmedqa
    from scoring.federated.local import get_lora_weights, local_update
    from scoring.federated.merging import merge_adapters
    from scoring.models import attach_lora, load_base_model, save_adapter

    items = load_pubmedqa(args.data_dir / "pubmedqa" / "ori_pqal.json")
    random.Random(args.seed).shuffle(items)
    names = [f"silo{i + 1}" for i in range(args.silos)]
    silos = {n: items[i * args.silo_samples : (i + 1) * args.silo_samples] for i, n in enumerate(names)}
    cfg = LocalTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=3e-4)
    lora = LoraSettings()
    base = load_base_model(args.model)
    model = attach_lora(base.model, lora, init_seed=0)
    start = get_lora_weights(model)
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    work = Path(tempfile.mkdtemp(prefix="clues-withdrawal-"))

    def train(name: str, samples) -> tuple[Path, int, float]:
        began = time.perf_counter()
        data = tokenize_samples(samples, tok, args.max_len)
        local_update(model, data, cfg, pad_id=pad, global_weights=start, lr=cfg.lr)  # leaves its weights in model
        save_adapter(model, work / name)
        return work / name, len(samples), time.perf_counter() - began

    def merge(dirs: dict[str, Path], counts: dict[str, int]) -> tuple[dict, float]:
        began = time.perf_counter()
        fresh = load_base_model(args.model)  # the worker loads the base model for every merge
        total = sum(counts[n] for n in dirs)
        merged = merge_adapters(fresh.model, dirs, [counts[n] / total for n in dirs], kind=args.kind)
        weights = {n: p.detach().float().numpy().copy() for n, p in merged.named_parameters() if ".merged." in n}
        return weights, time.perf_counter() - began

    log(f"{args.silos} silos x {args.silo_samples} samples, {args.steps} steps, model {args.model}")
    trained = {n: train(n, s) for n, s in silos.items()}
    train_s = {n: t[2] for n, t in trained.items()}
    dirs, counts = {n: t[0] for n, t in trained.items()}, {n: t[1] for n, t in trained.items()}
    _, merge_s = merge(dirs, counts)
    full = sum(train_s.values()) + merge_s
    log(f"full retrain: {full:.1f} s (training {sum(train_s.values()):.1f} s, merge {merge_s:.1f} s)")

    leaving = names[-1]
    rest = {n: d for n, d in dirs.items() if n != leaving}
    remerged, remerge_s = merge(rest, counts)
    fresh_dirs = {n: train(f"{n}-again", silos[n])[0] for n in rest}  # the same silos trained again from scratch
    fresh, _ = merge(fresh_dirs, counts)
    equal = all(np.array_equal(remerged[k], fresh[k]) for k in fresh)
    log(f"whole silo: re-merge {remerge_s:.1f} s; equals a fresh merge of the others: {equal}")

    first = names[0]
    kept = silos[first][args.withdraw :]
    began = time.perf_counter()
    path, n, _ = train(f"{first}-without", kept)
    merge({**dirs, first: path}, {**counts, first: n})
    sample_s = time.perf_counter() - began
    log(f"samples: {args.withdraw} of {first} out, {sample_s:.1f} s")
    emit(
        {
            "model": args.model,
            "silos": args.silos,
            "silo_samples": args.silo_samples,
            "steps": args.steps,
            "kind": args.kind,
            "full_retrain_s": round(full, 2),
            "train_s": {k: round(v, 2) for k, v in train_s.items()},
            "merge_s": round(merge_s, 2),
            "remerge_s": round(remerge_s, 2),
            "remerge_over_full": round(remerge_s / full, 4),
            "remerge_equals_fresh_merge": equal,
            "sample_withdrawal_s": round(sample_s, 2),
            "sample_withdrawal_over_full": round(sample_s / full, 4),
            "withdrawn_samples": args.withdraw,
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
