"""``clues agent ...``: the silo's commands; parsing and printing only (the work is in `agent.loop`).

    clues agent run     take part in a scoring job: project the local samples, upload the projections and the
                        per-sample losses the job asks for (never the text), wait for the scores and write this
                        silo's mask next to the data file
    clues agent train   take part in a training job: train every round locally from the global adapter, upload
                        the adapter (never the text or the Adam moments), download the final adapter
    clues agent withdraw
                        leave a training job, or withdraw some samples: a merge job is merged again without them
                        (the silo retrains its adapter for samples), a federated job gets a draft job without the
                        silo (a full retrain)
    clues agent dashboard
                        serve this silo's own dashboard on this machine: its scores joined with its local text,
                        what was dropped and why, and keep/drop overrides (`agent.dashboard`)

`add_parser` registers the ``agent`` command on the ``clues`` parser. Errors print one line
``clues agent run: error: ...`` (or ``train``, ``dashboard``) naming the option or the problem, and exit 2. The
coordinator's address and the silo's token may come from ``CLUES_COORDINATOR`` and ``CLUES_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.console import EXIT_OK, CliError, Progress, add_model_args, cache_dir, fail, offline_environment

PROG = "clues agent run"
UNITS = {"checkpoints": "ckpt", "gradients": "grad", "shards": "shard", "scoring": "%", "training": "step"}


def _check_connection(args: argparse.Namespace) -> None:
    """Where the coordinator is and the token: from the options or the environment."""
    for option, value in (("--coordinator", args.coordinator), ("--token", args.token)):
        if not value:
            env = "CLUES_COORDINATOR" if option == "--coordinator" else "CLUES_TOKEN"
            raise CliError(f"{option}: missing; pass {option} or set {env}")


def _check_common(args: argparse.Namespace) -> None:
    """The options ``run`` and ``train`` share: where the coordinator is, the token, the polling."""
    _check_connection(args)
    for option, value in (("--poll-interval", args.poll_interval), ("--timeout", args.timeout)):
        if value is not None and not value > 0:
            raise CliError(f"{option}: must be positive, got {value}")


def _work_dir(args: argparse.Namespace) -> Path:
    return Path(args.work_dir) if args.work_dir else Path(args.data).parent / ".clues-agent"


def _options(args: argparse.Namespace):
    from agent.loop import AgentOptions

    _check_common(args)
    for option, value in (("--rows-per-shard", args.rows_per_shard), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CliError(f"{option}: must be at least 1, got {value}")
    return AgentOptions(
        rows_per_shard=args.rows_per_shard,
        engine=args.engine,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        cache_dir=cache_dir(),
        poll_interval=args.poll_interval,
        timeout=args.timeout,
        wait=not args.no_wait,
        out_dir=Path(args.out_dir) if args.out_dir else None,
        max_epsilon=args.max_epsilon,
    )


def cmd_run(args: argparse.Namespace) -> int:
    """``clues agent run``; returns the exit status (2 on any error, printed as one line)."""
    from agent.client import CoordinatorError, SiloClient
    from agent.loop import AgentError, run_agent
    from scoring.errors import ScoringError

    bars = Progress(units=UNITS)
    try:
        options = _options(args)
        with SiloClient(args.coordinator, args.token) as client:
            result = run_agent(
                client, args.job, Path(args.data), work_dir=_work_dir(args), options=options, progress=bars.stage
            )
    except (CliError, AgentError, CoordinatorError, ScoringError, OSError) as exc:
        bars.close()
        return fail(PROG, exc)
    bars.close()
    print(
        f"agent: job {result.job_id} is {result.status!r}: {result.samples} samples, "
        f"{result.uploaded} shard(s) uploaded, {result.skipped} already held"
    )
    if result.scores_path is None:
        print("  the scores are not ready; run the same command again later to fetch this silo's mask")
    else:
        threshold = "none" if result.threshold is None else f"{result.threshold:.6g}"
        print(f"  selected {result.selected} of {result.samples} (threshold {threshold})")
        print(f"  scores   {result.scores_path}")
        print(f"  selected {result.selected_path}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    """``clues agent train``; prints one JSON line summing up; returns the exit status (2 on any error)."""
    from agent.client import CoordinatorError, SiloClient
    from agent.loop import AgentError
    from agent.train import TrainOptions, run_training
    from scoring.errors import ScoringError

    bars = Progress(units=UNITS)
    try:
        _check_common(args)
        options = TrainOptions(
            device=args.device,
            dtype=args.dtype,
            cache_dir=cache_dir(),
            poll_interval=args.poll_interval,
            timeout=args.timeout,
            max_epsilon=args.max_epsilon,
        )
        with SiloClient(args.coordinator, args.token) as client:
            result = run_training(
                client, args.job, Path(args.data), work_dir=_work_dir(args), options=options, progress=bars.stage
            )
    except (CliError, AgentError, CoordinatorError, ScoringError, OSError) as exc:
        bars.close()
        return fail("clues agent train", exc)
    bars.close()
    summary = {
        "job": result.job_id,
        "status": result.status,
        "num_samples": result.num_samples,
        "rounds_trained": result.rounds_trained,
        "late_rounds": result.late_rounds,
        "final_adapter": str(result.final_path),
    }
    print(json.dumps(summary))
    return EXIT_OK


def print_withdrawal(row: dict) -> None:
    """One JSON line (the withdrawal as the coordinator answered), then the report in words on stderr."""
    print(json.dumps(row))
    report = row["report"]
    print(
        f"withdrawal {row['id']} of {row['silo']} from training job {row['job_id']}: {row['status']}", file=sys.stderr
    )
    print(f"  {report['exact']}: {report['message']}", file=sys.stderr)
    for command in report.get("commands", []):
        print(f"  $ {command}", file=sys.stderr)
    if row.get("error"):
        print(f"  error: {row['error']}", file=sys.stderr)


def _sample_ids(path: str) -> list[str]:
    """The ids in ``--samples``: one per line, or JSONL records with an ``id``."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise CliError(f"--samples: cannot read {path} ({exc.strerror or exc})") from None
    ids = []
    for n, line in enumerate(lines, 1):
        if line.startswith("{"):
            try:
                ids.append(str(json.loads(line)["id"]))
            except (ValueError, KeyError):
                raise CliError(f"--samples: line {n} of {path} is a JSON record without an 'id'") from None
        else:
            ids.append(line)
    if not ids:
        raise CliError(f"--samples: {path} lists no sample id")
    return ids


def cmd_withdraw(args: argparse.Namespace) -> int:
    """``clues agent withdraw``: this silo, or some of its samples, leaves a training job (docs/withdrawal.md)."""
    from agent.client import CoordinatorError, SiloClient
    from agent.loop import AgentError
    from agent.train import TrainOptions
    from agent.withdraw import withdraw_samples
    from scoring.errors import ScoringError

    bars = Progress(units=UNITS)
    try:
        _check_connection(args)
        if args.samples and not args.data:
            raise CliError("--data: required with --samples (this silo retrains its adapter without them)")
        if args.data and not args.samples and args.reason:
            raise CliError("--reason: the pending withdrawal has its reason already; drop --reason or pass --samples")
        if not args.data and not args.reason:
            raise CliError("--reason: required to withdraw this silo (why, for the audit record)")
        with SiloClient(args.coordinator, args.token) as client:
            if args.data:
                ids = _sample_ids(args.samples) if args.samples else None
                options = TrainOptions(device=args.device, dtype=args.dtype, cache_dir=cache_dir())
                row = withdraw_samples(
                    client, args.job, Path(args.data), work_dir=_work_dir(args), sample_ids=ids,
                    reason=args.reason, options=options, progress=bars.stage,
                )  # fmt: skip
            else:
                row = client.withdraw(args.job, args.reason)
            if args.wait and row["status"] == "pending":
                row = client.wait_withdrawal(args.job, row["id"], timeout=args.timeout)
    except (CliError, AgentError, CoordinatorError, ScoringError, OSError) as exc:
        bars.close()
        return fail("clues agent withdraw", exc)
    bars.close()
    print_withdrawal(row)
    return EXIT_OK if row["status"] != "failed" else 1


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: any free port), so a port in use is a clean error before start."""
    if not 0 <= port <= 65535:
        raise CliError(f"--port: must be 0 to 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CliError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror or exc})") from exc
    return sock


def cmd_dashboard(args: argparse.Namespace) -> int:
    """``clues agent dashboard``: ask the coordinator whose token this is (``GET /v1/silos/me``: a silo's, else
    exit 2), print the URL, serve until Ctrl-C."""
    import uvicorn

    from agent.client import Client, CoordinatorError
    from agent.dashboard import create_dashboard, describe
    from scoring.errors import ScoringError

    prog = "clues agent dashboard"
    try:
        _check_connection(args)
        if not Path(args.data).is_file():
            raise CliError(f"--data: {args.data}: no such file")
        with Client(args.coordinator, args.token, timeout=30.0, retries=1, backoff=0.2) as client:
            silo = client.me()["name"]  # the token check
        app = create_dashboard(args.coordinator, args.token, Path(args.data), _work_dir(args), silo=silo)
        sock = _listen(args.host, args.port)
    except CoordinatorError as exc:
        message = describe(exc, args.coordinator)[1]
        if exc.status == 403:  # a token the coordinator knows, but not a silo's (the admin's)
            message = f"--token: not a silo's token; the coordinator at {args.coordinator} answered 403: {exc.detail}"
        return fail(prog, message)
    except (CliError, ScoringError, OSError) as exc:
        return fail(prog, exc)
    dashboard = app.state.dashboard
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"{dashboard.brand} dashboard: http://{shown}:{port}/ui/jobs (Ctrl-C stops it)")
    print(f"  {len(dashboard.text.current())} local samples from {args.data}; coordinator {args.coordinator}")
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"{prog}: warning: listening on {host}: anyone who reaches it and has the token sees this silo's text")
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return EXIT_OK


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator",
        metavar="URL",
        default=os.environ.get("CLUES_COORDINATOR"),
        help="coordinator URL, e.g. http://host:8000 (default: $CLUES_COORDINATOR)",
    )
    p.add_argument(
        "--token",
        metavar="TOKEN",
        default=os.environ.get("CLUES_TOKEN"),
        help="this silo's token (default: $CLUES_TOKEN)",
    )


def _add_common(p: argparse.ArgumentParser, what: str) -> None:
    """--coordinator, --token, --job, --data, --work-dir (holding ``what``), --device, --dtype, --poll-interval."""
    _add_connection(p)
    p.add_argument(
        "--job", required=True, metavar="JOB", help="the job id (32 hex digits, from the coordinator's admin)"
    )
    p.add_argument("--data", required=True, metavar="FILE", help="local samples: JSONL/JSON records (Alpaca or chat)")
    p.add_argument(
        "--work-dir",
        metavar="DIR",
        default=None,
        help=f"{what} kept for resuming (default: .clues-agent next to --data)",
    )
    add_model_args(p)
    p.add_argument(
        "--poll-interval", type=float, default=2.0, metavar="S", help="seconds between status polls (default 2)"
    )


def add_parser(sub) -> None:
    """Register ``agent`` (with its ``run`` and ``train`` subcommands) on the ``clues`` subparsers ``sub``."""
    agent = sub.add_parser(
        "agent",
        help="the silo agent: take part in a coordinator's scoring or training job, or see this silo's scores",
        description="The silo side of federated scoring and training jobs. Only projections and per-sample losses "
        "(scoring) or adapters (training) leave the silo, never text.",
    )
    commands = agent.add_subparsers(dest="agent_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "run",
        help="project local samples, upload the projections, wait for and write this silo's mask",
        description="Download the job's spec and checkpoints, compute the projected gradients of the local samples "
        "and their response losses (for a calibrated job also, at its signal checkpoint, the loss after an empty "
        "prompt and the response length), "
        "upload them as shards (resuming: shards the coordinator holds are not sent again), mark the upload "
        "complete, wait until the job is scored and write <data stem>.scores.jsonl (id, score, parts, selected) "
        "and <data stem>.selected.jsonl (the selected samples) next to --data (or in --out-dir). Safe to run again "
        "at any point. A silo-local job (scoring mode local) is scored here instead: the agent downloads the "
        "reference, scores the samples (on exact gradients, streamed and never stored, when the job says so), "
        "writes the same two files and sends only its kept count and a score histogram (noisy when the job asks).",
    )
    _add_common(p, "checkpoints, run and projections")
    p.add_argument(
        "--rows-per-shard", type=int, default=4096, metavar="N", help="samples per uploaded shard (default 4096)"
    )
    p.add_argument(
        "--engine", default="hooks", choices=("hooks", "vmap", "loop"), help="gradient engine (default: hooks)"
    )
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="samples per gradient batch (default 8)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up waiting for the scores after S seconds (an error; the upload stays done, run again later)",
    )
    p.add_argument(
        "--no-wait", action="store_true", help="stop once the upload is complete (run again later for the mask)"
    )
    p.add_argument(
        "--out-dir",
        metavar="DIR",
        default=None,
        help="where <data stem>.scores.jsonl and .selected.jsonl go (default: next to --data); for a data folder "
        "that is read-only",
    )
    p.add_argument(
        "--max-epsilon",
        type=float,
        default=None,
        metavar="EPS",
        help="for silo-local jobs with noisy aggregates: the most ε this silo's releases spend in all (its ledger "
        "--work-dir/privacy-ledger.json); a job past it is refused and nothing is sent (default: no limit)",
    )
    p.set_defaults(func=cmd_run)

    p = commands.add_parser(
        "train",
        help="take part in a training job: train locally every round, upload the adapter, fetch the final one",
        description="For every round of the training job this silo has not sent yet: download the round's global "
        "adapter, train it locally on the samples the job's selection picks (AdamW, continuing this silo's own "
        "moments, which never leave it), upload the new adapter, and wait for the next round. Ends when the job "
        "is done, with the final adapter under --work-dir; prints one JSON line. Safe to run again at any point: "
        "a round already trained is re-sent, not retrained. Use the same --work-dir for a scoring job made from "
        "a warmup job with preconditioning (it needs this silo's moments).",
    )
    _add_common(p, "the rounds' adapters and this silo's Adam moments")
    p.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up after S seconds in all (default: never)"
    )
    p.add_argument(
        "--max-epsilon",
        type=float,
        default=None,
        metavar="EPS",
        help="with a DP-SGD job: the most ε this silo spends on it; a round past it is refused and the agent stops "
        "(default: the job's budget)",
    )
    p.set_defaults(func=cmd_train)

    p = commands.add_parser(
        "dashboard",
        help="serve this silo's own dashboard: its scores with its local text, what was dropped and why",
        description="Serve a dashboard on this machine that joins the coordinator's scores for this silo with the "
        "text of its data file (which never leaves it): score histograms with the threshold, the samples with "
        "their text, filters and text search, and keep/drop overrides with a reason (recorded on the "
        "coordinator). Log in with this silo's token. The token is checked with the coordinator at start-up "
        "(it must be a silo's, not the admin's).",
    )
    _add_connection(p)
    p.add_argument("--data", required=True, metavar="FILE", help="local samples: JSONL/JSON records (Alpaca or chat)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8600, help="port to listen on (default 8600; 0: any free port)")
    p.add_argument(
        "--work-dir",
        metavar="DIR",
        default=None,
        help="where the session secret is kept (default: .clues-agent next to --data; "
        "$CLUES_SESSION_SECRET overrides it)",
    )
    p.set_defaults(func=cmd_dashboard)

    p = commands.add_parser(
        "withdraw",
        help="leave a training job, or withdraw some samples: merged again without them, or a retrain is offered",
        description="Withdraw this silo from a training job (docs/withdrawal.md), with a reason for the audit "
        "record. A finished merge job is merged again without this silo's adapter, which the coordinator then "
        "deletes; the result equals a merge that never included it. A federated or warmup job cannot drop a "
        "silo's contribution in place: the coordinator makes a new draft job without this silo, a FULL RETRAIN "
        "that the admin starts. With --samples and --data (a merge job): withdraw those samples only; this silo "
        "retrains its adapter without them (same seed and settings; the other silos do nothing) and the "
        "coordinator merges again. With --data alone: carry out the sample withdrawal the admin recorded for this "
        "silo. The answer says how exact the result is given what upstream used this silo's data (a federated "
        "warmup, a global top-fraction threshold), with the commands for a strict re-run.",
    )
    _add_connection(p)
    p.add_argument("--job", required=True, help="the training job's id")
    p.add_argument("--reason", default=None, help="why, for the audit record (required unless the admin asked)")
    p.add_argument("--samples", default=None, metavar="FILE", help="sample ids to withdraw: one per line, or JSONL")
    p.add_argument("--data", default=None, metavar="FILE", help="with --samples: the data file the job trained on")
    p.add_argument(
        "--work-dir", metavar="DIR", default=None, help="the retrained adapter (default: .clues-agent next to --data)"
    )
    add_model_args(p)
    p.add_argument("--wait", action="store_true", help="wait until the re-merge is done")
    p.add_argument("--timeout", type=float, default=600, metavar="S", help="with --wait: give up after S seconds")
    p.set_defaults(func=cmd_withdraw)


def main(argv: Sequence[str] | None = None) -> int:
    """``clues agent ...`` on its own (the ``clues`` command registers the same parser)."""
    offline_environment()
    parser = argparse.ArgumentParser(prog="clues")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
