"""Exact silo-local jobs (``scoring_mode: local``, ``gradients: exact``) end to end against a real coordinator: the
coordinator's anchor step streams its anchors' exact gradients and stores only the reference, each silo streams its
own samples against it and gets the mask the coordinator would compute with every unprojected gradient in hand; no
gradient is stored anywhere (no anchor shard, no projection directory at a silo) and only aggregates are sent."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sqlalchemy import func, select

from agent.client import CoordinatorError
from agent.loop import AgentOptions, run_agent
from scoring.io.reference import reference_from_bytes
from storage import repository as repo
from storage.models import Score
from tests.agent.conftest import Recorder, make_job
from tests.conftest import SILOS, expected_exact

OPTS = AgentOptions(batch_size=4, poll_interval=0.05, timeout=120)


@pytest.fixture(scope="module")
def exact(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    job = make_job(world, "exact-mode", scoring_mode="local", gradients="exact")
    results, requests = {}, {}
    for silo in SILOS:
        data = world.data_file(silo, root / silo)
        recorder = Recorder()
        with world.client(silo, transport=recorder) as client:
            results[silo] = run_agent(client, job, data, work_dir=root / silo / "work", options=OPTS)
        requests[silo] = recorder.sent
    return job, results, requests, root


def _scores(path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_each_silo_gets_the_coordinator_side_exact_scores_and_mask(world, exact):
    job, results, _, _ = exact
    reference, _, expected, _ = expected_exact(world.data)
    for silo in SILOS:
        mine = _scores(results[silo].scores_path)
        ids = [s.id for s in world.samples[silo]]
        got = np.array([mine[i]["score"] for i in ids])
        np.testing.assert_allclose(got, expected[silo].scores, rtol=1e-5, atol=1e-7)
        assert [mine[i]["selected"] for i in ids] == expected[silo].selected.tolist()
        assert results[silo].threshold == pytest.approx(reference.threshold, rel=1e-6)
    state = world.admin.job(job)
    assert state["status"] == "done" and state["spec"]["gradients"] == "exact"
    assert sum(m["aggregate"]["kept"] for m in state["silos"]) == sum(results[s].selected for s in SILOS)


def test_no_gradient_is_stored_and_only_aggregates_are_sent(world, exact):
    job, _, requests, root = exact
    clues = world.coordinator.app.state.clues
    with clues.sessions() as session:
        assert repo.list_shards(session, job_id=job) == []  # not even the anchors' gradients
        assert session.scalar(select(func.count()).select_from(Score).where(Score.job_id == job)) == 0
        stored = repo.get_job(session, job_id=job)
        reference = reference_from_bytes(clues.blobs.read_bytes(stored.options["reference"]))
    layout = json.loads((world.run_dir / "run.json").read_text())["layout"]
    assert reference.dim == sum(math.prod(shape) for _, shape in layout)  # the full directions, unprojected
    for silo in SILOS:
        puts = [(m, url) for m, url, _ in requests[silo] if m in ("PUT", "POST")]
        assert puts == [("PUT", f"{world.coordinator.url}/v1/jobs/{job}/aggregate")]
        assert not list((root / silo / "work" / job).glob("proj-*"))  # the silo kept no gradient either


def test_exact_gradients_need_a_local_job(world):
    with pytest.raises(CoordinatorError, match="gradients: 'exact' needs scoring_mode 'local'") as exc:
        make_job(world, "exact-shared", gradients="exact")
    assert exc.value.status == 422
    with pytest.raises(CoordinatorError, match="gradients") as exc:
        make_job(world, "exact-typo", scoring_mode="local", gradients="full")
    assert exc.value.status == 422


def test_the_admin_page_says_the_job_scored_exact_gradients(world, exact):
    import httpx

    job = exact[0]
    with httpx.Client(base_url=world.coordinator.url, follow_redirects=True) as browser:
        assert browser.post("/ui/login", data={"token": world.coordinator.admin_token}).status_code == 200
        html = browser.get(f"/ui/jobs/{job}").text
    assert "Scored at the silos" in html and "<b>exact gradients</b>" in html and 'id="samples"' not in html
