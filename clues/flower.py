"""``clues flower ...`` (flower_app, docs/flower.md):

- ``init``: a Flower App project for clues' federated training, its run config filled from a clues training job or
  naming a scoring job, ready for ``flwr run DIR <superlink>``;
- ``superlink`` and ``supernode``: Flower's ``flower-superlink`` and ``flower-supernode`` started the way the app
  needs them (TLS unless ``--insecure`` is explicit, no runtime dependency installation, a silo's node config built
  from named options and checked first). They replace this process (exec); ``--print`` shows the command instead.
  docker/compose.flower.yml runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from agent.console import EXIT_OK, CliError
from clues.admin import add_connection_args, client
from wire.files import atomic_write_bytes


def cmd_flower_init(args: argparse.Namespace) -> int:
    from flower_app.config import project_toml, run_config_from_spec

    dest = Path(args.dir) / "pyproject.toml"
    if dest.exists():
        raise CliError(f"DIR: {dest} exists; pick an empty directory")
    run_config: dict = {}
    if args.train_job:
        with client(args) as api:
            run_config = run_config_from_spec(api.train_job(args.train_job)["spec"])
    if args.scoring_job:
        run_config["selection.scoring-job"] = args.scoring_job
        run_config.setdefault("selection.source", "selected")
    text = project_toml(run_config)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, text.encode())
    print(json.dumps({"project": str(dest.parent), "run_config": run_config}))
    return EXIT_OK


def flower_binary(name: str) -> Path:
    """``flower-superlink`` or ``flower-supernode``: next to this Python, else on PATH."""
    here = Path(sys.executable).parent / name
    found = here if here.is_file() else (Path(p) if (p := shutil.which(name)) else None)
    if found is None:
        raise CliError(f"{name}: not found; install Flower where clues runs: pip install 'clues[flower]'")
    return found


def tls_args(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    """The TLS options as given, all of ``flags`` or ``--insecure`` (said out loud, never by default)."""
    given = {f: getattr(args, f.lstrip("-").replace("-", "_")) for f in flags}
    if args.insecure:
        if any(given.values()):
            raise CliError(f"--insecure: drop it, or drop {[f for f, v in given.items() if v]}")
        return ["--insecure"]
    missing = [f for f, v in given.items() if not v]
    if missing:
        raise CliError(f"{missing[0]}: required for TLS (or pass --insecure, e.g. on loopback for a try)")
    for flag, value in given.items():
        if not Path(value).is_file():
            raise CliError(f"{flag}: no such file {value}")
    return [token for flag, value in given.items() for token in (flag, str(value))]


def start(argv: list[str], args: argparse.Namespace) -> int:
    """Exec ``argv`` (the Flower component), with its directory on PATH (it spawns flower-superexec), or print it."""
    if args.print:
        print(shlex.join(argv))
        return EXIT_OK
    env = dict(os.environ)
    env["PATH"] = f"{Path(argv[0]).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.stdout.flush()
    os.execve(argv[0], argv, env)
    return EXIT_OK  # not reached


def cmd_superlink(args: argparse.Namespace) -> int:
    tls = tls_args(args, ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"))
    argv = [str(flower_binary("flower-superlink")), *tls, "--host", args.host, "--port", str(args.port)]
    argv += ["--disable-runtime-dependency-installation"]  # the app's code is the installed clues
    if args.database:
        argv += ["--database", args.database]
    return start(argv, args)


def cmd_supernode(args: argparse.Namespace) -> int:
    from flower_app.silo import NodeSettings

    tls = tls_args(args, ("--root-certificates",))
    config = {"silo": args.silo, "data-path": args.data, "scores-path": args.scores, "coordinator": args.coordinator}
    config |= {"token-file": args.token_file, "work-dir": args.work_dir, "device": args.device, "dtype": args.dtype}
    config = {k: v for k, v in config.items() if v}
    NodeSettings.from_node_config(config)  # a bad node config stops here, not in the first round
    if not Path(args.data).is_file():
        raise CliError(f"--data: no such file {args.data}")
    for flag, value in (("--scores", args.scores), ("--token-file", args.token_file)):
        if value and not Path(value).is_file():
            raise CliError(f"{flag}: no such file {value}")
    node_config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in config.items())
    argv = [str(flower_binary("flower-supernode")), *tls, "--superlink", args.superlink, "--host", args.host]
    argv += ["--port", str(args.port), "--node-config", node_config]
    return start(argv, args)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "flower",
        help="clues inside a Flower federation: make the Flower App project (docs/flower.md)",
        description="The Flower App runs clues' federated LoRA training on a scoring job's selection over Flower's "
        "Deployment Runtime (SuperLink, SuperNodes, `flwr run`); it needs `pip install clues[flower]` where the "
        "SuperLink and SuperNodes run.",
    )
    fsub = p.add_subparsers(dest="action", required=True)
    q = fsub.add_parser(
        "init",
        help="write DIR/pyproject.toml: the Flower App project, its run config from a training job or a scoring job",
        description="Write the Flower App project (pyproject.toml) into DIR. Its [tool.flwr.app.config] holds every "
        "key the app reads: clues' defaults, or the settings of --train-job (read from the coordinator with the "
        "admin token), and --scoring-job as the selection. Override any key at run time with `flwr run DIR "
        "<superlink> --run-config 'key=value ...'`.",
    )
    q.add_argument("dir", help="the project directory (created; must not hold a pyproject.toml)")
    q.add_argument("--train-job", default=None, help="copy this clues training job's settings (needs --coordinator)")
    q.add_argument("--scoring-job", default=None, help="train on this scoring job's selection (selection.scoring-job)")
    add_connection_args(q)
    q.set_defaults(func=cmd_flower_init)

    q = fsub.add_parser(
        "superlink",
        help="start flower-superlink for the clues app (TLS, no runtime dependency installation)",
        description="Start Flower's SuperLink (it replaces this process) with TLS from the three certificate "
        "files, or --insecure when said explicitly, and with runtime dependency installation off: the app's code "
        "is the installed clues[flower]. flwr run, the SuperNodes and the ServerApp all use --port.",
    )
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in docker)")
    q.add_argument("--port", type=int, default=9093, help="the port SuperNodes and `flwr` connect to (default 9093)")
    q.add_argument("--database", default=None, metavar="FILE", help="the SuperLink's state (default: in memory)")
    q.add_argument("--ssl-ca-certfile", default=None, metavar="FILE", help="the CA certificate")
    q.add_argument("--ssl-certfile", default=None, metavar="FILE", help="the server certificate")
    q.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="the server's private key")
    q.add_argument("--insecure", action="store_true", help="no TLS (a try on loopback only)")
    q.add_argument("--print", action="store_true", help="print the command instead of running it")
    q.set_defaults(func=cmd_superlink)

    q = fsub.add_parser(
        "supernode",
        help="start flower-supernode for one silo: its data and mask as the node config",
        description="Start Flower's SuperNode for one silo (it replaces this process). The node config the "
        "ClientApp reads is built from the options and checked before the start (flower_app/silo.py): the silo's "
        "name, its data file, and its mask (clues agent run's <stem>.scores.jsonl, or the coordinator and a file "
        "holding the silo's token).",
    )
    q.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    q.add_argument("--root-certificates", default=None, metavar="FILE", help="the CA certificate of the SuperLink")
    q.add_argument("--insecure", action="store_true", help="no TLS (a try on loopback only)")
    q.add_argument("--silo", required=True, help="this silo's name, as the coordinator knows it")
    q.add_argument("--data", required=True, metavar="FILE", help="the silo's data file (the one it scored with)")
    q.add_argument("--scores", default=None, metavar="FILE", help="clues agent run's <stem>.scores.jsonl")
    q.add_argument("--coordinator", default=None, metavar="URL", help="instead of --scores: ask the coordinator")
    q.add_argument("--token-file", default=None, metavar="FILE", help="with --coordinator: the silo's token")
    q.add_argument("--work-dir", default=None, metavar="DIR", help="moments and round records (~/.clues-flower)")
    q.add_argument("--device", default=None, help="torch device (default cpu)")
    q.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="model dtype")
    q.add_argument("--host", default="127.0.0.1", help="address of this SuperNode's own API (default 127.0.0.1)")
    q.add_argument("--port", type=int, default=9094, help="port of this SuperNode's own API (default 9094)")
    q.add_argument("--print", action="store_true", help="print the command instead of running it")
    q.set_defaults(func=cmd_supernode)
