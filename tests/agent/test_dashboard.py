"""The silo's dashboard (`agent.dashboard`, its rows from `agent.samples`) against a real coordinator served over
HTTP (uvicorn), with a job seeded straight into its storage: login, the silo's name, the joined sample table (text
search, filters, sort, paging), overrides round-tripped to the coordinator, CSRF and cross-silo refusals, coordinator
failures, and ``clues agent dashboard``.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from agent.cli import main
from agent.dashboard import create_dashboard
from agent.samples import JobRows, SampleQuery, query_rows
from scoring.calibration import EXPLANATIONS, fused_signals
from scoring.config import DEFAULT_SIGNALS
from tests.app.test_api import job_body
from tests.conftest import serve_coordinator
from tests.seed import seed_scored_job

N = 30
IDS = [f"alpha-{i:03d}" for i in range(N)]
NOT_LOCAL = IDS[-2:]  # scored, but not in the local file
ZEBRA = {3, 7, 19}  # samples whose instruction mentions a Zebra
IN_INPUT = 11  # the one whose Alpaca input (not instruction) holds the word "okapi"
LONG = 5  # a response longer than a preview


def record(i: int) -> dict:
    instruction = f"Describe the Zebra crossing number {i}." if i in ZEBRA else f"Explain item {i}."
    output = ("very long answer " * 60) if i == LONG else f"Answer {i}."
    return {"id": IDS[i], "instruction": instruction, "input": "an okapi" if i == IN_INPUT else "", "output": output}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A coordinator with job ``main`` over silos alpha and beta (seeded scores), a job ``beta-only``, and silo
    alpha's data file (all its scored samples but the last two, plus one never scored)."""
    root = tmp_path_factory.mktemp("dash")
    with serve_coordinator(root / "coord") as coord:
        sessions = coord.app.state.clues.sessions
        with sessions() as session:
            main_job = seed_scored_job(
                session, silos=("alpha", "beta"), per_silo=N, sample_ids={"alpha": IDS}, name="main", seed=1
            )
        with sessions() as session:
            other = seed_scored_job(session, silos=("beta",), per_silo=5, name="beta-only", duplicates=0)
        with sessions() as session:
            calibrated = seed_scored_job(
                session, silos=("alpha",), per_silo=N, sample_ids={"alpha": IDS}, name="calibrated", seed=2,
                duplicates=0, calibrated=True,
            )  # fmt: skip
        data = root / "alpha.jsonl"
        lines = [record(i) for i in range(N) if IDS[i] not in NOT_LOCAL]
        lines.append({"id": "alpha-unscored", "instruction": "Never scored.", "output": "Nothing."})
        data.write_text("".join(json.dumps(r) + "\n" for r in lines))
        yield {
            "coord": coord,
            "job": main_job,
            "other": other.job_id,
            "calibrated": calibrated.job_id,
            "token": main_job.tokens["alpha"],
            "data": data,
            "root": root,
        }


def api(world, silo: str = "alpha") -> httpx.Client:
    """The coordinator's own API with a silo's token (to check what the dashboard did)."""
    token = world["job"].tokens[silo]
    return httpx.Client(base_url=world["coord"].url, headers={"Authorization": f"Bearer {token}"})


def dashboard(world, tmp_path, *, token=None, url=None, data=None, **kwargs) -> TestClient:
    app = create_dashboard(
        url or world["coord"].url, token or world["token"], data or world["data"], tmp_path / "work", **kwargs
    )
    return TestClient(app, follow_redirects=False)


def login(client: TestClient, token: str) -> httpx.Response:
    return client.post("/ui/login", data={"token": token, "next": "/ui/jobs"})


@pytest.fixture
def dash(world, tmp_path):
    with dashboard(world, tmp_path) as client:
        assert login(client, world["token"]).status_code == 303
        yield client


def samples(client: TestClient, job_id: str, **params) -> dict:
    r = client.get(f"/api/jobs/{job_id}/samples", params=params)
    assert r.status_code == 200, r.text
    return r.json()


# -- login ----------------------------------------------------------------------------------------------------------


def test_pages_and_json_need_a_login(world, tmp_path):
    with dashboard(world, tmp_path) as client:
        r = client.get("/ui/jobs")
        assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=/ui/jobs"
        r = client.get(f"/ui/jobs/{world['job'].job_id}?x=1")
        assert r.headers["location"] == f"/ui/login?next=/ui/jobs/{world['job'].job_id}%3Fx%3D1"
        assert client.get("/api/jobs").status_code == 401
        assert client.post(f"/api/jobs/{world['job'].job_id}/overrides", json={}).status_code == 401
        page = client.get("/ui/login?next=/ui/jobs")
        assert page.status_code == 200 and 'name="token"' in page.text and 'type="password"' in page.text


def test_a_wrong_token_is_a_401_page(world, tmp_path):
    with dashboard(world, tmp_path) as client:
        for token in ("nope", world["job"].tokens["beta"], ""):
            r = login(client, token)
            assert r.status_code == 401 and "not this silo&#39;s token" in r.text
            assert "set-cookie" not in r.headers
        assert client.get("/ui/jobs").status_code == 303


def test_login_sets_an_httponly_samesite_cookie(world, tmp_path):
    with dashboard(world, tmp_path) as client:
        r = client.post("/ui/login", data={"token": f" {world['token']} ", "next": "/ui/jobs?kept=false"})
        assert r.status_code == 303 and r.headers["location"] == "/ui/jobs?kept=false"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("clues_silo_") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Path=/" in cookie and world["token"] not in cookie and world["token"] not in r.headers["location"]
        assert client.get("/ui/jobs").status_code == 200
        assert (tmp_path / "work" / "session.key").stat().st_mode & 0o777 == 0o600
        # only our own pages are redirect targets
        for target in ("//evil.example/ui/x", "https://evil.example/", "/v1/jobs"):
            assert client.post("/ui/login", data={"token": world["token"], "next": target}).headers["location"] == (
                "/ui/jobs"
            )
        r = client.post("/ui/logout")
        assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]
        assert client.get("/ui/jobs").status_code == 303


def test_a_cookie_from_another_dashboard_or_token_is_refused(world, tmp_path, monkeypatch):
    monkeypatch.setenv("CLUES_SESSION_SECRET", "one shared secret, long enough")
    with dashboard(world, tmp_path) as a, dashboard(world, tmp_path, token="some other token") as b:
        login(a, world["token"])
        ((name, value),) = a.cookies.items()
        b.cookies.set(name, value)
        assert b.get("/ui/jobs").status_code == 303  # another token: another cookie name and fingerprint
        b.cookies.set(b.app.state.dashboard.cookie, value)  # signed with the same secret, for another token
        assert b.get("/api/jobs").status_code == 401


# -- pages ----------------------------------------------------------------------------------------------------------


def test_the_jobs_page_lists_this_silos_jobs(world, dash):
    job_id = world["job"].job_id
    r = dash.get("/ui/jobs")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert f'data-job="{job_id}"' in r.text and "main" in r.text and "silo alpha" in r.text
    assert world["other"] not in r.text and 'clues.liveJobs("scoring", "/api/jobs")' in r.text
    listed = dash.get("/api/jobs").json()
    mine = {j["id"]: j for j in listed}
    assert mine[job_id]["status"] == "done" and world["other"] not in mine
    assert dash.get("/").headers["location"] == "/ui/jobs"


def test_the_job_page_has_the_histogram_and_the_table(world, dash):
    job_id = world["job"].job_id
    r = dash.get(f"/ui/jobs/{job_id}")
    assert r.status_code == 200
    for part in ('data-silo="alpha"', 'id="sample-table"', "<dialog", 'name="reason"', "/ui/static/plotly.min.js"):
        assert part in r.text
    assert dash.get("/ui/static/dashboard.js").status_code == 200
    js = dash.get("/ui/static/plotly.min.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    summary = dash.get(f"/api/jobs/{job_id}/summary").json()
    assert list(summary["silos"]) == ["alpha"] and summary["silos"]["alpha"]["n"] == N
    member = {"name": "alpha", "status": "complete", "num_samples": N, "aggregate": None}  # a shared job: none
    assert dash.get(f"/api/jobs/{job_id}").json()["silos"] == [member]


def test_a_job_not_scored_yet_shows_its_progress(world, dash):
    admin = {"Authorization": f"Bearer {world['coord'].admin_token}"}
    body = job_body(name="pending", silos=["alpha"])
    job_id = httpx.post(f"{world['coord'].url}/v1/jobs", json=body, headers=admin).json()["id"]
    page = dash.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200 and "draft" in page.text and f'clues.followJob("/api/jobs/{job_id}"' in page.text
    assert 'id="sample-table"' not in page.text and "plotly.min.js" not in page.text
    r = dash.get(f"/api/jobs/{job_id}/samples")
    assert r.status_code == 409 and "'draft'" in r.json()["detail"]
    assert job_id in dash.get("/ui/jobs").text


def test_the_name_of_a_silo_with_no_jobs_comes_from_the_coordinator(world, tmp_path):
    admin = {"Authorization": f"Bearer {world['coord'].admin_token}"}
    created = httpx.post(f"{world['coord'].url}/v1/silos", json={"name": "gamma"}, headers=admin).json()
    with dashboard(world, tmp_path, token=created["token"]) as client:
        assert client.app.state.dashboard.silo is None
        assert "silo gamma" not in client.get("/ui/login").text  # not asked before a login
        login(client, created["token"])
        page = client.get("/ui/jobs")
        assert page.status_code == 200 and "silo gamma" in page.text and "data-job=" not in page.text
        assert client.app.state.dashboard.silo == "gamma" and client.get("/api/jobs").json() == []


def test_the_admin_token_is_not_a_silos(world, tmp_path):
    admin = world["coord"].admin_token
    with dashboard(world, tmp_path, token=admin) as client:
        login(client, admin)
        page = client.get("/ui/jobs")
        assert page.status_code == 403 and "use a silo&#39;s token" in page.text


# -- the joined table -----------------------------------------------------------------------------------------------


def test_samples_join_the_local_text(world, dash):
    data = samples(dash, world["job"].job_id, limit=1000)
    assert data["total"] == N and data["threshold"] == pytest.approx(world["job"].threshold)
    assert data["without_text"] == len(NOT_LOCAL)
    rows = {r["sample_id"]: r for r in data["rows"]}
    assert list(rows) == IDS  # upload order
    assert rows[IDS[3]]["instruction"] == "Describe the Zebra crossing number 3."
    assert rows[IDS[3]]["response"] == "Answer 3."
    assert rows[IDS[IN_INPUT]]["instruction"] == f"Explain item {IN_INPUT}.\n\nan okapi"
    assert len(rows[IDS[LONG]]["response"]) == 400 and rows[IDS[LONG]]["response"].endswith("…")
    for sid in NOT_LOCAL:
        assert rows[sid]["text_missing"] and rows[sid]["instruction"] == rows[sid]["response"] == ""
    assert not rows[IDS[0]]["text_missing"] and "alpha-unscored" not in rows
    row = rows[IDS[0]]
    assert {"silo", "score", "parts", "selected", "auto_selected", "override", "nearest_anchors"} <= set(row)
    assert row["silo"] == "alpha" and len(row["parts"]) == 2 and len(row["nearest_anchors"]) == 3


def test_a_calibrated_job_shows_each_signal_and_why_a_sample_was_dropped(world, dash):
    """The page declares the signal columns (raw values, then each fused signal's z, and the flagging signal in
    words for a dropped sample); the joined rows carry what the coordinator sent for them beside the local text."""
    job_id = world["calibrated"]
    page = dash.get(f"/ui/jobs/{job_id}").text
    values, fused = ["trace", "loss", *DEFAULT_SIGNALS], list(fused_signals(DEFAULT_SIGNALS))
    assert f"clues.signalColumns({json.dumps(values)}, {json.dumps(fused)})" in page
    assert 'id="score-kind">calibrated (' in page
    rows = samples(dash, job_id, limit=1000)["rows"]
    assert len(rows) == N and all(sorted(r["z"]) == sorted(fused) for r in rows)
    dropped = [r for r in rows if not r["auto_selected"]]
    assert dropped and all(r["flag_reason"] == EXPLANATIONS[r["flagged_by"]] for r in dropped)
    assert rows[3]["instruction"] == "Describe the Zebra crossing number 3."
    plain = dash.get(f"/ui/jobs/{world['job'].job_id}").text  # a trace job: no signal columns
    assert "clues.signalColumns([], [])" in plain and 'id="score-kind">trace<' in plain


def test_samples_search_filter_sort_and_page(world, dash):
    job_id = world["job"].job_id
    ids = lambda d: [r["sample_id"] for r in d["rows"]]  # noqa: E731
    assert sorted(ids(samples(dash, job_id, q="zEBRA"))) == [IDS[i] for i in sorted(ZEBRA)]
    assert ids(samples(dash, job_id, q="OKAPI")) == [IDS[IN_INPUT]]  # the Alpaca input is searched too
    assert ids(samples(dash, job_id, q="answer 7.")) == [IDS[7]]  # and the response
    assert ids(samples(dash, job_id, q=NOT_LOCAL[0].upper())) == [NOT_LOCAL[0]]  # and the id, text or not
    assert samples(dash, job_id, q="no such words")["total"] == 0

    everything = samples(dash, job_id, limit=1000)["rows"]
    kept = samples(dash, job_id, kept="true", limit=1000)
    assert kept["total"] == sum(r["selected"] for r in everything) and all(r["selected"] for r in kept["rows"])
    dropped = samples(dash, job_id, kept="false", limit=1000)
    assert kept["total"] + dropped["total"] == N and 0 < dropped["total"] < N

    by_score = samples(dash, job_id, sort="score", order="desc", limit=1000)["rows"]
    assert [r["score"] for r in by_score] == sorted((r["score"] for r in everything), reverse=True)
    by_part = samples(dash, job_id, sort="part:1", order="asc", limit=1000)["rows"]
    assert [r["parts"][1] for r in by_part] == sorted(r["parts"][1] for r in everything)
    pages = [samples(dash, job_id, sort="score", order="desc", limit=7, offset=o) for o in range(0, N, 7)]
    assert all(p["total"] == N for p in pages) and [r for p in pages for r in p["rows"]] == by_score

    middle = by_score[N // 2]["score"]
    high = samples(dash, job_id, min_score=middle, limit=1000)
    assert high["total"] == N // 2 + 1 and all(r["score"] >= middle for r in high["rows"])
    low = samples(dash, job_id, max_score=middle, kept="false", limit=1000)
    assert all(r["score"] <= middle and not r["selected"] for r in low["rows"])

    r = dash.get(f"/api/jobs/{job_id}/samples", params={"sort": "part:2"})
    assert r.status_code == 422 and "part:2 names no checkpoint" in r.json()["detail"]
    r = dash.get(f"/api/jobs/{job_id}/samples", params={"sort": "text", "limit": 0})
    assert r.status_code == 422 and "sort:" in r.json()["detail"] and "limit:" in r.json()["detail"]


def test_paging_100k_rows_is_fast():
    n = 100_000
    rows = [
        {
            "sample_id": f"s-{i:06d}",
            "score": ((i * 7919) % n) / n,
            "parts": [i % 13, i % 7],
            "selected": i % 3 != 0,
            "override": None if i % 50 else {"decision": "keep"},
            "text_missing": False,
        }
        for i in range(n)
    ]
    search = [f"s-{i:06d}\nquestion {i} about topic {i % 97}\nanswer".lower() for i in range(n)]
    job = JobRows(0.5, rows, search, 1, time.monotonic())
    for sort in ("score", "part:1"):  # each sort is made once per fill (≈ 0.1 s each) and kept
        job.order(sort)
    start = time.perf_counter()
    total, page = query_rows(job, SampleQuery(q="topic 42", kept=True, sort="score", descending=True), 50, 100)
    total2, _ = query_rows(job, SampleQuery(sort="part:1", min_score=0.25), 50, 5000)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{elapsed:.2f} s for two queries over 100k rows"
    assert total == sum(1 for i in range(n) if i % 97 == 42 and i % 3) and len(page) == 50
    assert [r["score"] for r in page] == sorted((r["score"] for r in page), reverse=True)
    assert total2 == sum(r["score"] >= 0.25 for r in rows)


def test_the_local_file_is_read_again_when_it_changes(world, tmp_path):
    data = tmp_path / "copy.jsonl"
    data.write_text(world["data"].read_text())
    job_id = world["job"].job_id
    with dashboard(world, tmp_path, data=data) as client:
        login(client, world["token"])
        assert samples(client, job_id, q="giraffe")["total"] == 0
        data.write_text(data.read_text().replace("Explain item 4.", "Explain the giraffe."))
        found = samples(client, job_id, q="GIRAFFE")["rows"]
        assert [r["sample_id"] for r in found] == [IDS[4]] and found[0]["instruction"] == "Explain the giraffe."
        data.write_text("not json\n")  # a file that no longer reads: the text read before stays
        assert samples(client, job_id, q="giraffe")["total"] == 1


# -- overrides ------------------------------------------------------------------------------------------------------


def coordinator_row(world, sample_id: str) -> dict:
    with api(world) as c:
        rows = c.get(f"/v1/jobs/{world['job'].job_id}/scores", params={"q": sample_id}).json()["rows"]
    return next(r for r in rows if r["sample_id"] == sample_id)


def test_an_override_is_recorded_on_the_coordinator_and_auto_restores_it(world, dash):
    job_id = world["job"].job_id
    target = samples(dash, job_id, kept="false", limit=1)["rows"][0]
    sid = target["sample_id"]
    assert not coordinator_row(world, sid)["selected"]

    body = {"sample_id": sid, "decision": "keep", "reason": "  rare case "}
    r = dash.post(f"/api/jobs/{job_id}/overrides", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["reason"] == "rare case" and r.json()["selected"] and not r.json()["previous"]
    row = coordinator_row(world, sid)
    assert row["selected"] and not row["auto_selected"] and row["override"]["reason"] == "rare case"
    with api(world) as c:
        log = c.get(f"/v1/jobs/{job_id}/overrides").json()
    assert log["rows"][0]["sample_id"] == sid and log["rows"][0]["reason"] == "rare case"
    assert dash.get(f"/api/jobs/{job_id}/overrides").json()["rows"][0]["id"] == log["rows"][0]["id"]
    shown = samples(dash, job_id, overridden="true")  # the held rows were patched: no refetch needed
    assert [r["sample_id"] for r in shown["rows"]] == [sid] and shown["rows"][0]["override"]["decision"] == "keep"
    assert shown["rows"][0]["selected"] and shown["rows"][0]["instruction"] == target["instruction"]

    r = dash.post(f"/api/jobs/{job_id}/overrides", json={"sample_id": sid, "decision": "auto", "reason": "undo"})
    assert r.status_code == 201 and not r.json()["selected"]
    row = coordinator_row(world, sid)
    assert not row["selected"] and row["override"] is None
    assert samples(dash, job_id, overridden="true")["total"] == 0
    assert sid in [r["sample_id"] for r in samples(dash, job_id, kept="false", limit=1000)["rows"]]


def test_cross_site_posts_are_refused(world, dash):
    job_id = world["job"].job_id
    body = {"sample_id": IDS[0], "decision": "drop", "reason": "csrf"}
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = dash.post(f"/api/jobs/{job_id}/overrides", json=body, headers=headers)
        assert r.status_code == 403 and "cross-site" in r.json()["detail"]
    with api(world) as c:
        assert all(o["reason"] != "csrf" for o in c.get(f"/v1/jobs/{job_id}/overrides").json()["rows"])
    same = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    r = dash.post(f"/api/jobs/{job_id}/overrides", json={**body, "decision": "auto", "reason": "ok"}, headers=same)
    assert r.status_code == 201


def test_an_override_needs_a_reason_and_a_known_sample(world, dash):
    url = f"/api/jobs/{world['job'].job_id}/overrides"
    r = dash.post(url, json={"sample_id": IDS[0], "decision": "drop"})
    assert r.status_code == 422 and r.json()["detail"].startswith("reason: required")
    r = dash.post(url, json={"sample_id": IDS[0], "decision": "drop", "reason": "   "})
    assert r.status_code == 422 and "reason: required" in r.json()["detail"]
    r = dash.post(url, json={"sample_id": IDS[0], "decision": "maybe", "reason": "x"})
    assert r.status_code == 422 and r.json()["detail"].startswith("decision:")
    r = dash.post(url, json={"sample_id": "alpha-unscored", "decision": "drop", "reason": "x"})  # coordinator's 404
    assert r.status_code == 404 and "alpha-unscored" in r.json()["detail"]


# -- refusals and failures ------------------------------------------------------------------------------------------


def test_another_silos_job_is_not_found(world, dash):
    other = world["other"]
    for path in (f"/api/jobs/{other}/samples", f"/api/jobs/{other}", f"/api/jobs/{other}/overrides"):
        r = dash.get(path)
        assert r.status_code == 404 and r.json()["detail"] == f"job '{other}' does not exist"
    page = dash.get(f"/ui/jobs/{other}")
    assert page.status_code == 404 and f"job &#39;{other}&#39; does not exist" in page.text
    assert dash.get("/ui/jobs/not-a-job").status_code == 422


def test_an_unreachable_coordinator_is_a_502_naming_it(world, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens here
    with dashboard(world, tmp_path, url=url) as client:
        login(client, world["token"])
        page = client.get("/ui/jobs")
        assert page.status_code == 502 and f"the coordinator at {url} cannot be reached" in page.text
        assert "Traceback" not in page.text
        r = client.get(f"/api/jobs/{world['job'].job_id}/samples")
        assert r.status_code == 502 and url in r.json()["detail"]


def test_a_token_the_coordinator_refuses_is_a_502(world, tmp_path):
    with dashboard(world, tmp_path, token="revoked-token") as client:
        login(client, "revoked-token")
        r = client.get("/api/jobs")
        assert r.status_code == 502 and "refused this silo's token" in r.json()["detail"]
        assert world["coord"].url in r.json()["detail"]


def test_rows_older_than_the_ttl_are_refetched(world, tmp_path):
    job_id = world["job"].job_id
    with dashboard(world, tmp_path, ttl_s=0.0) as client:
        login(client, world["token"])
        assert samples(client, job_id, overridden="true")["total"] == 0
        with api(world) as c:  # an override made elsewhere (the coordinator's own dashboard)
            body = {"sample_id": IDS[1], "decision": "drop", "reason": "elsewhere"}
            assert c.post(f"/v1/jobs/{job_id}/overrides", json=body).status_code == 201
        try:
            deadline = time.monotonic() + 10
            while samples(client, job_id, overridden="true")["total"] != 1:
                assert time.monotonic() < deadline, "the held rows were never refetched"
                time.sleep(0.05)
        finally:
            with api(world) as c:
                c.post(f"/v1/jobs/{job_id}/overrides", json={**body, "decision": "auto", "reason": "undo"})


# -- the command ----------------------------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("CLUES_TOKEN", raising=False)
    monkeypatch.delenv("CLUES_COORDINATOR", raising=False)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["agent", "dashboard", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data", "--coordinator", "--token", "--host", "--port", "--work-dir", "CLUES_TOKEN"):
        assert option in out


def test_cli_missing_options(no_env, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["agent", "dashboard", "--token", "t", "--coordinator", "http://127.0.0.1:9"])
    assert exit_info.value.code == 2 and "--data" in capsys.readouterr().err
    data = tmp_path / "a.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    cases = [
        (["--coordinator", "http://127.0.0.1:9"], "--token: missing; pass --token or set CLUES_TOKEN"),
        (["--token", "t"], "--coordinator: missing; pass --coordinator or set CLUES_COORDINATOR"),
        (["--token", "t", "--coordinator", "http://127.0.0.1:9", "--data", "nope.jsonl"], "--data: nope.jsonl"),
    ]
    for extra, message in cases:
        argv = ["agent", "dashboard", "--data", str(data), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("clues agent dashboard: error: ") and message in err and err.count("\n") == 1


def test_cli_checks_the_token_then_serves(world, no_env, tmp_path, capsys, monkeypatch):
    import uvicorn

    argv = ["agent", "dashboard", "--data", str(world["data"]), "--coordinator", world["coord"].url]
    assert main([*argv, "--token", "wrong"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clues agent dashboard: error: the coordinator at ") and "refused this silo's token" in err

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.append((self.config.app, sockets)))
    work = tmp_path / "w"
    assert main([*argv, "--token", world["token"], "--port", "0", "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    ((app, (sock,)),) = served
    port = sock.getsockname()[1]
    sock.close()
    assert f"silo alpha dashboard: http://127.0.0.1:{port}/ui/jobs" in out and "29 local samples" in out
    assert world["token"] not in out and (work / "session.key").is_file()
    assert app.state.dashboard.silo == "alpha"


def test_cli_refuses_the_admin_token(world, no_env, tmp_path, capsys):
    argv = ["agent", "dashboard", "--data", str(world["data"]), "--coordinator", world["coord"].url]
    assert main([*argv, "--token", world["coord"].admin_token, "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clues agent dashboard: error: --token: not a silo's token; the coordinator at ")
    assert "403" in err and err.count("\n") == 1


def test_cli_port_in_use(world, no_env, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["agent", "dashboard", "--data", str(world["data"]), "--coordinator", world["coord"].url]
        assert main([*argv, "--token", world["token"], "--port", str(port), "--work-dir", str(tmp_path)]) == 2
    assert f"--host/--port: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_an_unreadable_data_file_stops_the_start(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q"}\n')
    with pytest.raises(ValueError, match="output"):
        create_dashboard(world["coord"].url, world["token"], bad, tmp_path)
