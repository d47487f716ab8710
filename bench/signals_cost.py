"""What the calibrated score's extra signals cost a silo: `project_samples` with and without them, in one run.

A silo's projection step (`scoring.workflow.project_samples`, what `clues agent run` calls) computes exact per-sample
LoRA gradients at every checkpoint and projects them. A calibrated job (the default) also asks for ``loss_uncond``
and ``n_tokens`` (`scoring.config.SIGNALS`): one forward pass without backward over the response after an empty
prompt, at one checkpoint. This script measures the added time on real PubMedQA samples with the product's defaults
(LoRA r=8 on every linear layer of a block, SJLT k = 32768, the hooks engine, batch 8, 4 checkpoints).

Setup: a short warmup (``--warmup-steps`` AdamW steps, ``--checkpoints`` checkpoints, `scoring.workflow.run_warmup`)
writes a run directory; then ``plain`` (no signals) and ``signals`` (every signal) runs of `project_samples` over
the same ``--n`` samples alternate ``--reps`` times after one untimed warmup call each, so the noise of a shared
machine falls on both alike. The overhead is median(signals) / median(plain) − 1.

Target (issue 16): overhead <= 0.15.

Usage::

    python bench/signals_cost.py --out bench/results/signals-cost-smollm2.json
    python bench/signals_cost.py --model tiny:0 --n 16 --reps 2      # a smoke test

One JSON object goes to stdout (and to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from common import emit, make_log  # bench/common.py (the script's directory is on sys.path)

from scoring.config import DEFAULT_LORA_TARGETS, DEFAULT_PROJECTION_DIM, SIGNALS, LoraSettings, TrainingConfig
from scoring.data import load_pubmedqa
from scoring.workflow import ProjectOptions, project_samples, release_memory, run_warmup

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.15
log = make_log("signals_cost")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model reference (default smollm2; tiny:0 for a smoke test)")
    p.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data" / "pubmedqa" / "ori_pqal.json",
        help="PubMedQA ori_pqal.json (default ../shared/data/pubmedqa/ori_pqal.json)",
    )
    p.add_argument("--n", type=int, default=48, help="samples projected per call (default 48)")
    p.add_argument("--checkpoints", type=int, default=4, help="checkpoints T (default 4)")
    p.add_argument("--warmup-steps", type=int, default=4, help="warmup AdamW steps (default 4)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument("--proj-dim", type=int, default=DEFAULT_PROJECTION_DIM, help="SJLT k (default: the product's)")
    p.add_argument("--batch-size", type=int, default=8, help="gradient batch size (default 8)")
    p.add_argument("--reps", type=int, default=3, help="timed calls of each variant (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def warmup_config(args: argparse.Namespace) -> TrainingConfig:
    """``--warmup-steps`` AdamW steps of batch 4 at a constant 3e-4, with ``--checkpoints`` evenly spaced."""
    return TrainingConfig(
        epochs=1000, batch_size=4, lr=3e-4, schedule="constant", warmup_ratio=0.0,
        num_checkpoints=args.checkpoints, max_steps=args.warmup_steps, seed=0,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    items = load_pubmedqa(args.data)
    samples = random.Random(0).sample(items, args.n + 8)
    with tempfile.TemporaryDirectory(prefix="signals-cost-") as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        run_warmup(
            args.model,
            samples[args.n :],
            run_dir,
            lora=LoraSettings(target_modules=DEFAULT_LORA_TARGETS),
            training=warmup_config(args),
            projection={"kind": "sjlt", "dim": args.proj_dim, "seed": 0, "nnz": 4},
            max_len=args.max_len,
        )
        log(f"warmup: {time.perf_counter() - t0:.0f} s")
        variants = {
            "plain": ProjectOptions(batch_size=args.batch_size),
            "signals": ProjectOptions(batch_size=args.batch_size, signals=SIGNALS),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.reps + 1):  # rep 0: untimed warmup of both
            for name, opts in variants.items():
                out = Path(tmp) / f"{name}-{rep}"
                t0 = time.perf_counter()
                project_samples(run_dir, samples[: args.n], out, opts=opts)
                seconds = time.perf_counter() - t0
                log(f"{name} rep {rep}: {seconds:.1f} s")
                if rep:
                    times[name].append(seconds)
                release_memory()
    median = {name: statistics.median(ts) for name, ts in times.items()}
    overhead = median["signals"] / median["plain"] - 1.0
    emit(
        {
            "benchmark": "signals_cost",
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "seconds": times,
            "median_s": median,
            "per_sample_ms": {name: 1000 * m / args.n for name, m in median.items()},
            "overhead": overhead,
            "targets": {"overhead_le_0.15": {"value": overhead, "pass": overhead <= TARGET}},
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
