"""``clues train`` (create, start and follow a training job, docs/training.md) and the admin's training actions
(``clues admin train-show``, ``train-export``, ``job-from-warmup``). ``--coordinator`` / ``--token`` default to
``CLUES_COORDINATOR`` / ``CLUES_ADMIN_TOKEN``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from agent.console import EXIT_OK, CliError, add_projection_args
from clues.admin import add_connection_args, add_score_args, client, given_fields, score_fields, silo_names
from scoring.config import DEFAULT_MAX_LEN, MERGE_KINDS
from scoring.federated.lora_algebra import ADAPTER_KINDS

SELECTIONS = ("fraction", "selected", "random", "all")
AGGREGATIONS = ("fedavg", "quality-fedavg", "fedadam", "fedyogi", "fedprox")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def train_spec(args: argparse.Namespace) -> dict:
    """A `TrainCreate` body from the ``clues train`` options."""
    source = args.selection or ("fraction" if args.mode == "warmup" else "selected")
    if source in ("selected", "random") and not args.scoring_job:
        raise CliError(f"--selection: {source!r} needs --scoring-job ID (a finished scoring job), or --selection all")
    if not 0 < args.fraction <= 1:
        raise CliError(f"--fraction: must be in (0, 1], got {args.fraction}")
    checkpoint_rounds = None
    if args.checkpoint_rounds is not None:
        try:
            checkpoint_rounds = [int(r) for r in args.checkpoint_rounds.split(",") if r.strip()]
        except ValueError:
            raise CliError(
                f"--checkpoint-rounds: expected rounds such as 0,2, got {args.checkpoint_rounds!r}"
            ) from None
    dp = given_fields(
        epsilon=args.dp_epsilon, noise_multiplier=args.dp_noise, clip_norm=args.dp_clip, delta=args.dp_delta
    )
    if dp and "epsilon" not in dp and "noise_multiplier" not in dp:
        raise CliError("--dp-epsilon: DP-SGD needs --dp-epsilon (a budget) or --dp-noise (σ)")
    local = given_fields(
        steps=args.local_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        schedule=args.schedule,
        prox_mu=args.prox_mu,
        dp=dp or None,
    )
    return given_fields(
        name=args.name or f"{args.mode}-{args.silos.replace(',', '-')}"[:200],
        mode=args.mode,
        silos=silo_names(args.silos),
        model=args.model,
        lora=None if args.rank is None else {"rank": args.rank, "alpha": 2.0 * args.rank},
        max_len=args.max_len,
        rounds=args.rounds,
        quorum=args.quorum,
        round_timeout_s=args.round_timeout,
        local=local,
        aggregation=given_fields(rule=args.aggregation, eta=args.server_lr, kind=args.adapters, max_rank=args.max_rank),
        merge=given_fields(kind=args.merge_kind, density=args.density),
        selection=given_fields(source=source, fraction=args.fraction, scoring_job=args.scoring_job),
        checkpoint_rounds=checkpoint_rounds,
    )


def cmd_train(args: argparse.Namespace) -> int:
    spec = train_spec(args)
    if args.eval is not None and not Path(args.eval).is_file():
        raise CliError(f"--eval: no such file {args.eval}")
    with client(args) as api:
        job = api.create_train_job(spec)
        if args.eval is not None:
            api.upload_eval_set(job["id"], Path(args.eval).read_bytes())
        job = api.start_train_job(job["id"])
        print(f"training job {job['id']} is {job['status']}", file=sys.stderr)
        if args.wait:
            job = api.wait_train(job["id"], poll=args.poll_interval, timeout=args.timeout, on_progress=_show_message())
            print(f"final metrics: {json.dumps(job['metrics'])}", file=sys.stderr)
    print(json.dumps(job, indent=2))
    return EXIT_OK


def _show_message():
    """Print the job's message on stderr whenever it changes (round opened, aggregating, evaluating)."""
    last: list[str] = []

    def show(job: dict) -> None:
        if [job["message"]] != last:
            last[:] = [job["message"]]
            print(f"  {job['status']}: {job['message']}", file=sys.stderr)

    return show


def cmd_train_show(args: argparse.Namespace) -> int:
    with client(args) as api:
        print(json.dumps(api.train_job(args.job), indent=2))
    return EXIT_OK


def export_adapter(api, job_id: str, out: Path) -> None:
    """The job's final adapter as a peft adapter directory: ``out/adapter_config.json`` and
    ``out/adapter_model.safetensors``."""
    from scoring.io import read_bundle, write_checkpoint_dir

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp:
        bundle_path = Path(tmp) / "final.safetensors"
        api.download_final_adapter(job_id, bundle_path)
        bundle = read_bundle(bundle_path.read_bytes(), None, None, f"final adapter of training job {job_id}")
        write_checkpoint_dir(bundle, Path(tmp) / "ckpt")  # writes the peft files under ckpt/adapter/
        for name in ADAPTER_FILES:
            os.replace(Path(tmp) / "ckpt" / "adapter" / name, out / name)


def export_merged(model_ref: str, adapter_dir: Path, dest: Path, args: argparse.Namespace) -> None:
    """The base model with the adapter merged in (peft ``merge_and_unload``) and its tokenizer, under ``dest``."""
    from agent.console import model_options
    from scoring.models import load_adapter, load_base_model

    opts = model_options(args)
    base = load_base_model(model_ref, dtype=opts.dtype, device=opts.device, cache_dir=opts.cache_dir)
    merged = load_adapter(base.model, adapter_dir, trainable=False).merge_and_unload()
    merged.save_pretrained(str(dest))
    base.tokenizer.save_pretrained(str(dest))


def cmd_train_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    with client(args) as api:
        job = api.train_job(args.job)
        export_adapter(api, args.job, out)
    written = {"job": job["id"], "adapter": str(out), "merged": None}
    if args.merged_model:
        export_merged(job["spec"]["model"], out, out / "merged", args)
        written["merged"] = str(out / "merged")
    print(json.dumps(written))
    return EXIT_OK


def cmd_job_from_warmup(args: argparse.Namespace) -> int:
    if args.open and args.anchors is None:
        raise CliError("--open: needs --anchors FILE (a job opens once its anchor set is uploaded)")
    if args.anchors is not None and not Path(args.anchors).is_file():
        raise CliError(f"--anchors: no such file {args.anchors}")
    from scoring.config import DEFAULT_SCORE_KIND
    from scoring.errors import ConfigError
    from scoring.selection import (
        check_score_preconditioning,
        check_threshold_preconditioning,
        parse_threshold,
        threshold_to_dict,
    )

    policy = parse_threshold(args.threshold)
    score = score_fields(args)
    try:  # the coordinator holds no silo's warmup moments, so its anchor samples are scored plain
        check_score_preconditioning(score.get("score", DEFAULT_SCORE_KIND), args.precondition, False)
        check_threshold_preconditioning(policy, args.precondition, False)
    except ConfigError as exc:
        raise CliError(f"--{exc} (--precondition)") from None
    body = {
        "name": args.name,
        "projection": {"kind": "sjlt", "dim": args.proj_dim, "seed": args.proj_seed, "nnz": 4},
        "precondition": args.precondition,
        "threshold": threshold_to_dict(policy),
        **score,
    }
    with client(args) as api:
        job = api.scoring_job_from_warmup(args.train_job, body)
        if args.anchors is not None:
            api.upload_anchors(job["id"], Path(args.anchors).read_bytes())
            job = api.open_job(job["id"]) if args.open else api.job(job["id"])
    print(json.dumps(job, indent=2))
    return EXIT_OK


def add_admin_actions(asub) -> None:
    """Register the training actions on the ``clues admin`` subparsers ``asub`` (see `clues.admin.add_parser`)."""
    q = asub.add_parser("train-show", help="a training job's spec, rounds and metrics (JSON)")
    q.add_argument("job")
    add_connection_args(q)
    q.set_defaults(func=cmd_train_show)

    q = asub.add_parser(
        "train-export",
        help="write a training job's final adapter as a peft adapter directory (optionally a merged model)",
    )
    q.add_argument("job")
    q.add_argument("--out", required=True, help="directory for adapter_config.json + adapter_model.safetensors")
    q.add_argument(
        "--merged-model",
        action="store_true",
        help="also load the base model here, merge the adapter in and save it with its tokenizer under OUT/merged",
    )
    q.add_argument("--device", default="cpu", help="torch device for --merged-model (default: cpu)")
    q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    add_connection_args(q)
    q.set_defaults(func=cmd_train_export)

    q = asub.add_parser(
        "job-from-warmup",
        help="a scoring job whose checkpoints are a finished warmup job's checkpoint rounds",
        description="Create a scoring job from a finished 'clues train --mode warmup' job: checkpoint t is the "
        "global adapter after checkpoint round r_t, with that round's learning rate. With --anchors the anchor "
        "set is uploaded, with --open the job is opened too. Prints the job (JSON).",
    )
    q.add_argument("train_job", metavar="TRAIN_ID", help="the warmup training job")
    q.add_argument("--name", required=True, help="job name")
    add_projection_args(q)
    q.add_argument(
        "--precondition",
        action="store_true",
        help="each silo preconditions with the Adam moments of its own warmup training (it must run the agent "
        "with the --work-dir it trained with); needs --score trace and a top:Q or fixed:V --threshold",
    )
    q.add_argument(
        "--threshold",
        default="mean-anchor",
        help="mean-anchor | top:0.3 | fixed:0.01 (mean-anchor only without --precondition: the coordinator scores "
        "its anchor samples with plain gradients)",
    )
    add_score_args(q)
    q.add_argument("--anchors", default=None, help="the anchor set to upload: JSON/JSONL samples")
    q.add_argument("--open", action="store_true", help="open the job (needs --anchors)")
    add_connection_args(q)
    q.set_defaults(func=cmd_job_from_warmup)


def add_train_parser(sub) -> None:
    """Register the top-level ``clues train`` command on the ``clues`` subparsers ``sub``."""
    p = sub.add_parser(
        "train",
        help="create and start a federated training job (warmup, federated or merge) on the coordinator",
        description="Create a training job (docs/training.md), upload its held-out evaluation set, start it and "
        "print it (JSON). The silos then run 'clues agent train'. warmup: R rounds on a seeded random --fraction "
        "of each silo's data, whose checkpoint rounds feed 'clues admin job-from-warmup'; federated: R rounds on "
        "the samples --scoring-job selected (--selection selected), a random subset of the same size (random) or "
        "all; merge: one round, the silos' adapters merged with peft (--merge-kind).",
    )
    p.add_argument("--mode", required=True, choices=("warmup", "federated", "merge"))
    p.add_argument("--silos", required=True, help="comma-separated names of the silos taking part")
    p.add_argument("--name", default=None, help="job name (default: MODE-SILOS)")
    p.add_argument("--model", default=None, help="model reference (default: the scoring job's)")
    p.add_argument("--scoring-job", default=None, metavar="ID", help="the finished scoring job whose selection to use")
    p.add_argument(
        "--selection",
        default=None,
        choices=SELECTIONS,
        help="which local samples each silo trains on (default: fraction for warmup, else selected)",
    )
    p.add_argument("--fraction", type=float, default=0.05, help="--selection fraction: the share (default 0.05)")
    p.add_argument("--rounds", type=int, default=None, metavar="R", help="federated rounds (default 1)")
    p.add_argument("--local-steps", type=int, default=None, metavar="E", help="optimizer steps per round (default 10)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per micro-batch (default 4)")
    p.add_argument("--schedule", default=None, choices=("constant", "linear", "cosine"), help="lr across rounds")
    p.add_argument("--prox-mu", type=float, default=None, help="FedProx proximal coefficient (default 0)")
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        metavar="EPS",
        help="train with DP-SGD: the ε budget of the whole job at each silo (σ is derived from it)",
    )
    p.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA", help="DP-SGD with this σ instead")
    p.add_argument("--dp-clip", type=float, default=None, metavar="C", help="DP-SGD per-sample clip norm (default 1)")
    p.add_argument("--dp-delta", type=float, default=None, metavar="DELTA", help="DP-SGD δ (default 1/N per silo)")
    p.add_argument("--aggregation", default=None, choices=AGGREGATIONS, help="server rule (default fedavg)")
    p.add_argument("--server-lr", type=float, default=None, help="server learning rate of fedadam/fedyogi")
    p.add_argument(
        "--adapters",
        default=None,
        choices=ADAPTER_KINDS,
        help="federated: how adapters combine: fedavg (each factor averaged, default), stack (exact, FLoRA: the "
        "global rank grows by the silos' ranks each round) or shared-basis (exact, Fed-SB: silos train and send only "
        "an r×r matrix)",
    )
    p.add_argument("--max-rank", type=int, default=None, help="stack: truncate the global adapter to this rank by SVD")
    p.add_argument("--merge-kind", default=None, choices=MERGE_KINDS, help="merge: peft combination (default cat)")
    p.add_argument("--density", type=float, default=None, help="merge: density of the ties/dare/magnitude kinds")
    p.add_argument("--quorum", type=int, default=None, help="fewest updates a round needs at its deadline (all)")
    p.add_argument("--round-timeout", type=float, default=None, metavar="S", help="round deadline (default 3600 s)")
    p.add_argument("--eval", default=None, metavar="FILE", help="held-out evaluation set (JSON/JSONL samples)")
    p.add_argument("--checkpoint-rounds", default=None, help="warmup: rounds that become scoring checkpoints, e.g. 0,2")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank, alpha = 2·rank (default: the scoring job's, 8)")
    p.add_argument(
        "--max-len", type=int, default=None, help=f"tokens per sample (default: the scoring job's, {DEFAULT_MAX_LEN})"
    )
    p.add_argument("--wait", action="store_true", help="wait until the job is done and print its final state")
    p.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls with --wait")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="with --wait: give up after S seconds")
    add_connection_args(p)
    p.set_defaults(func=cmd_train)
