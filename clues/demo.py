"""``clues demo``: the whole product on one machine — an embedded coordinator, three silo agents, SmolLM2, PubMedQA.

Every party talks REST to the coordinator, as in a deployment:

- the coordinator is ``clues coordinator up`` (API + one Celery worker; SQLite and kombu's SQLite transport, so no
  Redis and no PostgreSQL), holding the clean anchor set and a clean held-out set;
- three silos hold disjoint PubMedQA splits with 10 %, 30 % and 50 % injected noise (`NOISE`: answers cut, words
  deleted, answers exchanged between questions). Each silo's agent is the code behind ``clues agent train`` /
  ``clues agent run``, in a thread of the demo process, with its own token, data file and work directory; it talks
  REST to the coordinator, and only adapters and projections leave it. Each silo's dashboard is a
  ``clues agent dashboard`` process.

Phases: federated warmup (its rounds become the scoring checkpoints) → each silo projects its per-sample gradients and
uploads them (with ℓ(y|∅) and the response lengths at the last checkpoint) → the coordinator's worker projects the
anchors, scores every sample (the calibrated score: the trace and loss signals against the anchors, fused) and sets
the mean-anchor threshold
→ each silo receives its mask → three federated training jobs, on all data, on a random subset of the selected size,
and on the selected samples → the coordinator evaluates each final adapter on the held-out set (loss, PubMedQA
accuracy). The summary compares them; the dashboards (the coordinator's and each silo's) stay up until Ctrl-C.

Longer than most modules (about 580 lines) because it is one script read top to bottom: the product's walk-through
phase by phase, with the processes it starts and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agent.console import CliError, Progress, cache_dir, fail
from scoring.config import DEFAULT_LORA_TARGETS, DEFAULT_PROJECTION_DIM
from scoring.data import Sample, load_pubmedqa, write_samples
from scoring.errors import DataError
from scoring.noise import inject_noise
from scoring.selection import auroc

REPO = Path(__file__).resolve().parents[1]
BUNDLED = Path(__file__).resolve().parent / "data" / "pubmedqa_200.json"
NOISE = {  # silo -> noise kind -> rate: 10 %, 30 % and 50 % noisy
    "silo1": {"cut": 0.05, "delete": 0.05},
    "silo2": {"cut": 0.1, "delete": 0.1, "exchange": 0.1},
    "silo3": {"cut": 0.5 / 3, "delete": 0.5 / 3, "exchange": 0.5 / 3},
}
ARMS = ("all", "random", "selected")  # training-data arms, in the order they run and print
ADMIN = "clues_demo_admin_"


class DemoError(CliError):
    """A phase of the demo failed (the message names it, and the log to read)."""


@dataclass(frozen=True)
class DemoSize:
    anchors: int
    per_silo: int
    held_out: int
    max_len: int
    proj_dim: int
    warmup_rounds: int  # every warmup round becomes a scoring checkpoint
    warmup_steps: int  # local AdamW steps per silo per warmup round
    warmup_fraction: float  # share of each silo's data the warmup trains on
    train_rounds: int
    train_steps: int  # local AdamW steps per silo per training round
    lr: float = 3e-4
    batch_size: int = 4


QUICK = DemoSize(
    anchors=8, per_silo=20, held_out=8, max_len=128, proj_dim=1024,
    warmup_rounds=1, warmup_steps=2, warmup_fraction=0.25, train_rounds=1, train_steps=1,
)  # fmt: skip
DEFAULT = DemoSize(
    anchors=40, per_silo=30, held_out=20, max_len=192, proj_dim=DEFAULT_PROJECTION_DIM,
    warmup_rounds=2, warmup_steps=3, warmup_fraction=0.25, train_rounds=2, train_steps=3,
)  # fmt: skip


def find_pubmedqa(data_dir: str | None) -> Path:
    """--data-dir (which must hold the file), else ../shared/data beside the checkout, else the bundled subset."""
    if data_dir:
        path = Path(data_dir) / "pubmedqa" / "ori_pqal.json"
        if not path.is_file():
            raise DataError(f"--data-dir: no pubmedqa/ori_pqal.json in {data_dir}")
        return path
    shared = REPO.parent / "shared" / "data" / "pubmedqa" / "ori_pqal.json"
    return shared if shared.is_file() else BUNDLED


@dataclass
class Split:
    anchors: list[Sample]
    held_out: list[Sample]
    silos: dict[str, list[Sample]]  # noisy, labelled with meta["noise"]


def split_data(path: Path, size: DemoSize, seed: int = 0) -> Split:
    """Disjoint anchors, held-out set and silo splits of one seeded shuffle; noise injected into the silos only."""
    items = load_pubmedqa(path)
    need = size.anchors + size.held_out + len(NOISE) * size.per_silo
    if len(items) < need:
        raise DataError(f"{path}: {len(items)} items, the demo needs {need}")
    random.Random(seed).shuffle(items)
    anchors, held_out = items[: size.anchors], items[size.anchors : size.anchors + size.held_out]
    rest = items[size.anchors + size.held_out :]
    silos = {
        name: inject_noise(rest[i * size.per_silo : (i + 1) * size.per_silo], rates, seed=seed + i)
        for i, (name, rates) in enumerate(NOISE.items())
    }
    return Split(anchors, held_out, silos)


MARKER = ".clues-demo"


def fresh_out_dir(out: Path) -> Path:
    """``out`` emptied for a new run: only a directory an earlier demo made (it holds `MARKER`) is ever deleted."""
    out = out.resolve()
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise DemoError(f"--out: {out} exists and is not a clues demo directory; choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).touch()
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


class Processes:
    """Child processes of the demo, each logging to its own file; all stopped on exit (SIGINT, then SIGKILL)."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir = env, log_dir
        self.running: list[tuple[str, subprocess.Popen, Path]] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "clues", *args],
                env=self.env | (env or {}),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the demo only; it stops the children itself
            )
        self.running.append((name, proc, log))
        return proc

    def check(self, procs: list[subprocess.Popen]) -> None:
        """Raise `DemoError` for the first of ``procs`` that exited with an error."""
        for name, proc, log in self.running:
            if proc in procs and proc.poll() not in (None, 0):
                raise DemoError(f"{name} exited with status {proc.returncode}; the end of {log}:\n{_tail(log)}")

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGINT to every child's process group (the coordinator's worker is in its group), then SIGKILL to the
        groups still alive after ``grace`` seconds: a worker finishing a long task would otherwise hold the exit."""
        for _, proc, _ in self.running:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + grace
        for _, proc, _ in self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: stragglers such as a worker mid-task
            proc.wait()


def _phase_note(job: dict, stages: str) -> str:
    """Beside a phase's bar: the job's message, and each silo's current stage while it runs."""
    message = str(job.get("message") or job["status"])[:40]
    return f"{message} | {stages}" if stages and job["status"] != "done" else message


class SiloAgent(threading.Thread):
    """One silo's agent for one job, in a thread of the demo process: the library calls that ``clues agent run`` /
    ``clues agent train`` make, with the silo's own token, data file and work directory (one process spares three
    interpreter and model start-ups per phase). Its torch work releases the GIL."""

    def __init__(self, demo: Demo, name: str, command: str, job_id: str, stages: dict[str, str]):
        super().__init__(name=f"agent-{name}", daemon=True)
        self.demo, self.silo, self.command, self.job_id, self.stages = demo, name, command, job_id, stages
        self.error: BaseException | None = None

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stages[self.silo] = f"{stage} {done}/{total}"

    def run(self) -> None:
        from agent.client import SiloClient
        from agent.loop import AgentOptions, run_agent
        from agent.train import TrainOptions, run_training

        demo, work = self.demo, self.demo.out / self.silo / "work"
        cache = cache_dir()
        try:
            with SiloClient(demo.url, demo.tokens[self.silo]) as client:
                if self.command == "run":
                    # batch 4 (the CLI's default is 8): half the activation memory, three agents at once
                    options = AgentOptions(batch_size=4, poll_interval=0.5, cache_dir=cache)
                    run_agent(client, self.job_id, demo.data[self.silo], work_dir=work, options=options,
                              progress=self.progress)  # fmt: skip
                else:
                    options = TrainOptions(poll_interval=0.5, cache_dir=cache)
                    run_training(client, self.job_id, demo.data[self.silo], work_dir=work, options=options,
                                 progress=self.progress)  # fmt: skip
            self.stages[self.silo] = "done"
        except BaseException as exc:  # reported by check() in the main thread
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise DemoError(f"{self.silo}'s agent ({self.command}): {self.error}") from self.error


def _progress(job: dict) -> float:
    """A training job's progress: its rounds, counting the silos' updates within the open round, up to 90 %, and
    the final evaluation after; a scoring job's own ``progress``."""
    history = job.get("history")
    if history is None:
        return float(job.get("progress") or 0.0)
    if job["status"] == "evaluating":
        return 0.95
    if not history or job["status"] != "running":
        return 1.0 if job["status"] == "done" else 0.0
    current = history[-1]
    members = max(1, len(job.get("silos") or ()))
    within = len(current.get("received") or ()) / members if current["status"] == "open" else 1.0
    return 0.9 * min(1.0, (len(history) - 1 + within) / max(1, job["rounds"]))


class Demo:
    """One run of the demo under ``out`` (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, size: DemoSize):
        from agent.client import AdminClient

        self.args, self.size = args, size
        self.out = fresh_out_dir(Path(args.out))
        self.port = args.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = ADMIN + secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLUES_")}  # the embedded default
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CLUES_COORDINATOR": self.url}
        if os.environ.get("CLUES_CACHE_DIR"):
            env["CLUES_CACHE_DIR"] = os.environ["CLUES_CACHE_DIR"]
        self.procs = Processes(env, self.out / "logs")
        self.api = AdminClient(self.url, self.admin_token)
        self.tokens: dict[str, str] = {}
        self.data: dict[str, Path] = {}

    # --- set-up -------------------------------------------------------------------------------------------------

    def write_data(self, split: Split) -> None:
        write_samples(self.out / "coordinator-files" / "anchors.jsonl", split.anchors)
        write_samples(self.out / "coordinator-files" / "held_out.jsonl", split.held_out)
        for name, samples in split.silos.items():
            self.data[name] = self.out / name / "data.jsonl"
            write_samples(self.data[name], samples)

    def start_coordinator(self) -> None:
        env = {"CLUES_ADMIN_TOKEN": self.admin_token, "CLUES_DATA_DIR": str(self.out / "coordinator")}
        proc = self.procs.start("coordinator", ["coordinator", "up", "--port", str(self.port)], env)
        deadline = time.monotonic() + 120
        while True:
            self.procs.check([proc])
            if proc.poll() == 0:
                raise DemoError(f"the coordinator stopped at start-up; see {self.out / 'logs' / 'coordinator.log'}")
            with contextlib.suppress(Exception):
                if self.api.http.get("/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise DemoError(f"the coordinator did not answer at {self.url} within 120 s")
            time.sleep(0.5)
        for name in NOISE:
            self.tokens[name] = self.api.register_silo(name)["token"]

    # --- phases ---------------------------------------------------------------------------------------------------

    def agents(self, command: str, job_id: str, fetch, desc: str, silos: list[str] | None = None) -> dict:
        """Every silo's agent at once (``run`` or ``train``, the product's `agent.loop.run_agent` /
        `agent.train.run_training`, each with its own token, data file and work directory, talking REST to the
        coordinator); a bar follows the job until it is done, with each silo's current stage beside it."""
        stages: dict[str, str] = {}
        silos = list(NOISE) if silos is None else silos
        agents = [SiloAgent(self, name, command, job_id, stages) for name in silos]
        for agent in agents:
            agent.start()
        bar = Progress(desc, width=18)
        try:
            while True:
                job = fetch(job_id)
                done = 100 if job["status"] == "done" else min(99, int(100 * _progress(job)))
                bar.update(done, 100, _phase_note(job, " · ".join(f"{n} {stages[n]}" for n in silos if n in stages)))
                for agent in agents:
                    agent.check()
                if job["status"] == "failed":
                    raise DemoError(f"{desc}: the job failed: {job['error']}")
                if job["status"] == "done":
                    break
                time.sleep(0.5)
        finally:
            bar.close()
        for agent in agents:
            agent.join(timeout=120)
            agent.check()
        return job

    def local(self) -> dict:
        s = self.size
        return {"steps": s.warmup_steps, "batch_size": s.batch_size, "lr": s.lr, "schedule": "constant"}

    def warmup(self) -> dict:
        s = self.size
        spec = {
            "name": "demo-warmup",
            "mode": "warmup",
            "silos": list(NOISE),
            "model": self.args.model,
            "lora": {"rank": 8, "alpha": 16.0, "target_modules": list(DEFAULT_LORA_TARGETS)},
            "max_len": s.max_len,
            "rounds": s.warmup_rounds,
            "local": self.local(),
            "selection": {"source": "fraction", "fraction": s.warmup_fraction},
            "checkpoint_rounds": list(range(s.warmup_rounds)),
        }
        job = self.api.start_train_job(self.api.create_train_job(spec)["id"])
        return self.agents("train", job["id"], self.api.train_job, "warmup")

    def scoring(self, warmup_id: str) -> dict:
        body = {
            "name": "demo-scoring",
            "projection": {"kind": "sjlt", "dim": self.size.proj_dim, "seed": 0, "nnz": 4},
            "threshold": {"kind": "mean-anchor"},
        }
        job = self.api.scoring_job_from_warmup(warmup_id, body)
        self.api.upload_anchors(job["id"], (self.out / "coordinator-files" / "anchors.jsonl").read_bytes())
        self.api.open_job(job["id"])
        return self.agents("run", job["id"], self.api.job, "projection+scoring")

    def train(self, arm: str, scoring_id: str, kept: dict[str, int]) -> dict:
        """A federated training job on ``arm`` (all / random / selected). A silo the threshold left with no sample
        sits the selected and random arms out (``kept``: selected samples per silo)."""
        s = self.size
        silos = [name for name in NOISE if arm == "all" or kept.get(name, 0) > 0]
        if not silos:
            raise DemoError("the threshold kept no sample in any silo; nothing to train on")
        spec = {
            "name": f"demo-train-{arm}",
            "mode": "federated",
            "silos": silos,
            "rounds": s.train_rounds,
            "local": {**self.local(), "steps": s.train_steps},
            "selection": {"source": arm, "scoring_job": scoring_id},
            "evaluation": {"every": s.train_rounds},  # the final adapter only
        }
        job = self.api.create_train_job(spec)
        self.api.upload_eval_set(job["id"], (self.out / "coordinator-files" / "held_out.jsonl").read_bytes())
        self.api.start_train_job(job["id"])
        return self.agents("train", job["id"], self.api.train_job, f"train on {arm}", silos)

    def dashboards(self) -> dict[str, str]:
        """Each silo's dashboard (``clues agent dashboard``) on a free port; returns silo -> URL."""
        urls = {}
        for name in NOISE:
            port = free_port()
            self.procs.start(
                f"{name}-dashboard",
                ["agent", "dashboard", "--data", str(self.data[name]), "--port", str(port),
                 "--work-dir", str(self.out / name / "work")],
                {"CLUES_TOKEN": self.tokens[name]},
            )  # fmt: skip
            urls[name] = f"http://127.0.0.1:{port}/"
        return urls


def silo_rows(split: Split, scores: list[dict], work: dict[str, Path], job_id: str) -> list[dict]:
    """Per silo: samples, noisy, kept, noisy kept, detection AUROC of the job's score (calibrated by default) and of
    the trace score alone (and of the silo's own perplexity at the first checkpoint, read from its local projection
    files, when they are there)."""
    by_id = {(r["silo"], r["sample_id"]): r for r in scores}
    rows = []
    for name, samples in split.silos.items():
        got = [by_id[(name, s.id)] for s in samples]
        clean = np.array([s.meta.get("noise") == "clean" for s in samples])
        kept = np.array([bool(r["selected"]) for r in got])
        rows.append(
            {
                "silo": name,
                "samples": len(samples),
                "noisy": int((~clean).sum()),
                "kept": int(kept.sum()),
                "noisy_kept": int((kept & ~clean).sum()),
                "auroc_score": auroc(np.array([r["score"] for r in got]), clean),
                "auroc_trace": auroc(np.array([(r.get("values") or {}).get("trace", r["score"]) for r in got]), clean),
                "auroc_perplexity": _perplexity_auroc(work[name] / job_id, samples, clean),
            }
        )
    return rows


def _perplexity_auroc(job_dir: Path, samples: list[Sample], clean: np.ndarray) -> float | None:
    from scoring.workflow import load_projection_dir

    dirs = sorted(job_dir.glob("proj-*"))
    if not dirs:
        return None
    projections, losses = load_projection_dir(dirs[-1], "candidate")
    if losses is None:
        return None
    index = {sid: i for i, sid in enumerate(projections[0].ids)}
    return auroc(-np.asarray(losses)[[index[s.id] for s in samples]], clean)


def model_rows(jobs: dict[str, dict]) -> list[dict]:
    """Per training arm: the samples trained on (as the silos reported them) and the final held-out metrics."""
    rows = []
    for arm, job in jobs.items():
        metrics = job.get("metrics") or {}
        rows.append(
            {
                "arm": arm,
                "train_samples": sum(m["num_samples"] or 0 for m in job["silos"]),
                "held_out_loss": metrics.get("loss"),
                "pubmedqa_accuracy": metrics.get("pubmedqa_accuracy"),
                "pubmedqa_n": metrics.get("pubmedqa_n"),
            }
        )
    return rows


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(summary: dict) -> None:
    print("\nSilos (detection of the injected noise; AUROC 1.0 = every clean sample outscores every noisy one)")
    print(
        f"{'silo':<8}{'samples':>8}{'noisy':>7}{'kept':>6}{'noisy kept':>12}{'AUROC score':>13}{'AUROC trace':>13}"
        f"{'AUROC ppl':>11}"
    )
    for r in summary["silos"]:
        print(
            f"{r['silo']:<8}{r['samples']:>8}{r['noisy']:>7}{r['kept']:>6}{r['noisy_kept']:>12}"
            f"{_fmt(r['auroc_score']):>13}{_fmt(r['auroc_trace']):>13}{_fmt(r['auroc_perplexity']):>11}"
        )
    print(f"score: {summary.get('score', 'trace')} (AUROC score: the job's score, which selects)")
    print(f"threshold (mean anchor score): {summary['threshold']:.4g}")
    n = summary["models"][0]["pubmedqa_n"] if summary["models"] else 0
    print(f"\nModel (federated LoRA training, evaluated on {n} clean held-out PubMedQA items)")
    print(f"{'trained on':<12}{'samples':>8}{'held-out loss':>15}{'PubMedQA acc':>14}")
    for r in summary["models"]:
        print(f"{r['arm']:<12}{r['train_samples']:>8}{_fmt(r['held_out_loss']):>15}{_fmt(r['pubmedqa_accuracy']):>14}")
    print(f"\nfinished in {summary['seconds']:.0f} s; files under {summary['out']}")


def prepare_model(ref: str) -> None:
    """Load the model once in the main thread before any agent thread starts: the agents' threads then find every
    lazily imported transformers/peft module already imported (concurrent first imports race), and SmolLM2's
    weights already converted from GGUF into the cache."""
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    from scoring.models import load_base_model

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes would break the bars
    hf_logging.disable_progress_bar()  # and so would the agents' "Loading weights" bars
    hf_logging.set_verbosity_error()
    print(f"loading {ref} (converted from GGUF into the cache on the first run)", file=sys.stderr)
    load_base_model(ref, cache_dir=cache_dir())
    # the three agents share this process: one intra-op team each, instead of three oversubscribing the cores
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // len(NOISE)))


def run_demo(args: argparse.Namespace) -> int:
    from agent.client import CoordinatorError
    from scoring.errors import ScoringError

    # Ctrl-C (SIGINT) stops the demo even when it was started with SIGINT ignored, as a background job of a
    # non-interactive shell is: Python then leaves it ignored unless told otherwise
    signal.signal(signal.SIGINT, signal.default_int_handler)
    size = QUICK if args.quick else DEFAULT
    split = split_data(find_pubmedqa(args.data_dir), size)
    demo = Demo(args, size)
    code = 0
    try:
        prepare_model(args.model)
        demo.write_data(split)
        summary = run_phases(demo, split)
        (demo.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
        if not args.no_serve:
            serve(demo, summary["jobs"]["scoring"])
    except KeyboardInterrupt:
        code = 130
    except (CliError, CoordinatorError, ScoringError) as exc:
        code = fail("clues demo", exc)
    finally:
        demo.api.close()
        demo.procs.stop_all()
    if any(isinstance(t, SiloAgent) and t.is_alive() for t in threading.enumerate()):
        # an error or Ctrl-C cut a phase short while an agent thread is inside torch: the interpreter's shutdown
        # would abort under it, so leave at once (every child process is already stopped)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_phases(demo: Demo, split: Split) -> dict:
    """Coordinator up, warmup, projection and scoring, the three training arms; returns the summary."""
    started = time.perf_counter()
    print(f"coordinator: {demo.url} (embedded: SQLite, no Redis); logs under {demo.out / 'logs'}", file=sys.stderr)
    demo.start_coordinator()
    warm = demo.warmup()
    scoring = demo.scoring(warm["id"])
    answer = demo.api.scores(scoring["id"])
    kept = {name: sum(bool(r["selected"]) for r in answer["rows"] if r["silo"] == name) for name in NOISE}
    trained = {arm: demo.train(arm, scoring["id"], kept) for arm in ARMS}
    work = {name: demo.out / name / "work" for name in NOISE}
    return {
        "size": asdict(demo.size),
        "model": demo.args.model,
        "threshold": answer["threshold"],
        "score": scoring["spec"]["score"],
        "silos": silo_rows(split, answer["rows"], work, scoring["id"]),
        "models": model_rows(trained),
        "jobs": {"warmup": warm["id"], "scoring": scoring["id"], **{a: j["id"] for a, j in trained.items()}},
        "seconds": time.perf_counter() - started,
        "out": str(demo.out),
    }


def serve(demo: Demo, scoring_id: str) -> None:
    """Print the dashboards' URLs and keep every process up until Ctrl-C (SIGINT or SIGTERM)."""
    urls = demo.dashboards()
    print(f"\ncoordinator dashboard: {demo.url}/ui/jobs/{scoring_id}  (log in with the admin token {demo.admin_token})")
    for name, url in urls.items():
        print(f"{name} dashboard: {url}  (log in with {name}'s token {demo.tokens[name]})")
    print("press Ctrl-C to stop", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            demo.procs.check([p for _, p, _ in demo.procs.running])
            time.sleep(1.0)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
