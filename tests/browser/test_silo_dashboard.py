"""A silo's own dashboard (`clues agent dashboard`, served by its agent) in headless Chromium, against a real
coordinator: the silo's scores beside its own text, search by text, an override that reaches the coordinator as an
audited record (and shows in the coordinator's view), and what a silo cannot see."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from agent.dashboard import create_dashboard
from scoring.calibration import EXPLANATIONS, fused_signals
from scoring.config import DEFAULT_SIGNALS
from scoring.data import load_pubmedqa, write_samples
from tests.browser.conftest import screenshot
from tests.browser.test_coordinator_dashboard import login as coordinator_login
from tests.conftest import Coordinator, serve_asgi, serve_coordinator
from tests.scoring.test_data import PUBMEDQA
from tests.seed import SeededJob, seed_scored_job, seed_training_job

pytestmark = pytest.mark.integration


@dataclass
class Env:
    coordinator: Coordinator
    job: SeededJob
    other_job: str  # a job of silo2 and silo3 only
    train_job: str  # a stack training job of silo1 and silo2
    samples: dict  # silo -> list[Sample]
    dashboard: str  # silo1's dashboard URL

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.coordinator.url, headers={"Authorization": "Bearer admin-secret-for-tests-0123456789abcdef"}
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("silo")
    items = load_pubmedqa(PUBMEDQA, limit=24)
    samples = {"silo1": items[:12], "silo2": items[12:24]}
    with serve_coordinator(root / "coord") as coordinator:
        with coordinator.app.state.clues.sessions() as session:
            job = seed_scored_job(
                session,
                silos=("silo1", "silo2"),
                per_silo=12,
                sample_ids={s: [x.id for x in v] for s, v in samples.items()},
                noise=(0.4, 0.4),
                duplicates=1,
                name="pubmedqa",
                calibrated=True,  # the default score kind
            )
            other = seed_scored_job(session, silos=("silo2", "silo3"), per_silo=5, name="not silo1's")
            train = seed_training_job(session, scoring_job_id=job.job_id, silos=("silo1", "silo2"), kind="stack")
        data = root / "silo1.jsonl"
        write_samples(data, samples["silo1"])

        def make(url: str):
            return create_dashboard(coordinator.url, job.tokens["silo1"], data, root / "work", ttl_s=0.5)

        with serve_asgi(make, "silo dashboard") as (url, _):
            yield Env(coordinator, job, other.job_id, train, samples, url)


def login(page, env: Env, token: str, path: str = "/ui/jobs") -> None:
    page.goto(env.dashboard + path)
    assert "/ui/login" in page.url
    page.fill("input[name=token]", token)
    page.click("form button[type=submit]")
    page.wait_for_url(re.compile(re.escape(env.dashboard + path) + "$"))


def settled(page) -> None:
    page.wait_for_function("document.getElementById('samples').dataset.state === 'ready'")


def test_only_this_silos_token_logs_in(env: Env, page) -> None:
    page.goto(env.dashboard + "/ui/jobs")
    for wrong in ("nope", env.job.tokens["silo2"], "admin-secret-for-tests-0123456789abcdef"):
        page.fill("input[name=token]", wrong)
        page.click("form button[type=submit]")
        assert page.locator(".error").inner_text() == "That is not this silo's token."
    login(page, env, env.job.tokens["silo1"])
    assert page.locator(".who").inner_text() == "silo silo1"
    jobs = page.locator("tr[data-kind=scoring]")
    assert jobs.count() == 1 and "pubmedqa" in jobs.inner_text()  # not the silo2/silo3 job
    training = page.locator(f'#training-jobs tr[data-job="{env.train_job}"]')
    assert training.get_attribute("data-aggregation") == "stack"
    assert "stack · fedavg · rank 8" in training.inner_text()  # its own rank (the job's lora.rank)
    sent = training.locator(".uploads span")  # silo1's own update of each round, not silo2's
    assert [sent.nth(i).get_attribute("data-bytes") for i in range(sent.count())] == ["1000", "1001", "1002"]
    screenshot(page, "silo-jobs")


def test_scores_beside_the_silos_own_text_and_search(env: Env, page) -> None:
    login(page, env, env.job.tokens["silo1"], f"/ui/jobs/{env.job.job_id}")
    page.wait_for_selector("#histogram[data-rendered]")
    assert float(page.get_attribute("#histogram", "data-threshold")) == pytest.approx(env.job.threshold)
    assert page.locator("#histogram .shapelayer path").count() == 1
    settled(page)
    assert page.locator("#samples").get_attribute("data-total") == "12"
    by_id = {s.id: s for s in env.samples["silo1"]}
    for row in page.locator("#sample-table tbody tr").all():
        sample = by_id[row.get_attribute("data-id")]  # only silo1's samples, each beside its own text
        assert row.locator("td.resp").inner_text()[:40] == sample.response[:40]
    target = env.samples["silo1"][5]
    word = max(target.prompt[-1][1].split(), key=len)  # a distinctive word of its question
    page.fill("input[name=q]", word)
    page.click("#sample-filters button[type=submit]")
    settled(page)
    found = page.locator("#sample-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.id)")
    assert target.id in found
    assert all(word.lower() in (by_id[i].prompt[-1][1] + by_id[i].response).lower() for i in found)
    screenshot(page, "silo-job-search")


def test_each_signal_and_why_a_dropped_sample_was_dropped(env: Env, page) -> None:
    """The calibrated job's table shows each raw value and each fused signal's z, as the coordinator sent them, and
    for every sample the threshold dropped, the signal that flagged it in words."""
    login(page, env, env.job.tokens["silo1"], f"/ui/jobs/{env.job.job_id}")
    settled(page)
    assert page.locator("#score-kind").inner_text().startswith("calibrated (")
    headers = page.locator("#sample-table thead th").all_inner_texts()
    fused = list(fused_signals(DEFAULT_SIGNALS))
    for label in ("trace", "ℓ(y|x)", "ℓ(y|∅)", "tokens", *(f"z {s}" for s in fused), "Why dropped"):
        assert any(h.strip() == label for h in headers), (label, headers)
    with httpx.Client(
        base_url=env.coordinator.url, headers={"Authorization": f"Bearer {env.job.tokens['silo1']}"}
    ) as c:
        rows = {r["sample_id"]: r for r in c.get(f"/v1/jobs/{env.job.job_id}/scores").json()["rows"]}
    for tr in page.locator("#sample-table tbody tr").all():
        row = rows[tr.get_attribute("data-id")]
        assert tr.locator("td.value-n_tokens").inner_text() == str(row["values"]["n_tokens"])
        assert float(tr.locator("td.z-ifd").inner_text()) == pytest.approx(row["z"]["ifd"], rel=5e-3, abs=5e-3)
        why = tr.locator("td.why").inner_text()
        assert why == ("" if row["auto_selected"] else f"{EXPLANATIONS[row['flagged_by']]} ({row['flagged_by']})")
    assert any(not r["auto_selected"] for r in rows.values())
    screenshot(page, "silo-job-signals")


def test_an_override_round_trips_to_the_coordinator(env: Env, page, browser) -> None:
    login(page, env, env.job.tokens["silo1"], f"/ui/jobs/{env.job.job_id}")
    settled(page)
    page.select_option("select[name=kept]", "false")
    settled(page)
    row = page.locator("#sample-table tbody tr").first
    sample_id = row.get_attribute("data-id")
    row.locator("button.override-btn").click()
    dialog = page.locator("#override-dialog")
    assert dialog.is_visible()
    dialog.locator("select[name=decision]").select_option("keep")
    dialog.locator("textarea[name=reason]").fill("clinician review: the answer is correct")
    screenshot(page, "silo-override-dialog")
    dialog.locator("button[type=submit]").click()
    page.wait_for_selector("#override-dialog", state="hidden")
    page.select_option("select[name=kept]", "true")
    settled(page)
    kept_row = page.locator(f'#sample-table tbody tr[data-id="{sample_id}"]')
    assert "clinician review" in kept_row.locator(".override-note").inner_text()
    page.wait_for_function("document.querySelectorAll('#overrides tbody tr td').length > 1")
    assert "clinician review: the answer is correct" in page.locator("#overrides").inner_text()
    screenshot(page, "silo-job-overridden")

    with env.admin() as admin:  # the coordinator holds the audited record and the decision in force
        rows = admin.get(f"/v1/jobs/{env.job.job_id}/scores", params={"silo": "silo1", "q": sample_id}).json()["rows"]
        assert [(r["selected"], r["auto_selected"], r["override"]["actor"]) for r in rows] == [(True, False, "silo1")]
        log = admin.get(f"/v1/jobs/{env.job.job_id}/overrides").json()["rows"]
        assert (log[0]["sample_id"], log[0]["decision"], log[0]["reason"], log[0]["previous"]) == (
            sample_id, "keep", "clinician review: the answer is correct", False,
        )  # fmt: skip

    context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)  # the coordinator's view
    coordinator_page = context.new_page()
    coordinator_login(
        coordinator_page, env.coordinator.url, "admin-secret-for-tests-0123456789abcdef", f"/ui/jobs/{env.job.job_id}"
    )
    coordinator_page.wait_for_function("document.querySelectorAll('#overrides tbody tr td').length > 1")
    text = coordinator_page.locator("#overrides").inner_text()
    assert sample_id in text and "clinician review" in text and "dropped → kept" in text
    screenshot(coordinator_page, "coordinator-job-after-override")
    context.close()


def test_a_silo_cannot_see_another_silos_data(env: Env, page) -> None:
    login(page, env, env.job.tokens["silo1"])
    status = page.evaluate(f"fetch('/api/jobs/{env.other_job}/samples').then(r => r.status)")
    assert status == 404  # the coordinator answers 404 for a job silo1 is not in
    response = page.goto(f"{env.dashboard}/ui/jobs/{env.other_job}")
    assert response.status == 404
    data = page.evaluate(f"fetch('/api/jobs/{env.job.job_id}/samples?limit=100').then(r => r.json())")
    assert {r["silo"] for r in data["rows"]} == {"silo1"} and data["total"] == 12
    silo2_ids = {s.id for s in env.samples["silo2"]}
    assert not silo2_ids & {r["sample_id"] for r in data["rows"]}
    summary = page.evaluate(f"fetch('/api/jobs/{env.job.job_id}/summary').then(r => r.json())")
    assert list(summary["silos"]) == ["silo1"] and summary["anchor_scores"] == []


def test_the_pages_work_under_their_content_security_policy(env: Env, strict_page) -> None:
    """The silo's pages with the policy enforced: the histogram draws and the table loads, no violation."""
    page = strict_page
    login(page, env, env.job.tokens["silo1"], f"/ui/jobs/{env.job.job_id}")
    page.wait_for_selector("#histogram[data-rendered]")
    page.wait_for_selector("#samples[data-state=ready]")
    assert "frame-ancestors 'none'" in page.request.get(env.dashboard + "/ui/jobs").headers["content-security-policy"]
