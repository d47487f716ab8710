"""The training routes in-process (TestClient, a recording ``send``; the queued training steps are run here by
calling `workers.training` directly): every bad input is a 4xx naming the field with nothing stored, idempotent
uploads and starts, the aggregation hand-off, and a warmup job turned into a scoring job. Then a real coordinator
(`serve_coordinator`, tasks in-process) restarted in the middle of a round."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import AppSettings
from app.main import create_app
from scoring.config import DEFAULT_SIGNALS, LocalTrainConfig, ProjectionSpec, parameter_layout_hash, round_lr
from scoring.federated.aggregation import delta_norm
from scoring.io import CheckpointBundle, bundle_to_bytes, checkpoint_from_bytes, read_bundle
from storage import repository as repo
from tests.app.test_api import job_body, put
from tests.conftest import serve_coordinator
from tests.workers.test_training import past_deadline, update_bytes
from workers import names, pipeline, training

ADMIN = {"Authorization": "Bearer admin-secret-for-tests-0123456789abcdef"}
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}


def train_body(**over: Any) -> dict[str, Any]:
    body = {
        "name": "t",
        "mode": "federated",
        "silos": ["a", "b"],
        "model": "tiny:0",
        "lora": LORA,
        "max_len": 64,
        "rounds": 2,
        "selection": {"source": "all"},
        "local": {"steps": 2, "lr": 0.01, "schedule": "linear"},
    }
    body.update(over)
    return body


class Env:
    """The app on a fresh data dir with silos a, b, c; ``enqueued`` records (task, *args); `work` runs the queued
    training steps as a worker would (deadline checks are left to the test)."""

    def __init__(self, tmp_path: Path):
        self.settings = AppSettings(
            data_dir=tmp_path / "coord",
            admin_token="admin-secret-for-tests-0123456789abcdef",
            max_upload_bytes=64 << 10,
        )
        self.enqueued: list[tuple] = []
        self.app = create_app(self.settings, send=lambda task, args, countdown: self.enqueued.append((task, *args)))
        self.client = TestClient(self.app)
        self.client.__enter__()
        self.res = pipeline.Resources.from_settings(self.settings)
        self.done = 0
        self.tokens = {}
        for name in ("a", "b", "c"):
            r = self.client.post("/v1/silos", json={"name": name}, headers=ADMIN)
            assert r.status_code == 201, r.text
            self.tokens[name] = r.json()["token"]

    def auth(self, silo: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[silo]}"}

    def work(self) -> None:
        while self.done < len(self.enqueued):
            task, job_id, *args = self.enqueued[self.done]
            self.done += 1
            if task == names.TRAIN_INIT:
                training.init_train(self.res, job_id)
            elif task == names.TRAIN_AGGREGATE:
                outcome = training.aggregate_round(self.res, job_id, *args)
                if outcome.evaluate is not None:
                    training.evaluate_round(self.res, job_id, outcome.evaluate)

    def create(self, **over: Any) -> str:
        r = self.client.post("/v1/train", json=train_body(**over), headers=ADMIN)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def running(self, **over: Any) -> str:
        """A job started, with round 0 open."""
        job_id = self.create(**over)
        assert self.client.post(f"/v1/train/{job_id}/start", headers=ADMIN).status_code == 202
        self.work()
        assert self.get(job_id)["status"] == "running"
        return job_id

    def get(self, job_id: str, silo: str | None = None) -> dict[str, Any]:
        r = self.client.get(f"/v1/train/{job_id}", headers=self.auth(silo) if silo else ADMIN)
        assert r.status_code == 200, r.text
        return r.json()

    def start_bundle(self, job_id: str, round: int, silo: str = "a") -> CheckpointBundle:
        r = self.client.get(f"/v1/train/{job_id}/rounds/{round}/adapter", headers=self.auth(silo))
        assert r.status_code == 200, r.text
        assert r.headers["X-Content-SHA256"] == hashlib.sha256(r.content).hexdigest()
        assert r.headers["X-Content-SHA256"] == self.get(job_id)["history"][round]["start_sha256"]
        return read_bundle(r.content, None, None)

    def upload(self, job_id: str, round: int, silo: str, data: bytes, sha: str | None = None) -> httpx.Response:
        return put(self.client, f"/v1/train/{job_id}/rounds/{round}/update", data, self.tokens[silo], sha)

    def updates(self, job_id: str, round: int) -> list[str]:
        with self.res.sessions() as session:
            return [u.silo.name for u in repo.list_updates(session, job_id=job_id, round=round)]


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.client.__exit__(None, None, None)


def _draft_scoring_job(env: Env) -> str:
    r = env.client.post("/v1/jobs", json=job_body(), headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["id"]


# --- creating a job -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "status", "needle"),
    [
        ({"silos": ["a", "zz"]}, 422, "silos: unknown silo(s): 'zz'"),
        ({"mode": "merge", "rounds": 2}, 422, "rounds"),
        ({"aggregation": {"rule": "fedprox"}}, 422, "prox_mu"),
        ({"quorum": 3}, 422, "quorum"),
        ({"selection": {"source": "selected"}}, 422, "selection.scoring_job"),
        ({"selection": {"source": "random"}}, 422, "selection.scoring_job"),
        ({"selection": None}, 422, "selection"),
        ({"mode": "warmup", "checkpoint_rounds": [0, 2]}, 422, "checkpoint_rounds"),
        ({"mode": "warmup", "checkpoint_rounds": [1, 1]}, 422, "checkpoint_rounds"),
        ({"checkpoint_rounds": [0]}, 422, "checkpoint_rounds"),
        ({"mode": "merge", "rounds": 1, "merge": {"kind": "ties"}}, 422, "merge.density"),
        ({"merge": {"kind": "nope"}}, 422, "merge"),
        ({"aggregation": {"rule": "fedavg", "eta": 0.1}}, 422, "aggregation"),
        ({"local": {"steps": 0}}, 422, "steps"),
        ({"lora": {**LORA, "rank": 0}}, 422, "rank"),
        ({"model": None}, 422, "model"),
        ({"silos": ["a", "a"]}, 422, "unique"),
        ({"mode": "warmup", "aggregation": {"kind": "stack"}}, 422, "aggregation.kind: 'stack' aggregates federated"),
        ({"aggregation": {"kind": "stack", "rule": "fedadam"}}, 422, "'fedadam' does not work with kind 'stack'"),
        ({"aggregation": {"kind": "stack", "rule": "median"}}, 422, "'median' does not work with kind 'stack'"),
        ({"aggregation": {"kind": "fedavg", "silo_ranks": {"a": 2}}}, 422, "silo_ranks: only kind 'stack'"),
        ({"aggregation": {"kind": "shared-basis", "max_rank": 8}}, 422, "max_rank: only kind 'stack'"),
        ({"aggregation": {"kind": "stack", "silo_ranks": {"zz": 2}}}, 422, "silo_ranks: ['zz'] are not silos"),
        ({"aggregation": {"kind": "stack", "silo_ranks": {"a": 0}}}, 422, "ranks must be in 1..4096"),
        ({"aggregation": {"kind": "stack"}, "rounds": 300, "lora": {**LORA, "rank": 8}}, 422, "give max_rank"),
        ({"aggregation": {"kind": "fedsvd"}}, 422, "aggregation"),
    ],
)
def test_bad_train_specs_are_4xx_naming_the_field_and_store_nothing(env, over, status, needle):
    r = env.client.post("/v1/train", json=train_body(**over), headers=ADMIN)
    assert r.status_code == status, r.text
    assert needle in json.dumps(r.json()["detail"])
    assert env.client.get("/v1/train", headers=ADMIN).json() == []


def test_the_scoring_job_must_be_done_and_gives_the_defaults(env):
    scoring_job = _draft_scoring_job(env)
    body = {
        "model": None,
        "lora": None,
        "max_len": None,
        "selection": {"source": "selected", "scoring_job": scoring_job},
    }
    r = env.client.post("/v1/train", json=train_body(**body), headers=ADMIN)
    assert r.status_code == 409 and "selection.scoring_job" in r.json()["detail"] and "'draft'" in r.json()["detail"]
    with env.res.sessions.begin() as session:
        repo.update_job(session, job_id=scoring_job, status="done")
    r = env.client.post("/v1/train", json=train_body(**body, silos=["a", "c"]), headers=ADMIN)
    assert r.status_code == 422 and "silos" in r.json()["detail"] and "'c'" in r.json()["detail"]
    r = env.client.post("/v1/train", json=train_body(**body), headers=ADMIN)
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert (spec["model"], spec["lora"]["rank"], spec["max_len"]) == ("tiny:0", 4, 64)
    assert spec["selection"]["scoring_job"] == scoring_job and spec["random_b"] is False


def test_a_created_job_shows_its_spec_defaults(env):
    job = env.client.post("/v1/train", json=train_body(mode="warmup", rounds=5, selection=None), headers=ADMIN).json()
    assert (job["status"], job["round"], job["history"], job["final_sha256"]) == ("draft", 0, [], None)
    spec = job["spec"]
    assert spec["checkpoint_rounds"] == [0, 1, 3, 4] and spec["quorum"] == 2 and spec["random_b"] is True
    assert spec["selection"] == {"source": "fraction", "fraction": 0.05, "seed": 0, "scoring_job": None}
    assert [m["name"] for m in job["silos"]] == ["a", "b"]


# --- start, downloads ---------------------------------------------------------------------------------------------


def test_start_twice_is_a_no_op_and_downloads_wait_for_round_0(env):
    job_id = env.create()
    r = env.client.get(f"/v1/train/{job_id}/rounds/0/adapter", headers=env.auth("a"))
    assert r.status_code == 409 and "round 0 is not open" in r.json()["detail"]
    r = env.client.get(f"/v1/train/{job_id}/adapter", headers=ADMIN)
    assert r.status_code == 409 and "final adapter" in r.json()["detail"]
    for _ in range(2):
        r = env.client.post(f"/v1/train/{job_id}/start", headers=ADMIN)
        assert r.status_code == 202 and r.json()["status"] == "starting"
    assert env.enqueued == [(names.TRAIN_INIT, job_id)]
    env.work()
    r = env.client.post(f"/v1/train/{job_id}/start", headers=ADMIN)
    assert r.status_code == 202 and r.json()["status"] == "running"
    assert len(env.enqueued) == 1
    env.start_bundle(job_id, 0)
    r = env.client.get(f"/v1/train/{job_id}/adapter", headers=ADMIN)
    assert r.status_code == 409 and "'running'" in r.json()["detail"]


def test_a_silo_sees_only_its_jobs_and_itself(env):
    job_id = env.running()
    send_round(env, job_id, 0, silos=("a",))
    assert env.client.get(f"/v1/train/{job_id}", headers=env.auth("c")).status_code == 404
    assert env.client.get(f"/v1/train/{job_id}/rounds/0/adapter", headers=env.auth("c")).status_code == 404
    assert env.client.get("/v1/train", headers=env.auth("c")).json() == []
    for silo, received in (("a", ["a"]), ("b", [])):
        job = env.get(job_id, silo)
        assert [m["name"] for m in job["silos"]] == [silo] and job["history"][0]["received"] == received
    assert env.get(job_id)["history"][0]["received"] == ["a"]
    assert env.client.post(f"/v1/train/{job_id}/start", headers=env.auth("a")).status_code == 403


# --- updates ------------------------------------------------------------------------------------------------------


def send_round(env: Env, job_id: str, round: int, silos=("a", "b"), seed: int = 0) -> dict[str, bytes]:
    start = env.start_bundle(job_id, round)
    sent = {}
    for i, silo in enumerate(silos):
        sent[silo] = update_bytes(start, round, seed=seed + 10 * round + i, num_samples=2 + i, loss=1.0 + i)
        r = env.upload(job_id, round, silo, sent[silo])
        assert r.status_code == 201, r.text
    return sent


def test_the_last_update_hands_the_round_to_a_worker_and_reupload_is_200(env):
    job_id = env.running()
    start = env.start_bundle(job_id, 0)
    data = update_bytes(start, 0, seed=1, num_samples=3)
    assert env.upload(job_id, 0, "a", data).status_code == 201
    again = env.upload(job_id, 0, "a", data)
    assert again.status_code == 200 and again.json()["created"] is False
    assert env.enqueued == [(names.TRAIN_INIT, job_id)]  # b has not sent yet
    other = update_bytes(start, 0, seed=2, num_samples=3)
    r = env.upload(job_id, 0, "a", other)
    assert r.status_code == 409 and "already held" in r.json()["detail"]
    assert env.upload(job_id, 0, "b", other).status_code == 201
    assert env.enqueued[-1] == (names.TRAIN_AGGREGATE, job_id, 0)
    env.work()
    job = env.get(job_id)
    assert job["round"] == 1 and [h["status"] for h in job["history"]] == ["closed", "open"]
    assert job["history"][0]["participants"] == ["a", "b"] and job["silos"][0]["num_samples"] == 3
    lr = round_lr(LocalTrainConfig(steps=2, lr=0.01, schedule="linear"), 1, 2)
    assert job["history"][1]["lr"] == pytest.approx(lr)
    assert job["history"][1]["start_sha256"] == job["history"][0]["result_sha256"]
    again = env.upload(job_id, 0, "a", data)  # the same bytes once the round has closed: still idempotent
    assert again.status_code == 200


def with_update(data: bytes, **fields: Any) -> bytes:
    """``data`` (a safetensors bundle) with fields of its ``update`` metadata replaced, as a hostile silo could
    write it (`bundle_to_bytes` refuses to)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"]["update"] = json.dumps({**json.loads(header["__metadata__"]["update"]), **fields})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + size :]


def _bad_updates(start: CheckpointBundle) -> list[tuple[str, bytes, str]]:
    def bundle(**over: Any) -> bytes:
        fields = {
            "layout": start.layout,
            "adapter": {n: a + 0.01 for n, a in start.adapter.items()},
            "exp_avg": {},
            "exp_avg_sq": {},
            "adapter_config": start.adapter_config,
            "entry": start.entry,
            "update": {"round": 0, "num_samples": 2, "score_mass": 0.0, "train_loss": 1.0},
        }
        return bundle_to_bytes(CheckpointBundle(**{**fields, **over}))

    zeros = {n: np.zeros_like(a) for n, a in start.adapter.items()}
    first = start.layout[0][0]
    return [
        ("no update", bundle(update=None), "'update' is missing"),
        ("moments", bundle(exp_avg=zeros, exp_avg_sq=zeros), "Adam moments"),
        ("layout", bundle(layout=start.layout[1:], adapter={n: a for n, a in start.adapter.items() if n != first}),
         "layout"),
        ("round", bundle(update={"round": 1, "num_samples": 2, "score_mass": 0.0, "train_loss": 1.0}), "round 1"),
        ("samples", bundle(update={"round": 0, "num_samples": 0, "score_mass": 0.0, "train_loss": 1.0}),
         "num_samples"),
        ("huge count", with_update(bundle(), num_samples=10**15), "at most 2147483647"),
        ("negative loss", with_update(bundle(), train_loss=-5), "cannot be negative"),
        ("not safetensors", b"hello world, not a bundle", "safetensors"),
    ]  # fmt: skip


def test_bad_updates_are_422_and_store_nothing(env):
    job_id = env.running()
    start = env.start_bundle(job_id, 0)
    for what, data, needle in _bad_updates(start):
        r = env.upload(job_id, 0, "a", data)
        assert r.status_code == 422, (what, r.text)
        assert needle in r.json()["detail"], what
    assert env.updates(job_id, 0) == []
    assert env.get(job_id)["history"][0]["status"] == "open"


def test_update_refusals_by_caller_round_and_checksum(env):
    job_id = env.running()
    start = env.start_bundle(job_id, 0)
    data = update_bytes(start, 0, seed=1, num_samples=1)
    r = env.upload(job_id, 0, "c", data)
    assert r.status_code == 404 and job_id in r.json()["detail"]  # not a member
    r = env.upload(job_id, 0, "a", data, sha="0" * 64)
    assert r.status_code == 400 and "does not match" in r.json()["detail"]
    r = env.upload(job_id, 0, "a", data, sha="not-a-sha")
    assert r.status_code == 400 and "X-Content-SHA256" in r.json()["detail"]
    future = update_bytes(start, 1, seed=1, num_samples=1)
    r = env.upload(job_id, 1, "a", future)
    assert r.status_code == 409 and "round 1" in r.json()["detail"]
    r = env.client.put(f"/v1/train/{job_id}/rounds/0/update", content=data, headers=ADMIN)
    assert r.status_code == 403
    assert env.updates(job_id, 0) == [] and env.updates(job_id, 1) == []


def test_a_late_update_is_refused_after_the_deadline_and_after_the_close(env):
    job_id = env.running(silos=["a", "b", "c"], quorum=2)
    send_round(env, job_id, 0, silos=("a", "b"))
    assert env.enqueued[-1] == (names.TRAIN_INIT, job_id)  # c has not sent: no aggregation yet
    past_deadline(env.res, job_id, 0)
    late = update_bytes(env.start_bundle(job_id, 0), 0, seed=9, num_samples=1)
    r = env.upload(job_id, 0, "c", late)
    assert r.status_code == 409 and "deadline" in r.json()["detail"]
    assert env.enqueued[-1] == (names.TRAIN_AGGREGATE, job_id, 0)  # the upload nudged the overdue round
    env.work()
    assert env.get(job_id)["history"][0]["participants"] == ["a", "b"]
    r = env.upload(job_id, 0, "c", late)
    assert r.status_code == 409 and "closed" in r.json()["detail"]
    assert env.updates(job_id, 0) == ["a", "b"]


def test_reading_a_job_past_its_deadline_hands_the_round_over_again(env):
    job_id = env.running()
    env.get(job_id)
    assert env.enqueued == [(names.TRAIN_INIT, job_id)]
    past_deadline(env.res, job_id, 0)
    env.get(job_id, "a")
    assert env.enqueued[-1] == (names.TRAIN_AGGREGATE, job_id, 0)


def test_the_final_adapter_is_the_last_rounds_result(env):
    job_id = env.running(rounds=1)
    send_round(env, job_id, 0)
    env.work()
    job = env.get(job_id)
    assert job["status"] == "done" and job["final_sha256"] == job["history"][0]["result_sha256"]
    r = env.client.get(f"/v1/train/{job_id}/adapter", headers=env.auth("b"))
    assert r.status_code == 200 and r.headers["X-Content-SHA256"] == job["final_sha256"]
    assert hashlib.sha256(r.content).hexdigest() == job["final_sha256"]
    r = env.upload(job_id, 0, "a", update_bytes(env.start_bundle(job_id, 0), 0, seed=5, num_samples=1))
    assert r.status_code == 409


# --- warmup -> scoring job ----------------------------------------------------------------------------------------


def test_a_finished_warmup_becomes_a_scoring_job(env):
    warm = {"mode": "warmup", "rounds": 3, "selection": None, "checkpoint_rounds": [0, 2]}
    job_id = env.running(**warm)
    projection = {"kind": "sjlt", "dim": 64, "seed": 0, "nnz": 4}
    r = env.client.post(f"/v1/train/{job_id}/scoring-job", json={"name": "s", "projection": projection}, headers=ADMIN)
    assert r.status_code == 409 and "finished warmup" in r.json()["detail"]
    results = {}
    for rnd in range(3):
        send_round(env, job_id, rnd)
        env.work()
        results[rnd] = env.get(job_id)["history"][rnd]["result_sha256"]
    job = env.get(job_id)
    assert job["status"] == "done" and [h["participants"] for h in job["history"]] == [["a", "b"]] * 3

    r = env.client.post(f"/v1/train/{job_id}/scoring-job", json={"name": "s", "projection": projection}, headers=ADMIN)
    assert r.status_code == 201, r.text
    scoring = r.json()
    assert scoring["status"] == "draft" and scoring["checkpoints_uploaded"] == [0, 1]
    assert (scoring["spec"]["score"], scoring["spec"]["signals"]) == ("calibrated", list(DEFAULT_SIGNALS))
    assert scoring["spec"]["signal_checkpoint"] == 1  # the last of the two checkpoints
    assert [m["name"] for m in scoring["silos"]] == ["a", "b"]
    spec = ProjectionSpec.from_dict(scoring["spec"]["projection"])
    with env.res.sessions() as session:
        layout = [(n, tuple(s)) for n, s in repo.get_train_job(session, job_id=job_id).layout]
    assert spec.param_hash == parameter_layout_hash(layout)
    cfg = LocalTrainConfig(steps=2, lr=0.01, schedule="linear")
    for t, rnd in enumerate((0, 2)):
        entry = scoring["spec"]["checkpoints"][t]
        assert entry["lr"] == pytest.approx(round_lr(cfg, rnd, 3)) == job["history"][rnd]["lr"]
        assert entry["step"] == 2 * (rnd + 1)
        r = env.client.get(f"/v1/jobs/{scoring['id']}/checkpoints/{t}", headers=ADMIN)
        assert r.status_code == 200
        got = checkpoint_from_bytes(r.content, spec)
        want = read_bundle(env.res.blobs.read_bytes(results[rnd]), None, None)
        assert not got.has_moments and got.entry["lr"] == entry["lr"] and got.entry["index"] == t
        for name in want.adapter:
            np.testing.assert_array_equal(got.adapter[name], want.adapter[name], err_msg=name)
    assert round_lr(cfg, 0, 3) != round_lr(cfg, 2, 3)


def test_only_a_finished_warmup_makes_a_scoring_job(env):
    job_id = env.running(rounds=1)
    send_round(env, job_id, 0)
    env.work()
    assert env.get(job_id)["status"] == "done"
    r = env.client.post(f"/v1/train/{job_id}/scoring-job", json={"name": "s"}, headers=ADMIN)
    assert r.status_code == 409 and "federated" in r.json()["detail"]
    warm = env.running(mode="warmup", rounds=1, selection=None)
    send_round(env, warm, 0)
    env.work()
    body = {"name": "s", "precondition": True, "silos": ["a", "c"], "threshold": {"kind": "top", "fraction": 0.5}}
    r = env.client.post(f"/v1/train/{warm}/scoring-job", json=body, headers=ADMIN)
    assert r.status_code == 422 and "'c'" in r.json()["detail"]
    # preconditioned silos against the coordinator's plain anchor samples: no calibrated score (the default), and
    # with the trace score no mean-anchor threshold
    r = env.client.post(f"/v1/train/{warm}/scoring-job", json={"name": "s", "precondition": True}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["detail"].startswith("score: 'calibrated' compares the trace scores")
    assert "use plain gradients (no preconditioning), or score 'trace'" in r.json()["detail"]
    body = {"name": "s", "precondition": True, "score": "trace"}
    r = env.client.post(f"/v1/train/{warm}/scoring-job", json=body, headers=ADMIN)
    assert r.status_code == 422 and r.json()["detail"].startswith("threshold: 'mean-anchor' compares Adam-precond")
    r = env.client.post(f"/v1/train/{warm}/scoring-job", json={"name": "s", "signals": ["x"]}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["detail"].startswith("signals: unknown signal(s) ['x']")
    r = env.client.post(f"/v1/train/{warm}/scoring-job", json={"name": "s", "projection": {"kind": "x"}}, headers=ADMIN)
    assert r.status_code == 422 and "projection" in r.json()["detail"]
    assert env.client.get("/v1/jobs", headers=ADMIN).json() == []


# --- a real coordinator restarted mid-round -----------------------------------------------------------------------


class Silos:
    """httpx clients of the admin and silos a, b against a coordinator at ``url``."""

    def __init__(self, url: str, tokens: dict[str, str]):
        self.tokens = tokens
        self.http = httpx.Client(base_url=url, timeout=30)

    def get(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/train/{job_id}", headers=ADMIN)
        assert r.status_code == 200, r.text
        return r.json()

    def send(self, job_id: str, round: int, silo: str, seed: int) -> httpx.Response:
        auth = {"Authorization": f"Bearer {self.tokens[silo]}"}
        start = read_bundle(
            self.http.get(f"/v1/train/{job_id}/rounds/{round}/adapter", headers=auth).content, None, None
        )
        data = update_bytes(start, round, seed=seed, num_samples=2)
        headers = {**auth, "X-Content-SHA256": hashlib.sha256(data).hexdigest()}
        return self.http.put(f"/v1/train/{job_id}/rounds/{round}/update", content=data, headers=headers)


def _wait(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _setup(url: str, **over: Any) -> tuple[Silos, str]:
    admin = httpx.Client(base_url=url, timeout=30)
    tokens = {s: admin.post("/v1/silos", json={"name": s}, headers=ADMIN).json()["token"] for s in ("a", "b")}
    job_id = admin.post("/v1/train", json=train_body(**over), headers=ADMIN).json()["id"]
    assert admin.post(f"/v1/train/{job_id}/start", headers=ADMIN).status_code == 202
    silos = Silos(url, tokens)
    _wait(lambda: silos.get(job_id)["status"] == "running", "round 0 to open")
    return silos, job_id


def test_a_restart_mid_round_keeps_the_round_and_its_updates(tmp_path):
    data_dir = tmp_path / "coord"
    with serve_coordinator(data_dir) as first:
        silos, job_id = _setup(first.url)
        assert silos.send(job_id, 0, "a", seed=1).status_code == 201
        assert first.errors == []
    with serve_coordinator(data_dir) as second:
        silos = Silos(second.url, silos.tokens)
        job = silos.get(job_id)
        assert (job["status"], job["history"][0]["status"], job["history"][0]["received"]) == ("running", "open", ["a"])
        assert silos.send(job_id, 0, "b", seed=2).status_code == 201
        job = _wait(lambda: (j := silos.get(job_id))["round"] == 1 and j, "round 1 to open")
        assert job["history"][0]["participants"] == ["a", "b"] and job["history"][1]["status"] == "open"
        assert second.errors == []


def test_a_deadline_that_passes_while_the_coordinator_is_down_closes_the_round_on_restart(tmp_path):
    data_dir = tmp_path / "coord"
    with serve_coordinator(data_dir) as first:
        silos, job_id = _setup(first.url, quorum=1)
        assert silos.send(job_id, 0, "a", seed=1).status_code == 201
    res = pipeline.Resources.from_settings(first.settings)
    past_deadline(res, job_id, 0)  # the deadline passes while nothing runs (its timer died with the coordinator)
    with res.sessions() as session:
        assert repo.get_round(session, job_id=job_id, round=0).status == "open"
    with serve_coordinator(data_dir) as second:

        def round_1_open() -> bool:  # read the database, not the API: a GET past the deadline would nudge too
            with res.sessions() as session:
                return repo.get_train_job(session, job_id=job_id).round == 1

        _wait(round_1_open, "the resumed deadline check")
        silos = Silos(second.url, silos.tokens)
        assert silos.get(job_id)["history"][0]["participants"] == ["a"]
        r = silos.send(job_id, 0, "b", seed=2)
        assert r.status_code == 409 and "closed" in r.json()["detail"]
        assert second.errors == []


def test_the_held_out_set_is_evaluated_after_the_last_round(env, tmp_path):
    from scoring.data import load_pubmedqa, write_samples
    from tests.scoring.test_data import PUBMEDQA

    job_id = env.create(rounds=1, evaluation={"tasks": ["loss"], "batch_size": 4})
    r = put(env.client, f"/v1/train/{job_id}/eval", b'{"no": "samples"}', "admin-secret-for-tests-0123456789abcdef")
    assert r.status_code == 422 and "eval" in r.json()["detail"]
    write_samples(tmp_path / "eval.jsonl", load_pubmedqa(PUBMEDQA, limit=3))
    data = (tmp_path / "eval.jsonl").read_bytes()
    assert put(env.client, f"/v1/train/{job_id}/eval", data, env.tokens["a"]).status_code == 403
    assert (
        put(env.client, f"/v1/train/{job_id}/eval", data, "admin-secret-for-tests-0123456789abcdef").status_code == 201
    )
    assert (
        put(env.client, f"/v1/train/{job_id}/eval", data, "admin-secret-for-tests-0123456789abcdef").status_code == 200
    )
    assert env.get(job_id)["eval_samples"] == 3
    assert env.client.post(f"/v1/train/{job_id}/start", headers=ADMIN).status_code == 202
    env.work()
    r = put(env.client, f"/v1/train/{job_id}/eval", data + b"\n", "admin-secret-for-tests-0123456789abcdef")
    assert r.status_code == 409 and "'draft'" in r.json()["detail"]
    send_round(env, job_id, 0)
    env.work()
    job = env.get(job_id)
    assert job["status"] == "done" and job["metrics"] == job["history"][0]["metrics"]
    assert job["metrics"]["round"] == 0 and job["metrics"]["num_samples"] == 3 and job["metrics"]["loss"] > 0


def test_a_byzantine_silo_cannot_take_over_the_model_and_is_flagged_to_the_admin_only(env):
    """Silo c sends every weight ×1e30, the largest count it may claim and a huge score mass (the probe that moved
    the global adapter's largest weight from ~1 to 9.55e29): the round closes with the model moved by at most the
    clip bound, c is flagged, and neither a nor b learns about it."""
    job_id = env.running(silos=["a", "b", "c"])
    start = env.start_bundle(job_id, 0)
    for i, silo in enumerate(("a", "b")):
        assert (
            env.upload(job_id, 0, silo, update_bytes(start, 0, seed=i, num_samples=20, scale=0.01)).status_code == 201
        )
    evil = CheckpointBundle(
        start.layout,
        {n: (a * 1e30).astype(np.float32) for n, a in start.adapter.items()},
        {},
        {},
        start.adapter_config,
        start.entry,
        {},
        {"round": 0, "num_samples": 2**31 - 1, "score_mass": 1e300, "train_loss": 0.0},
    )
    assert env.upload(job_id, 0, "c", bundle_to_bytes(evil)).status_code == 201
    env.work()
    job = env.get(job_id)
    row = job["history"][0]
    assert row["status"] == "closed"
    result = env.start_bundle(job_id, 1)
    moved = delta_norm(result.adapter, start.adapter)
    assert moved <= row["clip_bound"] * (1 + 1e-5)
    assert max(float(np.abs(a).max()) for a in result.adapter.values()) < 10
    assert {(f["silo"], f["kind"]) for f in row["flags"]} == {
        ("c", "count_capped"),
        ("c", "mass_clamped"),
        ("c", "clipped"),
    }
    for silo in ("a", "b"):
        seen = env.get(job_id, silo)["history"][0]
        assert seen["flags"] == [] and seen["clip_bound"] is None and seen["participants"] == [silo]
    assert {f["kind"] for f in env.get(job_id, "c")["history"][0]["flags"]} == {
        "count_capped",
        "mass_clamped",
        "clipped",
    }


def test_retry_re_sends_the_step_a_training_job_waits_for(env):
    draft = env.create()
    r = env.client.post(f"/v1/train/{draft}/retry", headers=ADMIN)
    assert r.status_code == 409 and "nothing to retry" in r.json()["detail"]
    job_id = env.running()
    before = len(env.enqueued)
    assert env.client.post(f"/v1/train/{job_id}/retry", headers=ADMIN).status_code == 202
    assert env.enqueued[before:] == [(names.TRAIN_AGGREGATE, job_id, 0)]  # round 0's deadline check, sent again
    assert env.client.post(f"/v1/train/{job_id}/retry", headers=env.auth("a")).status_code == 403


def test_not_a_member_and_does_not_exist_read_the_same(env):
    job_id = env.running()
    theirs = env.client.get(f"/v1/train/{job_id}", headers=env.auth("c"))
    missing = env.client.get(f"/v1/train/{'0' * 32}", headers=env.auth("c"))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["detail"].replace(job_id, "ID") == missing.json()["detail"].replace("0" * 32, "ID")
