"""The service for real: the API under uvicorn and Celery workers as separate processes, on real Redis (and once on
real PostgreSQL), two silo agents with the tiny model over HTTP; the whole round trip from the CLI, embedded and on
Redis + PostgreSQL; and a worker killed with SIGKILL while it scores.

Every test compares the masks the silos receive with what the scoring engine computes in-process on the same data,
for the default score kind (calibrated: the trace and the loss signals against the anchor samples).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.client import AdminClient, SiloClient
from agent.loop import AgentOptions, run_agent
from clues.admin import create_job_from_run, job_spec_from_run
from scoring.calibration import EXPLANATIONS, fused_signals
from scoring.config import DEFAULT_SIGNALS
from tests.conftest import SILOS, TinyData, expected_calibration, expected_exact, expected_scores
from tests.integration.conftest import Service, each_silo

pytestmark = pytest.mark.integration


def _run_agents(
    world: TinyData, tokens: dict[str, str], service: Service, job_id: str, work: Path
) -> dict[str, dict[str, dict]]:
    """Both silos' agents at once (each waits for the other's upload before scores exist); their written scores."""

    def one(silo: str):
        with SiloClient(service.url, tokens[silo]) as client:
            return run_agent(
                client,
                job_id,
                world.data_file(silo, work / silo),
                work_dir=work / silo / "agent",
                options=AgentOptions(rows_per_shard=4, poll_interval=0.5, timeout=300),
            )

    each_silo(one)
    return {silo: _read_scores(work / silo / f"{silo}.scores.jsonl") for silo in SILOS}


def _read_scores(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def _assert_matches_engine(world: TinyData, written: dict[str, dict[str, dict]], spec: dict) -> None:
    """The silos' written scores and masks are the engine's for the job's score kind (the calibrated default)."""
    assert spec["score"] == "calibrated" and spec["signals"] == list(DEFAULT_SIGNALS)
    table = expected_scores(world, spec["threshold"], spec)
    for silo in SILOS:
        for sid, score, keep in zip(table.ids, table.scores, table.selected, strict=True):
            if sid in written[silo]:
                assert written[silo][sid]["score"] == pytest.approx(score, rel=1e-6, abs=1e-9)
                assert written[silo][sid]["selected"] == bool(keep)
        assert set(written[silo]) == {s.id for s in world.samples[silo]}


def _create_job(world: TinyData, service: Service, tokens: dict[str, str], **over) -> str:
    """Register the silos (their tokens go into ``tokens``) and create, fill and open a job from the tiny run."""
    spec = job_spec_from_run(
        world.run_dir,
        name="it",
        silos=list(SILOS),
        precondition=True,
        similarity="cosine",
        threshold={"kind": "mean-anchor"},
        auto_score=True,
    )
    spec.update(over)
    with AdminClient(service.url, service.admin_token) as admin:
        for silo in SILOS:
            tokens[silo] = admin.register_silo(silo)["token"]
        return create_job_from_run(admin, world.run_dir, world.anchors_file, spec)["id"]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_round_trip_on_redis_with_a_real_worker(tiny_data, service_factory, database, tmp_path):
    service = service_factory(database=database, redis=True)
    service.start_api()
    service.start_worker("w1")
    tokens: dict[str, str] = {}
    job_id = _create_job(tiny_data, service, tokens)
    written = _run_agents(tiny_data, tokens, service, job_id, tmp_path)
    with AdminClient(service.url, service.admin_token) as admin:
        job = admin.job(job_id)
        _assert_matches_engine(tiny_data, written, job["spec"])
        assert job["status"] == "done" and job["anchor_status"] == "done"
        scores = admin.scores(job_id)
        owners = {r["silo"] for r in scores["rows"]}
        assert owners == {*SILOS, "__anchor__"}
        _assert_signal_columns(tiny_data, job["spec"], scores["rows"])
        csv = admin.http.get(f"/v1/jobs/{job_id}/scores.csv")
        assert csv.status_code == 200 and csv.text.splitlines()[0].endswith(",flagged_by,flag_reason")
    assert service.api_log_has('"event": "request"')
    _assert_owner_only(service.root / "data")


@pytest.mark.parametrize("gradients", ["projected", "exact"])
def test_a_silo_local_job_on_redis_with_a_real_worker(tiny_data, service_factory, tmp_path, gradients):
    """The private mode for real: the worker process publishes the reference (from projected anchors, or from
    their exact gradients streamed), each agent scores its own samples and sends only its aggregate; the masks are
    the engine's, and no silo sample id is in any file of the coordinator."""
    service = service_factory(database="sqlite", redis=True)
    service.start_api()
    service.start_worker("w1")
    tokens: dict[str, str] = {}
    job_id = _create_job(tiny_data, service, tokens, scoring_mode="local", gradients=gradients)
    written = _run_agents(tiny_data, tokens, service, job_id, tmp_path)
    with AdminClient(service.url, service.admin_token) as admin:
        job = admin.job(job_id)
        assert job["status"] == "done" and job["spec"]["scoring_mode"] == "local"
        assert job["spec"]["gradients"] == gradients
        if gradients == "projected":
            _assert_matches_engine(tiny_data, written, job["spec"])
        else:  # what the coordinator would compute with every unprojected gradient in hand
            _, _, expected, _ = expected_exact(tiny_data)
            for silo in SILOS:
                ids = [s.id for s in tiny_data.samples[silo]]
                got = [written[silo][i]["score"] for i in ids]
                assert got == pytest.approx(expected[silo].scores.tolist(), rel=1e-5, abs=1e-7)
                assert [written[silo][i]["selected"] for i in ids] == expected[silo].selected.tolist()
        assert admin.scores(job_id)["rows"] == []
        assert sum(m["aggregate"]["kept"] for m in job["silos"]) == sum(
            r["selected"] for rows in written.values() for r in rows.values()
        )
    ids = {s.id.encode() for silo in SILOS for s in tiny_data.samples[silo]}
    for path in (service.root / "data").rglob("*"):  # the database, the blobs, the broker's files, the work files
        if path.is_file():
            data = path.read_bytes()
            assert not [i for i in ids if i in data], f"{path} holds a silo sample id"


def _assert_owner_only(data_dir: Path) -> None:
    """The database, the broker files, the blobs (anchor texts, adapters) and the work files: nobody but the
    coordinator's user may read them (files 0600, directories 0700)."""
    shared = [p for p in (data_dir, *data_dir.rglob("*")) if p.stat().st_mode & 0o077]
    assert shared == [], [f"{p}: {oct(p.stat().st_mode & 0o777)}" for p in shared]


def _assert_signal_columns(world: TinyData, spec: dict, rows: list[dict]) -> None:
    """Every row (the anchor samples' too) carries its raw values, each fused signal's z as the engine computes
    them, and the signal that flagged it, in words."""
    table, cand, anch = expected_calibration(world, spec["threshold"], spec)
    fused = list(fused_signals(spec["signals"]))
    by_id = {(r["silo"], r["sample_id"]): r for r in rows}
    for i, key in enumerate(zip(table.silos, table.ids, strict=True)):
        row = by_id[key]
        assert sorted(row["values"]) == sorted(["trace", "loss", *spec["signals"]]) and list(row["z"]) == fused
        assert [row["z"][s] for s in fused] == pytest.approx(list(cand.z[i]), rel=1e-5, abs=1e-5)
        assert row["flagged_by"] == cand.flagged_by[i] and row["flag_reason"] == EXPLANATIONS[row["flagged_by"]]
    anchors = [r for r in rows if r["silo"] == "__anchor__"]
    assert sorted(r["score"] for r in anchors) == pytest.approx(sorted(anch.scores), rel=1e-5, abs=1e-9)
    assert all(r["z"] is not None and r["flagged_by"] in fused for r in anchors)


@pytest.mark.parametrize("servers", ["embedded", "redis+postgresql"])
def test_round_trip_from_the_cli(tiny_data, tmp_path, request, servers):
    """All via the CLI: ``clues coordinator up``, ``clues admin ...``, two ``clues agent run``. Embedded: no Redis and
    no PostgreSQL (SQLite metadata, SQLite broker); then the same commands with CLUES_REDIS_URL and
    CLUES_DATABASE_URL pointing at the real servers."""
    data_dir = tmp_path / "coord"
    port = Service.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUES_")}
    env |= {
        "CLUES_DATA_DIR": str(data_dir),
        "CLUES_ADMIN_TOKEN": "admin-secret-for-tests-0123456789abcdef",
        "HF_HUB_OFFLINE": "1",
    }
    if servers != "embedded":
        env |= {
            "CLUES_REDIS_URL": request.getfixturevalue("redis_url"),
            "CLUES_DATABASE_URL": request.getfixturevalue("postgres_url"),
        }
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "clues", "coordinator", "up", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    try:
        Service.wait_healthy(url, up, tmp_path / "up.log")
        cli_env = env | {"CLUES_COORDINATOR": url}

        def clues(*args: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "clues", *args], env=cli_env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        tokens = {silo: json.loads(clues("admin", "silo-add", silo))["token"] for silo in SILOS}
        job_id = clues(
            "admin", "job-create", "--run", str(tiny_data.run_dir), "--anchors", str(tiny_data.anchors_file),
            "--silos", ",".join(SILOS),
        ).strip()  # fmt: skip
        agents = []
        for silo in SILOS:
            data = tiny_data.data_file(silo, tmp_path / silo)
            agents.append(
                subprocess.Popen(
                    [sys.executable, "-m", "clues", "agent", "run", "--job", job_id, "--data", str(data),
                     "--poll-interval", "0.5", "--timeout", "300", "--rows-per-shard", "4"],
                    env=cli_env | {"CLUES_TOKEN": tokens[silo]},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )  # fmt: skip
        for proc in agents:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
        written = {silo: _read_scores(tmp_path / silo / f"{silo}.scores.jsonl") for silo in SILOS}
        spec = json.loads(clues("admin", "job-show", job_id))["spec"]
        _assert_matches_engine(tiny_data, written, spec)
        retry = subprocess.run(
            [sys.executable, "-m", "clues", "admin", "job-retry", job_id], env=cli_env, capture_output=True, text=True
        )
        assert retry.returncode != 0 and "nothing to retry" in retry.stderr  # a done job waits for nothing
        embedded_files = (data_dir / "broker.sqlite").is_file() and (data_dir / "clues.db").is_file()
        assert embedded_files == (servers == "embedded")
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()


def _wait_mid_scoring(admin: AdminClient, job_id: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        job = admin.job(job_id)
        if job["status"] == "scoring" and job["message"].startswith("scored "):
            return
        assert job["status"] not in ("done", "failed"), job
        assert time.monotonic() < deadline, "scoring never started"
        time.sleep(0.1)


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_a_worker_killed_while_scoring_is_replaced(tiny_data, service_factory, tmp_path, broker):
    """SIGKILL the only worker in the middle of scoring (slowed down per shard part to make the window wide), with
    every setting at its default; a new worker finishes the job, with the same scores, within a few minutes.

    On the embedded broker (kombu's SQLite transport) the killed worker's message is gone for good; on Redis it
    would come back only after the 1-hour visibility timeout. Either way the step's lease goes stale (45 s) and the
    API's reaper sends it again."""
    service = service_factory(database="sqlite", redis=broker == "redis")
    service.start_api()
    slow = service.start_worker("slow", slow_parts_s=1.0)
    tokens: dict[str, str] = {}
    job_id = _create_job(tiny_data, service, tokens)
    written: dict = {}
    runner = threading.Thread(target=lambda: written.update(_run_agents(tiny_data, tokens, service, job_id, tmp_path)))
    runner.start()
    with AdminClient(service.url, service.admin_token) as admin:
        _wait_mid_scoring(admin, job_id)
        slow.kill()  # SIGKILL: no warm shutdown, no acknowledgement, no end to the lease
        slow.wait(30)
        killed_at = time.monotonic()
        job = admin.job(job_id)
        assert job["status"] == "scoring"
        step = next(s for s in job["steps"] if s["task"] == "clues.score_job")
        assert step["state"] == "running" and step["holder"]
        service.start_worker("w2")
        runner.join(600)
        assert not runner.is_alive()
        assert time.monotonic() - killed_at < 180, "recovery took longer than the defaults promise"
        job = admin.job(job_id)
        assert job["status"] == "done", job
        step = next(s for s in job["steps"] if s["task"] == "clues.score_job")
        assert (step["state"], step["lost"]) == ("done", 1), step
        assert len(admin.scores(job_id)["rows"]) == sum(len(tiny_data.samples[s]) for s in (*SILOS, "anchors"))
        _assert_matches_engine(tiny_data, written, job["spec"])
    assert np.isfinite([r["score"] for rows in written.values() for r in rows.values()]).all()


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_the_api_killed_mid_job_and_restarted_loses_nothing(tiny_data, service_factory, tmp_path, broker):
    """SIGKILL the API while its worker scores, then start it again (defaults): the worker's step goes on, the new
    API re-queues nothing that is alive, and the job ends with the engine's scores."""
    service = service_factory(database="sqlite", redis=broker == "redis")
    service.start_api()
    service.start_worker("slow", slow_parts_s=0.5)
    tokens: dict[str, str] = {}
    job_id = _create_job(tiny_data, service, tokens)
    written: dict = {}
    runner = threading.Thread(target=lambda: written.update(_run_agents(tiny_data, tokens, service, job_id, tmp_path)))
    runner.start()
    with AdminClient(service.url, service.admin_token) as admin:
        _wait_mid_scoring(admin, job_id)
    service.kill_api()  # the agents' clients retry refused connections until it is back
    service.start_api(same_port=True)
    runner.join(600)
    assert not runner.is_alive()
    with AdminClient(service.url, service.admin_token) as admin:
        job = admin.job(job_id)
        assert job["status"] == "done", job
        step = next(s for s in job["steps"] if s["task"] == "clues.score_job")
        assert (step["state"], step["attempt"], step["lost"]) == ("done", 1, 0), step
        _assert_matches_engine(tiny_data, written, job["spec"])
