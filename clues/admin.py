"""``clues admin ...``: the coordinator operator's commands over REST (register silos, create, open and score jobs,
read scores, show and export training jobs, make a scoring job from a warmup), and ``clues train`` (create, start
and follow a training job, docs/training.md). ``--coordinator`` / ``--token`` default to ``CLUES_COORDINATOR`` /
``CLUES_ADMIN_TOKEN``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from clues.service import CliError, add_projection_args
from scoring.config import DEFAULT_MAX_LEN, MERGE_KINDS
from scoring.spec import manifest_has_moments

JOB_CHECKPOINT_KEYS = ("index", "step", "lr", "lr_last", "adam")
SELECTIONS = ("fraction", "selected", "random", "all")
AGGREGATIONS = ("fedavg", "quality-fedavg", "fedadam", "fedyogi", "fedprox")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def client(args: argparse.Namespace):
    from agent.client import AdminClient

    url = args.coordinator or os.environ.get("CLUES_COORDINATOR")
    token = args.token or os.environ.get("CLUES_ADMIN_TOKEN")
    if not url:
        raise CliError("--coordinator: required (or set CLUES_COORDINATOR)")
    if not token:
        raise CliError("--token: required (or set CLUES_ADMIN_TOKEN)")
    return AdminClient(url, token)


def add_score_args(p: argparse.ArgumentParser) -> None:
    """``--score``, ``--signals``, ``--fusion``, ``--signal-checkpoint``: how a scoring job scores (`ScoreFields`);
    left out, the coordinator's defaults apply."""
    from scoring.config import DEFAULT_FUSION, DEFAULT_SCORE_KIND, DEFAULT_SIGNALS, FUSIONS, SCORE_KINDS, SIGNALS

    p.add_argument(
        "--score",
        default=None,
        choices=SCORE_KINDS,
        help=f"calibrated: the trace score and the loss signals, each standardised against the anchor samples and "
        f"fused; trace: the pure CLUES trace score (default {DEFAULT_SCORE_KIND})",
    )
    p.add_argument(
        "--signals",
        default=None,
        metavar="NAMES",
        help=f"per-sample signals each silo sends besides ids, projections and losses, comma-separated among "
        f"{','.join(SIGNALS)}; '' for none (default: {','.join(DEFAULT_SIGNALS)} for calibrated, none for trace)",
    )
    p.add_argument(
        "--fusion", default=None, choices=FUSIONS, help=f"how calibrated signals combine (default {DEFAULT_FUSION})"
    )
    p.add_argument(
        "--signal-checkpoint",
        type=int,
        default=None,
        metavar="T",
        help="the checkpoint at which silos compute the signals (default: the last)",
    )


def score_fields(args: argparse.Namespace) -> dict:
    """The `ScoreFields` of a job body from `add_score_args`' options (those given only)."""
    from clues.cli import parse_signals
    from scoring.errors import ScoringError

    try:
        signals = None if args.signals is None else list(parse_signals(args.signals))
    except ScoringError as exc:
        raise CliError(str(exc)) from None
    if args.signal_checkpoint is not None and args.signal_checkpoint < 0:
        raise CliError(f"--signal-checkpoint: must be a checkpoint index >= 0, got {args.signal_checkpoint}")
    return _given(score=args.score, signals=signals, fusion=args.fusion, signal_checkpoint=args.signal_checkpoint)


def job_spec_from_run(
    run_dir: Path,
    *,
    name: str,
    silos: list[str],
    precondition: bool,
    similarity: str,
    threshold: dict,
    auto_score: bool,
    score: dict | None = None,
) -> dict:
    """A `JobCreate` body from a warmup run directory's ``run.json`` (``score``: `score_fields`, if any)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise CliError(f"--run: {run_dir} has no run.json (make one with 'clues warmup')")
    manifest = json.loads(path.read_text())
    if precondition and not manifest_has_moments(manifest):
        raise CliError("--run: the run has no Adam moments (not trained); pass --no-precondition")
    return {
        "name": name,
        "silos": silos,
        "model": manifest["model"],
        "lora": manifest["lora"],
        "lora_init_seed": manifest.get("lora_init_seed", 0),
        "max_len": manifest["max_len"],
        "template": manifest["template"],
        "projection": manifest["projection"],
        "checkpoints": [{k: e[k] for k in JOB_CHECKPOINT_KEYS} for e in manifest["checkpoints"]],
        "precondition": precondition,
        "similarity": similarity,
        "threshold": threshold,
        "auto_score": auto_score,
        **(score or {}),
    }


def create_job_from_run(api, run_dir: Path, anchors: Path, spec: dict, open_job: bool = True) -> dict:
    """Create the job, upload every checkpoint bundle and the anchor set, and open it (unless told not to)."""
    from scoring.io import checkpoint_to_bytes

    manifest = json.loads((Path(run_dir) / "run.json").read_text())
    if "layout" not in manifest:
        raise CliError(f"--run: {run_dir}/run.json has no 'layout' (made by an older clues); run 'clues warmup' again")
    job = api.create_job(spec)
    for entry in manifest["checkpoints"]:
        api.upload_checkpoint(
            job["id"], entry["index"], checkpoint_to_bytes(Path(run_dir) / entry["dir"], manifest["layout"])
        )
    api.upload_anchors(job["id"], Path(anchors).read_bytes())
    return api.open_job(job["id"]) if open_job else api.job(job["id"])


def cmd_silo_add(args: argparse.Namespace) -> int:
    with client(args) as api:
        silo = api.register_silo(args.name)
    print(json.dumps(silo, indent=2))
    print("the token is shown only this once: hand it to the silo's operator", file=sys.stderr)
    return 0


def cmd_silo_list(args: argparse.Namespace) -> int:
    with client(args) as api:
        print(json.dumps(api.list_silos(), indent=2))
    return 0


def cmd_job_create(args: argparse.Namespace) -> int:
    from scoring.selection import parse_threshold, threshold_to_dict

    silos = _silo_names(args.silos)
    if not Path(args.anchors).is_file():
        raise CliError(f"--anchors: no such file {args.anchors}")
    spec = job_spec_from_run(
        Path(args.run),
        name=args.name or Path(args.run).name,
        silos=silos,
        precondition=not args.no_precondition,
        similarity=args.similarity,
        threshold=threshold_to_dict(parse_threshold(args.threshold)),
        auto_score=not args.no_auto_score,
        score=score_fields(args),
    )
    with client(args) as api:
        job = create_job_from_run(api, Path(args.run), Path(args.anchors), spec, open_job=not args.no_open)
    print(job["id"])
    print(f"job {job['id']} is {job['status']}", file=sys.stderr)
    return 0


def cmd_job_show(args: argparse.Namespace) -> int:
    with client(args) as api:
        print(json.dumps(api.job(args.job), indent=2))
    return 0


def cmd_job_score(args: argparse.Namespace) -> int:
    with client(args) as api:
        job = api.start_scoring(args.job)
        if args.wait:
            job = api.wait(args.job, poll=args.poll_interval)
    print(f"job {job['id']} is {job['status']} ({job['message']})")
    return 0


def _step_lines(steps: list[dict]) -> list[str]:
    lines = []
    for s in steps:
        beat = f", heartbeat {s['heartbeat_age_s']:.0f} s ago" if s.get("heartbeat_age_s") is not None else ""
        where = f" on {s['holder']}" if s.get("holder") else ""
        lost = f", its worker died {s['lost']}x" if s.get("lost") else ""
        error = f": {s['error']}" if s.get("error") else ""
        lines.append(
            f"  {s['task']}{s['args'][1:] or ''}: {s['state']}{where}{beat} (sent {s['attempt']}x{lost}){error}"
        )
    return lines


def cmd_job_retry(args: argparse.Namespace) -> int:
    with client(args) as api:
        job = api.retry_train_job(args.job) if args.training else api.retry_job(args.job)
    print(f"{'training job' if args.training else 'job'} {job['id']} is {job['status']} ({job['message']}); steps:")
    print("\n".join(_step_lines(job.get("steps") or [])))
    return 0


def cmd_scores(args: argparse.Namespace) -> int:
    with client(args) as api:
        scores = api.scores(args.job, silo=args.silo)
    out = sys.stdout if args.out == "-" else open(args.out, "w")  # noqa: SIM115
    try:
        for row in scores["rows"]:
            out.write(json.dumps(row) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"{len(scores['rows'])} rows, threshold {scores['threshold']}", file=sys.stderr)
    return 0


def _silo_names(value: str) -> list[str]:
    silos = [s for s in value.split(",") if s]
    if not silos:
        raise CliError("--silos: give at least one silo name")
    return silos


def _given(**fields) -> dict:
    """The fields whose option was given (the coordinator fills in the rest)."""
    return {key: value for key, value in fields.items() if value is not None}


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
    local = _given(
        steps=args.local_steps, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule, prox_mu=args.prox_mu
    )
    return _given(
        name=args.name or f"{args.mode}-{args.silos.replace(',', '-')}"[:200],
        mode=args.mode,
        silos=_silo_names(args.silos),
        model=args.model,
        lora=None if args.rank is None else {"rank": args.rank, "alpha": 2.0 * args.rank},
        max_len=args.max_len,
        rounds=args.rounds,
        quorum=args.quorum,
        round_timeout_s=args.round_timeout,
        local=local,
        aggregation=_given(rule=args.aggregation, eta=args.server_lr),
        merge=_given(kind=args.merge_kind, density=args.density),
        selection=_given(source=source, fraction=args.fraction, scoring_job=args.scoring_job),
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
    return 0


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
    return 0


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
    from clues.cli import model_options
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
    return 0


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
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=None, help="coordinator URL (default: $CLUES_COORDINATOR)")
    p.add_argument("--token", default=None, help="admin token (default: $CLUES_ADMIN_TOKEN)")


def add_parser(sub) -> None:
    p = sub.add_parser("admin", help="the coordinator operator's commands (over REST)", description=__doc__)
    asub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    q = asub.add_parser("silo-add", help="register a silo; prints its token once")
    q.add_argument("name", help="silo name (letters, digits, '_', '.', '-')")
    _common(q)
    q.set_defaults(func=cmd_silo_add)

    q = asub.add_parser("silo-list", help="list the registered silos")
    _common(q)
    q.set_defaults(func=cmd_silo_list)

    q = asub.add_parser(
        "job-create",
        help="create a job from a warmup run, upload its checkpoints and anchors, open it; prints the job id",
    )
    q.add_argument("--run", required=True, help="run directory from 'clues warmup'")
    q.add_argument("--anchors", required=True, help="the anchor set: JSON/JSONL samples (kept by the coordinator)")
    q.add_argument("--silos", required=True, help="comma-separated names of the silos taking part")
    q.add_argument("--name", default=None, help="job name (default: the run directory's name)")
    q.add_argument("--similarity", default="cosine", choices=("cosine", "dot"))
    q.add_argument("--threshold", default="mean-anchor", help="mean-anchor | top:0.3 | fixed:0.01")
    q.add_argument("--no-precondition", action="store_true", help="silos project plain gradients (no Adam)")
    add_score_args(q)
    q.add_argument("--no-auto-score", action="store_true", help="wait for 'job-score' instead of starting by itself")
    q.add_argument("--no-open", action="store_true", help="leave the job in draft")
    _common(q)
    q.set_defaults(func=cmd_job_create)

    q = asub.add_parser("job-show", help="a job's spec, status and progress (JSON)")
    q.add_argument("job")
    _common(q)
    q.set_defaults(func=cmd_job_show)

    q = asub.add_parser("job-score", help="start scoring a job (every silo must have completed)")
    q.add_argument("job")
    q.add_argument("--wait", action="store_true", help="wait until it is done")
    q.add_argument("--poll-interval", type=float, default=2.0)
    _common(q)
    q.set_defaults(func=cmd_job_score)

    q = asub.add_parser(
        "job-retry",
        help="send the step a job waits for again (after a crash); a step a live worker runs is left alone",
        description="Re-queue the step a scoring job (or, with --training, a training job) waits for: scoring, the "
        "anchor projection, a training start, aggregation or evaluation. Idempotent: a step whose worker is alive "
        "(a heartbeat within the lease timeout) is left alone. A failed job goes back to the step that failed.",
    )
    q.add_argument("job")
    q.add_argument("--training", action="store_true", help="the id is a training job's")
    _common(q)
    q.set_defaults(func=cmd_job_retry)

    q = asub.add_parser("scores", help="all scores of a done job as JSONL (silo, sample_id, score, parts, selected)")
    q.add_argument("job")
    q.add_argument("--silo", default=None, help="only this silo (or __anchor__)")
    q.add_argument("--out", default="-", help="file to write (default: stdout)")
    _common(q)
    q.set_defaults(func=cmd_scores)

    q = asub.add_parser("train-show", help="a training job's spec, rounds and metrics (JSON)")
    q.add_argument("job")
    _common(q)
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
    _common(q)
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
    _common(q)
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
    p.add_argument("--aggregation", default=None, choices=AGGREGATIONS, help="server rule (default fedavg)")
    p.add_argument("--server-lr", type=float, default=None, help="server learning rate of fedadam/fedyogi")
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
    _common(p)
    p.set_defaults(func=cmd_train)
