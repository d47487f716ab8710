"""`workers.training` called directly (no Celery) on the tiny model: round 0 from the seeded adapter, FedAvg and
FedAdam against hand computations (server state persisted between rounds), quorum at the deadline, redelivered and
crashed aggregations, merging (ΔW of the merged adapter), and evaluation.

Silo updates are the round's start adapter plus seeded noise, written as a silo would (`bundle_to_bytes` with an
``update`` field) and recorded straight in storage; the HTTP side is tests/app/test_train_api.py.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as load_arrays

from scoring.config import DEFAULT_LORA_TARGETS, LocalTrainConfig, LoraSettings, round_lr
from scoring.data import load_pubmedqa, write_samples
from scoring.federated.aggregation import FedAdam, SiloUpdate, state_from_arrays, state_to_arrays, weighted_average
from scoring.io import CheckpointBundle, bundle_to_bytes, read_bundle
from storage import repository as repo
from storage.models import utcnow
from tests.scoring.test_data import PUBMEDQA
from workers import pipeline, training
from workers.config import ServiceSettings

LORA = LoraSettings(rank=4, alpha=8.0).to_dict()


def train_settings(mode: str = "federated", **over: Any) -> dict[str, Any]:
    """A job's ``settings`` as `app.routes.train` stores them (tiny LoRA, 2 local steps, cosine lr)."""
    settings = {
        "lora": LORA,
        "lora_init_seed": 0,
        "random_b": mode == "warmup",
        "max_len": 64,
        "template": "auto",
        "local": LocalTrainConfig(steps=2, lr=1e-2, schedule="cosine").to_dict(),
        "aggregation": {"rule": "fedavg"},
        "merge": {"kind": "cat", "density": None, "svd_rank": None, "weights": "samples"},
        "selection": {"source": "all", "fraction": 0.05, "seed": 0, "scoring_job": None},
        "checkpoint_rounds": [0, 1] if mode == "warmup" else None,
        "evaluation": {
            "tasks": ["loss"],
            "every": 1,
            "batch_size": 4,
            "max_new_tokens": 8,
            "pubmedqa_method": "loglik",
        },
    }
    return {**settings, **over}


def scored_job(res: pipeline.Resources, scores: dict[str, list[tuple[float, bool]]]) -> str:
    """A finished scoring job whose silos' samples have these ``(score, selected)``; its silos created if missing."""
    with res.sessions.begin() as session:
        known = {s.name for s in repo.list_silos(session)}
        for name in scores:
            if name not in known:
                repo.create_silo(session, name=name)
        job = repo.create_job(
            session, name="s", model="tiny:0", lora=LORA, projection={}, similarity="cosine",
            threshold={"kind": "mean-anchor"}, precondition=False, options={},
            checkpoints=[{"index": 0, "step": 1, "lr": 1e-3, "lr_last": 1e-3, "adam": {}}], silo_names=list(scores),
        )  # fmt: skip
        rows = [
            {"owner": silo, "sample_id": f"{silo}{i}", "row": i, "score": score, "parts": [score], "selected": kept}
            for silo, values in scores.items()
            for i, (score, kept) in enumerate(values)
        ]
        repo.replace_scores(session, job_id=job.id, rows=rows)
        repo.update_job(session, job_id=job.id, status="done")
        return job.id


def new_train_job(
    res: pipeline.Resources,
    *,
    silos: tuple[str, ...] = ("a", "b"),
    mode: str = "federated",
    rounds: int = 2,
    quorum: int | None = None,
    timeout_s: float = 3600.0,
    scoring_job: str | None = None,
    **settings: Any,
) -> str:
    """A training job in ``starting`` (as after ``POST /start``), its silos created when missing."""
    with res.sessions.begin() as session:
        known = {s.name for s in repo.list_silos(session)}
        for name in silos:
            if name not in known:
                repo.create_silo(session, name=name)
        job = repo.create_train_job(
            session, name="t", mode=mode, model="tiny:0", settings=train_settings(mode, **settings), rounds=rounds,
            quorum=quorum or len(silos), round_timeout_s=timeout_s, scoring_job_id=scoring_job,
            silo_names=list(silos),
        )  # fmt: skip
        repo.update_train_job(session, job_id=job.id, status="starting")
        return job.id


def update_bytes(
    start: CheckpointBundle, round: int, *, seed: int, num_samples: int, scale: float = 0.05, score_mass=0.0, loss=1.0
) -> bytes:
    """A silo's update: the start adapter plus seeded Gaussian noise (float32), no moments, with ``update``."""
    rng = np.random.default_rng(seed)
    adapter = {name: (a + scale * rng.standard_normal(a.shape)).astype(np.float32) for name, a in start.adapter.items()}
    update = {"round": round, "num_samples": num_samples, "score_mass": score_mass, "train_loss": loss}
    bundle = CheckpointBundle(start.layout, adapter, {}, {}, start.adapter_config, start.entry, {}, update)
    return bundle_to_bytes(bundle)


def round_start(res: pipeline.Resources, job_id: str, round: int) -> CheckpointBundle:
    with res.sessions() as session:
        key = repo.get_round(session, job_id=job_id, round=round).start_blob
    return read_bundle(res.blobs.read_bytes(key), None, None)


def send(res: pipeline.Resources, job_id: str, round: int, silo: str, data: bytes) -> CheckpointBundle:
    """Record ``data`` as ``silo``'s update (what the upload route stores); returns it parsed."""
    bundle = read_bundle(data, None, None)
    ref = res.blobs.put_bytes(data)
    with res.sessions.begin() as session:
        u = bundle.update
        repo.add_update(
            session, job_id=job_id, round=round, silo_id=repo.get_silo_by_name(session, name=silo).id,
            blob_key=ref.key, size_bytes=ref.size, num_samples=u["num_samples"], score_mass=u["score_mass"],
            train_loss=u["train_loss"],
        )  # fmt: skip
    return bundle


def send_all(res, job_id: str, round: int, counts: dict[str, int], seed: int = 0) -> dict[str, CheckpointBundle]:
    start = round_start(res, job_id, round)
    return {
        silo: send(res, job_id, round, silo, update_bytes(start, round, seed=seed + i, num_samples=n, loss=1.0 + i))
        for i, (silo, n) in enumerate(counts.items())
    }


def result_of(res: pipeline.Resources, job_id: str, round: int) -> CheckpointBundle:
    with res.sessions() as session:
        key = repo.get_round(session, job_id=job_id, round=round).result_blob
    assert key is not None
    return read_bundle(res.blobs.read_bytes(key), None, None)


def silo_updates(bundles: dict[str, CheckpointBundle]) -> list[SiloUpdate]:
    return [SiloUpdate(s, b.adapter, b.update["num_samples"], b.update["score_mass"]) for s, b in bundles.items()]


def assert_adapters_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == np.float32, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def past_deadline(res: pipeline.Resources, job_id: str, round: int) -> None:
    with res.sessions.begin() as session:
        repo.get_round(session, job_id=job_id, round=round).deadline = utcnow() - timedelta(seconds=1)


@pytest.fixture
def res(tmp_path) -> pipeline.Resources:
    from storage.db import upgrade

    resources = pipeline.Resources.from_settings(ServiceSettings(data_dir=tmp_path / "coord"))
    upgrade(resources.sessions.kw["bind"])
    return resources


# --- init ---------------------------------------------------------------------------------------------------------


def test_init_opens_round_0_with_the_seeded_adapter_and_is_idempotent(res):
    from scoring.federated.local import get_lora_weights
    from scoring.models import attach_lora, load_base_model, lora_layout

    job_id = new_train_job(res, mode="warmup")
    opened = training.init_train(res, job_id)
    assert opened is not None and opened.round == 0 and 3500 < opened.delay_s <= 3600
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        row = repo.get_round(session, job_id=job_id, round=0)
        assert (job.status, job.round) == ("running", 0) and row.status == "open"
        assert row.lr == pytest.approx(1e-2) and row.deadline == opened.deadline
        layout, start_key = job.layout, row.start_blob
    # the adapter every silo would build itself: seed 0, random B (warmup)
    model = attach_lora(load_base_model("tiny:0").model, LoraSettings.from_dict(LORA), init_seed=0, random_b=True)
    assert layout == [[name, list(shape)] for name, shape in lora_layout(model)]
    start = round_start(res, job_id, 0)
    assert start.entry == {"index": 0, "step": 0, "lr": 1e-2, "lr_last": 1e-2, "adam": start.entry["adam"]}
    assert not start.has_moments and start.update is None
    want = get_lora_weights(model)
    assert_adapters_close(start.adapter, want)
    assert any(np.abs(a).sum() > 0 for n, a in want.items() if "lora_B" in n)

    again = training.init_train(res, job_id)  # a redelivered task
    assert again == opened
    with res.sessions() as session:
        assert len(repo.list_rounds(session, job_id=job_id)) == 1
        assert repo.get_round(session, job_id=job_id, round=0).start_blob == start_key


def test_init_does_nothing_for_a_draft_job(res):
    job_id = new_train_job(res)
    with res.sessions.begin() as session:
        repo.update_train_job(session, job_id=job_id, status="draft")
    assert training.init_train(res, job_id) is None
    with res.sessions() as session:
        assert repo.list_rounds(session, job_id=job_id) == []


# --- FedAvg / FedAdam ---------------------------------------------------------------------------------------------


def test_fedavg_round_is_the_sample_weighted_average_and_opens_the_next_round(res):
    job_id = new_train_job(res, rounds=3)
    training.init_train(res, job_id)
    start = round_start(res, job_id, 0)
    sent = send_all(res, job_id, 0, {"a": 3, "b": 1})
    outcome = training.aggregate_round(res, job_id, 0)
    assert outcome.status == "closed" and outcome.evaluate is None
    assert outcome.opened is not None and outcome.opened.round == 1

    got = result_of(res, job_id, 0)
    want = {n: (3 * sent["a"].adapter[n].astype(np.float64) + sent["b"].adapter[n]) / 4 for n in start.adapter}
    assert_adapters_close(got.adapter, {n: a.astype(np.float32) for n, a in want.items()})
    assert got.update is None and not got.has_moments and got.layout == start.layout
    assert got.entry["index"] == 0 and got.entry["step"] == 2 and got.entry["lr"] == pytest.approx(1e-2)

    cfg = LocalTrainConfig(steps=2, lr=1e-2, schedule="cosine")
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        r0, r1 = repo.list_rounds(session, job_id=job_id)
        assert (job.status, job.round, job.progress) == ("running", 1, pytest.approx(1 / 3))
        assert (r0.status, r0.participants) == ("closed", ["a", "b"])
        assert r0.train_loss == pytest.approx((3 * 1.0 + 1 * 2.0) / 4)
        assert r1.status == "open" and r1.start_blob == r0.result_blob
        assert r1.lr == pytest.approx(round_lr(cfg, 1, 3)) and r1.lr < r0.lr
        assert [m.num_samples for m in job.members] == [3, 1]
    assert round_start(res, job_id, 1).entry["lr"] == pytest.approx(1e-2)  # the result's entry: round 0's lr


@pytest.mark.parametrize(("rule", "weights"), [("quality-fedavg", [0.5, 1.5]), ("fedprox", [1, 3])])
def test_quality_fedavg_weighs_by_score_mass_and_fedprox_by_samples(res, rule, weights):
    # a's one selected sample scores 0.5, b's three 1.5 in all: what the silos claim below
    scoring = scored_job(res, {"a": [(0.5, True), (0.1, False)], "b": [(0.5, True)] * 3 + [(-1.0, False)]})
    selection = {"source": "selected", "fraction": 0.05, "seed": 0, "scoring_job": scoring}
    job_id = new_train_job(res, rounds=1, aggregation={"rule": rule}, scoring_job=scoring, selection=selection)
    training.init_train(res, job_id)
    start = round_start(res, job_id, 0)
    sent = {
        silo: send(res, job_id, 0, silo, update_bytes(start, 0, seed=i, num_samples=1 + 2 * i, score_mass=0.5 + i))
        for i, silo in enumerate(("a", "b"))
    }
    assert training.aggregate_round(res, job_id, 0).status == "closed"
    want = weighted_average(silo_updates(sent), weights)
    assert_adapters_close(result_of(res, job_id, 0).adapter, {n: a.astype(np.float32) for n, a in want.items()})


def test_fedadam_carries_its_server_state_across_rounds(res):
    options = {"eta": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-2}
    job_id = new_train_job(res, rounds=2, aggregation={"rule": "fedadam", **options})
    training.init_train(res, job_id)
    x0 = round_start(res, job_id, 0).adapter
    sent0 = send_all(res, job_id, 0, {"a": 2, "b": 5})
    assert training.aggregate_round(res, job_id, 0).status == "closed"

    want1, state1 = FedAdam(**options).aggregate(x0, silo_updates(sent0))
    assert_adapters_close(result_of(res, job_id, 0).adapter, want1)
    with res.sessions() as session:
        state_key = repo.get_train_job(session, job_id=job_id).server_state_blob
    stored = load_arrays(res.blobs.read_bytes(state_key))
    assert set(stored) == set(state_to_arrays(state1))
    for key, value in state_to_arrays(state1).items():
        np.testing.assert_array_equal(stored[key], value, err_msg=key)
    assert state_from_arrays(stored).round == 1

    x1 = round_start(res, job_id, 1).adapter
    sent1 = send_all(res, job_id, 1, {"a": 4, "b": 1}, seed=10)
    outcome = training.aggregate_round(res, job_id, 1)
    assert outcome.status == "closed" and outcome.opened is None
    got = result_of(res, job_id, 1).adapter
    want2, state2 = FedAdam(**options).aggregate(x1, silo_updates(sent1), state_from_arrays(stored))
    assert_adapters_close(got, want2)
    fresh, _ = FedAdam(**options).aggregate(x1, silo_updates(sent1))  # what forgetting the state would give
    assert max(np.abs(fresh[n] - got[n]).max() for n in got) > 1e-3
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        assert (job.status, job.progress) == ("done", 1.0) and job.finished_at is not None
        assert job.final_blob == repo.get_round(session, job_id=job_id, round=1).result_blob
        assert state_from_arrays(load_arrays(res.blobs.read_bytes(job.server_state_blob))).round == state2.round == 2


# --- quorum and deadlines -----------------------------------------------------------------------------------------


def test_quorum_waits_until_the_deadline_then_aggregates_who_sent(res):
    job_id = new_train_job(res, silos=("a", "b", "c"), quorum=2, rounds=2)
    training.init_train(res, job_id)
    sent = send_all(res, job_id, 0, {"a": 1, "b": 3})
    assert training.aggregate_round(res, job_id, 0).status == "waiting"
    with res.sessions() as session:
        assert repo.get_round(session, job_id=job_id, round=0).status == "open"
    past_deadline(res, job_id, 0)
    outcome = training.aggregate_round(res, job_id, 0)
    assert outcome.status == "closed" and outcome.opened.round == 1
    with res.sessions() as session:
        assert repo.get_round(session, job_id=job_id, round=0).participants == ["a", "b"]
    want = weighted_average(silo_updates(sent), [1, 3])
    assert_adapters_close(result_of(res, job_id, 0).adapter, {n: a.astype(np.float32) for n, a in want.items()})


def test_a_tiny_round_timeout_closes_the_round_by_itself(res):
    job_id = new_train_job(res, silos=("a", "b", "c"), quorum=2, rounds=1, timeout_s=0.05)
    opened = training.init_train(res, job_id)
    send_all(res, job_id, 0, {"a": 1, "c": 2})
    assert opened.delay_s < 0.05
    time.sleep(opened.delay_s + 0.01)
    assert training.aggregate_round(res, job_id, 0).status == "closed"
    with res.sessions() as session:
        assert repo.get_round(session, job_id=job_id, round=0).participants == ["a", "c"]
        assert repo.get_train_job(session, job_id=job_id).status == "done"


def test_below_quorum_at_the_deadline_fails_the_job_naming_the_missing_silo(res):
    job_id = new_train_job(res, silos=("a", "b", "c"), quorum=3)
    training.init_train(res, job_id)
    send_all(res, job_id, 0, {"a": 1, "b": 1})
    assert training.aggregate_round(res, job_id, 0).status == "waiting"
    past_deadline(res, job_id, 0)
    assert training.aggregate_round(res, job_id, 0).status == "failed"
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        assert (job.status, job.message) == ("failed", "failed")
        assert "['c']" in job.error and "quorum of 3" in job.error
        assert job.finished_at is not None
    assert training.aggregate_round(res, job_id, 0).status == "already"  # a later delivery changes nothing


# --- redelivery ---------------------------------------------------------------------------------------------------


def test_a_redelivered_aggregation_changes_nothing(res):
    job_id = new_train_job(res, rounds=2)
    training.init_train(res, job_id)
    send_all(res, job_id, 0, {"a": 2, "b": 2})
    assert training.aggregate_round(res, job_id, 0).status == "closed"
    with res.sessions() as session:
        before = [(r.round, r.status, r.result_blob, r.start_blob) for r in repo.list_rounds(session, job_id=job_id)]
    assert training.aggregate_round(res, job_id, 0).status == "already"
    with res.sessions() as session:
        after = [(r.round, r.status, r.result_blob, r.start_blob) for r in repo.list_rounds(session, job_id=job_id)]
        assert repo.get_train_job(session, job_id=job_id).round == 1
    assert after == before


def test_a_worker_that_crashed_mid_aggregation_is_redone_to_the_same_blob(res, monkeypatch):
    job_id = new_train_job(res, rounds=2)
    training.init_train(res, job_id)
    send_all(res, job_id, 0, {"a": 2, "b": 1})
    written: list[str] = []
    put = res.blobs.put_bytes

    def recording_put(data: bytes):
        ref = put(data)
        written.append(ref.key)
        return ref

    def crash(*args, **kwargs):
        raise RuntimeError("worker killed")

    monkeypatch.setattr(res.blobs, "put_bytes", recording_put)
    monkeypatch.setattr(training.repo, "close_round", crash)
    with pytest.raises(RuntimeError, match="killed"):
        training.aggregate_round(res, job_id, 0)
    with res.sessions() as session:
        assert repo.get_round(session, job_id=job_id, round=0).status == "aggregating"  # claimed, never closed
    crashed_result = written[0]

    monkeypatch.undo()
    assert training.aggregate_round(res, job_id, 0).status == "closed"  # the redelivery
    assert training.aggregate_round(res, job_id, 0).status == "already"
    with res.sessions() as session:
        rows = repo.list_rounds(session, job_id=job_id)
        assert [(r.round, r.status) for r in rows] == [(0, "closed"), (1, "open")]
        assert rows[0].result_blob == crashed_result and rows[0].participants == ["a", "b"]


def test_an_update_committed_between_listing_and_claiming_is_aggregated_or_refused(res, monkeypatch):
    """A silo's upload may commit while the worker decides the round is due: every stored update of a closed round
    must be among its participants (else the silo got 201 for an update nobody used)."""
    job_id = new_train_job(res, silos=("a", "b", "c"), quorum=2, rounds=1)
    training.init_train(res, job_id)
    start = round_start(res, job_id, 0)
    send_all(res, job_id, 0, {"a": 1, "b": 1})
    past_deadline(res, job_id, 0)
    claim = training.repo.claim_round

    def late_upload_then_claim(session, **kwargs):
        send(res, job_id, 0, "c", update_bytes(start, 0, seed=7, num_samples=1))  # its own, committed transaction
        return claim(session, **kwargs)

    monkeypatch.setattr(training.repo, "claim_round", late_upload_then_claim)
    assert training.aggregate_round(res, job_id, 0).status == "closed"
    with res.sessions() as session:
        stored = [u.silo.name for u in repo.list_updates(session, job_id=job_id, round=0)]
        assert repo.get_round(session, job_id=job_id, round=0).participants == stored


# --- merging ------------------------------------------------------------------------------------------------------


def _deltas(bundle: CheckpointBundle) -> dict[str, np.ndarray]:
    """ΔW = scaling·B·A per adapted module, from a bundle's tensors and its adapter_config (alpha / r)."""
    scaling = bundle.adapter_config["lora_alpha"] / bundle.adapter_config["r"]
    out = {}
    for name, a in bundle.adapter.items():
        if ".lora_A." in name:
            b = bundle.adapter[name.replace(".lora_A.", ".lora_B.")]
            out[name.replace(".lora_A.weight", "")] = scaling * b.astype(np.float64) @ a.astype(np.float64)
    return out


def test_cat_merge_gives_the_count_weighted_sum_of_deltas(res):
    job_id = new_train_job(res, mode="merge", rounds=1)
    training.init_train(res, job_id)
    sent = send_all(res, job_id, 0, {"a": 3, "b": 1})
    outcome = training.aggregate_round(res, job_id, 0)
    assert outcome.status == "closed" and outcome.opened is None
    merged = result_of(res, job_id, 0)
    assert merged.adapter_config["r"] == 8 and merged.adapter_config["lora_alpha"] == 8  # ranks add up; scaling 1
    assert all(shape[0] == 8 for name, shape in merged.layout if ".lora_A." in name)
    weights = {"a": 0.75, "b": 0.25}
    per_silo = {s: _deltas(b) for s, b in sent.items()}
    want = {m: sum(weights[s] * per_silo[s][m] for s in sent) for m in per_silo["a"]}
    got = _deltas(merged)
    assert set(got) == set(want) and len(got) == 2 * len(DEFAULT_LORA_TARGETS)  # every target in 2 layers
    for m in want:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-7, err_msg=m)
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        assert job.status == "done" and job.final_blob == repo.get_round(session, job_id=job_id, round=0).result_blob


def test_cat_merge_loads_in_peft_with_the_same_deltas(res, tmp_path):
    from scoring.federated.merging import lora_deltas
    from scoring.io import write_checkpoint_dir
    from scoring.models import load_adapter, load_base_model

    job_id = new_train_job(res, mode="merge", rounds=1)
    training.init_train(res, job_id)
    send_all(res, job_id, 0, {"a": 1, "b": 2})
    training.aggregate_round(res, job_id, 0)
    merged = result_of(res, job_id, 0)
    write_checkpoint_dir(merged, tmp_path / "merged")
    model = load_adapter(load_base_model("tiny:0").model, tmp_path / "merged" / "adapter", trainable=False)
    got = {path.removeprefix("base_model.model."): d.numpy() for path, d in lora_deltas(model, "default").items()}
    want = {name.removeprefix("base_model.model."): d for name, d in _deltas(merged).items()}
    assert set(got) == set(want)
    for m in want:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-6, err_msg=m)


def test_linear_merge_combines_a_and_b_with_root_weights(res):
    job_id = new_train_job(res, mode="merge", rounds=1, merge={"kind": "linear", "weights": "uniform"})
    training.init_train(res, job_id)
    sent = send_all(res, job_id, 0, {"a": 3, "b": 1})
    training.aggregate_round(res, job_id, 0)
    merged = result_of(res, job_id, 0)
    assert merged.adapter_config["r"] == 4 and merged.adapter_config["lora_alpha"] == 4
    s = LORA["alpha"] / LORA["rank"]
    root = np.sqrt(0.5 * s)  # uniform weights over 2 silos, each with scaling alpha/r
    for name in merged.adapter:
        want = root * (sent["a"].adapter[name].astype(np.float64) + sent["b"].adapter[name])
        np.testing.assert_allclose(merged.adapter[name], want, rtol=1e-5, atol=1e-7, err_msg=name)


# --- evaluation ---------------------------------------------------------------------------------------------------


def test_evaluate_stores_round_metrics_then_finishes_the_job(res, monkeypatch):
    import scoring.federated.evaluation

    job_id = new_train_job(res, rounds=2)
    samples = load_pubmedqa(PUBMEDQA, limit=3)
    path = res.settings.data_dir / "eval.jsonl"
    write_samples(path, samples)
    ref = res.blobs.put_bytes(path.read_bytes())
    with res.sessions.begin() as session:
        repo.update_train_job(session, job_id=job_id, eval_blob=ref.key, eval_num_samples=3)
    calls = []
    real = scoring.federated.evaluation.evaluate
    monkeypatch.setattr(scoring.federated.evaluation, "evaluate", lambda *a, **k: calls.append(k) or real(*a, **k))

    training.init_train(res, job_id)
    send_all(res, job_id, 0, {"a": 1, "b": 1})
    assert training.aggregate_round(res, job_id, 0).evaluate == 0
    first = training.evaluate_round(res, job_id, 0)
    assert first["round"] == 0 and first["loss"] > 0 and first["perplexity"] == pytest.approx(np.exp(first["loss"]))
    assert calls[0]["tasks"] == ["loss"] and calls[0]["max_len"] == 64
    with res.sessions() as session:
        assert repo.get_round(session, job_id=job_id, round=0).metrics == first
        job = repo.get_train_job(session, job_id=job_id)
        assert job.status == "running" and job.metrics is None

    send_all(res, job_id, 1, {"a": 1, "b": 1}, seed=5)
    outcome = training.aggregate_round(res, job_id, 1)
    assert (outcome.status, outcome.evaluate) == ("closed", 1)
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        assert job.status == "evaluating" and job.final_blob is not None
    last = training.evaluate_round(res, job_id, 1)
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        assert (job.status, job.metrics) == ("done", last) and job.finished_at is not None
        assert repo.get_round(session, job_id=job_id, round=1).metrics == last
    assert len(calls) == 2
    assert training.evaluate_round(res, job_id, 1) == last  # stored already: skipped
    assert len(calls) == 2
    assert json.dumps(last)  # JSON-safe (stored in a JSON column)
