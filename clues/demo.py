"""``clues demo``: the whole method on one machine, on PubMedQA with injected noise.

Three silos hold disjoint PubMedQA splits with 10 %, 30 % and 50 % noise (see `NOISE` for the kinds);
the coordinator holds clean anchors. Warmup trains LoRA on a random fifth of each silo's data, every silo projects
its gradients, the coordinator scores and applies the mean-anchor threshold. The table compares the detection
AUROC (clean vs noisy) of the trace score with the perplexity baseline, per silo.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clues.cli import ProgressBar, model_options
from scoring.config import LoraSettings, TraceConfig, TrainingConfig
from scoring.data import load_pubmedqa, write_samples
from scoring.errors import DataError
from scoring.noise import inject_noise
from scoring.selection import MeanAnchorScore, apply_threshold, auroc
from scoring.steps import ProjectOptions, load_projection_dir, project_samples, run_warmup, score_dirs

REPO = Path(__file__).resolve().parents[1]
BUNDLED = Path(__file__).resolve().parent / "data" / "pubmedqa_200.json"
NOISE = {  # silo -> noise kind -> rate: 10 %, 30 % and 50 % noisy
    "silo1": {"cut": 0.05, "delete": 0.05},
    "silo2": {"cut": 0.1, "delete": 0.1, "exchange": 0.1},
    "silo3": {"cut": 0.5 / 3, "delete": 0.5 / 3, "exchange": 0.5 / 3},
}


@dataclass(frozen=True)
class DemoSize:
    anchors: int
    per_silo: int
    checkpoints: int
    max_len: int
    warmup_steps: int


QUICK = DemoSize(anchors=8, per_silo=20, checkpoints=1, max_len=256, warmup_steps=4)
DEFAULT = DemoSize(anchors=40, per_silo=30, checkpoints=2, max_len=512, warmup_steps=12)


def find_pubmedqa(data_dir: str | None) -> Path:
    """--data-dir (which must hold the file), else ../shared/data beside the checkout, else the bundled subset."""
    if data_dir:
        path = Path(data_dir) / "pubmedqa" / "ori_pqal.json"
        if not path.is_file():
            raise DataError(f"--data-dir: no pubmedqa/ori_pqal.json in {data_dir}")
        return path
    shared = REPO.parent / "shared" / "data" / "pubmedqa" / "ori_pqal.json"
    return shared if shared.is_file() else BUNDLED


def split_silos(path: Path, size: DemoSize, seed: int = 0):
    """(anchors, {silo: noisy samples}) with disjoint items."""
    items = load_pubmedqa(path)
    need = size.anchors + len(NOISE) * size.per_silo
    if len(items) < need:
        raise DataError(f"{path}: {len(items)} items, the demo needs {need}")
    random.Random(seed).shuffle(items)
    anchors, rest = items[: size.anchors], items[size.anchors :]
    silos = {}
    for i, (name, rates) in enumerate(NOISE.items()):
        part = rest[i * size.per_silo : (i + 1) * size.per_silo]
        silos[name] = inject_noise(part, rates, seed=seed + i)
    return anchors, silos


def run_demo(args: argparse.Namespace) -> int:
    size = QUICK if args.quick else DEFAULT
    out = Path(args.out)
    model_opts = model_options(args)
    started = time.perf_counter()
    anchors, silos = split_silos(find_pubmedqa(args.data_dir), size)
    for name, samples in silos.items():
        write_samples(out / "data" / f"{name}.jsonl", samples)
    rng = random.Random(0)
    warm = [s for samples in silos.values() for s in rng.sample(samples, max(1, len(samples) // 5))]
    training = TrainingConfig(
        epochs=100,
        batch_size=4,
        lr=3e-4,
        schedule="constant",
        warmup_ratio=0.0,
        num_checkpoints=size.checkpoints,
        max_steps=size.warmup_steps,
    )
    run_warmup(
        args.model,
        warm,
        out / "run",
        lora=LoraSettings(),
        training=training,
        projection={"kind": "sjlt", "dim": 8192, "seed": 0},
        max_len=size.max_len,
        model_opts=model_opts,
        progress=ProgressBar("warmup"),
    )
    opts = ProjectOptions()
    project_samples(
        out / "run",
        anchors,
        out / "proj" / "anchors",
        anchor=True,
        opts=opts,
        model_opts=model_opts,
        progress=ProgressBar("anchors"),
    )
    for name, samples in silos.items():
        project_samples(
            out / "run", samples, out / "proj" / name, opts=opts, model_opts=model_opts, progress=ProgressBar(name)
        )
    table, anchor_table = score_dirs({n: out / "proj" / n for n in silos}, out / "proj" / "anchors", TraceConfig())
    selected = apply_threshold(table, MeanAnchorScore(), anchor_table)
    print_summary(silos, selected, {n: load_projection_dir(out / "proj" / n, "candidate")[1] for n in silos})
    print(
        f"threshold (mean anchor score) {selected.threshold:.4g}; finished in {time.perf_counter() - started:.0f} s; "
        f"files under {out}"
    )
    return 0


def print_summary(silos, table, losses) -> None:
    """Per silo: samples, noisy, kept, noisy kept, detection AUROC of the trace score and of perplexity."""
    print(f"\n{'silo':<8}{'samples':>8}{'noisy':>7}{'kept':>6}{'noisy kept':>12}{'AUROC trace':>13}{'AUROC ppl':>11}")
    index = {sid: i for i, sid in enumerate(table.ids)}
    for name, samples in silos.items():
        rows = [index[s.id] for s in samples]
        clean = np.array([s.meta.get("noise") == "clean" for s in samples])
        kept = table.selected[rows]
        trace_auc = auroc(table.scores[rows], clean)
        ppl_auc = auroc(-losses[name], clean)
        print(
            f"{name:<8}{len(samples):>8}{int((~clean).sum()):>7}{int(kept.sum()):>6}{int((kept & ~clean).sum()):>12}"
            f"{trace_auc:>13.3f}{ppl_auc:>11.3f}"
        )
