"""clues inside a Flower federation (flower_app, docs/flower.md): a real SuperLink and two SuperNodes on loopback
over TLS, ``flwr run`` of the app on the samples a clues scoring job selected, against clues' own training of the
same job through the coordinator.

Silo a reads its mask from ``clues agent run``'s scores file, silo b asks the coordinator with its token; the
ServerApp reads what each silo may claim from the coordinator with the admin token."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from agent.loop import AgentOptions, run_agent
from flower_app.config import run_config_from_spec
from flower_app.silo import ids_digest
from scoring.io import read_bundle
from tests.agent.conftest import make_job
from tests.agent.test_train import start, train_body, train_silos
from tests.conftest import SILOS
from tests.flower_deployment import APP_DIR, Deployment, require_flower

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scored(world, tmp_path_factory):
    """A scoring job over both silos, each silo's agent run (mask files written), and its selected ids."""
    root = tmp_path_factory.mktemp("flower-scored")
    job_id = make_job(world, "flower-scoring", threshold={"kind": "top", "fraction": 0.5})
    files, selected = {}, {}
    for wait in (False, True):  # both silos upload, then each waits for the scores and writes its mask
        for silo in SILOS:
            data = world.data_file(silo, root / silo)
            options = AgentOptions(
                rows_per_shard=16, poll_interval=0.1, timeout=120, out_dir=root / silo / "out", wait=wait
            )
            with world.client(silo) as client:
                result = run_agent(client, job_id, data, work_dir=root / silo / "work", options=options)
            files[silo] = (data, result.scores_path)
    for silo, (_, scores_path) in files.items():
        rows = [json.loads(line) for line in scores_path.read_text().splitlines()]
        selected[silo] = [r["id"] for r in rows if r["selected"]]
    assert all(0 < len(ids) < len(world.samples[s]) for s, ids in selected.items())
    return job_id, files, selected


def test_a_flower_run_equals_clues_training_on_the_selection(world, scored, tmp_path):
    require_flower()
    scoring_job, files, selected = scored
    body = train_body("flower-twin", selection={"source": "selected", "scoring_job": scoring_job})
    train_id = start(world, body)
    results = train_silos(world, train_id, tmp_path / "clues")
    ours = read_bundle(results["a"].final_path.read_bytes(), None, None, "clues' final adapter")
    spec = world.admin.train_job(train_id)["spec"]

    admin_token = tmp_path / "admin.token"
    admin_token.write_text(world.coordinator.admin_token)
    silo_b_token = tmp_path / "b.token"
    silo_b_token.write_text(world.tokens["b"])
    nodes = {
        "a": {"silo": "a", "data-path": str(files["a"][0]), "scores-path": str(files["a"][1])},
        "b": {"silo": "b", "data-path": str(files["b"][0]), "coordinator": world.coordinator.url},
    }
    nodes["b"]["token-file"] = str(silo_b_token)
    for silo, config in nodes.items():
        config["work-dir"] = str(tmp_path / "nodes" / silo)
    out = tmp_path / "server-out"
    run_config = run_config_from_spec(
        spec,
        **{
            "out-dir": str(out),
            "min-train-nodes": 2,
            "coordinator.url": world.coordinator.url,
            "coordinator.token-file": str(admin_token),
        },
    )
    app = shutil.copytree(APP_DIR, tmp_path / "app")  # flwr may rewrite the project's pyproject
    began = time.monotonic()
    with Deployment(tmp_path / "deploy", nodes) as flower:
        run = flower.run(app, run_config)
    took = time.monotonic() - began
    result_dir = out / f"run-{run['run_id']}"
    summary = json.loads((result_dir / "result.json").read_text())
    theirs = read_bundle((result_dir / "final.safetensors").read_bytes(), None, None, "the Flower run's adapter")

    # every round completed with both silos, each on exactly its selection (and the ServerApp knew the selection)
    assert summary["known"] == "coordinator"
    assert [r["round"] for r in summary["history"]] == list(range(spec["rounds"]))
    samples = {s: {x.id: x for x in world.samples[s]} for s in SILOS}
    for entry in summary["history"]:
        assert [x["silo"] for x in entry["silos"]] == list(SILOS)
        assert entry["flags"] == []
        for x in entry["silos"]:
            assert x["num_samples"] == len(selected[x["silo"]])
            assert x["ids_sha256"] == ids_digest([samples[x["silo"]][i] for i in selected[x["silo"]]])
    for silo in SILOS:
        state = tmp_path / "nodes" / silo / f"train-flower-{run['run_id']}"
        for r in range(spec["rounds"]):
            record = json.loads((state / f"round-{r:04d}" / "trained.json").read_text())
            assert record["ids"] == selected[silo]
            assert record["lr"] == pytest.approx(world.admin.train_job(train_id)["history"][r]["lr"])

    # the same adapter as clues' own training of the same job, to float tolerance
    assert theirs.layout == ours.layout
    mine, yours = dict(theirs.adapter_config), dict(ours.adapter_config)
    assert set(mine.pop("target_modules")) == set(yours.pop("target_modules"))  # peft keeps a set: order varies
    assert mine == yours
    worst = max(float(np.max(np.abs(theirs.adapter[n] - ours.adapter[n]))) for n in ours.adapter)
    scale = max(float(np.max(np.abs(ours.adapter[n]))) for n in ours.adapter)
    print(f"flower run: {took:.1f} s; largest difference from clues' training {worst:.3g} (weights up to {scale:.3g})")
    assert worst <= 1e-6 * max(1.0, scale)
    # a peft adapter directory, as `clues admin train-export` writes it
    assert sorted(p.name for p in (result_dir / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_a_silo_that_cannot_train_fails_the_run(world, scored, tmp_path):
    """A SuperNode whose data file went away after it started: its ClientApp's error comes back, the round is short
    of min-train-nodes and the run fails (it neither hangs nor averages the other silo alone)."""
    require_flower()
    scoring_job, files, _ = scored
    shutil.copy(files["b"][0], tmp_path / "gone.jsonl")  # `clues flower supernode` checks it exists at the start
    nodes = {
        "a": {"silo": "a", "data-path": str(files["a"][0]), "scores-path": str(files["a"][1])},
        "b": {"silo": "b", "data-path": str(tmp_path / "gone.jsonl"), "scores-path": str(files["b"][1])},
    }
    out = tmp_path / "server-out"
    run_config = {
        "model": "tiny:0",
        "max-len": 96,
        "lora.rank": 4,
        "num-server-rounds": 1,
        "local.steps": 1,
        "selection.scoring-job": scoring_job,
        "out-dir": str(out),
    }
    app = shutil.copytree(APP_DIR, tmp_path / "app")
    with Deployment(tmp_path / "deploy", nodes) as flower:
        (tmp_path / "gone.jsonl").unlink()
        run = flower.run(app, run_config, expect="finished:failed")
        log = flower.run_log(run["run_id"])
    assert "1 valid replies, below min-train-nodes 2" in log and "gone.jsonl" in log, log
    assert not (out / f"run-{run['run_id']}" / "final.safetensors").exists()
