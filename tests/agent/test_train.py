"""``agent.train`` against a real coordinator (uvicorn, training tasks in-process): two silos through a federated
job, a rerun, a late round, the warmup → preconditioned scoring job path, and the ``clues train`` /
``clues agent train`` / ``clues admin train-export`` commands."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from agent.client import CoordinatorError, SiloClient
from agent.loop import AgentError, AgentOptions, run_agent
from agent.train import TrainOptions, choose_samples, local_moments_path, round_dir, run_training
from clues.cli import main
from scoring.io import load_projection, read_bundle
from tests.conftest import SILOS

FAST = TrainOptions(poll_interval=0.1, timeout=120)


def train_body(name: str, mode: str = "federated", **fields) -> dict:
    """A tiny job: the tiny model and LoRA of the shared warmup run, 2 rounds of 2 steps on all samples."""
    return {
        "name": name,
        "mode": mode,
        "silos": list(SILOS),
        "model": "tiny:0",
        "lora": {"rank": 4, "alpha": 8.0},
        "max_len": 96,
        "rounds": 2,
        "local": {"steps": 2, "batch_size": 4, "lr": 1e-2},
        "selection": {"source": "all"},
        **fields,
    }


def start(world, body: dict) -> str:
    job = world.admin.create_train_job(body)
    return world.admin.start_train_job(job["id"])["id"]


def train_silos(world, job_id: str, root: Path, clients: dict | None = None) -> dict:
    """`run_training` for silos a and b at once, one thread each (work directory ``root/<silo>/work``)."""
    results, errors = {}, []

    def one(silo: str) -> None:
        client = (clients or {}).get(silo) or world.client(silo)
        try:
            data = world.data_file(silo, root / silo)
            results[silo] = run_training(client, job_id, data, work_dir=root / silo / "work", options=FAST)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(silo,)) for silo in SILOS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    return results


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def federated(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("federated")
    job_id = start(world, train_body("fed"))
    return job_id, root, train_silos(world, job_id, root)


def test_two_silos_train_every_round(world, federated):
    job_id, _, results = federated
    for silo, result in results.items():
        assert (result.status, result.rounds_trained, result.late_rounds) == ("done", [0, 1], [])
        assert result.num_samples == len(world.samples[silo])
    job = world.admin.wait_train(job_id, timeout=5)
    assert job["status"] == "done"
    assert [sorted(h["participants"]) for h in job["history"]] == [["a", "b"], ["a", "b"]]
    assert all(h["train_loss"] > 0 for h in job["history"])
    assert job["history"][1]["start_sha256"] == job["history"][0]["result_sha256"]
    assert all(sha256(r.final_path) == job["final_sha256"] for r in results.values())


def test_updates_carry_no_moments(federated):
    job_id, root, _ = federated
    for r in (0, 1):
        update = read_bundle(
            (round_dir(root / "a" / "work", job_id, r) / "update.safetensors").read_bytes(), None, None
        )
        assert not update.has_moments and update.update["round"] == r and update.update["num_samples"] == 9
        assert update.update["score_mass"] == 0.0  # no scoring job gives scores
        assert local_moments_path(root / "a" / "work", job_id, r).is_file()  # kept by the silo


def test_a_rerun_after_done_trains_nothing(world, federated, monkeypatch):
    job_id, root, _ = federated

    def no_model(self):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("agent.train.LocalTrainer._load", no_model)
    with world.client("a") as client:
        result = run_training(client, job_id, root / "a" / "a.jsonl", work_dir=root / "a" / "work", options=FAST)
    assert (result.status, result.rounds_trained, result.late_rounds) == ("done", [], [])


class LateFirstRound(SiloClient):
    """A silo whose round-0 update arrives after the round closed (the coordinator would answer 409)."""

    def upload_round_update(self, job_id: str, round: int, data: bytes) -> dict:
        if round == 0:
            raise CoordinatorError(409, f"round 0 of training job {job_id} is closed (closed); late update refused")
        return super().upload_round_update(job_id, round, data)


def test_a_late_round_is_not_fatal(world, tmp_path):
    job_id = start(world, train_body("late", quorum=1, round_timeout_s=2.0, local={"steps": 1, "batch_size": 4}))
    late = LateFirstRound(world.coordinator.url, world.tokens["a"])
    results = train_silos(world, job_id, tmp_path, clients={"a": late})
    assert (results["a"].rounds_trained, results["a"].late_rounds) == ([1], [0])
    assert (results["b"].rounds_trained, results["b"].late_rounds) == ([0, 1], [])
    history = world.admin.train_job(job_id)["history"]
    assert [sorted(h["participants"]) for h in history] == [["b"], ["a", "b"]]


class Scores:
    """A client stub serving one scoring job's rows for `choose_samples`."""

    def __init__(self, selected: set[str], samples):
        self.rows = [{"sample_id": s.id, "score": 0.5, "selected": s.id in selected} for s in samples]

    def scores(self, job_id: str) -> dict:
        return {"rows": self.rows, "threshold": 0.0}


@pytest.mark.parametrize(
    ("source", "selected", "count", "mass"),
    [("selected", 3, 3, 1.5), ("random", 3, 3, 1.5), ("all", 3, 9, 4.5), ("fraction", 0, 4, 2.0)],
)
def test_choose_samples(world, source, selected, count, mass):
    samples = world.samples["a"]
    client = Scores({s.id for s in samples[:selected]}, samples)
    job = {
        "id": "f" * 32,
        "spec": {"selection": {"source": source, "scoring_job": "e" * 32, "fraction": 0.4, "seed": 0}},
    }
    chosen, score_mass = choose_samples(client, job, samples)
    assert (len(chosen), score_mass) == (count, mass)
    assert choose_samples(client, job, list(reversed(samples)))[0] == list(reversed(chosen))  # order-free draw
    if source == "selected":
        assert [s.id for s in chosen] == [s.id for s in samples[:3]]


def test_an_empty_selection_is_refused(world):
    samples = world.samples["a"]
    job = {"id": "f" * 32, "spec": {"selection": {"source": "selected", "scoring_job": "e" * 32}}}
    with pytest.raises(AgentError, match=f"scoring job {'e' * 32} selected none of them"):
        choose_samples(Scores(set(), samples), job, samples)


def test_warmup_moments_precondition_the_scoring_job(world, tmp_path):
    warm_id = start(
        world, train_body("warm", "warmup", selection={"source": "fraction", "fraction": 0.5}, checkpoint_rounds=[0, 1])
    )
    results = train_silos(world, warm_id, tmp_path)
    assert all(r.num_samples == round(0.5 * 9) for r in results.values())
    body = {
        "name": "from-warm",
        "projection": {"kind": "sjlt", "dim": 64, "seed": 0, "nnz": 4},
        "precondition": True,
        "score": "trace",  # the calibrated score compares with the coordinator's plain anchor samples
        "threshold": {"kind": "top", "fraction": 0.5},
    }
    job = world.admin.scoring_job_from_warmup(warm_id, body)
    world.admin.upload_anchors(job["id"], world.data.anchors_file.read_bytes())
    world.admin.open_job(job["id"])
    work = tmp_path / "a" / "work"
    options = AgentOptions(wait=False, rows_per_shard=16)
    with world.client("a") as client:
        result = run_agent(client, job["id"], tmp_path / "a" / "a.jsonl", work_dir=work, options=options)
    assert result.uploaded == 2
    run = work / job["id"] / "run"
    manifest = json.loads((run / "run.json").read_text())
    assert [e["has_moments"] for e in manifest["checkpoints"]] == [True, True]
    for t in (0, 1):
        moments = local_moments_path(work, warm_id, t).read_bytes()
        assert (run / f"ckpt-{t:03d}" / "optimizer.safetensors").read_bytes() == moments
    proj_dir = next((work / job["id"]).glob("proj-*"))
    assert load_projection(proj_dir / "ckpt-000.candidate.safetensors")[0].preconditioned
    with world.client("b") as client, pytest.raises(AgentError, match=f"taken part in warmup job {warm_id}"):
        run_agent(client, job["id"], world.data_file("b", tmp_path), work_dir=tmp_path / "other", options=options)


def test_the_commands_round_trip(world, tmp_path, capsys):
    admin = ["--coordinator", world.coordinator.url, "--token", world.coordinator.admin_token]
    flags = ["--silos", "a", "--model", "tiny:0", "--selection", "all", "--rank", "4", "--max-len", "96"]
    assert main(["train", "--mode", "federated", *flags, "--local-steps", "1", *admin]) == 0
    job_id = json.loads(capsys.readouterr().out)["id"]
    data = world.data_file("a", tmp_path)
    silo = ["--coordinator", world.coordinator.url, "--token", world.tokens["a"], "--job", job_id, "--data", str(data)]
    assert main(["agent", "train", *silo, "--poll-interval", "0.1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["status"], summary["rounds_trained"], summary["num_samples"]) == ("done", [0], 9)
    assert Path(summary["final_adapter"]).parent == tmp_path / ".clues-agent" / f"train-{job_id}"
    assert main(["admin", "train-show", job_id, *admin]) == 0
    assert json.loads(capsys.readouterr().out)["history"][0]["participants"] == ["a"]
    out = tmp_path / "export"
    assert main(["admin", "train-export", job_id, "--out", str(out), "--merged-model", *admin]) == 0
    assert json.loads(capsys.readouterr().out)["merged"] == str(out / "merged")
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "merged"}
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "tokenizer.json").is_file()
    _check_export(out, Path(summary["final_adapter"]))


def _check_export(out: Path, final: Path) -> None:
    """The exported adapter loads into peft with the final adapter's weights."""
    import numpy as np

    from scoring.federated.local import get_lora_weights
    from scoring.models import load_adapter, load_base_model

    model = load_adapter(load_base_model("tiny:0").model, out)
    bundle = read_bundle(final.read_bytes(), None, None)
    weights = get_lora_weights(model)
    assert all(np.array_equal(weights[name], bundle.adapter[name]) for name in bundle.adapter)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--mode", "federated", "--silos", "a"], "clues train: error: --selection: 'selected' needs"),
        (["train", "--mode", "warmup", "--silos", "a", "--fraction", "2"], "clues train: error: --fraction:"),
        (["train", "--mode", "warmup", "--silos", "a", "--checkpoint-rounds", "x"], "--checkpoint-rounds: expected"),
        (["admin", "job-from-warmup", "0" * 32, "--name", "n", "--open"], "--open: needs --anchors"),
        (["admin", "job-from-warmup", "0" * 32, "--name", "n", "--precondition"], "--score: 'calibrated' compares"),
        (
            ["admin", "job-from-warmup", "0" * 32, "--name", "n", "--precondition", "--score", "trace"],
            "--threshold: 'mean-anchor' comp",
        ),
        (["admin", "job-from-warmup", "0" * 32, "--name", "n", "--signals", "ppl"], "--signals: expected distinct"),
        (["admin", "job-from-warmup", "0" * 32, "--name", "n", "--signal-checkpoint", "-2"], "--signal-checkpoint:"),
        (["agent", "train", "--job", "0" * 32, "--data", "d", "--poll-interval", "0"], "--poll-interval: must be"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message):
    connection = ["--coordinator", "http://127.0.0.1:9", "--token", "t"]
    assert main([*argv, *connection]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_names_the_new_commands(capsys):
    for argv in (["train", "--help"], ["agent", "train", "--help"], ["admin", "train-export", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--aggregation", "--checkpoint-rounds", "--work-dir", "--merged-model"))
