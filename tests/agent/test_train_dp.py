"""DP-SGD training jobs end to end against a real coordinator (uvicorn, training tasks in-process): two silos train
with DP-SGD, each keeps an ε ledger and reports it with its updates; the admin sees every silo's ε, a silo only its
own; a silo's own ε limit refuses a round before any training; and REST refuses malformed DP settings."""

from __future__ import annotations

import json

import pytest

from agent.loop import AgentError
from agent.train import TrainOptions, round_dir, run_training, train_dir
from scoring.io import read_bundle
from tests.agent.test_train import start, train_body, train_silos

BUDGET = 4.0


@pytest.fixture(scope="module")
def dp_job(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    body = train_body("dp", local={"steps": 2, "batch_size": 4, "lr": 1e-2, "dp": {"epsilon": BUDGET}})
    job_id = start(world, body)
    return job_id, root, train_silos(world, job_id, root)


def test_each_silo_spends_at_most_the_budget_and_reports_it(world, dp_job):
    job_id, root, results = dp_job
    job = world.admin.train_job(job_id)
    assert job["status"] == "done" and job["spec"]["local"]["dp"]["epsilon"] == BUDGET
    for silo in ("a", "b"):
        assert results[silo].rounds_trained == [0, 1]
        ledger = json.loads((train_dir(root / silo / "work", job_id) / "privacy-ledger.json").read_text())
        assert [r["round"] for r in ledger["rounds"]] == [0, 1]
        spent = [r["epsilon"] for r in ledger["rounds"]]
        assert 0 < spent[0] < spent[1] <= BUDGET * (1 + 1e-6)
        assert spent[1] == pytest.approx(BUDGET, rel=1e-3)  # σ is calibrated to spend the budget over both rounds
        report = next(m["privacy"] for m in job["silos"] if m["name"] == silo)
        assert report["epsilon_spent"] == spent[1] and report["steps"] == 4
        assert report["delta"] == pytest.approx(1 / len(world.samples[silo]))
        update = read_bundle(
            (round_dir(root / silo / "work", job_id, 1) / "update.safetensors").read_bytes(), None, None
        )
        assert update.update["privacy"] == report
        assert update.update["train_loss"] == 0.0  # an un-noised mean loss is not covered by ε: not sent
    with world.client("a") as client:
        mine = client.train_job(job_id)["silos"]
    assert [m["name"] for m in mine] == ["a"] and mine[0]["privacy"]["epsilon_spent"] > 0


def test_a_silo_s_own_limit_refuses_a_round_before_training(world, tmp_path):
    job_id = start(
        world, train_body("dp-limit", quorum=1, round_timeout_s=5.0, local={"steps": 2, "dp": {"epsilon": 8.0}})
    )
    strict = TrainOptions(poll_interval=0.1, timeout=60, max_epsilon=0.01)
    with (
        world.client("a") as client,
        pytest.raises(AgentError, match=r"refused: round 0 .* past this silo's own limit ε = 0\.01"),
    ):
        run_training(
            client, job_id, world.data_file("a", tmp_path / "a"), work_dir=tmp_path / "a" / "work", options=strict
        )
    ledger = json.loads((train_dir(tmp_path / "a" / "work", job_id) / "privacy-ledger.json").read_text())
    assert ledger["rounds"] == []  # nothing charged
    assert not (round_dir(tmp_path / "a" / "work", job_id, 0) / "update.safetensors").exists()
    assert world.admin.train_job(job_id)["history"][0]["received"] == []


@pytest.mark.parametrize(
    ("dp", "needle"),
    [
        ({}, "give exactly one of epsilon"),
        ({"epsilon": 1.0, "noise_multiplier": 1.0}, "give exactly one of epsilon"),
        ({"epsilon": 0}, "epsilon"),
        ({"noise_multiplier": 1.0, "delta": 1.5}, "delta"),
        ({"epsilon": 1.0, "clip_norm": -1}, "clip_norm"),
        ({"epsilon": 1.0, "sigma": 2}, "sigma"),
    ],
)
def test_bad_dp_settings_are_422_naming_the_field(world, dp, needle):
    body = train_body("bad-dp", local={"steps": 2, "dp": dp})
    r = world.admin.http.post("/v1/train", json=body)
    assert r.status_code == 422, r.text
    assert needle in json.dumps(r.json()["detail"])


def test_the_admin_page_shows_each_silo_s_epsilon(world, dp_job):
    import httpx

    job_id, _, _ = dp_job
    job = world.admin.train_job(job_id)
    with httpx.Client(base_url=world.coordinator.url, follow_redirects=True) as browser:
        assert browser.post("/ui/login", data={"token": world.coordinator.admin_token}).status_code == 200
        page = browser.get(f"/ui/train/{job_id}").text
    assert "ε spent (of budget, at δ)" in page and "trains with DP-SGD" in page
    for member in job["silos"]:
        row = page.split(f'<tr data-silo="{member["name"]}">', 1)[1].split("</tr>", 1)[0]
        assert f"of {BUDGET:g}" in row and f'<td class="num">{member["privacy"]["steps"]}</td>' in row


@pytest.mark.parametrize("kind", ["stack", "shared-basis"])
def test_the_exact_kinds_train_with_dp_sgd(world, tmp_path, kind):
    """DP-SGD under both exact kinds: a stack silo's fresh adapter and a shared basis's R (the only noisy
    coordinates: r² per module) are clipped and noised, the ledger is charged, and only those tensors leave."""
    local = {"steps": 2, "batch_size": 4, "lr": 1e-2, "dp": {"noise_multiplier": 1.0}}
    job_id = start(world, train_body(f"dp-{kind}", rounds=1, local=local, aggregation={"kind": kind}))
    results = train_silos(world, job_id, tmp_path)
    assert all(r.status == "done" for r in results.values())
    update = read_bundle(
        (round_dir(tmp_path / "a" / "work", job_id, 0) / "update.safetensors").read_bytes(), None, None
    )
    assert update.update["privacy"]["steps"] == 2 and update.update["train_loss"] == 0.0
    sent = {name.rsplit(".", 2)[-2] for name in update.adapter}
    assert sent == ({"lora_R"} if kind == "shared-basis" else {"lora_A", "lora_B"})
