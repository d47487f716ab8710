"""The silo agent against a real coordinator: the masks equal the in-process computation, no text leaves the silo,
an interrupted upload resumes without recomputing, and a finished agent run again uploads nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass

import numpy as np
import pytest

from agent.client import AdminClient, CoordinatorError
from agent.loop import AgentError, AgentOptions, AgentResult, output_paths, run_agent
from scoring.data import read_samples, write_samples
from scoring.errors import DataError
from tests.agent.conftest import Recorder, World, make_job
from tests.conftest import expected_scores


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FAST = AgentOptions(rows_per_shard=4, poll_interval=0.05, timeout=60)  # 9 samples: parts of 4, 4, 1
SHARDS = 2 * 3  # checkpoints x parts


@dataclass
class Scored:
    job_id: str
    results: dict[str, list[AgentResult]]
    recorders: list[Recorder]
    data: dict
    progress: list[tuple[str, int, int]]


def agent(
    world: World, silo: str, job_id: str, data, work_dir, *, recorder=None, progress=None, **options
) -> AgentResult:
    opts = AgentOptions(**{**FAST.__dict__, **options})
    with world.client(silo, recorder, retries=0) as client:
        return run_agent(client, job_id, data, work_dir=work_dir, options=opts, progress=progress)


@pytest.fixture(scope="module")
def scored(world, tmp_path_factory) -> Scored:
    """Silo a uploads without waiting, silo b uploads (its completion starts scoring) and waits, then silo a runs
    again to fetch its mask."""
    root = tmp_path_factory.mktemp("scored")
    job_id = make_job(world, "main")
    data = {s: world.data_file(s, root) for s in ("a", "b")}
    recorders = [Recorder() for _ in range(3)]
    results = {"a": [], "b": []}
    seen: list[tuple[str, int, int]] = []
    results["a"].append(agent(world, "a", job_id, data["a"], root / "work", recorder=recorders[0], wait=False))
    results["b"].append(
        agent(world, "b", job_id, data["b"], root / "work-b", recorder=recorders[1], progress=lambda *a: seen.append(a))
    )
    results["a"].append(agent(world, "a", job_id, data["a"], root / "work", recorder=recorders[2]))
    assert not world.coordinator.errors
    return Scored(job_id, results, recorders, data, seen)


def test_upload_then_scores(scored):
    first, again = scored.results["a"]
    assert (first.status, first.uploaded, first.skipped, first.scores_path) == ("open", SHARDS, 0, None)
    (b,) = scored.results["b"]
    assert (b.status, b.uploaded, b.samples) == ("done", SHARDS, 9)
    assert (again.status, again.uploaded, again.skipped) == ("done", 0, SHARDS)  # idempotent: nothing sent again
    assert scored.recorders[2].count("PUT", "/shards/") == 0
    assert scored.recorders[2].count("GET", "/checkpoints/") == 0  # the run directory was kept
    assert scored.recorders[2].count("POST", "/complete") == 0


def test_progress_reports_every_stage(scored):
    last = {stage: (done, total) for stage, done, total in scored.progress}
    assert last == {"checkpoints": (2, 2), "gradients": (18, 18), "shards": (SHARDS, SHARDS), "scoring": (100, 100)}


def test_masks_equal_the_in_process_computation(world, scored):
    spec = world.admin.job(scored.job_id)["spec"]
    assert spec["score"] == "calibrated"  # the default: the calibrated fusion, not the trace score alone
    expected = expected_scores(world.data, spec["threshold"], spec)
    want = dict(zip(expected.ids, zip(expected.scores, expected.parts, expected.selected, strict=True), strict=True))
    for silo in ("a", "b"):
        result = scored.results[silo][-1]
        assert result.threshold == pytest.approx(expected.threshold, rel=1e-6, abs=1e-9)
        rows = [json.loads(line) for line in result.scores_path.read_text().splitlines()]
        assert [r["id"] for r in rows] == [s.id for s in world.samples[silo]]  # the local order
        got = np.array([r["score"] for r in rows])
        assert np.allclose(got, [want[r["id"]][0] for r in rows], rtol=1e-6, atol=1e-9)
        assert np.allclose([r["parts"] for r in rows], [want[r["id"]][1] for r in rows], rtol=1e-6, atol=1e-9)
        assert [r["selected"] for r in rows] == [bool(want[r["id"]][2]) for r in rows]
        chosen = [s for s in world.samples[silo] if want[s.id][2]]
        assert result.selected == len(chosen) and result.selected_path == output_paths(scored.data[silo])[1]
        if chosen:
            assert read_samples(result.selected_path) == chosen
        else:
            assert result.selected_path.read_text() == ""
    assert 0 < expected.selected.sum() < len(expected.ids)  # a real selection, not all or nothing


def test_no_text_leaves_the_silo(world, scored):
    windows: set[bytes] = set()
    for silo in ("a", "b"):
        for s in world.samples[silo]:
            for text in (s.response, *(content for _, content in s.prompt)):
                for i in range(max(len(text) - 19, 1)):
                    window = text[i : i + 20]
                    windows.update({window.encode(), json.dumps(window)[1:-1].encode()})
    sent = [body for r in scored.recorders for _, url, body in r.sent] + [
        url.encode() for r in scored.recorders for _, url, _ in r.sent
    ]
    assert sum(r.count("PUT", "/shards/") for r in scored.recorders) == 2 * SHARDS
    local = b"".join(world.data_file(s, world.root / "check").read_bytes() for s in ("a", "b"))
    assert sum(w in local for w in windows) > len(windows) / 3  # the probe finds text where there is some
    for blob in sent:
        leaked = [w for w in windows if w in blob]
        assert not leaked, f"sample text was sent: {leaked[:1]}"


def test_resume_after_an_interrupted_upload(world, tmp_path, monkeypatch):
    job_id = make_job(world, "resume")
    data = world.data_file("a", tmp_path)
    cut = Recorder(fail_after_shards=2)
    with pytest.raises(CoordinatorError, match="unreachable"):
        agent(world, "a", job_id, data, tmp_path / "work", recorder=cut, wait=False)
    assert cut.shard_puts == 2

    def recompute(*args, **kwargs):
        raise AssertionError("the finished projection was computed again")

    monkeypatch.setattr("scoring.workflow.project_samples", recompute)
    again = Recorder()
    result = agent(world, "a", job_id, data, tmp_path / "work", recorder=again, wait=False)
    assert (result.status, result.uploaded, result.skipped) == ("open", SHARDS - 2, 2)  # b has not uploaded yet
    assert again.count("GET", "/checkpoints/") == 0
    with world.client("a") as client:
        assert len(client.held_shards(job_id)) == SHARDS
        assert client.job(job_id)["silos"] == [{"name": "a", "status": "complete", "num_samples": 9, "aggregate": None}]
    third = Recorder()
    result = agent(world, "a", job_id, data, tmp_path / "work", recorder=third, wait=False)
    assert (result.uploaded, result.skipped) == (0, SHARDS) and third.count("PUT", "/shards/") == 0
    with pytest.raises(AgentError, match="rows-per-shard changed"):
        agent(world, "a", job_id, data, tmp_path / "work", rows_per_shard=5, wait=False)


def test_checkpoints_are_reused_when_their_checksum_holds(world, tmp_path):
    job_id = make_job(world, "reuse")
    data = world.data_file("a", tmp_path)
    work = tmp_path / "work"
    first = Recorder(fail_after_shards=0)  # downloads and projects, then the link goes down
    with pytest.raises(CoordinatorError, match="unreachable"):
        agent(world, "a", job_id, data, work, recorder=first, wait=False)
    assert first.count("GET", "/checkpoints/") == 2
    bundle = work / job_id / "ckpt-001.safetensors"
    assert (work / job_id / "ckpt-001.safetensors.sha256").read_text().strip() == sha256(bundle.read_bytes())
    shutil.rmtree(work / job_id / "run")
    for proj in (work / job_id).glob("proj-*"):
        shutil.rmtree(proj)
    bundle.write_bytes(b"corrupt")
    second = Recorder()
    result = agent(world, "a", job_id, data, work, recorder=second, wait=False)
    assert second.count("GET", "/checkpoints/0") == 0 and second.count("GET", "/checkpoints/1") == 1
    assert (result.uploaded, result.skipped) == (SHARDS, 0)
    assert not list((work / job_id).glob(".*"))  # no temp directories left behind


def test_a_job_not_yet_open_is_refused(world, tmp_path):
    job_id = make_job(world, "draft", open_it=False)
    with pytest.raises(AgentError, match=f"has not opened job {job_id} yet"):
        agent(world, "a", job_id, world.data_file("a", tmp_path), tmp_path / "work")


def test_samples_the_coordinator_did_not_score(world, scored, tmp_path):
    extra = read_samples(scored.data["a"]) + world.samples["b"][:1]
    write_samples(tmp_path / "more.jsonl", extra)
    with pytest.raises(AgentError, match="no scores for 1 of the 10 local samples"):
        agent(world, "a", scored.job_id, tmp_path / "more.jsonl", tmp_path / "work")


def test_mask_files_go_to_out_dir_and_nothing_is_written_beside_the_data(world, scored, tmp_path):
    """For a data folder mounted read-only (docker/compose.silo.yml): --out-dir takes the mask files."""
    data_dir = tmp_path / "ro"
    data_dir.mkdir()
    data = data_dir / "a.jsonl"
    data.write_bytes(scored.data["a"].read_bytes())
    result = agent(world, "a", scored.job_id, data, tmp_path / "work", out_dir=tmp_path / "masks")
    assert result.selected_path == tmp_path / "masks" / "a.selected.jsonl" == output_paths(data, tmp_path / "masks")[1]
    assert result.scores_path.read_text() == output_paths(scored.data["a"])[0].read_text()
    assert sorted(p.name for p in data_dir.iterdir()) == ["a.jsonl"]


def test_bad_data_names_the_file_and_line(world, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2"}\n')
    with pytest.raises(DataError, match=f"{path}:2"):
        agent(world, "a", "0" * 32, path, tmp_path / "work")
    with pytest.raises(AgentError, match="no such data file"):
        agent(world, "a", "0" * 32, tmp_path / "missing.jsonl", tmp_path / "work")


def test_options_are_validated():
    with pytest.raises(AgentError, match="rows_per_shard"):
        AgentOptions(rows_per_shard=0)
    with pytest.raises(AgentError, match="timeout"):
        AgentOptions(timeout=0)


def test_the_coordinator_fixture(coordinator):

    with AdminClient(coordinator.url, coordinator.admin_token) as admin:
        assert admin.register_silo("x")["name"] == "x"
        assert admin.request("GET", "/healthz").json()["status"] == "ok"
    assert coordinator.settings.admin_token == "admin-secret-for-tests-0123456789abcdef" and coordinator.app is not None
