"""Training for real: the API under uvicorn and a Celery worker process on real Redis, two silo agents with the tiny
model over HTTP, through the whole product: federated warmup → a scoring job from its rounds (each silo
preconditioning with its own warmup moments) → federated training on the selected samples, evaluated on a held-out
set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.client import AdminClient, SiloClient
from agent.loop import AgentOptions, run_agent
from agent.train import TrainOptions, run_training
from scoring.io import read_bundle
from tests.conftest import SILOS, TinyData
from tests.integration.conftest import Service, each_silo

pytestmark = pytest.mark.integration

MODEL = {"model": "tiny:0", "lora": {"rank": 4, "alpha": 8.0}, "max_len": 96}


def _train(service: Service, tokens: dict[str, str], job_id: str, data: dict[str, Path], work: Path) -> dict:
    def run(silo: str):
        with SiloClient(service.url, tokens[silo]) as client:
            options = TrainOptions(poll_interval=0.3, timeout=300)
            return run_training(client, job_id, data[silo], work_dir=work / silo, options=options)

    return each_silo(run)


def test_warmup_then_scoring_then_federated_training_on_redis(tiny_data: TinyData, service_factory, tmp_path):
    service = service_factory(database="sqlite", redis=True)
    service.start_api()
    service.start_worker("w1")
    work = tmp_path / "silos"
    data = {silo: tiny_data.data_file(silo, work / silo) for silo in SILOS}
    with AdminClient(service.url, service.admin_token) as admin:
        tokens = {silo: admin.register_silo(silo)["token"] for silo in SILOS}

        # 1. federated warmup: 3 rounds on half of each silo's data; rounds 1 and 2 become scoring checkpoints
        warm = admin.create_train_job(
            {
                "name": "warmup",
                "mode": "warmup",
                "silos": list(SILOS),
                **MODEL,
                "rounds": 3,
                "local": {"steps": 2, "batch_size": 2, "lr": 1e-2},
                "selection": {"source": "fraction", "fraction": 0.5, "seed": 1},
                "checkpoint_rounds": [1, 2],
            }
        )
        admin.start_train_job(warm["id"])
        _train(service, tokens, warm["id"], data, work)
        warm = admin.train_job(warm["id"])
        assert warm["status"] == "done", warm["error"]
        assert [h["participants"] for h in warm["history"]] == [sorted(SILOS)] * 3
        assert warm["final_sha256"] == warm["history"][-1]["result_sha256"]

        # 2. a scoring job from the warmup's rounds; every silo preconditions with its own warmup moments
        job = admin.scoring_job_from_warmup(
            warm["id"],
            {
                "name": "score",
                "projection": {"kind": "sjlt", "dim": 256, "seed": 3},
                "precondition": True,
                "score": "trace",  # the calibrated score would compare with the coordinator's plain anchor samples
                # the tiny model's close scores order differently from run to run (the top half split 3/6 to 9/0
                # between the silos): the top 75 % of 2 × 9 samples (13 or more) leaves each silo at least 4 whatever
                # the order, for the training step below
                "threshold": {"kind": "top", "fraction": 0.75},
            },
        )
        assert [c["lr"] for c in job["spec"]["checkpoints"]] == [h["lr"] for h in warm["history"][1:]]
        admin.upload_anchors(job["id"], tiny_data.anchors_file.read_bytes())
        admin.open_job(job["id"])

    def score(silo: str):
        with SiloClient(service.url, tokens[silo]) as client:
            options = AgentOptions(rows_per_shard=4, poll_interval=0.3, timeout=300)
            return run_agent(client, job["id"], data[silo], work_dir=work / silo, options=options)

    scored = each_silo(score)
    selected = {silo: scored[silo].selected for silo in SILOS}
    assert all(n is not None and n > 0 for n in selected.values()), selected

    # 3. federated training on the selected samples, evaluated on a held-out set
    with AdminClient(service.url, service.admin_token) as admin:
        fed = admin.create_train_job(
            {
                "name": "federated",
                "mode": "federated",
                "silos": list(SILOS),
                "rounds": 2,
                "local": {"steps": 2, "batch_size": 2, "lr": 1e-2},
                "selection": {"source": "selected", "scoring_job": job["id"]},
                "aggregation": {"rule": "fedavg"},
            }
        )
        assert fed["spec"]["model"] == "tiny:0"  # from the scoring job
        admin.upload_eval_set(fed["id"], tiny_data.anchors_file.read_bytes())
        admin.start_train_job(fed["id"])
        _train(service, tokens, fed["id"], data, work)
        fed = service_wait_done(admin, fed["id"])
        assert {m["name"]: m["num_samples"] for m in fed["silos"]} == selected
        assert fed["metrics"]["num_samples"] == len(tiny_data.samples["anchors"])
        assert np.isfinite(fed["metrics"]["loss"]) and fed["metrics"]["perplexity"] > 1
        assert all(h["metrics"] is not None for h in fed["history"])

        # the final adapter is the last round's FedAvg result, and it moved away from the first round's start
        final = read_bundle(_download(admin, fed["id"], tmp_path), None, None)
        start = read_bundle(_round_start(admin, fed["id"], tmp_path), None, None)
        assert any(not np.allclose(final.adapter[k], start.adapter[k]) for k in final.adapter)


def service_wait_done(admin: AdminClient, job_id: str, timeout: float = 120.0) -> dict:
    """Poll until the job leaves ``evaluating`` (the final evaluation runs after the last round)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        job = admin.train_job(job_id)
        if job["status"] in ("done", "failed") or time.monotonic() > deadline:
            assert job["status"] == "done", job["error"]
            return job
        time.sleep(0.3)


def _download(admin: AdminClient, job_id: str, tmp: Path) -> bytes:
    dest = tmp / f"{job_id}-final.safetensors"
    admin.download_final_adapter(job_id, dest)
    return dest.read_bytes()


def _round_start(admin: AdminClient, job_id: str, tmp: Path) -> bytes:
    dest = tmp / f"{job_id}-round0.safetensors"
    admin.download_round_adapter(job_id, 0, dest)
    return dest.read_bytes()
