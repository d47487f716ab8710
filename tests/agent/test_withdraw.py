"""Exact withdrawal (docs/withdrawal.md) against a real coordinator: a silo leaves a finished merge job, and the
re-merge equals a merge job that never had it; the refusals; a federated job's "retrain without"; the audit
record; who may withdraw whom; and the dependency report."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from agent.client import CoordinatorError
from agent.train import run_training
from agent.withdraw import withdraw_samples
from scoring.data import write_samples
from scoring.errors import ConfigError
from scoring.io import read_bundle
from scoring.withdrawal import EXACT_MERGE_KINDS, Upstream, dependency_report, withdrawal_kind
from storage.blobs import LocalBlobStore
from tests.agent.test_train import FAST, start, train_body, train_silos


def merge_body(name: str, kind: str, silos=("a", "b"), seed: int = 0) -> dict:
    """A tiny merge job; ``seed`` (the local shuffle) makes its adapters' bytes its own among the package's jobs."""
    extra = {"density": 0.5} if kind not in EXACT_MERGE_KINDS else {}
    local = {"steps": 2, "batch_size": 4, "lr": 1e-2, "seed": seed}
    return train_body(name, "merge", rounds=1, silos=list(silos), merge={"kind": kind, **extra}, local=local)


def final(world, job_id: str, dest: Path):
    sha = world.admin.download_final_adapter(job_id, dest)
    return sha, read_bundle(dest.read_bytes(), None, None, "final adapter")


@pytest.mark.parametrize("kind", EXACT_MERGE_KINDS)
def test_a_withdrawn_silo_leaves_a_merge_as_if_never_there(world, tmp_path, kind):
    seed = 1000 + EXACT_MERGE_KINDS.index(kind)  # no other job of the package holds these adapters' bytes
    both = start(world, merge_body(f"withdraw-{kind}", kind, seed=seed))
    trained = train_silos(world, both, tmp_path / "both")
    only_a = start(world, merge_body(f"never-b-{kind}", kind, silos=("a",), seed=seed))
    with world.client("a") as client:
        data = world.data_file("a", tmp_path / "only-a")
        run_training(client, only_a, data, work_dir=tmp_path / "only-a" / "work", options=FAST)
    b_update = tmp_path / "both" / "b" / "work" / f"train-{both}" / "round-0000" / "update.safetensors"
    b_key = hashlib.sha256(b_update.read_bytes()).hexdigest()
    blobs = LocalBlobStore(world.coordinator.settings.storage.blob_dir)
    old_sha, _ = final(world, both, tmp_path / "old.safetensors")
    assert blobs.exists(b_key) and trained["b"].num_samples > 0

    asked = world.admin.withdraw(both, "consent withdrawn by the data owner", silo="b")
    assert (asked["status"], asked["actor"], asked["silo"]) in {("pending", "admin", "b"), ("done", "admin", "b")}
    row = world.admin.wait_withdrawal(both, asked["id"], poll=0.1, timeout=120)
    assert row["status"] == "done", row
    report = row["report"]
    assert report["exact"] == "exact" and report["kind"] == "remerge" and report["upstream"] == []
    assert report["old_sha256"] == old_sha and 0 < report["seconds"] < 60

    new_sha, remerged = final(world, both, tmp_path / "new.safetensors")
    never_sha, never = final(world, only_a, tmp_path / "never.safetensors")
    assert new_sha == report["new_sha256"] != old_sha
    assert remerged.layout == never.layout
    for name in never.adapter:
        np.testing.assert_array_equal(remerged.adapter[name], never.adapter[name])
    assert new_sha == never_sha  # bit for bit: the same canonical bundle

    job = world.admin.train_job(both)
    assert [s["name"] for s in job["silos"]] == ["a"]
    assert job["history"][0]["participants"] == ["a"]
    # the silo's adapter and the old merge are gone (no other job refers to these bytes: its own seed)
    for key in (b_key, old_sha):
        assert not in_use(world, key) and not blobs.exists(key), key

    # the audit record: the admin sees it, the silo sees its own after leaving, the other silo none of it
    audit = world.admin.withdrawals(both)
    assert [(w["silo"], w["actor"], w["reason"], w["status"]) for w in audit] == [
        ("b", "admin", "consent withdrawn by the data owner", "done")
    ]
    with world.client("b") as b, world.client("a") as a:
        assert [w["id"] for w in b.withdrawals(both)] == [row["id"]]
        assert a.withdrawals(both) == []
        with pytest.raises(CoordinatorError) as err:
            b.train_job(both)
        assert err.value.status == 404
    with pytest.raises(CoordinatorError, match="withdrew already") as err:
        world.admin.withdraw(both, "again", silo="b")
    assert err.value.status == 409


def coordinator_session(world):
    """A session on the coordinator's database (closed, and its engine disposed, on exit)."""
    from contextlib import contextmanager

    from storage.db import make_engine, make_session_factory

    @contextmanager
    def session():
        engine = make_engine(world.coordinator.settings.storage.database_url)
        try:
            with make_session_factory(engine)() as s:
                yield s
        finally:
            engine.dispose()

    return session()


def in_use(world, key: str) -> bool:
    """Whether any row of the coordinator still refers to blob ``key``."""
    from storage import repository as repo

    with coordinator_session(world) as session:
        return repo.blob_in_use(session, key=key)


def update_keys(world, job_id: str) -> dict[str, str]:
    """Each silo's update blob in round 0, read from the coordinator's database."""
    from sqlalchemy import select

    from storage.models import Silo, TrainUpdate

    with coordinator_session(world) as session:
        stmt = select(Silo.name, TrainUpdate.blob_key).join(Silo).where(TrainUpdate.job_id == job_id)
        return dict(session.execute(stmt).all())


def test_withdrawn_samples_leave_a_merge_as_if_never_in_the_data(world, tmp_path):
    job_id = start(world, merge_body("withdraw-samples", "cat"))
    train_silos(world, job_id, tmp_path / "with")
    before = update_keys(world, job_id)
    gone = [s.id for s in world.samples["b"][:2]]
    reduced = tmp_path / "b-without.jsonl"
    write_samples(reduced, [s for s in world.samples["b"] if s.id not in gone])
    twin = start(world, merge_body("never-had-them", "cat"))
    files = {"a": world.data_file("a", tmp_path / "twin-a"), "b": reduced}

    def train(silo: str) -> None:
        with world.client(silo) as client:
            run_training(client, twin, files[silo], work_dir=tmp_path / "twin" / silo, options=FAST)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(train, files))

    data_b = world.data_file("b", tmp_path / "with" / "b")  # the file still holds them: the ids are left out
    with world.client("b") as b:
        row = withdraw_samples(b, job_id, data_b, work_dir=tmp_path / "with" / "b" / "work", sample_ids=gone,
                               reason="a patient withdrew consent")  # fmt: skip
        assert row["report"]["update"]["num_samples"] == len(world.samples["b"]) - 2
        row = b.wait_withdrawal(job_id, row["id"], poll=0.1, timeout=120)
    assert (row["status"], row["actor"], row["sample_ids"]) == ("done", "b", gone), row
    assert row["report"]["exact"] == "exact" and row["report"]["kind"] == "retrain-silo"

    after = update_keys(world, job_id)
    assert after["a"] == before["a"] and after["b"] != before["b"]  # only b's adapter changed
    assert after["b"] == update_keys(world, twin)["b"]  # b's retrained adapter is the twin's, byte for byte
    assert final(world, job_id, tmp_path / "new.safetensors")[0] == final(world, twin, tmp_path / "t.safetensors")[0]
    job = world.admin.train_job(job_id)
    assert [s["name"] for s in job["silos"]] == ["a", "b"] and job["history"][0]["participants"] == ["a", "b"]
    blobs = LocalBlobStore(world.coordinator.settings.storage.blob_dir)
    assert blobs.exists(before["b"]) == in_use(world, before["b"])  # kept only while another job holds the bytes


def test_non_exact_merge_kinds_and_samples_are_refused(world):
    ties = world.admin.create_train_job(merge_body("withdraw-ties", "ties"))["id"]
    with pytest.raises(CoordinatorError, match=r"merge\.kind: .*\['cat', 'linear'\]") as err:
        world.admin.withdraw(ties, "agreement ended", silo="b")
    assert err.value.status == 422
    cat = world.admin.create_train_job(merge_body("withdraw-draft", "cat"))["id"]
    with pytest.raises(CoordinatorError, match="once it is done") as err:
        world.admin.withdraw(cat, "too early", silo="b")
    assert err.value.status == 409
    fed = world.admin.create_train_job(train_body("withdraw-fed-samples"))["id"]
    with pytest.raises(CoordinatorError, match=r"sample_ids: a federated or warmup job") as err:
        world.admin.withdraw(fed, "one patient", silo="b", sample_ids=["x"])
    assert err.value.status == 422
    assert world.admin.withdrawals(ties) == world.admin.withdrawals(cat) == world.admin.withdrawals(fed) == []


def test_a_federated_job_offers_a_retrain_without_the_silo(world):
    job_id = world.admin.create_train_job(train_body("withdraw-fed", rounds=3))["id"]
    with world.client("a") as a, pytest.raises(CoordinatorError, match="may withdraw only itself") as err:
        a.withdraw(job_id, "not mine to give", silo="b")
    assert err.value.status == 403
    with world.client("b") as b:
        row = b.withdraw(job_id, "our agreement ends")
    assert (row["status"], row["actor"], row["report"]["exact"]) == ("done", "b", "full retrain")
    assert "trained from the start" in row["report"]["message"] and row["report"]["new_job"] in row["report"]["message"]
    old, new = world.admin.train_job(job_id), world.admin.train_job(row["report"]["new_job"])
    assert new["status"] == "draft" and [s["name"] for s in new["silos"]] == ["a"]
    assert {k: v for k, v in new["spec"].items() if k != "quorum"} == {
        k: v for k, v in old["spec"].items() if k != "quorum"
    }
    assert new["spec"]["quorum"] == 1 and new["name"] == "withdraw-fed without b"


def test_the_dependency_report():
    public = Upstream(scoring_job="s" * 32, threshold_kind="mean-anchor")
    assert dependency_report("b", "j", "remerge", public)["exact"] == "exact"
    warm = Upstream(scoring_job="s" * 32, threshold_kind="mean-anchor", warmup_job="w" * 32, warmup_silos=["a", "b"])
    report = dependency_report("b", "j", "remerge", warm)
    assert report["exact"] == "exact for the merge"
    assert report["upstream"] == [f"the scoring checkpoints were trained with this silo's data (warmup job {'w' * 32})"]
    assert any("--mode warmup --silos a " in c for c in report["commands"])
    assert "full re-run" in report["message"]
    assert dependency_report("c", "j", "remerge", warm)["exact"] == "exact"  # c took no part in the warmup
    top = dependency_report("b", "j", "remerge", Upstream(scoring_job="s" * 32, threshold_kind="top"))
    assert top["exact"] == "exact for the merge" and "cut-off" in top["upstream"][0]
    assert dependency_report("b", "j", "retrain", public)["exact"] == "full retrain"
    assert withdrawal_kind("federated", None, True) == "retrain"
    assert withdrawal_kind("merge", "linear", False) == "retrain-silo"
    # on start-up, a pending re-merge is sent again, but not a sample withdrawal still waiting for its silo
    from types import SimpleNamespace

    from workers.steps import withdrawal_waits_for

    def row(**kw):
        return SimpleNamespace(**({"job_id": "j", "id": 7, "status": "pending", "sample_ids": None, "report": {}} | kw))

    assert withdrawal_waits_for(row()) == ("clues.train_withdraw", ("j", 7), None)
    assert withdrawal_waits_for(row(sample_ids=["x"])) is None
    assert withdrawal_waits_for(row(sample_ids=["x"], report={"update": {}})) is not None
    assert withdrawal_waits_for(row(status="done")) is None
    with pytest.raises(ConfigError, match="sample_ids"):
        withdrawal_kind("federated", None, False)


def test_the_commands_and_the_dashboards(world, capsys, tmp_path):
    import json

    import httpx

    from clues.cli import main

    job_id = world.admin.create_train_job(train_body("withdraw-cli"))["id"]
    url, admin = world.coordinator.url, world.coordinator.admin_token
    assert main(["agent", "withdraw", "--coordinator", url, "--token", world.tokens["a"], "--job", job_id,
                 "--reason", "we leave"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    row = json.loads(out)
    assert (row["silo"], row["actor"], row["status"]) == ("a", "a", "done")
    assert "full retrain" in err and row["report"]["new_job"] in err
    new = row["report"]["new_job"]
    assert main(["admin", "withdraw", new, "--silo", "b", "--reason", "x", "--coordinator", url, "--token", admin]) == 2
    assert "only silo" in capsys.readouterr().err
    base = ["agent", "withdraw", "--coordinator", url, "--token", world.tokens["b"], "--job", job_id]
    assert main([*base, "--samples", "ids.txt", "--reason", "x"]) == 2
    assert "--data: required with --samples" in capsys.readouterr().err
    assert main(base) == 2
    assert "--reason: required" in capsys.readouterr().err
    assert main(["admin", "withdrawals", job_id, "--coordinator", url, "--token", admin]) == 0
    assert [w["id"] for w in json.loads(capsys.readouterr().out)] == [row["id"]]
    with httpx.Client(base_url=url, follow_redirects=True) as browser:
        assert browser.post("/ui/login", data={"token": admin}).status_code == 200
        page = browser.get(f"/ui/train/{job_id}").text
    line = page.split('<tr data-silo="a" data-status="done">', 1)[1].split("</tr>", 1)[0]
    assert "we leave" in line and "full retrain" in line and f"/ui/train/{new}" in line

    # the silo's own dashboard lists it, although the silo left the job
    from fastapi.testclient import TestClient

    from agent.dashboard import create_dashboard

    data = world.data_file("a", tmp_path)
    with TestClient(create_dashboard(url, world.tokens["a"], data, tmp_path / "dash")) as dash:
        assert dash.post("/ui/login", data={"token": world.tokens["a"], "next": "/ui/jobs"}).status_code in (200, 303)
        page = dash.get("/ui/jobs").text
    line = page.split(f'<tr data-job="{job_id}" data-status="done">', 1)[1].split("</tr>", 1)[0]
    assert "this silo" in line and "we leave" in line and "full retrain" in line


def test_the_report_names_a_federated_warmup_the_silo_trained_in(world, tmp_path):
    """The dependency report's upstream, read from the coordinator's own records: a scoring job made from a
    federated warmup with both silos (`upstream_of`) against one made from an uploaded (public) run."""
    from app.services.withdrawal import upstream_of
    from storage import repository as repo
    from tests.agent.conftest import make_job

    fraction = {"source": "fraction", "fraction": 0.5}
    warm_id = start(world, train_body("warm-for-withdrawal", "warmup", selection=fraction, checkpoint_rounds=[0, 1]))
    train_silos(world, warm_id, tmp_path)
    body = {"name": "from-warm", "projection": {"kind": "sjlt", "dim": 64, "seed": 0, "nnz": 4}, "score": "trace",
            "precondition": True, "threshold": {"kind": "top", "fraction": 0.5}}  # fmt: skip
    from_warmup = world.admin.scoring_job_from_warmup(warm_id, body)["id"]
    public = make_job(world, "public-warmup", open_it=False)
    with coordinator_session(world) as session:
        reports = {}
        for scoring in (from_warmup, public):
            job = repo.create_train_job(
                session, name="m", mode="merge", model="tiny:0", settings={}, rounds=1, quorum=2,
                round_timeout_s=60.0, scoring_job_id=scoring, silo_names=["a", "b"],
            )  # fmt: skip
            reports[scoring] = dependency_report("b", job.id, "remerge", upstream_of(session, job))
        session.rollback()
    warm = reports[from_warmup]
    assert warm["exact"] == "exact for the merge"
    assert any(f"warmup job {warm_id}" in note for note in warm["upstream"])
    assert any("cut-off" in note for note in warm["upstream"])  # its top-fraction threshold pools the silos
    assert any("--mode warmup --silos a " in command for command in warm["commands"])
    assert reports[public]["exact"] == "exact" and reports[public]["upstream"] == []


def test_a_sample_withdrawal_waits_for_its_silo_and_a_whole_silo_supersedes_it(world, tmp_path):
    job_id = start(world, merge_body("withdraw-waiting", "cat", seed=3000))
    train_silos(world, job_id, tmp_path)
    gone = [world.samples["b"][0].id]
    asked = world.admin.withdraw(job_id, "the admin records it", silo="b", sample_ids=gone)
    assert asked["status"] == "pending" and "clues agent withdraw" in asked["report"]["awaiting"]
    assert world.admin.withdraw(job_id, "asked twice", silo="b", sample_ids=gone)["id"] == asked["id"]
    with pytest.raises(CoordinatorError, match=f"withdrawal {asked['id']} \\(b\\) is still being") as err:
        world.admin.withdraw(job_id, "another silo meanwhile", silo="a")
    assert err.value.status == 409
    with world.client("b") as b:  # the silo's dashboard shows what it has to run; here it leaves instead
        assert [w["id"] for w in b.withdrawals() if w["status"] == "pending"] == [asked["id"]]
        whole = b.withdraw(job_id, "we leave altogether")
        done = b.wait_withdrawal(job_id, whole["id"], poll=0.1, timeout=120)
    assert done["status"] == "done" and done["sample_ids"] is None
    first = next(w for w in world.admin.withdrawals(job_id) if w["id"] == asked["id"])
    assert (first["status"], first["error"]) == ("failed", "superseded by the withdrawal of the whole silo")
