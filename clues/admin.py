"""``clues admin ...``: the coordinator operator's commands over REST (register silos, create, open and score jobs,
read scores). ``--coordinator`` / ``--token`` default to ``CLUES_COORDINATOR`` / ``CLUES_ADMIN_TOKEN``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from clues.service import CliError

JOB_CHECKPOINT_KEYS = ("index", "step", "lr", "lr_last", "adam")


def client(args: argparse.Namespace):
    from agent.client import Client

    url = args.coordinator or os.environ.get("CLUES_COORDINATOR")
    token = args.token or os.environ.get("CLUES_ADMIN_TOKEN")
    if not url:
        raise CliError("--coordinator: required (or set CLUES_COORDINATOR)")
    if not token:
        raise CliError("--token: required (or set CLUES_ADMIN_TOKEN)")
    return Client(url, token)


def job_spec_from_run(
    run_dir: Path,
    *,
    name: str,
    silos: list[str],
    precondition: bool,
    similarity: str,
    threshold: dict,
    auto_score: bool,
) -> dict:
    """A `JobCreate` body from a warmup run directory's ``run.json``."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise CliError(f"--run: {run_dir} has no run.json (make one with 'clues warmup')")
    manifest = json.loads(path.read_text())
    if precondition and not all(e.get("has_moments", True) for e in manifest["checkpoints"]):
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

    silos = [s for s in args.silos.split(",") if s]
    if not silos:
        raise CliError("--silos: give at least one silo name")
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

    q = asub.add_parser("scores", help="all scores of a done job as JSONL (silo, sample_id, score, parts, selected)")
    q.add_argument("job")
    q.add_argument("--silo", default=None, help="only this silo (or __anchor__)")
    q.add_argument("--out", default="-", help="file to write (default: stdout)")
    _common(q)
    q.set_defaults(func=cmd_scores)
