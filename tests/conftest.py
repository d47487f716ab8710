"""Shared fixtures: seeding, offline mode, and tiny-model builders."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


def tiny_lora_model(targets=("q_proj", "v_proj"), rank=4, seed=0, dtype="float32"):
    """A tiny random Llama with LoRA whose B matrices are random too (so every gradient is non-zero)."""
    from scoring.config import LoraSettings
    from scoring.models import attach_lora, load_base_model

    lm = load_base_model(f"tiny:{seed}", dtype=dtype)
    model = attach_lora(
        lm.model, LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=tuple(targets)), random_b=True
    )
    model.eval()
    return model, lm.tokenizer


@pytest.fixture
def tiny_model():
    return tiny_lora_model()


# --- a real coordinator over HTTP (uvicorn in a background thread; tasks run in-process) ---


@dataclass
class Coordinator:
    """A running coordinator: ``url`` (``http://127.0.0.1:<port>``), its ``settings``, ``admin_token`` and ``app``.

    Tasks run in-process (`inline_enqueue`); ``errors`` collects exceptions they raised (the job is failed too)."""

    url: str
    settings: Any
    admin_token: str
    app: Any
    errors: list[BaseException] = field(default_factory=list)
    tasks: list[threading.Thread] = field(default_factory=list)

    def join_tasks(self, timeout: float = 120.0) -> None:
        """Wait for the background tasks started so far."""
        for thread in list(self.tasks):
            thread.join(timeout)


def inline_enqueue(settings, coordinator: Coordinator):
    """``enqueue(task, job_id)`` running `workers.pipeline` in this process, as `workers.tasks` would: the anchor
    projection at once, scoring (then the near-duplicate report) in a thread so that the request that queued it
    (a silo's ``complete``, the admin's ``score``) answers first. A failure fails the job, as a worker would."""
    from workers import names, pipeline

    resources: list = []

    def res():
        if not resources:
            resources.append(pipeline.Resources.from_settings(settings))
        return resources[0]

    def project(job_id: str) -> None:
        try:
            pipeline.project_anchors(res(), job_id)
        except Exception as exc:
            coordinator.errors.append(exc)
            pipeline.set_anchor_failed(res(), job_id, str(exc))

    def score(job_id: str) -> None:
        try:
            pipeline.score_job(res(), job_id)
            pipeline.find_near_duplicates(res(), job_id)
        except Exception as exc:
            coordinator.errors.append(exc)
            pipeline.fail_job(res(), job_id, str(exc))

    def enqueue(task: str, job_id: str) -> None:
        if task == names.PROJECT_ANCHORS:
            project(job_id)
        elif task == names.SCORE_JOB:
            thread = threading.Thread(target=score, args=(job_id,), name=f"score-{job_id[:8]}", daemon=True)
            coordinator.tasks.append(thread)
            thread.start()
        elif task == names.NEAR_DUPLICATES:
            pipeline.find_near_duplicates(res(), job_id)
        else:
            raise ValueError(f"unknown task {task!r}")

    return enqueue


@contextmanager
def serve_coordinator(data_dir: Path, admin_token: str = "admin-secret") -> Iterator[Coordinator]:
    """The real app (SQLite + blob store under ``data_dir``) served by uvicorn on a free 127.0.0.1 port."""
    import uvicorn

    from app.config import AppSettings
    from app.main import create_app

    settings = AppSettings(data_dir=Path(data_dir), admin_token=admin_token, log_json=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    coordinator = Coordinator(f"http://127.0.0.1:{port}", settings, admin_token, None)
    coordinator.app = create_app(settings, enqueue=inline_enqueue(settings, coordinator))
    server = uvicorn.Server(uvicorn.Config(coordinator.app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="coordinator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the coordinator did not start")
        time.sleep(0.02)
    try:
        yield coordinator
    finally:
        coordinator.join_tasks()
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def coordinator(tmp_path) -> Iterator[Coordinator]:
    """A real coordinator over HTTP for this test (see `serve_coordinator`); admin token ``admin-secret``."""
    with serve_coordinator(tmp_path / "coord") as running:
        yield running


# --- one tiny warmup run with anchors and two silos' data, shared by the agent and integration tests ---

SILOS = ("a", "b")


@dataclass
class TinyData:
    """A tiny-model warmup run (2 checkpoints, SJLT k=256), an anchors file and the samples of silos a and b."""

    root: Path
    run_dir: Path
    anchors_file: Path
    samples: dict  # "anchors", "a", "b" -> list[Sample]

    def data_file(self, silo: str, dest: Path) -> Path:
        """A fresh copy of a silo's samples under ``dest`` (the agent writes its outputs next to it)."""
        from scoring.data import write_samples

        path = Path(dest) / f"{silo}.jsonl"
        write_samples(path, self.samples[silo])
        return path


def build_tiny_data(root: Path) -> TinyData:
    from scoring.config import LoraSettings, TrainingConfig
    from scoring.data import load_pubmedqa, write_samples
    from scoring.steps import run_warmup
    from tests.scoring.test_data import PUBMEDQA

    items = load_pubmedqa(PUBMEDQA, limit=24)
    samples = {"anchors": items[:6], "a": items[6:15], "b": items[15:24]}
    write_samples(root / "anchors.jsonl", samples["anchors"])
    run_warmup(
        "tiny:0",
        items[6:24],
        root / "run",
        lora=LoraSettings(rank=4, alpha=8.0),
        training=TrainingConfig(epochs=1, batch_size=6, lr=1e-2, warmup_ratio=0.0, num_checkpoints=2),
        projection={"kind": "sjlt", "dim": 256, "seed": 3},
        max_len=96,
    )
    return TinyData(root, root / "run", root / "anchors.jsonl", samples)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    return build_tiny_data(tmp_path_factory.mktemp("tiny-data"))


def expected_scores(data: TinyData, threshold: dict | None = None):
    """What the scoring engine computes in-process for silos a and b (mean-anchor threshold by default): the
    reference every service test compares the silos' masks with."""
    import tempfile

    from scoring.config import TraceConfig
    from scoring.selection import apply_threshold, threshold_from_dict
    from scoring.steps import ProjectOptions, project_samples, score_dirs

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name in ("anchors", *SILOS):
            dirs[name] = Path(tmp) / name
            dirs[name].mkdir()
            opts = ProjectOptions(batch_size=8, precondition=True)
            project_samples(data.run_dir, data.samples[name], dirs[name], anchor=name == "anchors", opts=opts)
        table, anchor_table = score_dirs({s: dirs[s] for s in SILOS}, dirs["anchors"], TraceConfig())
    return apply_threshold(table, threshold_from_dict(threshold or {"kind": "mean-anchor"}), anchor_table)
