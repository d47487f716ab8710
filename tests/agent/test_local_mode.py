"""Silo-local scoring jobs (``scoring_mode: local``) end to end against a real coordinator: each silo scores its own
samples against the published reference and gets the mask a shared job computes from the same data; nothing
per-sample reaches the coordinator (no shard, no score row, no blob of the job holds a silo's sample id, and the only
thing a silo sends is its aggregate); and the shared protocol's steps are refused on a local job."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from agent.client import CoordinatorError
from agent.loop import AgentError, AgentOptions, run_agent
from storage import repository as repo
from storage.models import Score
from tests.agent.conftest import Recorder, make_job
from tests.conftest import SILOS

FAST = AgentOptions(rows_per_shard=4, poll_interval=0.05, timeout=120)


def _scores(path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def both(world, tmp_path_factory):
    """The same job scored shared and local, for both silos; the local silos' requests recorded."""
    root = tmp_path_factory.mktemp("modes")
    shared, local = make_job(world, "shared-mode"), make_job(world, "local-mode", scoring_mode="local")
    out = {"shared": {}, "local": {}, "requests": {}, "root": root}
    for silo in SILOS:  # the shared job: a uploads, b uploads and waits, a fetches its mask
        data = world.data_file(silo, root / silo)
        with world.client(silo) as client:
            opts = FAST if silo == SILOS[-1] else AgentOptions(rows_per_shard=4, wait=False)
            run_agent(client, shared, data, work_dir=root / silo / "work", options=opts, progress=None)
    for silo in SILOS:
        data = world.data_file(silo, root / silo)
        with world.client(silo) as client:
            out["shared"][silo] = run_agent(client, shared, data, work_dir=root / silo / "work", options=FAST)
        recorder = Recorder()
        with world.client(silo, transport=recorder) as client:
            local_dir = root / silo / "local-out"
            opts = AgentOptions(rows_per_shard=4, poll_interval=0.05, timeout=120, out_dir=local_dir)
            out["local"][silo] = run_agent(client, local, data, work_dir=root / silo / "work", options=opts)
        out["requests"][silo] = recorder.sent
    return shared, local, out


def test_each_silo_gets_the_shared_job_s_scores_and_mask(world, both):
    _, local, out = both
    for silo in SILOS:
        mine, theirs = _scores(out["local"][silo].scores_path), _scores(out["shared"][silo].scores_path)
        assert set(mine) == set(theirs) == {s.id for s in world.samples[silo]}
        for sid in mine:
            assert mine[sid]["score"] == pytest.approx(theirs[sid]["score"], rel=1e-4, abs=1e-6), sid
            assert mine[sid]["selected"] == theirs[sid]["selected"], sid
        assert out["local"][silo].threshold == pytest.approx(out["shared"][silo].threshold, rel=1e-9)
    job = world.admin.job(local)
    assert job["status"] == "done" and job["spec"]["scoring_mode"] == "local"
    kept = sum(m["aggregate"]["kept"] for m in job["silos"])
    assert kept == sum(out["local"][s].selected for s in SILOS)
    assert (
        job["message"]
        == f"{kept} of {sum(len(world.samples[s]) for s in SILOS)} samples selected (scored at the silos)"
    )


def test_nothing_per_sample_reaches_the_coordinator(world, both):
    _, local, out = both
    silo_ids = {s.id for silo in SILOS for s in world.samples[silo]}
    for silo in SILOS:
        puts = [(m, url) for m, url, _ in out["requests"][silo] if m in ("PUT", "POST")]
        assert puts == [("PUT", f"{world.coordinator.url}/v1/jobs/{local}/aggregate")]
        body = json.loads(out["requests"][silo][-1][2].split(b"]", 1)[1])  # headers, then the JSON body
        assert set(body) == {"kept", "total", "histogram"}
    clues = world.coordinator.app.state.clues
    with clues.sessions() as session:
        job = repo.get_job(session, job_id=local)
        shards = repo.list_shards(session, job_id=local)
        assert {s.owner for s in shards} == {"__anchor__"}
        assert session.scalar(select(func.count()).select_from(Score).where(Score.job_id == local)) == 0
        keys = {c.blob_key for c in job.checkpoints} | {s.blob_key for s in shards}
        keys |= {repo.get_anchor_set(session, job_id=local).blob_key, job.options["reference"]}
    for key in keys:
        data = clues.blobs.read_bytes(key)
        leaked = [sid for sid in silo_ids if sid.encode() in data]
        assert not leaked, (key, leaked[:3])


def test_the_shared_protocol_is_refused_on_a_local_job(world, both, tmp_path):
    shared, local, _ = both
    with world.client("a") as client:
        with pytest.raises(CoordinatorError, match="scores at the silos") as exc:
            client.upload_shard(local, 0, 0, b"x")
        assert exc.value.status == 409
        with pytest.raises(CoordinatorError, match="already sent another aggregate"):
            client.send_aggregate(local, {"kept": 0, "total": 9, "histogram": [9] + [0] * 41})
        with pytest.raises(CoordinatorError, match="has no reference") as exc:
            client.download_reference(shared, tmp_path / "ref")
        assert exc.value.status == 409
    with pytest.raises(CoordinatorError, match="scores at the silos"):
        world.admin.start_scoring(local)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"kept": 1, "total": 9, "histogram": [9]}, "the reference has 42 bins"),
        ({"kept": 10, "total": 9, "histogram": [9] + [0] * 41}, "exceeds total"),
        ({"kept": 1, "total": 9, "histogram": [8] + [0] * 41}, "sum to 8, not total 9"),
        ({"kept": 1, "total": 9, "histogram": [-1, 10] + [0] * 40}, "must be >= 0"),
        ({"kept": 1, "total": 9, "histogram": [9] + [0] * 41, "ids": ["x"]}, "ids"),
    ],
)
def test_a_malformed_aggregate_is_422_and_stores_nothing(world, tmp_path, body, needle):
    local = make_job(world, f"local-bad-{len(body)}-{needle[:5]}", scoring_mode="local")
    with world.client("a") as client:
        client.download_reference(local, tmp_path / "ref")  # waits for nothing: the anchor step ran at open
        with pytest.raises(CoordinatorError, match=needle) as exc:
            client.send_aggregate(local, body)
        assert exc.value.status == 422
        assert client.job(local)["silos"][0]["status"] == "pending"


def test_a_local_job_refuses_a_top_fraction(world):
    with pytest.raises(CoordinatorError, match="'top' needs every silo's scores") as exc:
        make_job(world, "local-top", scoring_mode="local", threshold={"kind": "top", "fraction": 0.5})
    assert exc.value.status == 422


def test_the_admin_page_of_a_local_job_shows_aggregates_only(world, both):
    import httpx

    _, local, _ = both
    with httpx.Client(base_url=world.coordinator.url, follow_redirects=True) as browser:
        assert browser.post("/ui/login", data={"token": world.coordinator.admin_token}).status_code == 200
        page = browser.get(f"/ui/jobs/{local}")
    assert page.status_code == 200, page.text[:500]
    html = page.text
    assert "Scored at the silos" in html and "The coordinator holds no per-sample value" in html
    job = world.admin.job(local)
    for member in job["silos"]:
        row = html.split(f'<tr data-silo="{member["name"]}">', 1)[1].split("</tr>", 1)[0]
        kept, total = member["aggregate"]["kept"], member["aggregate"]["total"]
        assert f'<td class="num kept-count">{kept}</td>' in row and f'<td class="num">{total}</td>' in row
    assert html.count('"histogram":') == len(job["silos"])  # the reported histograms feed the charts
    assert 'id="samples"' not in html  # no per-sample table: there are no per-sample rows


def test_the_silo_s_dashboard_shows_its_own_rows_and_keeps_overrides_at_home(world, both):
    from fastapi.testclient import TestClient

    from agent.dashboard import create_dashboard

    _, local, out = both
    root = out["root"]
    app = create_dashboard(
        world.coordinator.url, world.tokens["a"], root / "a" / "a.jsonl", root / "a" / "work", silo="a"
    )
    with TestClient(app, follow_redirects=False) as dash:
        assert dash.post("/ui/login", data={"token": world.tokens["a"], "next": "/ui/jobs"}).status_code == 303
        rows = dash.get(f"/api/jobs/{local}/samples", params={"limit": 100}).json()
        mine = _scores(out["local"]["a"].scores_path)
        assert rows["total"] == len(mine) == len(world.samples["a"])
        for row in rows["rows"]:
            assert row["score"] == pytest.approx(mine[row["sample_id"]]["score"]) and not row["text_missing"]
            assert row["instruction"]  # the local text, joined here
            assert set(row["z"]) == {"trace", "perplexity", "ifd", "pmi"}
        summary = dash.get(f"/api/jobs/{local}/summary").json()
        assert sum(summary["silos"]["a"]["counts"]) == len(mine) and summary["silos"]["a"]["kept"] == sum(
            r["selected"] for r in mine.values()
        )
        assert summary["threshold"] == pytest.approx(out["local"]["a"].threshold)
        first = rows["rows"][0]["sample_id"]
        refused = dash.post(
            f"/api/jobs/{local}/overrides",
            json={"sample_id": first, "decision": "drop", "reason": "checked"},
            headers={"Origin": "http://testserver"},
        )
        assert refused.status_code == 409 and "not sent" in refused.json()["detail"]
        assert dash.get(f"/ui/jobs/{local}").status_code == 200


def test_a_failed_reference_fails_the_job_stops_the_agent_and_a_retry_recovers(world, tmp_path, monkeypatch):
    from scoring.errors import DataError

    def broken(res, job_id):
        raise DataError("anchor values unreadable (test)")

    monkeypatch.setattr("workers.local_scoring.publish_reference", broken)
    local = make_job(world, "local-broken", scoring_mode="local")
    world.coordinator.join_tasks()
    job = world.admin.job(local)
    assert (job["status"], job["anchor_status"]) == ("failed", "failed") and "unreadable" in job["error"]
    data = world.data_file("a", tmp_path / "a")
    with world.client("a") as client, pytest.raises(AgentError, match="is 'failed'"):
        run_agent(client, local, data, work_dir=tmp_path / "work", options=FAST)
    monkeypatch.undo()
    assert world.admin.retry_job(local)["status"] == "open"
    world.coordinator.join_tasks()
    with world.client("a") as client:
        result = run_agent(client, local, data, work_dir=tmp_path / "work", options=FAST)
    assert result.selected is not None and world.admin.job(local)["silos"][0]["status"] == "complete"


def test_a_noisy_aggregate_is_drawn_once_charged_once_and_capped(world, tmp_path):
    from dataclasses import replace

    from scoring.privacy import BudgetExceededError, ReleaseLedger

    local = make_job(world, "local-noisy", scoring_mode="local", aggregate_epsilon=0.5)
    assert world.admin.job(local)["spec"]["aggregate_epsilon"] == 0.5
    data, work = world.data_file("a", tmp_path / "a"), tmp_path / "work"
    with world.client("a") as client, pytest.raises(BudgetExceededError, match=r"past its own limit ε = 0\.25"):
        run_agent(client, local, data, work_dir=work, options=replace(FAST, max_epsilon=0.25))
    assert not (work / "privacy-ledger.json").exists() and not (work / local / "aggregate.json").exists()
    assert world.admin.job(local)["silos"][0]["aggregate"] is None  # nothing was sent
    with world.client("a") as client:
        first = run_agent(client, local, data, work_dir=work, options=FAST)
        run_agent(client, local, data, work_dir=work, options=FAST)  # a rerun re-sends the stored release
    release = json.loads((work / local / "aggregate.json").read_text())
    assert release["counted"]["kept"] == first.selected and release["counted"]["total"] == len(world.samples["a"])
    member = next(m for m in world.admin.job(local)["silos"] if m["name"] == "a")
    assert {k: member["aggregate"][k] for k in ("kept", "total", "histogram")} == release["sent"]
    assert ReleaseLedger.open(work / "privacy-ledger.json").epsilon_spent == pytest.approx(0.5)
    from fastapi.testclient import TestClient

    from agent.dashboard import create_dashboard

    app = create_dashboard(world.coordinator.url, world.tokens["a"], data, work, silo="a")
    with TestClient(app, follow_redirects=False) as dash:  # the silo's own page shows what its releases spent
        assert dash.post("/ui/login", data={"token": world.tokens["a"], "next": "/ui/jobs"}).status_code == 303
        page = dash.get("/ui/jobs").text
    assert "<b>ε = 0.5</b> in 1 release" in page


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"aggregate_epsilon": 1.0}, "needs scoring_mode 'local'"),
        ({"scoring_mode": "local", "aggregate_epsilon": -1}, "aggregate_epsilon"),
        ({"scoring_mode": "local", "aggregate_epsilon": 1e6}, "aggregate_epsilon"),
    ],
)
def test_aggregate_noise_settings_are_validated(world, fields, needle):
    with pytest.raises(CoordinatorError, match=needle) as exc:
        make_job(world, f"noisy-bad-{len(fields)}-{fields['aggregate_epsilon']}", **fields)
    assert exc.value.status == 422
