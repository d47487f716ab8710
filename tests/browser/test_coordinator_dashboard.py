"""The coordinator's dashboard in headless Chromium against a real coordinator (uvicorn, SQLite) holding a scored job
of three silos, a training job on its selection, and jobs in progress: login, live progress, histograms with the
threshold, the sample table's server-side sorting, filtering and paging, the training page, and a silo's limits."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from scoring.calibration import EXPLANATIONS, fused_signals
from scoring.config import DEFAULT_FUSION, DEFAULT_SIGNALS
from storage import repository as repo
from tests.browser.conftest import screenshot
from tests.conftest import Coordinator, serve_coordinator
from tests.seed import SeededJob, seed_local_job, seed_scored_job, seed_training_job

pytestmark = pytest.mark.integration

ADMIN = "admin-secret-for-tests-0123456789abcdef"
FUSED = list(fused_signals(DEFAULT_SIGNALS))


class Env:
    def __init__(
        self, coordinator: Coordinator, job: SeededJob, train_id: str, calibrated: SeededJob, local_id: str
    ) -> None:
        self.coordinator, self.job, self.train_id, self.calibrated = coordinator, job, train_id, calibrated
        self.local_id = local_id
        self.url = coordinator.url
        self.api = httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)

    def sessions(self):
        return self.coordinator.app.state.clues.sessions()

    def scores(self, **params) -> dict:
        response = self.api.get(f"/v1/jobs/{self.job.job_id}/scores", params=params)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    with serve_coordinator(tmp_path_factory.mktemp("coord"), admin_token=ADMIN) as coordinator:
        with coordinator.app.state.clues.sessions() as session:
            job = seed_scored_job(session, per_silo=(120, 90, 150), checkpoints=3, name="pubmedqa noisy silos")
            train_id = seed_training_job(session, scoring_job_id=job.job_id)
            calibrated = seed_scored_job(session, per_silo=(40, 30, 50), name="calibrated", seed=3, calibrated=True)
            local_id = seed_local_job(session, gradients="exact", aggregate_epsilon=1.0)
        yield Env(coordinator, job, train_id, calibrated, local_id)


def login(page, url: str, token: str, path: str = "/ui/jobs") -> None:
    page.goto(url + path)
    assert "/ui/login" in page.url
    page.fill("input[name=token]", token)
    page.click("form button[type=submit]")
    page.wait_for_url(re.compile(re.escape(url + path) + "$"))


def settled(page) -> None:
    """Wait until the sample table shows the answer to its latest request (each action issues one at once)."""
    page.wait_for_function("document.getElementById('samples').dataset.state === 'ready'")


def column(page, cls: str) -> list[str]:
    return page.locator(f"#sample-table tbody td.{cls}").all_inner_texts()


def ids(page) -> list[str]:
    return page.locator("#sample-table tbody td:first-child").all_inner_texts()


def test_login_form_and_live_job_progress(env: Env, page) -> None:
    page.goto(env.url + "/ui/jobs")
    assert "/ui/login" in page.url
    page.fill("input[name=token]", "not-the-token")
    page.click("form button[type=submit]")
    assert page.locator(".error").inner_text() == "That token is not valid here."
    screenshot(page, "coordinator-login")
    assert "not-the-token" not in page.url

    with env.sessions() as session:  # a scoring job in progress, to watch
        running = seed_scored_job(session, silos=("silo1", "silo2"), per_silo=5, name="in progress")
        repo.update_job(session, job_id=running.job_id, status="scoring", progress=0.2, message="scored 2/10 parts")
        session.commit()
    login(page, env.url, ADMIN)
    assert ADMIN not in page.url and ADMIN not in page.content()
    cookie = next(c for c in page.context.cookies() if c["name"] == "clues_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    row = page.locator(f'tr[data-kind="scoring"][data-job="{running.job_id}"]')
    assert row.locator(".message").inner_text() == "scored 2/10 parts"
    assert page.locator(f'tr[data-kind="training"][data-job="{env.train_id}"]').count() == 1

    with env.sessions() as session:  # the page follows the job without a reload
        repo.update_job(session, job_id=running.job_id, progress=0.7, message="scored 7/10 parts")
        session.commit()
    page.wait_for_function(
        f"document.querySelector('tr[data-job=\"{running.job_id}\"] .message').textContent === 'scored 7/10 parts'"
    )
    width = row.locator(".progress .bar").evaluate("el => el.style.width")
    assert width == "70%"
    with env.sessions() as session:
        repo.update_job(session, job_id=running.job_id, status="failed", error="silo2: shard 3 holds NaN")
        session.commit()
    page.wait_for_selector(f'tr[data-job="{running.job_id}"] .err:not([hidden])')
    assert row.locator(".err").inner_text() == "silo2: shard 3 holds NaN"
    assert row.locator(".status").inner_text() == "failed"
    screenshot(page, "coordinator-jobs")
    with env.sessions() as session:
        repo.delete_job(session, job_id=running.job_id)
        session.commit()


def test_job_page_histograms_draw_the_threshold(env: Env, page) -> None:
    login(page, env.url, ADMIN, f"/ui/jobs/{env.job.job_id}")
    page.wait_for_function("document.querySelectorAll('.chart.hist[data-rendered]').length === 4")
    charts = page.locator(".chart.hist")
    assert sorted(charts.evaluate_all("els => els.map(e => e.dataset.silo)")) == [
        "__anchor__",
        "silo1",
        "silo2",
        "silo3",
    ]
    for i in range(4):
        chart = charts.nth(i)
        assert float(chart.get_attribute("data-threshold")) == pytest.approx(env.job.threshold)
        assert chart.locator(".shapelayer path").count() == 1  # the threshold line
        assert chart.locator(".bars path").count() > 0
    for chart in ("kept-chart", "parts-chart", "anchor-chart"):
        page.wait_for_selector(f"#{chart}[data-rendered]")
    summary = env.api.get(f"/v1/jobs/{env.job.job_id}/summary").json()
    for silo in ("silo1", "silo2", "silo3"):
        kept = page.locator(f'#silo-stats tr[data-silo="{silo}"] .kept-count').inner_text()
        assert int(kept) == summary["silos"][silo]["kept"] == sum(r["selected"] for r in env.scores(silo=silo)["rows"])
    page.wait_for_selector("#duplicates .cluster")
    assert page.locator("#duplicates .cluster").count() == 3
    settled(page)
    screenshot(page, "coordinator-job")


def test_sample_table_sorts_filters_and_pages_on_the_server(env: Env, page) -> None:
    login(page, env.url, ADMIN, f"/ui/jobs/{env.job.job_id}")
    settled(page)
    total = env.scores()["total"]
    assert page.locator("#samples").get_attribute("data-total") == str(total) == "400"  # 360 + 40 anchor samples
    top = env.scores(sort="score", order="desc", limit=50)["rows"]
    shown = [float(x) for x in column(page, "score")]  # 4 significant digits
    assert shown == pytest.approx([r["score"] for r in top], rel=1e-3)

    page.click("#sample-table th[data-sort=score]")  # again: ascending
    settled(page)
    low = env.scores(sort="score", order="asc", limit=50)["rows"]
    assert ids(page) == [r["sample_id"] for r in low]
    assert page.locator("#sample-table th[data-sort=score]").get_attribute("class") == "sorted-asc"

    page.click("#sample-table th[data-sort='part:1']")  # checkpoint 1's term, largest first
    settled(page)
    by_part = env.scores(sort="part:1", order="desc", limit=50)["rows"]
    assert ids(page) == [r["sample_id"] for r in by_part]

    page.select_option("select[name=silo]", "silo2")
    settled(page)
    page.select_option("select[name=kept]", "false")
    settled(page)
    dropped = env.scores(silo="silo2", kept="false", sort="part:1", order="desc")
    assert page.locator("#samples").get_attribute("data-total") == str(dropped["total"])
    assert 0 < dropped["total"] < 90
    texts = page.locator("#sample-table tbody tr").all_inner_texts()
    assert all("silo2" in t and "dropped" in t for t in texts)
    csv_href = page.locator("#csv-link").get_attribute("href")
    assert "silo=silo2" in csv_href and "kept=false" in csv_href

    page.select_option("select[name=silo]", "")
    settled(page)
    page.select_option("select[name=kept]", "")
    settled(page)
    page.fill("input[name=q]", "silo3-00001")
    page.click("#sample-filters button[type=submit]")
    settled(page)
    found = ids(page)
    assert found and all("silo3-00001" in i for i in found)
    assert len(found) == env.scores(q="silo3-00001")["total"] == 10

    page.fill("input[name=q]", "")
    page.click("#sample-filters button[type=submit]")
    settled(page)
    page.click(".pager .next")
    settled(page)
    assert page.locator(".pager .info").inner_text() == "51–100 of 400"
    second = env.scores(sort="part:1", order="desc", limit=50, offset=50)["rows"]
    assert ids(page) == [r["sample_id"] for r in second]
    screenshot(page, "coordinator-table")


def test_a_calibrated_job_shows_each_signal_and_why_samples_were_dropped(env: Env, page) -> None:
    """The sample table of a calibrated job: each raw value, each fused signal's calibrated z (sortable pages
    unchanged), and for a sample the threshold dropped the signal that flagged it, in words; the CSV link carries
    the filters and the charts name the calibrated score."""
    job_id = env.calibrated.job_id
    login(page, env.url, ADMIN, f"/ui/jobs/{job_id}")
    settled(page)
    assert page.locator("#score-kind").inner_text() == f"calibrated ({DEFAULT_FUSION}: {', '.join(FUSED)})"
    headers = page.locator("#sample-table thead th").all_inner_texts()
    for label in ("trace", "ℓ(y|x)", "ℓ(y|∅)", "tokens", *(f"z {s}" for s in FUSED), "Why dropped"):
        assert any(h.strip() == label for h in headers), (label, headers)
    page.wait_for_selector(".chart.hist[data-rendered]")
    assert "calibrated score" in page.locator(".chart.hist").first.inner_text()
    page.select_option("select[name=silo]", "silo3")
    settled(page)
    page.select_option("select[name=kept]", "false")
    settled(page)
    api = env.api.get(f"/v1/jobs/{job_id}/scores", params={"silo": "silo3", "kept": "false", "sort": "score",
                                                           "order": "desc", "limit": 50}).json()  # fmt: skip
    assert api["total"] > 0 and page.locator("#samples").get_attribute("data-total") == str(api["total"])
    for tr, row in zip(page.locator("#sample-table tbody tr").all(), api["rows"], strict=True):
        assert tr.get_attribute("data-id") == row["sample_id"]
        assert float(tr.locator("td.value-loss").inner_text()) == pytest.approx(row["values"]["loss"], rel=1e-3)
        assert float(tr.locator("td.z-pmi").inner_text()) == pytest.approx(row["z"]["pmi"], rel=5e-3, abs=5e-3)
        assert tr.locator("td.why").inner_text() == f"{EXPLANATIONS[row['flagged_by']]} ({row['flagged_by']})"
    assert "kept=false" in page.locator("#csv-link").get_attribute("href")
    screenshot(page, "coordinator-job-calibrated")


def test_training_page_shows_curves_and_results(env: Env, page) -> None:
    login(page, env.url, ADMIN, f"/ui/train/{env.train_id}")
    page.wait_for_selector("#loss-chart[data-rendered]")
    page.wait_for_selector("#metrics-chart[data-rendered]")
    losses = page.evaluate("document.getElementById('loss-chart').data.map(t => [t.name, t.y])")
    assert [name for name, _ in losses] == ["training loss", "held-out loss"]
    assert losses[0][1] == pytest.approx([2.8, 2.55, 2.3]) and losses[1][1] == pytest.approx([2.7, 2.5, 2.3])
    tasks = page.evaluate("document.getElementById('metrics-chart').data.map(t => [t.name, t.y])")
    assert len(tasks) == 1 and tasks[0][0] == "pubmedqa_accuracy"
    assert tasks[0][1] == pytest.approx([0.3, 0.4, 0.5])
    assert "pubmedqa_accuracy" in page.locator("#final-metrics").inner_text()
    assert page.locator("#rounds tbody tr").count() == 3
    flags = page.locator("#rounds tbody tr:nth-child(2) .flag")
    assert flags.count() == 1 and flags.get_attribute("data-kind") == "clipped"
    assert "clipped to 0.3" in flags.inner_text()
    assert page.locator("#rounds tbody tr:nth-child(1) .flag").count() == 0
    assert page.locator("#aggregation").inner_text() == "stack · fedavg"
    uploads = page.locator("#rounds tbody tr:nth-child(3) .uploads span")
    assert [uploads.nth(i).get_attribute("data-bytes") for i in range(3)] == ["1002", "2002", "3002"]
    assert "silo1: 1.0 kB" in uploads.nth(0).inner_text()
    assert "rank 72" in page.locator("#rounds tbody tr:nth-child(3)").inner_text()
    screenshot(page, "coordinator-train")


def test_a_silo_sees_only_its_own_rows(env: Env, page) -> None:
    token = env.job.tokens["silo1"]
    login(page, env.url, token, f"/ui/jobs/{env.job.job_id}")
    settled(page)
    assert page.locator(".who").inner_text() == "silo silo1"
    assert page.locator("#silo-stats tbody tr").all_inner_texts()[0].startswith("silo1")
    assert page.locator("#silo-stats tbody tr").count() == 1
    assert page.locator("#anchor-chart").count() == 0 and page.locator("#duplicates").count() == 0
    assert page.locator("#samples").get_attribute("data-total") == "120"
    assert set(page.locator("#sample-table tbody td:nth-child(2)").all_inner_texts()) == {"silo1"}
    status = page.evaluate(
        f"fetch('/v1/jobs/{env.job.job_id}/scores?silo=silo2', {{credentials: 'same-origin'}}).then(r => r.status)"
    )
    assert status == 403
    clusters = page.evaluate(
        f"fetch('/v1/jobs/{env.job.job_id}/duplicates/clusters', {{credentials: 'same-origin'}}).then(r => r.status)"
    )
    assert clusters == 403
    screenshot(page, "coordinator-job-as-silo")


def test_a_silo_local_job_shows_aggregates_only(env: Env, page) -> None:
    login(page, env.url, ADMIN, f"/ui/jobs/{env.local_id}")
    page.wait_for_function("document.querySelectorAll('.chart.hist[data-rendered]').length === 3")
    text = page.inner_text("#local-scoring")
    assert "Scored at the silos" in text and "exact gradients" in text and "ε = 1 differentially private" in text
    rows = page.locator("#silo-aggregates tbody tr")
    assert rows.count() == 3
    job = env.api.get(f"/v1/jobs/{env.local_id}").json()
    kept = {m["name"]: str(m["aggregate"]["kept"]) for m in job["silos"]}
    assert {r.get_attribute("data-silo"): r.locator(".kept-count").inner_text() for r in rows.all()} == kept
    assert page.locator("#samples").count() == 0 and page.locator("#silo-stats").count() == 0
    screenshot(page, "coordinator-local-job")
    page.context.clear_cookies()
    login(page, env.url, env.job.tokens["silo1"], f"/ui/jobs/{env.local_id}")  # a silo sees its own aggregate only
    page.wait_for_function("document.querySelectorAll('.chart.hist[data-rendered]').length === 1")
    assert [r.get_attribute("data-silo") for r in page.locator("#silo-aggregates tbody tr").all()] == ["silo1"]


def test_unknown_job_is_an_error_page(env: Env, page) -> None:
    login(page, env.url, ADMIN)
    response = page.goto(env.url + "/ui/jobs/" + "0" * 32)
    assert response.status == 404 and page.title() == "Error 404 · clues coordinator"
    assert "does not exist" in page.locator(".error").inner_text()


def test_every_page_works_under_its_content_security_policy(env: Env, strict_page) -> None:
    """The pages as served, policy enforced: charts draw, tables load, and nothing the policy forbids is attempted
    (a violation is a console error, which fails the test)."""
    page = strict_page
    login(page, env.url, ADMIN, f"/ui/jobs/{env.job.job_id}")
    page.wait_for_selector(".chart.hist[data-rendered]")
    page.wait_for_selector("#samples[data-state=ready]")
    page.goto(f"{env.url}/ui/jobs/{env.calibrated.job_id}")
    page.wait_for_selector("#samples[data-state=ready]")
    page.goto(f"{env.url}/ui/train/{env.train_id}")
    page.wait_for_selector("#loss-chart[data-rendered]")
    page.goto(f"{env.url}/ui/jobs")
    page.wait_for_selector("tr[data-kind=training]")
    assert "script-src 'self'" in page.request.get(f"{env.url}/ui/jobs").headers["content-security-policy"]
