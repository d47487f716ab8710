"""The ``clues`` command: the whole method on one machine.

    clues warmup   train LoRA on a sample of data and save checkpoints θ_1..θ_T with η_t (a run directory)
    clues project  what a silo does: per-sample gradients at every checkpoint -> projection files (no text)
    clues score    trace scores of every silo's samples and of the anchor samples
    clues select   apply a threshold; write each silo's mask
    clues demo     all of the above on PubMedQA with injected noise, ending with a detection table

The service (docs/coordinator.md):

    clues coordinator up|serve|openapi   run the coordinator API (+ a worker with 'up')
    clues worker                         a Celery worker of the coordinator
    clues admin ...                      the coordinator operator's commands over REST
    clues train                          create and start a federated training job (docs/training.md)
    clues agent run                      what a silo runs against a coordinator: project, upload, fetch its mask
    clues agent train                    what a silo runs for a training job: train each round, upload the adapter

Parsing and printing only; the work is in `scoring.workflow`. Errors print one line naming the field and exit 2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.console import (
    EXIT_OK,
    CliError,
    Progress,
    add_model_args,
    add_projection_args,
    fail,
    model_options,
    offline_environment,
)
from scoring.config import (
    DEFAULT_LORA_TARGETS,
    DEFAULT_MAX_LEN,
    PROJECTION_KINDS,
    SIGNALS,
    SIMILARITIES,
    LoraSettings,
    TraceConfig,
    TrainingConfig,
)
from scoring.errors import ScoringError

FORMATS = ("records", "pubmedqa", "gsm8k")


def load_data(path: str, fmt: str, limit: int | None = None):
    """Samples from ``path`` in one of `FORMATS`."""
    from scoring import data

    if fmt == "pubmedqa":
        return data.load_pubmedqa(path, limit=limit)
    if fmt == "gsm8k":
        return data.load_gsm8k(path, limit=limit)
    if limit is not None and limit < 1:
        raise ScoringError(f"--limit: must be at least 1, got {limit}")
    samples = data.read_samples(path)
    return samples[:limit] if limit else samples


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="samples: JSONL/JSON records (Alpaca or chat), or see --format")
    p.add_argument("--format", default="records", choices=FORMATS, help="how to read --data (default: records)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")


def cmd_warmup(args: argparse.Namespace) -> int:
    from scoring.workflow import run_warmup

    samples = load_data(args.data, args.format, args.limit)
    if args.fraction < 1.0:
        rng = random.Random(args.seed)
        samples = rng.sample(samples, max(1, round(args.fraction * len(samples))))
    lora = LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha, target_modules=tuple(args.lora_targets.split(",")))
    training = None
    if not args.no_train:
        training = TrainingConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=args.lr,
            schedule=args.schedule,
            num_checkpoints=args.checkpoints,
            max_steps=args.max_steps,
            seed=args.seed,
        )
    projection = {"kind": args.proj_kind, "dim": args.proj_dim, "seed": args.proj_seed, "nnz": args.proj_nnz}
    progress = Progress("warmup", units={"warmup": "step"})
    ckpts = run_warmup(
        args.model,
        samples,
        Path(args.out),
        lora=lora,
        training=training,
        projection=projection,
        max_len=args.max_len,
        template=args.template,
        random_b=not args.zero_b,
        model_opts=model_options(args),
        progress=progress.steps,
    )
    progress.close()
    print(f"warmup: {len(samples)} samples, {len(ckpts)} checkpoint(s) in {args.out}")
    for c in ckpts:
        print(f"  ckpt-{c.index:03d}  step {c.step:>5}  lr {c.lr:.3g}")
    return EXIT_OK


def cmd_project(args: argparse.Namespace) -> int:
    from scoring.workflow import ProjectOptions, project_samples

    samples = load_data(args.data, args.format, args.limit)
    opts = ProjectOptions(
        engine=args.engine,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        precondition=not args.no_precondition,
        signals=parse_signals(args.signals),
        signal_checkpoint=args.signal_checkpoint,
    )
    progress = Progress("project", units={"project": "grad"})
    paths = project_samples(
        Path(args.run),
        samples,
        Path(args.out),
        anchor=args.anchor,
        opts=opts,
        model_opts=model_options(args),
        progress=progress.steps,
    )
    progress.close()
    print(f"project: {len(samples)} samples -> {len(paths)} file(s) in {args.out}")
    return EXIT_OK


def parse_signals(value: str) -> tuple[str, ...]:
    """``--signals``: comma-separated names of `scoring.config.SIGNALS` (an empty string: none)."""
    names = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in names if s not in SIGNALS]
    if unknown or len(set(names)) != len(names):
        raise ScoringError(f"--signals: expected distinct names among {','.join(SIGNALS)}, got {value!r}")
    return names


def _parse_silos(items: Sequence[str]) -> dict[str, Path]:
    silos: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ScoringError(f"--silo: expected NAME=DIR, got {item!r}")
        if name in silos:
            raise ScoringError(f"--silo: silo {name!r} given twice")
        silos[name] = Path(path)
    return silos


def cmd_score(args: argparse.Namespace) -> int:
    from scoring.workflow import score_dirs
    from wire.files import atomic_write_bytes

    silos = _parse_silos(args.silo)
    table, anchor_table = score_dirs(silos, Path(args.anchors), TraceConfig(similarity=args.similarity))
    lines = [
        json.dumps({"id": sid, "silo": silo, "score": float(score), "parts": parts.tolist()})
        for t in (table, anchor_table)
        for sid, silo, score, parts in zip(t.ids, t.silos, t.scores, t.parts, strict=True)
    ]
    atomic_write_bytes(args.out, ("\n".join(lines) + "\n").encode())
    print(f"score: {len(table.ids)} samples from {len(silos)} silo(s), {len(anchor_table.ids)} anchors -> {args.out}")
    return EXIT_OK


def read_scores(path: Path):
    """The two ScoreTables (silos, anchors) from a ``clues score`` output file."""
    import numpy as np

    from scoring.errors import DataError
    from scoring.types import ScoreTable
    from wire import ANCHOR_OWNER

    rows: dict[bool, list[dict]] = {True: [], False: []}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                row = {
                    "id": str(row["id"]),
                    "silo": str(row["silo"]),
                    "score": float(row["score"]),
                    "parts": [float(x) for x in row["parts"]],
                }
                rows[row["silo"] == ANCHOR_OWNER].append(row)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{path}:{n}: not a score record ({exc})") from exc
    if not rows[False]:
        raise DataError(f"{path}: no silo scores")

    def table(rs: list[dict]) -> ScoreTable:
        return ScoreTable(
            ids=tuple(r["id"] for r in rs),
            silos=tuple(r["silo"] for r in rs),
            scores=np.array([r["score"] for r in rs], dtype=np.float64),
            parts=np.array([r["parts"] for r in rs], dtype=np.float64).reshape(len(rs), -1),
        )

    return table(rows[False]), table(rows[True]) if rows[True] else None


def cmd_select(args: argparse.Namespace) -> int:
    from scoring.selection import apply_threshold, masks_by_silo, parse_threshold
    from wire.files import atomic_write_bytes

    policy = parse_threshold(args.threshold)
    table, anchor_table = read_scores(Path(args.scores))
    selected = apply_threshold(table, policy, anchor_table)
    scores = dict(zip(selected.ids, selected.scores.tolist(), strict=True))
    print(f"select: threshold {selected.threshold:.6g} ({args.threshold})")
    for silo, (ids, mask) in masks_by_silo(selected).items():
        lines = [json.dumps({"id": i, "score": scores[i], "keep": bool(k)}) for i, k in zip(ids, mask, strict=True)]
        atomic_write_bytes(Path(args.out) / f"{silo}.mask.jsonl", ("\n".join(lines) + "\n").encode())
        print(f"  {silo:<16} kept {int(mask.sum()):>6} / {len(ids):<6}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from clues.demo import run_demo

    return run_demo(args)


def _warmup_parser(sub) -> None:
    p = sub.add_parser(
        "warmup",
        help="train LoRA and save checkpoints (a run directory)",
        description="Train a LoRA adapter on a random fraction of the data and save T checkpoints "
        "with their learning rates and Adam moments, plus the projection spec.",
    )
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny[:seed] | HF directory | .gguf file")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--fraction", type=float, default=1.0, help="random fraction of --data to train on (default 1)")
    p.add_argument("--no-train", action="store_true", help="take no step: one checkpoint of the initial adapter")
    p.add_argument(
        "--zero-b",
        action="store_true",
        help="start from peft's lora_B=0 (default: a random lora_B, so lora_A gradients carry signal from step 0)",
    )
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument(
        "--lora-targets",
        default=",".join(DEFAULT_LORA_TARGETS),
        help="comma-separated module names (default: every linear layer of a Llama-style block)",
    )
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--schedule", default="linear", choices=("linear", "cosine", "constant"))
    p.add_argument("--checkpoints", type=int, default=4, help="T, checkpoints to save (default 4)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-len",
        type=int,
        default=DEFAULT_MAX_LEN,
        help=f"tokens per sample after truncation (default {DEFAULT_MAX_LEN})",
    )
    p.add_argument("--template", default="auto", choices=("auto", "chat", "alpaca"))
    p.add_argument("--proj-kind", default="sjlt", choices=PROJECTION_KINDS)
    add_projection_args(p)
    p.add_argument("--proj-nnz", type=int, default=4, help="SJLT non-zeros per coordinate (default 4)")
    add_model_args(p)
    p.set_defaults(func=cmd_warmup)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clues", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _warmup_parser(sub)

    p = sub.add_parser(
        "project",
        help="per-sample gradients at every checkpoint -> projection files",
        description="What a silo runs: gradients of each sample at every checkpoint of a run, "
        "projected to k dims. Writes ckpt-NNN.<role>.safetensors; no text leaves.",
    )
    p.add_argument("--run", required=True, help="run directory from 'clues warmup'")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="projection directory to write")
    p.add_argument("--anchor", action="store_true", help="these are the anchor samples (also writes role anchor)")
    p.add_argument("--engine", default="hooks", choices=("hooks", "vmap", "loop"), help="gradient engine")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=None, help="vmap engine: samples per vmap slice")
    p.add_argument("--no-precondition", action="store_true", help="project plain gradients (no Adam)")
    p.add_argument(
        "--signals",
        default="",
        metavar="NAMES",
        help=f"extra per-sample signals to write, comma-separated among {','.join(SIGNALS)} (default: none; "
        "loss_uncond: the response loss after an empty prompt, n_tokens: the response length)",
    )
    p.add_argument(
        "--signal-checkpoint",
        type=int,
        default=None,
        metavar="T",
        help="checkpoint index whose files carry the --signals (default: the last)",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_project)

    p = sub.add_parser(
        "score",
        help="trace scores of every silo's samples and the anchors",
        description="score(z) = Σ_t η_t · sim(g_t(z), mean anchor gradient at t).",
    )
    p.add_argument("--anchors", required=True, help="projection directory of the anchor set (--anchor)")
    p.add_argument("--silo", action="append", required=True, metavar="NAME=DIR", help="a silo's projections")
    p.add_argument("--similarity", default="cosine", choices=SIMILARITIES)
    p.add_argument("--out", required=True, help="scores file to write (JSONL: id, silo, score, parts)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "select",
        help="apply a threshold and write per-silo masks",
        description="Thresholds: mean-anchor (CLUES), top:Q (global top fraction), fixed:V.",
    )
    p.add_argument("--scores", required=True, help="file from 'clues score'")
    p.add_argument("--threshold", default="mean-anchor", help="mean-anchor | top:0.3 | fixed:0.01")
    p.add_argument("--out", required=True, help="directory for <silo>.mask.jsonl files")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser(
        "demo",
        help="the whole product on one machine: embedded coordinator, three silo agents, SmolLM2, PubMedQA",
        description="Start an embedded coordinator (no Redis, no PostgreSQL) and three silo agents holding PubMedQA "
        "splits with 10/30/50 % injected noise; run federated warmup, projection uploads, scoring, masks, and "
        "federated training on all / a random subset / the selected samples with held-out evaluation; print a "
        "summary (per silo: detection AUROC; per arm: held-out loss and PubMedQA accuracy) and keep the "
        "dashboards up until Ctrl-C. Logs and data under --out.",
    )
    p.add_argument("--quick", action="store_true", help="a small run (about 3 minutes on 2 cores)")
    p.add_argument("--model", default="smollm2", help="model reference (default smollm2; 'tiny:0' for a smoke test)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with pubmedqa/ori_pqal.json (default: ../shared/data if present, else a bundled 200-item subset)",
    )
    p.add_argument(
        "--out",
        default="runs/demo",
        help="working directory (default runs/demo); an earlier demo's is emptied first, any other non-empty one is "
        "refused",
    )
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: any free port)")
    p.add_argument("--no-serve", action="store_true", help="exit after the summary instead of serving the dashboards")
    p.set_defaults(func=cmd_demo)

    from agent import cli as agent_cli
    from clues import admin, flower, service, train

    service.add_parsers(sub)
    train.add_admin_actions(admin.add_parser(sub))
    train.add_train_parser(sub)
    agent_cli.add_parser(sub)
    flower.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    offline_environment()
    from agent.client import CoordinatorError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ScoringError, FileNotFoundError, CoordinatorError, CliError) as exc:
        return fail(f"clues {args.command}", exc)


if __name__ == "__main__":
    sys.exit(main())
