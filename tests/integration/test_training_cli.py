"""The whole product from the command line on the embedded coordinator (`clues coordinator up`: API + worker, no
Redis, no PostgreSQL), two silos with the tiny model: federated warmup → a scoring job from its rounds → federated
training on the selected samples → merging, then the export of the final adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SILOS, TinyData
from tests.integration.conftest import Service

pytestmark = pytest.mark.integration

TINY = ["--local-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--round-timeout", "300"]


def test_warmup_scoring_federated_and_merge_from_the_cli(tiny_data: TinyData, tmp_path: Path):
    port = Service.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUES_")}
    env |= {
        "CLUES_DATA_DIR": str(tmp_path / "data"),
        "CLUES_ADMIN_TOKEN": "admin-secret-for-tests-0123456789abcdef",
        "HF_HUB_OFFLINE": "1",
    }
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "clues", "coordinator", "up", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    cli_env = env | {"CLUES_COORDINATOR": url}

    def clues(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "clues", *args], env=cli_env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    data = {silo: tiny_data.data_file(silo, tmp_path / silo) for silo in SILOS}

    def agents(command: str, job_id: str, *extra: str) -> None:
        """``clues agent <command>`` for both silos at once, each with its own work directory."""
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "clues", "agent", command, "--job", job_id, "--data", str(data[silo]),
                 "--work-dir", str(tmp_path / silo / "work"), "--poll-interval", "0.5", "--timeout", "300", *extra],
                env=cli_env | {"CLUES_TOKEN": tokens[silo]},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for silo in SILOS
        ]  # fmt: skip
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err

    def show(train_id: str) -> dict:
        return json.loads(clues("admin", "train-show", train_id))

    try:
        Service.wait_healthy(url, up, tmp_path / "up.log")
        tokens = {silo: json.loads(clues("admin", "silo-add", silo))["token"] for silo in SILOS}
        silos = ",".join(SILOS)

        warm = json.loads(
            clues("train", "--mode", "warmup", "--silos", silos, "--model", "tiny:0", "--rank", "4", "--max-len",
                  "96", "--rounds", "2", "--fraction", "0.5", *TINY)
        )["id"]  # fmt: skip
        agents("train", warm)
        assert show(warm)["status"] == "done"

        # top 75 %: each silo keeps some samples whatever order the tiny model's close scores take in this run
        job = json.loads(
            clues("admin", "job-from-warmup", warm, "--name", "score", "--proj-dim", "256", "--threshold", "top:0.75",
                  "--anchors", str(tiny_data.anchors_file), "--open")
        )["id"]  # fmt: skip
        agents("run", job, "--rows-per-shard", "4")
        selected = {silo: len((tmp_path / silo / f"{silo}.selected.jsonl").read_text().splitlines()) for silo in SILOS}
        assert all(n > 0 for n in selected.values())

        finals = {}
        for mode in ("federated", "merge"):
            rounds = ["--rounds", "2"] if mode == "federated" else ["--merge-kind", "cat"]
            train = json.loads(
                clues("train", "--mode", mode, "--silos", silos, "--scoring-job", job, "--selection", "selected",
                      "--eval", str(tiny_data.anchors_file), *rounds, *TINY)
            )["id"]  # fmt: skip
            agents("train", train)
            done = _wait(clues, train)
            assert {m["name"]: m["num_samples"] for m in done["silos"]} == selected
            assert done["metrics"]["loss"] > 0 and done["metrics"]["pubmedqa_n"] == len(tiny_data.samples["anchors"])
            out = tmp_path / f"export-{mode}"
            clues("admin", "train-export", train, "--out", str(out))
            finals[mode] = json.loads((out / "adapter_config.json").read_text())
        assert finals["federated"]["r"] == 4
        assert finals["merge"]["r"] == 8  # 'cat' stacks the two silos' rank-4 adapters
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()


def _wait(clues, train_id: str, timeout: float = 180.0) -> dict:
    """Poll ``clues admin train-show`` until the job is done (the final evaluation follows the last round)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        job = json.loads(clues("admin", "train-show", train_id))
        if job["status"] in ("done", "failed") or time.monotonic() > deadline:
            assert job["status"] == "done", job["error"]
            return job
        time.sleep(1.0)
