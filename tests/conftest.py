"""Shared fixtures: seeding, offline mode, and tiny-model builders."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from workers import names

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

    Steps run in-process (`inline_send`); ``errors`` collects the exceptions they raised: bugs (which fail the
    job too) and transient errors (which leave the step queued), as a worker's log would show them."""

    url: str
    settings: Any
    admin_token: str
    app: Any
    errors: list[BaseException] = field(default_factory=list)
    tasks: list[threading.Thread] = field(default_factory=list)

    def join_tasks(self, timeout: float = 120.0) -> None:
        """Wait for the background tasks started so far (deadline timers still waiting are cancelled)."""
        for thread in list(self.tasks):
            if not getattr(thread, "fired", True):  # a deadline timer still waiting
                continue
            thread.join(timeout)

    def cancel_timers(self) -> None:
        for thread in self.tasks:
            if isinstance(thread, threading.Timer):
                thread.cancel()


INLINE_AT_ONCE = frozenset({names.PROJECT_ANCHORS, names.NEAR_DUPLICATES})
"""Steps the in-process runner runs in the sending thread (the others run in a thread of their own)."""


def inline_send(settings, coordinator: Coordinator):
    """``send(task, args, countdown)`` for `app.main.create_app` that runs each step in this process through
    `workers.graph.execute`: the same lease, error handling and follow-ups as a Celery worker. The anchor projection
    and the near-duplicate report run in the sending thread; the others in a thread, after ``countdown``, so that the
    request that queued them (a silo's ``complete``, the admin's ``score``) answers first. What a step raises (a
    transient error, a bug) lands in ``coordinator.errors``."""
    from workers import graph, pipeline
    from workers.steps import Dispatcher

    worker: list = []

    def resources_and_dispatcher():
        if not worker:
            res = pipeline.Resources.from_settings(settings)
            worker.append((res, Dispatcher(res.sessions, send, settings)))
        return worker[0]

    def run(task: str, args: list) -> None:
        res, dispatcher = resources_and_dispatcher()
        try:
            graph.execute(dispatcher, res, task, args, f"inline:{threading.get_ident()}")
        except Exception as exc:
            coordinator.errors.append(exc)

    def send(task: str, args: list, countdown: float | None) -> None:
        graph.GRAPH[task]  # an unknown task fails the caller, as the broker's worker would never run it
        if task in INLINE_AT_ONCE and not countdown:
            run(task, args)
            return

        def fire() -> None:
            thread.fired = True
            run(task, args)

        thread = threading.Timer(countdown or 0.0, fire)
        thread.name, thread.daemon, thread.fired = f"{task.rsplit('.', 1)[-1]}-{args[0][:8]}", True, False
        coordinator.tasks.append(thread)
        thread.start()

    return send


@contextmanager
def serve_asgi(make_app: Callable[[str], Any], name: str = "server") -> Iterator[tuple[str, Any]]:
    """``make_app(url)``'s app served by uvicorn on a free 127.0.0.1 port in a thread: yields ``(url, app)``."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = make_app(url)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the {name} did not start")
        time.sleep(0.02)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def serve_coordinator(
    data_dir: Path, admin_token: str = "admin-secret-for-tests-0123456789abcdef", **more: Any
) -> Iterator[Coordinator]:
    """The real app (SQLite + blob store under ``data_dir``) served by uvicorn on a free 127.0.0.1 port; ``more``:
    other `AppSettings`."""
    from app.config import AppSettings
    from app.main import create_app

    settings = AppSettings(data_dir=Path(data_dir), admin_token=admin_token, log_json=False, **more)
    coordinator = Coordinator("", settings, admin_token, None)

    def make(url: str):
        coordinator.url = url
        coordinator.app = create_app(settings, send=inline_send(settings, coordinator))
        return coordinator.app

    with serve_asgi(make, "coordinator"):
        try:
            yield coordinator
        finally:
            coordinator.cancel_timers()
            coordinator.join_tasks()


@pytest.fixture
def coordinator(tmp_path) -> Iterator[Coordinator]:
    """A real coordinator over HTTP for this test (see `serve_coordinator`); admin token
    ``admin-secret-for-tests-0123456789abcdef``."""
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
    from scoring.workflow import run_warmup
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


def expected_scores(data: TinyData, threshold: dict | None = None, score: dict | None = None):
    """What the scoring engine computes in-process for silos a and b (mean-anchor threshold by default): the
    reference every service test compares the silos' masks with. ``score``: the job spec's ``score``, ``signals``,
    ``fusion`` and ``signal_checkpoint`` (default: the pure trace score)."""
    return expected_calibration(data, threshold, score)[0]


def expected_calibration(data: TinyData, threshold: dict | None = None, score: dict | None = None):
    """``(table, candidates, anchors)``: `expected_scores`' table, and for a calibrated job the silos' and the anchor
    samples' `scoring.calibration.CalibratedScores` (None for a trace job), computed from projection directories
    with the engine's own functions (`scoring.workflow`, `scoring.calibration`), not the worker's."""
    import dataclasses
    import tempfile

    import numpy as np

    from scoring.calibration import calibrate, fused_signals
    from scoring.config import TraceConfig
    from scoring.io import load_projection
    from scoring.selection import apply_threshold, threshold_from_dict
    from scoring.workflow import ProjectOptions, project_samples, score_dirs

    how = {"score": "trace", "signals": [], "fusion": None, "signal_checkpoint": None, **(score or {})}
    calibrated = anchors = None
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name in ("anchors", *SILOS):
            dirs[name] = Path(tmp) / name
            dirs[name].mkdir()
            opts = ProjectOptions(
                batch_size=8,
                precondition=True,
                signals=tuple(how["signals"]),
                signal_checkpoint=how["signal_checkpoint"],
            )
            project_samples(data.run_dir, data.samples[name], dirs[name], anchor=name == "anchors", opts=opts)
        table, anchor_table = score_dirs({s: dirs[s] for s in SILOS}, dirs["anchors"], TraceConfig())
        if how["score"] == "calibrated":
            t = how["signal_checkpoint"] if how["signal_checkpoint"] is not None else 1  # the tiny run's last

            def values(name: str, ids) -> dict:
                file = load_projection(dirs[name] / f"ckpt-{t:03d}.candidate.safetensors")
                at = {sid: i for i, sid in enumerate(file.proj.ids)}
                rows = [at[i] for i in ids]
                return {"loss": file.losses[rows], **{k: v[rows] for k, v in file.signals.items()}}

            per_silo = [values(s, [i for i, o in zip(table.ids, table.silos, strict=True) if o == s]) for s in SILOS]
            cand = {k: np.concatenate([v[k] for v in per_silo]) for k in per_silo[0]}  # silos in table order
            anch = values("anchors", anchor_table.ids)
            calibrated, anchors = calibrate(
                {**cand, "trace": table.scores},
                {**anch, "trace": anchor_table.scores},
                fused_signals(how["signals"]),
                how["fusion"],
            )
            table = dataclasses.replace(table, scores=calibrated.scores)
            anchor_table = dataclasses.replace(anchor_table, scores=anchors.scores)
    policy = threshold_from_dict(threshold or {"kind": "mean-anchor"})
    return apply_threshold(table, policy, anchor_table), calibrated, anchors


def exact_rows(run_dir: Path, samples, opts):
    """Every unprojected gradient of ``samples`` at every checkpoint of ``run_dir``, held in memory (a tiny model
    only): ``(plain, candidate, lrs, values, layout)``, the first two T lists of (N, D) float32 matrices, ``values``
    the signal checkpoint's ``loss`` and ``opts.signals``."""
    import math

    import numpy as np

    from scoring.projection import flatten_grads
    from scoring.workflow import GradientPass

    grads = GradientPass(run_dir, samples, opts)
    plain, cand, lrs, values = [], [], [], {}
    width = sum(math.prod(shape) for _, shape in grads.manifest["layout"])
    for ckpt in grads.checkpoints():
        p = np.zeros((len(samples), width), np.float32)
        c, loss = np.zeros_like(p), np.zeros(len(samples))
        for batch in grads.batches(ckpt):
            p[batch.rows] = flatten_grads(batch.grads).numpy()
            c[batch.rows] = flatten_grads(batch.candidate).numpy()
            loss[batch.rows] = batch.losses.numpy()
        plain.append(p)
        cand.append(c)
        lrs.append(ckpt.lr)
        if ckpt.index == grads.signal_at:
            values = {"loss": loss, **(grads.signals(ckpt) or {})}
    values = {k: np.asarray(v, np.float64) for k, v in values.items()}
    return plain, cand, lrs, values, grads.manifest["layout"]


def expected_exact(data: TinyData, silos=SILOS, precondition: bool = True):
    """What the coordinator would compute for an exact calibrated job (the product's default signals and fusion,
    mean-anchor threshold) with every unprojected gradient in hand, by its own functions (`score_anchor_samples`,
    `build_anchor_directions`, `build_reference`, `score_locally`): ``(reference, anchor_trace, scores, values)``,
    the last two per silo (`scoring.local_scoring.LocalScores` and the silo's raw values)."""
    from scoring.config import DEFAULT_FUSION, DEFAULT_SIGNALS, TraceConfig
    from scoring.local_scoring import build_reference, score_locally
    from scoring.projection import make_spec
    from scoring.selection import MeanAnchorScore
    from scoring.traces import build_anchor_directions, score_anchor_samples
    from scoring.types import ProjectedGrads
    from scoring.workflow import ProjectOptions

    opts = ProjectOptions(batch_size=4, precondition=precondition, signals=DEFAULT_SIGNALS)
    anchors = data.samples["anchors"]
    a_plain, a_cand, lrs, a_values, layout = exact_rows(data.run_dir, anchors, opts)
    spec = make_spec("gaussian", a_plain[0].shape[1], 0, layout)  # tags the rows with their length D; not applied

    def seq(samples, mats, role):
        ids = tuple(s.id for s in samples)
        return [
            ProjectedGrads(ids, m, spec, t, lr, role, preconditioned=role == "candidate" and precondition)
            for t, (m, lr) in enumerate(zip(mats, lrs, strict=True))
        ]

    config = TraceConfig()
    anchor_seq = seq(anchors, a_plain, "anchor")
    anchor_table = score_anchor_samples(seq(anchors, a_cand, "candidate"), anchor_seq, config)
    reference = build_reference(
        build_anchor_directions(anchor_seq, config),
        {"trace": anchor_table.scores, **a_values},
        score="calibrated",
        signals=DEFAULT_SIGNALS,
        fusion=DEFAULT_FUSION,
        policy=MeanAnchorScore(),
    )
    scores, values = {}, {}
    for silo in silos:
        _, s_cand, _, values[silo], _ = exact_rows(data.run_dir, data.samples[silo], opts)
        scores[silo] = score_locally(reference, s_cand, values[silo])
    return reference, anchor_table.scores, scores, values
