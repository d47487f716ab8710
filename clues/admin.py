"""``clues admin ...``: the coordinator operator's commands over REST (register silos, create, open and score jobs,
read scores, show and export training jobs, make a scoring job from a warmup). ``--coordinator`` / ``--token``
default to ``CLUES_COORDINATOR`` / ``CLUES_ADMIN_TOKEN``."""

# The training actions (train-show, train-export, job-from-warmup) and ``clues train`` live in clues/train.py.

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from agent.console import EXIT_OK, CliError
from scoring.spec import manifest_has_moments

JOB_CHECKPOINT_KEYS = ("index", "step", "lr", "lr_last", "adam")


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
    """``--score``, ``--signals``, ``--fusion``, ``--signal-checkpoint``, ``--scoring-mode``: how and where a scoring
    job scores (`ScoreFields`); left out, the coordinator's defaults apply."""
    from scoring.config import (
        DEFAULT_FUSION,
        DEFAULT_GRADIENTS,
        DEFAULT_SCORE_KIND,
        DEFAULT_SCORING_MODE,
        DEFAULT_SIGNALS,
        FUSIONS,
        GRADIENT_KINDS,
        SCORE_KINDS,
        SCORING_MODES,
        SIGNALS,
    )

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
    p.add_argument(
        "--scoring-mode",
        default=None,
        choices=SCORING_MODES,
        help="shared: silos send projections and per-sample values, the coordinator scores; local: each silo scores "
        "its own samples against a reference published from the anchors and sends only its kept count and a score "
        f"histogram (threshold mean-anchor or fixed) (default {DEFAULT_SCORING_MODE})",
    )
    p.add_argument(
        "--gradients",
        default=None,
        choices=GRADIENT_KINDS,
        help="what a local job scores: projected gradients, or the exact unprojected LoRA gradients, streamed and "
        f"never stored (needs --scoring-mode local) (default {DEFAULT_GRADIENTS})",
    )
    p.add_argument(
        "--aggregate-epsilon",
        type=float,
        default=None,
        metavar="EPS",
        help="a local job's noise on the aggregates: each silo sends its kept count and histogram as an ε-DP release "
        "at EPS (discrete Laplace) and records it in its privacy ledger (default: no noise)",
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
    return given_fields(
        score=args.score,
        signals=signals,
        fusion=args.fusion,
        signal_checkpoint=args.signal_checkpoint,
        scoring_mode=args.scoring_mode,
        gradients=args.gradients,
        aggregate_epsilon=args.aggregate_epsilon,
    )


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
    return EXIT_OK


def cmd_silo_list(args: argparse.Namespace) -> int:
    with client(args) as api:
        print(json.dumps(api.list_silos(), indent=2))
    return EXIT_OK


def cmd_job_create(args: argparse.Namespace) -> int:
    from scoring.selection import parse_threshold, threshold_to_dict

    silos = silo_names(args.silos)
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
    return EXIT_OK


def cmd_job_show(args: argparse.Namespace) -> int:
    with client(args) as api:
        print(json.dumps(api.job(args.job), indent=2))
    return EXIT_OK


def cmd_job_score(args: argparse.Namespace) -> int:
    with client(args) as api:
        job = api.start_scoring(args.job)
        if args.wait:
            job = api.wait(args.job, poll=args.poll_interval)
    print(f"job {job['id']} is {job['status']} ({job['message']})")
    return EXIT_OK


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
    return EXIT_OK


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
    return EXIT_OK


def cmd_withdraw(args: argparse.Namespace) -> int:
    from agent.cli import print_withdrawal

    with client(args) as api:
        row = api.withdraw(args.job, args.reason, silo=args.silo)
        if args.wait and row["status"] == "pending":
            row = api.wait_withdrawal(args.job, row["id"])
    print_withdrawal(row)
    return EXIT_OK if row["status"] != "failed" else 1


def cmd_withdrawals(args: argparse.Namespace) -> int:
    with client(args) as api:
        print(json.dumps(api.withdrawals(args.job), indent=2))
    return EXIT_OK


def silo_names(value: str) -> list[str]:
    """``--silos a,b``: the names, at least one."""
    silos = [s for s in value.split(",") if s]
    if not silos:
        raise CliError("--silos: give at least one silo name")
    return silos


def given_fields(**fields) -> dict:
    """The fields whose option was given (the coordinator fills in the rest)."""
    return {key: value for key, value in fields.items() if value is not None}


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """``--coordinator`` and ``--token`` (the admin's), defaulting to the environment."""
    p.add_argument("--coordinator", default=None, help="coordinator URL (default: $CLUES_COORDINATOR)")
    p.add_argument("--token", default=None, help="admin token (default: $CLUES_ADMIN_TOKEN)")


def add_parser(sub) -> argparse._SubParsersAction:
    p = sub.add_parser("admin", help="the coordinator operator's commands (over REST)", description=__doc__)
    asub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    q = asub.add_parser("silo-add", help="register a silo; prints its token once")
    q.add_argument("name", help="silo name (letters, digits, '_', '.', '-')")
    add_connection_args(q)
    q.set_defaults(func=cmd_silo_add)

    q = asub.add_parser("silo-list", help="list the registered silos")
    add_connection_args(q)
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
    add_connection_args(q)
    q.set_defaults(func=cmd_job_create)

    q = asub.add_parser("job-show", help="a job's spec, status and progress (JSON)")
    q.add_argument("job")
    add_connection_args(q)
    q.set_defaults(func=cmd_job_show)

    q = asub.add_parser("job-score", help="start scoring a job (every silo must have completed)")
    q.add_argument("job")
    q.add_argument("--wait", action="store_true", help="wait until it is done")
    q.add_argument("--poll-interval", type=float, default=2.0)
    add_connection_args(q)
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
    add_connection_args(q)
    q.set_defaults(func=cmd_job_retry)

    q = asub.add_parser(
        "withdraw",
        help="withdraw a silo from a training job: re-merge without it, or a draft job to retrain without it",
        description="Withdraw SILO from training job JOB (docs/withdrawal.md), with a reason for the audit record. "
        "A finished merge job (kinds cat and linear) is merged again without the silo's adapter, which is then "
        "deleted; the result equals a merge that never included it. A federated or warmup job gets a new draft job "
        "with the same settings and the other silos: a FULL RETRAIN, started with `clues admin`/`clues train` like "
        "any job. Prints the withdrawal (JSON) and, on stderr, how exact it is and what upstream used the silo.",
    )
    q.add_argument("job")
    q.add_argument("--silo", required=True, help="the silo to withdraw")
    q.add_argument("--reason", required=True, help="why, for the audit record")
    q.add_argument("--wait", action="store_true", help="wait until a merge job's re-merge is done")
    add_connection_args(q)
    q.set_defaults(func=cmd_withdraw)

    q = asub.add_parser("withdrawals", help="a training job's withdrawals (the audit record, JSON)")
    q.add_argument("job")
    add_connection_args(q)
    q.set_defaults(func=cmd_withdrawals)

    q = asub.add_parser("scores", help="all scores of a done job as JSONL (silo, sample_id, score, parts, selected)")
    q.add_argument("job")
    q.add_argument("--silo", default=None, help="only this silo (or __anchor__)")
    q.add_argument("--out", default="-", help="file to write (default: stdout)")
    add_connection_args(q)
    q.set_defaults(func=cmd_scores)
    return asub
