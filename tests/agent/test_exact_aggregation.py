"""Federated jobs that aggregate exactly (issue 22), against a real coordinator and two silos on the tiny model:

- ``stack`` with silos of different ranks: after every round the global model's weight delta is the previous one
  plus Σ wᵢ·sᵢ·Bᵢ·Aᵢ of the updates the silos sent, to float tolerance;
- ``shared-basis``: A and B never move, the global R is the count-weighted mean of the silos' R, so the delta is
  B·mean(R)·A; the silos upload only R;
- an upload of the wrong shape for the job's kind is refused with 422 and nothing is stored;
- the export is a standard peft adapter that loads as the job's model; the round history names the kind and the
  bytes each silo sent; ``clues agent train`` and ``clues admin train-show`` run such a job."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from agent.client import CoordinatorError
from agent.train import round_dir
from clues.cli import main
from clues.train import export_adapter
from scoring.federated.adapter_rounds import scaling_of
from scoring.federated.lora_algebra import R_SUFFIX, fold_shared_basis, leading, lora_modules, warm_started
from scoring.io import bundle_to_bytes, read_bundle
from scoring.models import load_adapter, load_base_model
from tests.agent.test_train import start, train_body, train_silos


def delta(bundle) -> dict[str, np.ndarray]:
    """The dense weight update of a global adapter bundle (a shared basis folded first)."""
    weights = fold_shared_basis(bundle.adapter)
    return {m: pair.delta() for m, pair in lora_modules(weights, scaling_of(bundle.adapter_config)).items()}


def bundles(world, job_id: str, root: Path, rounds: int):
    """Each round's start adapter, the final one, and each silo's update per round (from its work directory)."""
    with world.client("a") as client:
        starts = []
        for r in range(rounds):
            client.download_round_adapter(job_id, r, root / f"start-{r}.safetensors")
            starts.append(read_bundle((root / f"start-{r}.safetensors").read_bytes(), None, None))
        client.download_final_adapter(job_id, root / "final.safetensors")
    final = read_bundle((root / "final.safetensors").read_bytes(), None, None)
    updates = {
        silo: [
            read_bundle((round_dir(root / silo / "work", job_id, r) / "update.safetensors").read_bytes(), None, None)
            for r in range(rounds)
        ]
        for silo in ("a", "b")
    }
    return starts, final, updates


@pytest.fixture(scope="module")
def stacked(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    aggregation = {"kind": "stack", "silo_ranks": {"a": 2, "b": 3}, "clip": "none", "stack_start": "warm"}
    job_id = start(world, train_body("stack", aggregation=aggregation))
    results = train_silos(world, job_id, root)
    return job_id, root, results


def test_a_warm_stack_round_adds_the_silos_changes_exactly(world, stacked):
    job_id, root, _ = stacked
    assert_exact_stack(world, job_id, root, warm=True)


def test_a_fresh_stack_round_adds_the_silos_products_exactly(world, tmp_path):
    aggregation = {"kind": "stack", "silo_ranks": {"a": 2, "b": 3}, "clip": "none"}  # stack_start fresh, the default
    job_id = start(world, train_body("fresh-stack", aggregation=aggregation))
    train_silos(world, job_id, tmp_path)
    assert_exact_stack(world, job_id, tmp_path, warm=False)


def assert_exact_stack(world, job_id: str, root: Path, *, warm: bool) -> None:
    """After each round of a finished two-round stack job of silos a (rank 2) and b (rank 3), the global weight
    delta is the previous one plus the count-weighted sum of the silos' changes."""
    job = world.admin.train_job(job_id)
    assert job["status"] == "done" and job["spec"]["aggregation"]["kind"] == "stack"
    starts, final, updates = bundles(world, job_id, root, 2)
    counts = {silo: len(world.samples[silo]) for silo in ("a", "b")}
    w = {silo: n / sum(counts.values()) for silo, n in counts.items()}
    ends = [*starts[1:], final]
    for r in range(2):
        assert {u[r].adapter_config["r"] for u in updates.values()} == {2, 3}  # each silo's own rank
        assert updates["a"][r].layout[0][1][0] == 2 and updates["b"][r].layout[0][1][0] == 3
        before, after = delta(starts[r]), delta(ends[r])
        for module, d in after.items():
            want = before[module] + sum(
                w[silo] * change(updates[silo][r], starts[r], warm)[module] for silo in ("a", "b")
            )
            np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-6)
        report = job["history"][r]["aggregation"]
        assert (report["kind"], report["rank"]) == ("stack", 5 * (r + 1)) and report["truncation_error"] < 1e-5
    assert final.adapter_config["r"] == 10 and final.adapter_config["lora_alpha"] == 10.0


def change(update, start, warm: bool) -> dict[str, np.ndarray]:
    """A silo's weight change in a round: its own adapter times its scaling α/rᵢ, minus (``warm``) the leading rᵢ
    components of the round's global adapter it started from (none in round 0, whose global adapter is 0)."""
    trained = {m: p.delta() for m, p in lora_modules(update.adapter, scaling_of(update.adapter_config)).items()}
    rank = update.adapter_config["r"]
    if not (warm and warm_started(start.adapter, rank)):
        return trained
    began = lora_modules(leading(start.adapter, rank), scaling_of(start.adapter_config))
    return {m: d - began[m].delta() for m, d in trained.items()}


def test_the_history_shows_each_silos_upload_and_a_silo_sees_only_its_own(world, stacked):
    job_id, root, _ = stacked
    job = world.admin.train_job(job_id)
    for r, row in enumerate(job["history"]):
        sent = {s: (round_dir(root / s / "work", job_id, r) / "update.safetensors").stat().st_size for s in ("a", "b")}
        assert row["upload_bytes"] == sent
    with world.client("b") as client:
        mine = client.train_job(job_id)
    assert all(set(row["upload_bytes"]) == {"b"} for row in mine["history"])
    assert mine["spec"]["aggregation"]["silo_ranks"] == {"b": 3}  # not a's


def test_the_stacked_export_is_a_peft_adapter_of_the_summed_rank(world, stacked, tmp_path):
    from scoring.federated.local import get_lora_weights
    from scoring.models import load_adapter, load_base_model

    job_id, root, _ = stacked
    with world.client("a") as client:
        export_adapter(client, job_id, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (10, 10.0)
    model = load_adapter(load_base_model("tiny:0").model, tmp_path / "out")
    final = read_bundle((root / "final.safetensors").read_bytes(), None, None)
    weights = get_lora_weights(model)
    assert all(np.array_equal(weights[n], final.adapter[n]) for n in final.adapter)


@pytest.fixture(scope="module")
def shared(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    job_id = start(world, train_body("shared", aggregation={"kind": "shared-basis", "clip": "none"}))
    return job_id, root, train_silos(world, job_id, root)


def test_a_shared_basis_round_is_b_mean_r_a(world, shared):
    job_id, root, _ = shared
    starts, final, updates = bundles(world, job_id, root, 2)
    counts = {silo: len(world.samples[silo]) for silo in ("a", "b")}
    w = {silo: n / sum(counts.values()) for silo, n in counts.items()}
    ends = [*starts[1:], final]
    basis = {n: v for n, v in starts[0].adapter.items() if not n.endswith(R_SUFFIX)}
    assert not any(np.any(v) for n, v in starts[0].adapter.items() if n.endswith(R_SUFFIX))  # R starts at 0
    for r in range(2):
        for silo in ("a", "b"):
            assert all(n.endswith(R_SUFFIX) for n in updates[silo][r].adapter)  # only R leaves a silo
        for name, value in ends[r].adapter.items():
            if name in basis:
                np.testing.assert_array_equal(value, basis[name])
            else:
                mean = sum(w[s] * updates[s][r].adapter[name].astype(np.float64) for s in ("a", "b"))
                np.testing.assert_allclose(value, mean, rtol=1e-5, atol=1e-7)
    job = world.admin.train_job(job_id)
    sizes = [v for row in job["history"] for v in row["upload_bytes"].values()]
    assert all(s == sizes[0] for s in sizes) and job["history"][0]["aggregation"] == {"kind": "shared-basis"}
    scaling = scaling_of(final.adapter_config)
    folded = delta(final)
    for module, d in folded.items():
        a = final.adapter[module + ".lora_A.weight"].astype(np.float64)
        b = final.adapter[module + ".lora_B.weight"].astype(np.float64)
        np.testing.assert_allclose(d, scaling * b @ final.adapter[module + R_SUFFIX].astype(np.float64) @ a, atol=1e-6)


@pytest.mark.parametrize(
    ("aggregation", "needle"),
    [
        ({"kind": "shared-basis"}, "aggregation kind 'shared-basis' takes the R matrices only"),
        ({"kind": "stack", "silo_ranks": {"a": 2}}, "aggregation kind 'stack' takes this silo's own rank-2 adapter"),
    ],
)
def test_an_update_of_the_wrong_shape_is_refused_and_nothing_is_stored(world, tmp_path, aggregation, needle):
    job_id = start(world, train_body(f"wrong-{aggregation['kind']}", rounds=1, aggregation=aggregation))
    deadline = time.monotonic() + 60
    while world.admin.train_job(job_id)["status"] != "running":  # round 0 opens once the worker built the start
        assert time.monotonic() < deadline, "round 0 never opened"
        time.sleep(0.05)
    with world.client("a") as client:
        client.download_round_adapter(job_id, 0, tmp_path / "start.safetensors")
        start_bundle = read_bundle((tmp_path / "start.safetensors").read_bytes(), None, None)
        whole = dataclasses.replace(  # the round's whole global adapter (rank 4), as a fedavg silo would send
            start_bundle, update={"round": 0, "num_samples": 3, "score_mass": 0.0, "train_loss": 1.0}
        )
        with pytest.raises(CoordinatorError) as err:
            client.upload_round_update(job_id, 0, bundle_to_bytes(whole))
        assert err.value.status == 422 and needle in str(err.value)
        job = client.train_job(job_id)
    assert job["history"][0]["received"] == [] and job["history"][0]["upload_bytes"] == {}
    digest = hashlib.sha256(bundle_to_bytes(whole)).hexdigest()
    assert not world.coordinator.app.state.clues.blobs.exists(digest)


def test_the_commands_run_a_shared_basis_job(world, tmp_path, capsys):
    admin = ["--coordinator", world.coordinator.url, "--token", world.coordinator.admin_token]
    flags = ["--silos", "a", "--model", "tiny:0", "--selection", "all", "--rank", "4", "--max-len", "96"]
    assert (
        main(["train", "--mode", "federated", "--adapters", "shared-basis", *flags, "--local-steps", "1", *admin]) == 0
    )
    job_id = json.loads(capsys.readouterr().out)["id"]
    data = world.data_file("a", tmp_path)
    silo = ["--coordinator", world.coordinator.url, "--token", world.tokens["a"], "--job", job_id, "--data", str(data)]
    assert main(["agent", "train", *silo, "--poll-interval", "0.1"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "done"
    assert main(["admin", "train-show", job_id, *admin]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["spec"]["aggregation"]["kind"] == "shared-basis"
    assert list(shown["history"][0]["upload_bytes"]) == ["a"]
    out = tmp_path / "export"  # a standard peft adapter (lora_B := B·R) and a merged model, as for any job
    assert main(["admin", "train-export", job_id, "--out", str(out), "--merged-model", *admin]) == 0
    capsys.readouterr()
    assert "lora_R" not in (out / "adapter_model.safetensors").read_bytes().decode("latin-1")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    adapted = load_adapter(load_base_model("tiny:0").model, out, trainable=False)
    ids = torch.tensor([[5, 17, 33, 2, 90]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_capped_stack_truncates_and_reports_its_error(world, tmp_path):
    aggregation = {"kind": "stack", "silo_ranks": {"a": 2, "b": 3}, "max_rank": 3}
    job_id = start(world, train_body("capped", aggregation=aggregation))
    train_silos(world, job_id, tmp_path)
    job = world.admin.train_job(job_id)
    reports = [row["aggregation"] for row in job["history"]]
    assert [r["rank"] for r in reports] == [3, 3]  # 5, then 3 + 5, each cut back to 3
    assert all(0 < r["truncation_error"] < 1 for r in reports)
    with world.client("a") as client:
        client.download_final_adapter(job_id, tmp_path / "final.safetensors")
    final = read_bundle((tmp_path / "final.safetensors").read_bytes(), None, None)
    assert final.adapter_config["r"] == 3 and {s[0] for n, s in final.layout if n.endswith("lora_A.weight")} == {3}
