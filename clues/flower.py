"""``clues flower init``: a Flower App project for clues' federated training (flower_app, docs/flower.md), its run
config filled from a clues training job or naming a scoring job, ready for ``flwr run DIR <superlink>``."""

from __future__ import annotations

import argparse
import json
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
