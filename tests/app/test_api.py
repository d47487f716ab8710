"""The coordinator API in-process (Starlette's TestClient): auth, job life cycle, and every bad input a 4xx with
nothing stored. Shards here are synthetic projections made under the job's spec; the real model round trip is in
tests/agent and tests/integration."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import AppSettings
from app.main import create_app
from scoring.config import DEFAULT_FUSION, DEFAULT_SIGNALS, SIGNALS, ProjectionSpec
from scoring.io import projection_to_bytes
from scoring.types import ProjectedGrads
from storage import repository as repo
from wire import hash_token

ADMIN = {"Authorization": "Bearer admin-secret-for-tests-0123456789abcdef"}
SPEC = ProjectionSpec(kind="sjlt", dim=16, seed=3, param_hash="deadbeef", param_count=1000, nnz=4)
LRS = (1e-3, 5e-4)


def job_body(**over) -> dict:
    body = {
        "name": "t",
        "silos": ["a", "b"],
        "model": "tiny:0",
        "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
        "max_len": 64,
        "projection": SPEC.to_dict(),
        "checkpoints": [
            {"index": i, "step": 2 * (i + 1), "lr": lr, "lr_last": lr, "adam": {}} for i, lr in enumerate(LRS)
        ],
        "precondition": True,
        "threshold": {"kind": "mean-anchor"},
    }
    body.update(over)
    return body


def shard(
    ids,
    checkpoint=0,
    *,
    spec=SPEC,
    lr=None,
    role="candidate",
    precond=True,
    matrix=None,
    seed=0,
    losses=True,
    signals=SIGNALS,
) -> bytes:
    """A shard as an agent sends it: with each sample's loss and the signals (only the signal checkpoint's must)."""
    rng = np.random.default_rng(seed)
    m = matrix if matrix is not None else rng.standard_normal((len(ids), spec.dim)).astype(np.float16)
    values = {"loss_uncond": rng.uniform(1.0, 3.0, len(ids)), "n_tokens": rng.integers(1, 50, len(ids))}
    proj = ProjectedGrads(
        ids=tuple(ids),
        matrix=m,
        spec=spec,
        checkpoint=checkpoint,
        lr=LRS[checkpoint] if lr is None else lr,
        role=role,
        preconditioned=precond,
    )
    loss = rng.uniform(0.5, 2.0, len(ids)) if losses else None
    return projection_to_bytes(proj, loss, {name: values[name] for name in signals})


def put(client, url, data: bytes, token: str, sha: str | None = None):
    headers = {"Authorization": f"Bearer {token}", "X-Content-SHA256": sha or hashlib.sha256(data).hexdigest()}
    return client.put(url, content=data, headers=headers)


def store_checkpoints_and_anchors(state, job_id: str) -> None:
    """Set a job's checkpoint blobs and anchor set straight in storage (bundles are tested elsewhere)."""
    with state.sessions.begin() as session:
        for i in range(len(LRS)):
            ref = state.blobs.put_bytes(f"ckpt{i}".encode())
            repo.set_checkpoint_blob(session, job_id=job_id, index=i, blob_key=ref.key, size_bytes=ref.size)
        ref = state.blobs.put_bytes(b"anchors")
        repo.set_anchor_set(session, job_id=job_id, blob_key=ref.key, size_bytes=ref.size, sample_ids=["x", "y"])


class Env:
    def __init__(self, tmp_path: Path, enqueued: list):
        self.settings = AppSettings(
            data_dir=tmp_path / "coord",
            admin_token="admin-secret-for-tests-0123456789abcdef",
            max_upload_bytes=64 * 1024,
        )
        self.app = create_app(self.settings, send=lambda task, args, countdown: enqueued.append((task, *args)))
        self.enqueued = enqueued
        self.client = TestClient(self.app)
        self.client.__enter__()  # runs the lifespan (migrations)
        self.tokens = {}
        for name in ("a", "b", "c"):
            r = self.client.post("/v1/silos", json={"name": name}, headers=ADMIN)
            assert r.status_code == 201, r.text
            self.tokens[name] = r.json()["token"]

    def open_job(self, **over) -> str:
        """A job in ``open`` with checkpoints and anchors set directly in storage (bundles are tested elsewhere)."""
        job = self.client.post("/v1/jobs", json=job_body(**over), headers=ADMIN).json()
        store_checkpoints_and_anchors(self.app.state.clues, job["id"])
        r = self.client.post(f"/v1/jobs/{job['id']}/open", headers=ADMIN)
        assert r.status_code == 200, r.text
        return job["id"]

    def blob_count(self) -> int:
        root = self.settings.storage.blob_dir
        return sum(1 for p in root.rglob("*") if p.is_file() and "tmp" not in p.relative_to(root).parts)

    def shard_count(self, job_id: str) -> int:
        with self.app.state.clues.sessions() as session:
            return len(repo.list_shards(session, job_id=job_id))


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path, [])
    yield e
    e.client.__exit__(None, None, None)


def test_auth(env):
    assert env.client.get("/v1/silos").status_code == 401
    assert env.client.get("/v1/silos", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = env.client.get("/v1/silos", headers={"Authorization": f"Bearer {env.tokens['a']}"})
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    listed = env.client.get("/v1/silos", headers=ADMIN).json()
    assert [s["name"] for s in listed] == ["a", "b", "c"] and "token" not in listed[0]


def test_silo_token_is_stored_hashed_and_names_are_unique(env):
    with env.app.state.clues.sessions() as session:
        stored = [s.token_hash for s in repo.list_silos(session)]
    assert env.tokens["a"] not in stored and hash_token(env.tokens["a"]) in stored
    r = env.client.post("/v1/silos", json={"name": "a"}, headers=ADMIN)
    assert r.status_code == 409 and "a" in r.json()["detail"]
    r = env.client.post("/v1/silos", json={"name": "bad name!"}, headers=ADMIN)
    assert r.status_code == 422


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"silos": ["a", "zz"]}, "silos: unknown silo(s): 'zz'"),
        ({"silos": ["a", "a"]}, "unique"),
        ({"checkpoints": []}, "checkpoints"),
        ({"projection": {**SPEC.to_dict(), "kind": "fft"}}, "kind"),
        ({"projection": {**SPEC.to_dict(), "nnz": 5}}, "nnz"),
        ({"threshold": {"kind": "top", "fraction": 2}}, "fraction"),
        ({"threshold": {"kind": "median"}}, "threshold"),
        ({"similarity": "euclid"}, "similarity"),
        ({"lora": {"rank": 0}}, "rank"),
        ({"lora": {"rank": 4097}}, "rank"),
        ({"lora": {"rank": 4, "bias": "all"}}, "bias"),
        ({"lora": {"target_modules": [""]}}, "target_modules"),
        ({"projection": {**SPEC.to_dict(), "dim": 0}}, "dim"),
        ({"projection": {**SPEC.to_dict(), "param_hash": "x" * 65}}, "param_hash"),
        ({"projection": {**SPEC.to_dict(), "fft": True}}, "fft"),
        ({"checkpoints": [{"index": 1, "step": 1, "lr": 1e-3, "lr_last": 1e-3, "adam": {}}]}, "indices"),
        ({"checkpoints": [{"index": 0, "step": 1, "lr": 1e-3, "lr_last": 1e-3, "adam": {"beta9": 1}}]}, "beta9"),
    ],
)
def test_bad_job_specs_are_4xx_and_store_nothing(env, over, needle):
    r = env.client.post("/v1/jobs", json=job_body(**over), headers=ADMIN)
    assert 400 <= r.status_code < 500, r.text
    assert needle in json.dumps(r.json()["detail"])
    assert env.client.get("/v1/jobs", headers=ADMIN).json() == []


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"score": "perplexity"}, "score: must be one of"),
        ({"signals": ["loss_uncond", "ifd"]}, "signals: unknown signal(s) ['ifd']"),
        ({"signals": ["n_tokens", "n_tokens"]}, "signals: repeated"),
        ({"fusion": "mean"}, "fusion: must be one of"),
        ({"signal_checkpoint": 2}, "signal_checkpoint: the job has checkpoints 0..1, not 2"),
        ({"signal_checkpoint": -1}, "signal_checkpoint"),
        ({"signals": "loss_uncond"}, "signals"),
    ],
)
def test_bad_score_settings_are_422_naming_the_field(env, over, needle):
    r = env.client.post("/v1/jobs", json=job_body(**over), headers=ADMIN)
    assert r.status_code == 422, r.text
    assert needle in json.dumps(r.json()["detail"])
    assert env.client.get("/v1/jobs", headers=ADMIN).json() == []


def test_score_settings_default_to_calibrated_and_a_trace_job_asks_for_no_signals(env):
    spec = env.client.post("/v1/jobs", json=job_body(), headers=ADMIN).json()["spec"]
    assert spec["score"] == "calibrated" and spec["signals"] == list(DEFAULT_SIGNALS)
    assert spec["fusion"] == DEFAULT_FUSION and spec["signal_checkpoint"] == len(LRS) - 1
    spec = env.client.post("/v1/jobs", json=job_body(score="trace"), headers=ADMIN).json()["spec"]
    assert (spec["score"], spec["signals"], spec["signal_checkpoint"]) == ("trace", [], len(LRS) - 1)
    over = {"signals": ["n_tokens"], "fusion": "max", "signal_checkpoint": 0}
    spec = env.client.post("/v1/jobs", json=job_body(**over), headers=ADMIN).json()["spec"]
    assert {k: spec[k] for k in over} == over and spec["score"] == "calibrated"


def _hand_written_shard(ids: list[str], checkpoint: int, **tensors: np.ndarray) -> bytes:
    """A shard with the given extra tensors, written by hand (projection_to_bytes refuses bad signals)."""
    from safetensors.numpy import save

    from scoring.io._safetensors import _read_metadata

    data = shard(ids, checkpoint, losses=False, signals=())
    raw_ids = np.frombuffer(json.dumps(ids).encode(), dtype=np.uint8).copy()
    matrix = np.zeros((len(ids), SPEC.dim), np.float16)
    return save({"matrix": matrix, "ids": raw_ids, **tensors}, metadata=_read_metadata(data))


def _bad_signal_shards():
    ok = {
        "losses": np.ones(2, np.float32),
        "loss_uncond": np.full(2, 2.0, np.float32),
        "n_tokens": np.ones(2, np.float32),
    }
    return [
        ("no loss_uncond", shard(["s1", "s2"], 1, signals=("n_tokens",)), "'loss_uncond' missing"),
        ("no signals", shard(["s1", "s2"], 1, signals=()), "'loss_uncond', 'n_tokens' missing"),
        ("no losses", shard(["s1", "s2"], 1, losses=False), "'losses' missing"),
        (
            "nan",
            _hand_written_shard(["s1", "s2"], 1, **{**ok, "loss_uncond": np.array([1, np.nan], np.float32)}),
            "'loss_uncond' holds NaN or Inf",
        ),
        (
            "inf",
            _hand_written_shard(["s1", "s2"], 1, **{**ok, "n_tokens": np.array([np.inf, 3], np.float32)}),
            "'n_tokens' holds NaN or Inf",
        ),
        (
            "shape",
            _hand_written_shard(["s1", "s2"], 1, **{**ok, "n_tokens": np.ones(3, np.float32)}),
            "'n_tokens' must be 2 float32 values",
        ),
        (
            "tokens",
            _hand_written_shard(["s1", "s2"], 1, **{**ok, "n_tokens": np.array([0, 3], np.float32)}),
            "'n_tokens' must be positive",
        ),
        (
            "nan loss",
            _hand_written_shard(["s1", "s2"], 1, **{**ok, "losses": np.array([1, np.nan], np.float32)}),
            "'losses'",
        ),
    ]


@pytest.mark.parametrize(("name", "data", "needle"), _bad_signal_shards(), ids=[b[0] for b in _bad_signal_shards()])
def test_a_calibrated_job_refuses_shards_without_sound_signals_at_its_signal_checkpoint(env, name, data, needle):
    job_id = env.open_job()
    before = env.blob_count()
    r = put(env.client, f"/v1/jobs/{job_id}/shards/1/0", data, env.tokens["a"])
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"] and "shard ckpt 1 part 0" in r.json()["detail"]
    assert env.shard_count(job_id) == 0 and env.blob_count() == before
    assert not any((env.settings.storage.blob_dir / "tmp").glob("*"))


def test_signals_are_needed_at_the_signal_checkpoint_only_and_not_by_a_pure_trace_job(env):
    job_id = env.open_job()
    bare = shard(["s1", "s2"], 0, losses=False, signals=())
    assert put(env.client, f"/v1/jobs/{job_id}/shards/0/0", bare, env.tokens["a"]).status_code == 201
    assert put(env.client, f"/v1/jobs/{job_id}/shards/1/0", shard(["s1", "s2"], 1), env.tokens["a"]).status_code == 201
    job_id = env.open_job(signal_checkpoint=0, signals=["n_tokens"])
    r = put(env.client, f"/v1/jobs/{job_id}/shards/0/0", shard(["s1"], 0, signals=()), env.tokens["a"])
    assert r.status_code == 422 and "'n_tokens' missing" in r.json()["detail"]
    only = shard(["s1"], 0, signals=("n_tokens",))
    assert put(env.client, f"/v1/jobs/{job_id}/shards/0/0", only, env.tokens["a"]).status_code == 201
    old = env.open_job(score="trace", signals=[])  # the pure CLUES protocol: files of old agents are taken
    for t in range(2):
        data = shard(["s1", "s2"], t, losses=False, signals=())
        assert put(env.client, f"/v1/jobs/{old}/shards/{t}/0", data, env.tokens["a"]).status_code == 201


def test_silo_sees_only_its_jobs_and_own_member_entry(env):
    job_id = env.open_job()
    c_headers = {"Authorization": f"Bearer {env.tokens['c']}"}
    assert env.client.get(f"/v1/jobs/{job_id}", headers=c_headers).status_code == 404
    assert env.client.get("/v1/jobs", headers=c_headers).json() == []
    r = env.client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {env.tokens['a']}"})
    assert r.status_code == 200 and [m["name"] for m in r.json()["silos"]] == ["a"]
    assert r.json()["anchors"] is None
    r = put(env.client, f"/v1/jobs/{job_id}/shards/0/0", shard(["s1"]), env.tokens["c"])
    assert r.status_code == 404


def test_not_a_member_and_does_not_exist_read_the_same(env):
    job_id = env.open_job()
    c_headers = {"Authorization": f"Bearer {env.tokens['c']}"}
    theirs = env.client.get(f"/v1/jobs/{job_id}", headers=c_headers)
    missing = env.client.get(f"/v1/jobs/{'0' * 32}", headers=c_headers)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["detail"].replace(job_id, "ID") == missing.json()["detail"].replace("0" * 32, "ID")
    for path in ("/scores", "/summary"):
        theirs = env.client.get(f"/v1/jobs/{job_id}{path}", headers=c_headers)
        missing = env.client.get(f"/v1/jobs/{'0' * 32}{path}", headers=c_headers)
        assert theirs.json()["detail"].replace(job_id, "ID") == missing.json()["detail"].replace("0" * 32, "ID")


def test_a_silo_sees_no_message_or_error_computed_from_other_silos(env):
    job_id = env.open_job()
    a = {"Authorization": f"Bearer {env.tokens['a']}"}
    with env.app.state.clues.sessions.begin() as session:  # what a worker writes while scoring, then on failure
        repo.update_job(session, job_id=job_id, status="scoring", message="scored 3/17 shard parts")
    assert env.client.get(f"/v1/jobs/{job_id}", headers=a).json()["message"] == "scoring"
    assert env.client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()["message"] == "scored 3/17 shard parts"
    detail = env.client.get(f"/v1/jobs/{job_id}/scores", headers=a).json()["detail"]
    assert "shard parts" not in detail and "scoring" in detail
    with env.app.state.clues.sessions.begin() as session:
        repo.update_job(session, job_id=job_id, status="failed", error="silo 'b' part 0: rows [3] hold NaN")
    job = env.client.get(f"/v1/jobs/{job_id}", headers=a).json()
    assert job["error"] is None and "'b'" not in job["message"]
    assert env.client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()["error"].startswith("silo 'b'")


def test_open_needs_checkpoints_and_anchors(env):
    job = env.client.post("/v1/jobs", json=job_body(), headers=ADMIN).json()
    r = env.client.post(f"/v1/jobs/{job['id']}/open", headers=ADMIN)
    assert r.status_code == 409 and "checkpoints [0, 1]" in r.json()["detail"]
    assert env.enqueued == []
    # a silo cannot upload to a draft job, nor download its checkpoints
    r = put(env.client, f"/v1/jobs/{job['id']}/shards/0/0", shard(["s1"]), env.tokens["a"])
    assert r.status_code == 409 and "draft" in r.json()["detail"]


def test_round_trip_of_uploads_complete_and_auto_score(env):
    job_id = env.open_job()
    assert env.enqueued == [("clues.project_anchors", job_id)]
    for silo, ids in (("a", ["a1", "a2", "a3"]), ("b", ["b1", "b2"])):
        for t in range(2):
            for part, chunk in enumerate((ids[:2], ids[2:])):
                if chunk:
                    r = put(env.client, f"/v1/jobs/{job_id}/shards/{t}/{part}", shard(chunk, t), env.tokens[silo])
                    assert r.status_code == 201, r.text
        held = env.client.get(f"/v1/jobs/{job_id}/shards", headers={"Authorization": f"Bearer {env.tokens[silo]}"})
        assert len(held.json()) == (4 if silo == "a" else 2)
        r = env.client.post(f"/v1/jobs/{job_id}/complete", headers={"Authorization": f"Bearer {env.tokens[silo]}"})
        assert r.status_code == 200, r.text
    job = env.client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()
    assert job["status"] == "scoring" and {m["num_samples"] for m in job["silos"]} == {3, 2}
    assert env.enqueued[-1] == ("clues.score_job", job_id)
    r = env.client.get(f"/v1/jobs/{job_id}/scores", headers={"Authorization": f"Bearer {env.tokens['a']}"})
    assert r.status_code == 409 and "scoring" in r.json()["detail"]


def test_idempotent_reupload_and_conflict(env):
    job_id = env.open_job()
    data = shard(["s1", "s2"])
    assert put(env.client, f"/v1/jobs/{job_id}/shards/0/0", data, env.tokens["a"]).status_code == 201
    again = put(env.client, f"/v1/jobs/{job_id}/shards/0/0", data, env.tokens["a"])
    assert again.status_code == 200 and again.json()["created"] is False
    other = put(env.client, f"/v1/jobs/{job_id}/shards/0/0", shard(["s1", "s2"], seed=1), env.tokens["a"])
    assert other.status_code == 409 and "already held" in other.json()["detail"]
    assert env.shard_count(job_id) == 1


def _bad_shards():
    wrong_spec = ProjectionSpec(kind="sjlt", dim=16, seed=4, param_hash="deadbeef", param_count=1000, nnz=4)
    wrong_dim = ProjectionSpec(kind="sjlt", dim=8, seed=3, param_hash="deadbeef", param_count=1000, nnz=4)
    f32 = _retype(shard(["s1", "s2"]))
    return [
        ("spec", shard(["s1", "s2"], spec=wrong_spec), "spec"),
        ("dim", shard(["s1", "s2"], spec=wrong_dim), "spec"),
        ("dtype", f32, "float16"),
        ("nan", _raw_nan_shard(), "NaN"),
        ("lr", shard(["s1"], lr=0.5), "lr"),
        ("role", shard(["s1"], role="anchor"), "role"),
        ("precond", shard(["s1"], precond=False), "precondition"),
        ("checkpoint", shard(["s1"], checkpoint=1), "checkpoint 1"),
        ("garbage", b"not a safetensors file at all", "safetensors"),
        ("nul id", _raw_shard(["s1", "a\x00b"], np.zeros((2, 16), np.float16)), "U+0000"),
        ("surrogate id", _raw_shard(["s1", "\ud800"], np.zeros((2, 16), np.float16)), "lone surrogate"),
        ("long id", _raw_shard(["s1", "x" * 600], np.zeros((2, 16), np.float16)), "at most 500"),
    ]


def _raw_shard(ids: list[str], matrix: np.ndarray) -> bytes:
    """A shard written by hand, as a hostile client would (projection_to_bytes refuses NaN and duplicate ids)."""
    from safetensors.numpy import save

    from scoring.io._safetensors import _read_metadata

    raw_ids = np.frombuffer(json.dumps(ids).encode(), dtype=np.uint8).copy()
    return save({"matrix": matrix, "ids": raw_ids}, metadata=_read_metadata(shard(["s1"])))


def _raw_nan_shard() -> bytes:
    matrix = np.zeros((2, 16), dtype=np.float16)
    matrix[1, 3] = np.nan
    return _raw_shard(["s1", "s2"], matrix)


def _retype(data: bytes) -> bytes:
    from safetensors.numpy import load, save

    from scoring.io._safetensors import _read_metadata

    tensors = load(data)
    tensors["matrix"] = tensors["matrix"].astype(np.float32)
    return save(tensors, metadata=_read_metadata(data))


@pytest.mark.parametrize(("name", "data", "needle"), _bad_shards(), ids=[b[0] for b in _bad_shards()])
def test_bad_shards_are_422_and_store_nothing(env, name, data, needle):
    job_id = env.open_job()
    before = env.blob_count()
    r = put(env.client, f"/v1/jobs/{job_id}/shards/0/0", data, env.tokens["a"])
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]
    assert env.shard_count(job_id) == 0 and env.blob_count() == before
    assert not any((env.settings.storage.blob_dir / "tmp").glob("*"))


def test_ids_must_match_across_checkpoints_and_not_repeat_across_parts(env):
    job_id = env.open_job()
    tok = env.tokens["a"]
    assert put(env.client, f"/v1/jobs/{job_id}/shards/0/0", shard(["s1", "s2"]), tok).status_code == 201
    r = put(env.client, f"/v1/jobs/{job_id}/shards/1/0", shard(["s1", "zz"], 1), tok)
    assert r.status_code == 422 and "unknown ids ['zz']" in r.json()["detail"]
    before = env.blob_count()
    r = put(env.client, f"/v1/jobs/{job_id}/shards/0/1", shard(["s2", "s3"]), tok)
    assert r.status_code == 409 and "already in other parts" in r.json()["detail"] and "s2" in r.json()["detail"]
    assert env.blob_count() == before  # refused before the blob was committed
    r = put(env.client, f"/v1/jobs/{job_id}/shards/0/1", _raw_shard(["s3", "s3"], np.ones((2, 16), np.float16)), tok)
    assert r.status_code == 422 and "unique" in r.json()["detail"]
    # incomplete: part 0 exists at checkpoint 0 only
    r = env.client.post(f"/v1/jobs/{job_id}/complete", headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 409 and "missing shards" in r.json()["detail"]
    assert env.shard_count(job_id) == 1


def test_checksum_size_and_header_problems(env):
    job_id = env.open_job()
    data = shard(["s1"])
    url = f"/v1/jobs/{job_id}/shards/0/0"
    r = put(env.client, url, data, env.tokens["a"], sha="0" * 64)
    assert r.status_code == 400 and "does not match" in r.json()["detail"]
    r = env.client.put(url, content=data, headers={"Authorization": f"Bearer {env.tokens['a']}"})
    assert r.status_code == 400 and "X-Content-SHA256" in r.json()["detail"]
    big = shard([f"s{i}" for i in range(3000)])  # > 64 KiB cap of this fixture
    r = put(env.client, url, big, env.tokens["a"])
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = put(env.client, url, b"", env.tokens["a"], sha=hashlib.sha256(b"").hexdigest())
    assert r.status_code == 400
    assert env.shard_count(job_id) == 0
    assert not any((env.settings.storage.blob_dir / "tmp").glob("*"))


def test_oversize_body_without_content_length_is_refused_while_streaming(env):
    job_id = env.open_job()
    big = shard([f"s{i}" for i in range(3000)])

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    headers = {"Authorization": f"Bearer {env.tokens['a']}", "X-Content-SHA256": hashlib.sha256(big).hexdigest()}
    r = env.client.put(f"/v1/jobs/{job_id}/shards/0/0", content=chunks(), headers=headers)
    assert r.status_code == 413
    assert env.shard_count(job_id) == 0
    assert not any((env.settings.storage.blob_dir / "tmp").glob("*"))


def test_uploads_after_complete_and_score_preconditions(env):
    job_id = env.open_job()
    tok = {"Authorization": f"Bearer {env.tokens['a']}"}
    for t in range(2):
        assert put(env.client, f"/v1/jobs/{job_id}/shards/{t}/0", shard(["s1"], t), env.tokens["a"]).status_code == 201
    assert env.client.post(f"/v1/jobs/{job_id}/complete", headers=tok).status_code == 200
    assert env.client.post(f"/v1/jobs/{job_id}/complete", headers=tok).status_code == 200  # idempotent
    r = put(env.client, f"/v1/jobs/{job_id}/shards/0/1", shard(["s2"]), env.tokens["a"])
    assert r.status_code == 409 and "completed" in r.json()["detail"]
    r = env.client.post(f"/v1/jobs/{job_id}/score", headers=ADMIN)
    assert r.status_code == 409 and "['b']" in r.json()["detail"]
    r = env.client.post(f"/v1/jobs/{job_id}/score", headers=tok)
    assert r.status_code == 403


def test_bad_anchor_set_is_422(env):
    job = env.client.post("/v1/jobs", json=job_body(), headers=ADMIN).json()
    url = f"/v1/jobs/{job['id']}/anchors"
    r = put(env.client, url, b"[" * 5_000 + b"]" * 5_000, "admin-secret-for-tests-0123456789abcdef")
    assert r.status_code == 422 and "nested too deeply" in r.json()["detail"]
    nul = b'{"id": "a\\u0000", "instruction": "q", "output": "a"}\n'
    r = put(env.client, url, nul, "admin-secret-for-tests-0123456789abcdef")
    assert r.status_code == 422 and "U+0000" in r.json()["detail"]
    r = put(env.client, url, b'{"instruction": "q", "output": ""}\n', "admin-secret-for-tests-0123456789abcdef")
    assert r.status_code == 422 and "anchors:1" in r.json()["detail"] and "output" in r.json()["detail"]
    r = put(env.client, url, b'{"instruction": "q", "output": "a"}\n', "admin-secret-for-tests-0123456789abcdef")
    assert r.status_code == 422 and "two" in r.json()["detail"]
    two = b'{"instruction": "q", "output": "a"}\n{"instruction": "q2", "output": "b"}\n'
    r = put(
        env.client, url, two, "admin-secret-for-tests-0123456789abcdef"
    )  # a calibrated job (the default) needs three
    assert r.status_code == 422 and "a calibrated job needs at least three" in r.json()["detail"]
    ok = two + b'{"instruction": "q3", "output": "c"}\n'
    assert put(env.client, url, ok, "admin-secret-for-tests-0123456789abcdef").status_code == 201
    assert put(env.client, url, ok, "admin-secret-for-tests-0123456789abcdef").status_code == 200
    assert put(env.client, url, ok + b"\n", "admin-secret-for-tests-0123456789abcdef").status_code == 409
    trace = env.client.post("/v1/jobs", json=job_body(score="trace"), headers=ADMIN).json()
    assert (
        put(env.client, f"/v1/jobs/{trace['id']}/anchors", two, "admin-secret-for-tests-0123456789abcdef").status_code
        == 201
    )


def test_healthz_and_metrics(env):
    r = env.client.get("/healthz")
    assert r.status_code == 200 and r.json()["database"] == "ok"
    env.client.get("/v1/silos", headers=ADMIN)
    assert env.client.get("/metrics").status_code == 401  # not public
    silo = {"Authorization": f"Bearer {env.tokens['a']}"}
    assert env.client.get("/metrics", headers=silo).status_code == 403
    text = env.client.get("/metrics", headers=ADMIN).text
    assert 'clues_http_requests_total{method="GET",route="/v1/silos",status="200"}' in text


def test_an_unreachable_task_queue_is_503_and_the_state_is_put_back(tmp_path):
    def down(task, args, countdown):
        raise ConnectionError("broker down")

    e = Env(tmp_path, [])
    e.app.state.clues.dispatcher.send = down
    job = e.client.post("/v1/jobs", json=job_body(), headers=ADMIN).json()
    store_checkpoints_and_anchors(e.app.state.clues, job["id"])
    r = e.client.post(f"/v1/jobs/{job['id']}/open", headers=ADMIN)
    assert r.status_code == 503 and "broker down" in r.json()["detail"]
    assert e.client.get(f"/v1/jobs/{job['id']}", headers=ADMIN).json()["status"] == "draft"
    e.client.__exit__(None, None, None)
