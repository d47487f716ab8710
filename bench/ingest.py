"""Shard upload throughput and memory: the coordinator's upload route against a raw upload, same server, same run.

The real coordinator app (`app.main.create_app`, a no-op task recorder as ``send``) runs under uvicorn in a
**child process**, so that its memory is measured alone. The benchmark mounts one extra route on it,
``PUT /bench/raw``, which streams ``request.stream()`` into a temp file and answers: no checksum, no validation, no
fsync, no database (the file is deleted at once). Both routes go through the same uvicorn/h11, Starlette and
middleware stack, so the ratio isolates what the upload route adds: SHA-256 of the stream, the size cap, the
`scoring.io.load_projection` validation against the job's spec, the fsync and rename of the blob, the shard row.

Set-up through the real routes (admin token): register a silo, create a job (one checkpoint, projection spec with
k = ``--dim``), set the checkpoint bundle and anchor set straight into storage through the repository (as
tests/app/test_api.py does; bundles are not what is measured), ``POST /open``. Shards: ``--shards`` files of
``--rows`` × ``--dim`` float16 made with `scoring.io.projection_to_bytes` under the job's spec (part p holds ids
``p<part>-<row>``, fixed width), written under the work directory before the server starts and streamed from there by
httpx in ``--chunk-mib`` pieces, with ``Content-Length`` and ``X-Content-SHA256`` (computed beforehand, not timed).

Timing: one small warm-up upload on each route, then shard i goes to both routes, interleaved (raw first for even
i, API first for odd i). Seconds are client wall time from the request's start to its answer; MB/s = bytes / 1e6 /
median seconds; ``ratio_api_over_raw`` = MB/s(API) / MB/s(raw) (the median of the per-shard ratios is reported
beside it).

Memory: the child's RSS via psutil, sampled every ``--sample-ms`` during each upload, and its kernel high-water
mark ``VmHWM`` (reset through ``/proc/<pid>/clear_refs`` before each upload; Linux), which catches peaks between
samples. Baseline = RSS after start-up and the warm-up uploads. RSS counts file pages the process has mapped (the
validation memory-maps the upload).

Targets: ratio ≥ 0.5; peak RSS of the API process during an API upload ≤ baseline + 2 × shard size.

Usage::

    python bench/ingest.py --out bench/results/ingest.json          # 16 shards of 16384 × 4096 fp16 (128 MiB)

One JSON object goes to stdout (and to ``--out``); progress goes to stderr. Work files go under ``bench/.work/``
and are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
import psutil
from common import emit, make_log  # bench/common.py (the script's directory is on sys.path)
from fastapi import Request  # at module level: the route's annotation is resolved from the module's globals

from scoring.config import ProjectionSpec
from scoring.io import projection_to_bytes
from scoring.types import ProjectedGrads

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "bench-admin-token"
LR = 1e-3
PARAM_COUNT = 1_000_000
MIB = 1 << 20


log = make_log("ingest")


def make_spec(dim: int) -> ProjectionSpec:
    return ProjectionSpec(kind="sjlt", dim=dim, seed=0, param_hash="bench-ingest", param_count=PARAM_COUNT, nnz=4)


# ------------------------------------------------------------------------------------------------------------
# Child: the coordinator under uvicorn, plus the raw route


def serve(args: argparse.Namespace) -> int:
    """Child mode: the real app with ``PUT /bench/raw`` and ``GET /bench/ping`` mounted, on 127.0.0.1:port."""
    import uvicorn

    from app.config import AppSettings
    from app.main import create_app

    enqueued: list[tuple[str, str]] = []
    settings = AppSettings(
        data_dir=args.data_dir, admin_token=ADMIN_TOKEN, max_upload_bytes=args.max_upload, log_json=False
    )
    app = create_app(settings, send=lambda task, args, countdown: enqueued.append((task, *args)))
    raw_dir = Path(args.data_dir) / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)

    async def raw_upload(request: Request) -> dict:
        fd, name = tempfile.mkstemp(dir=raw_dir)
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in request.stream():
                    fh.write(chunk)
                    size += len(chunk)
                if args.raw_fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
        finally:
            os.unlink(name)
        return {"size": size}

    def ping() -> dict:
        return {"ok": True, "enqueued": len(enqueued)}

    app.add_api_route("/bench/raw", raw_upload, methods=["PUT"])
    app.add_api_route("/bench/ping", ping, methods=["GET"])
    if args.phases:
        phases = instrument()
        app.add_api_route("/bench/phases", lambda: phases.take(), methods=["GET"])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


class Phases:
    """Seconds spent in each instrumented call since the last `take` (thread-safe enough: one upload at a time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def timed(self, name: str, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        return wrapper

    def take(self) -> dict:
        out = {"seconds": self.seconds, "calls": self.calls}
        self.seconds, self.calls = {}, {}
        return out


def instrument() -> Phases:
    """``--phases``: wrap the upload path's steps (diagnostic only; the timed runs leave the app as it is).

    ``blob_write``: hashing + writing the body (`BlobWriter.write`: in 8 MiB blocks in a worker thread, overlapping
    the receiving, with `app.uploads` as it is now; every chunk on the event loop with the committed code);
    ``validate``: `map_projection` as the shard route calls it; ``commit``: flush + fsync + rename
    (`BlobWriter.commit`); ``add_shard``: the shard row (the ids as JSON). The rest of the wall time is receiving
    the body (HTTP parsing, on the event loop) and the route's other work."""
    import app.routes.jobs as jobs_routes
    from storage import repository
    from storage.blobs import BlobWriter

    phases = Phases()
    BlobWriter.write = phases.timed("blob_write", BlobWriter.write)
    BlobWriter.commit = phases.timed("commit", BlobWriter.commit)
    jobs_routes.map_projection = phases.timed("validate", jobs_routes.map_projection)
    repository.add_shard = phases.timed("add_shard", repository.add_shard)
    return phases


# ------------------------------------------------------------------------------------------------------------
# Parent: shards, set-up, uploads, memory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(dest: Path, spec: ProjectionSpec, n: int, rows: int, first_part: int = 0) -> list[dict]:
    """``n`` shard files (parts first_part.. first_part+n-1, checkpoint 0); their path, size and SHA-256."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(first_part)
    base = rng.standard_normal((rows, spec.dim), dtype=np.float32)  # one draw, rescaled per shard
    out = []
    for i in range(n):
        part = first_part + i
        matrix = (base * np.float32(1.0 + part / 64)).astype(np.float16)
        proj = ProjectedGrads(
            ids=tuple(f"p{part:05d}-{r:08d}" for r in range(rows)),  # fixed width: every shard has the same size
            matrix=matrix,
            spec=spec,
            checkpoint=0,
            lr=LR,
            role="candidate",
            preconditioned=True,
        )
        data = projection_to_bytes(proj)
        path = dest / f"part-{part:04d}.safetensors"
        path.write_bytes(data)
        out.append({"part": part, "path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        del data, matrix, proj
    return out


def body(path: Path, chunk: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            yield block


class RssSampler:
    """Samples a process's RSS in a thread; `peak` is the highest sample since `start`."""

    def __init__(self, proc: psutil.Process, every_s: float) -> None:
        self.proc, self.every_s = proc, every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak = self.proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak


def reset_hwm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM
        return True
    except OSError:
        return False


def read_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.spec = make_spec(args.dim)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir = work / "coord"
        self.child: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=self.base, timeout=httpx.Timeout(600.0))
        self.silo_token = ""
        self.job_id = ""

    # -- server
    def start(self, shard_bytes: int) -> psutil.Process:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--data-dir", str(self.data_dir)]
        cmd += ["--port", str(self.port), "--max-upload", str(max(1 << 30, 2 * shard_bytes))]
        if self.args.raw_fsync:
            cmd.append("--raw-fsync")
        if self.args.phases:
            cmd.append("--phases")
        self.child = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.monotonic() + 120
        while True:
            if self.child.poll() is not None:
                raise RuntimeError(f"server exited with {self.child.returncode}")
            try:
                if self.client.get("/bench/ping").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 120 s")
            time.sleep(0.2)
        return psutil.Process(self.child.pid)

    def stop(self) -> None:
        self.client.close()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGINT)
            try:
                self.child.wait(30)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()

    # -- set-up through the routes (and the repository for the checkpoint bundle and anchor set)
    def setup_job(self) -> None:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        r = self.client.post("/v1/silos", json={"name": "bench"}, headers=admin)
        r.raise_for_status()
        self.silo_token = r.json()["token"]
        job = {
            "name": "bench-ingest",
            "silos": ["bench"],
            "model": "tiny:0",
            "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
            "max_len": 64,
            "projection": self.spec.to_dict(),
            "checkpoints": [{"index": 0, "step": 1, "lr": LR, "lr_last": LR, "adam": {}}],
            "precondition": True,
            "score": "trace",  # the synthetic shards carry no losses or signals: the pure CLUES protocol
            "signals": [],
        }
        r = self.client.post("/v1/jobs", json=job, headers=admin)
        r.raise_for_status()
        self.job_id = r.json()["id"]
        self._set_checkpoint_and_anchors()
        r = self.client.post(f"/v1/jobs/{self.job_id}/open", headers=admin)
        r.raise_for_status()

    def _set_checkpoint_and_anchors(self) -> None:
        from storage import repository as repo
        from storage.blobs import LocalBlobStore
        from storage.config import StorageSettings
        from storage.db import make_engine, make_session_factory

        storage = StorageSettings.under(self.data_dir)
        engine = make_engine(storage.database_url)
        blobs = LocalBlobStore(storage.blob_dir)
        try:
            with make_session_factory(engine).begin() as session:
                ref = blobs.put_bytes(b"bench checkpoint 0")
                repo.set_checkpoint_blob(session, job_id=self.job_id, index=0, blob_key=ref.key, size_bytes=ref.size)
                ref = blobs.put_bytes(b"bench anchors")
                repo.set_anchor_set(
                    session, job_id=self.job_id, blob_key=ref.key, size_bytes=ref.size, sample_ids=["x", "y"]
                )
        finally:
            engine.dispose()

    # -- uploads
    def upload(self, route: str, shard: dict) -> float:
        if route == "api":
            url = f"/v1/jobs/{self.job_id}/shards/0/{shard['part']}"
            token = self.silo_token
        else:
            url, token = "/bench/raw", ADMIN_TOKEN
        headers = {
            "Authorization": f"Bearer {token}",
            "X-Content-SHA256": shard["sha256"],
            "Content-Length": str(shard["size"]),
            "Content-Type": "application/octet-stream",
        }
        start = time.perf_counter()
        r = self.client.put(url, content=body(shard["path"], self.args.chunk_mib * MIB), headers=headers)
        seconds = time.perf_counter() - start
        if route == "api" and r.status_code != 201:
            raise RuntimeError(f"API upload of part {shard['part']} answered {r.status_code}: {r.text[:500]}")
        if route == "raw" and (r.status_code != 200 or r.json()["size"] != shard["size"]):
            raise RuntimeError(f"raw upload answered {r.status_code}: {r.text[:500]}")
        return seconds


def summarise(seconds: list[float], size: int) -> dict:
    med = statistics.median(seconds)
    return {
        "reps": len(seconds),
        "median_s": med,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "times_s": [round(s, 4) for s in seconds],
        "mb_per_s": size / 1e6 / med,
        "mb_per_s_best": size / 1e6 / min(seconds),
    }


def run(args: argparse.Namespace, work: Path) -> dict:
    started = time.perf_counter()
    spec = make_spec(args.dim)
    log(f"writing {args.shards} shards of {args.rows} x {args.dim} fp16 under {work}")
    shards = write_shards(work / "shards", spec, args.shards, args.rows)
    warm = write_shards(work / "warm", spec, 1, 64, first_part=args.shards)[0]
    size = shards[0]["size"]
    assert all(s["size"] == size for s in shards), "shards differ in size"
    log(f"shard size {size / MIB:.1f} MiB; starting the server")
    bench = Bench(args, work)
    try:
        proc = bench.start(size)
        startup_rss = proc.memory_info().rss
        bench.setup_job()
        log(f"job {bench.job_id} open; warm-up uploads")
        bench.upload("api", warm)
        bench.upload("raw", warm)
        time.sleep(0.5)
        baseline = proc.memory_info().rss
        hwm_ok = reset_hwm(proc.pid)
        sampler = RssSampler(proc, args.sample_ms / 1000)
        times: dict[str, list[float]] = {"api": [], "raw": []}
        peaks: dict[str, list[int]] = {"api": [], "raw": []}
        hwms: dict[str, list[int]] = {"api": [], "raw": []}
        cpu: dict[str, list[float]] = {"api": [], "raw": []}
        phase_log: list[dict[str, float]] = []
        if args.phases:
            bench.client.get("/bench/phases")  # drop the warm-up's
        for i, shard in enumerate(shards):
            for route in ("raw", "api") if i % 2 == 0 else ("api", "raw"):
                if hwm_ok:
                    reset_hwm(proc.pid)
                cpu0 = sum(proc.cpu_times()[:2])
                sampler.start()
                seconds = bench.upload(route, shard)
                peak = sampler.stop()
                cpu[route].append(sum(proc.cpu_times()[:2]) - cpu0)
                hwm = read_hwm(proc.pid) if hwm_ok else None
                times[route].append(seconds)
                if args.phases and route == "api":
                    phase_log.append(bench.client.get("/bench/phases").json()["seconds"] | {"total": seconds})
                    log(f"phases {json.dumps({k: round(v, 3) for k, v in phase_log[-1].items()})}")
                peaks[route].append(peak)
                if hwm is not None:
                    hwms[route].append(hwm)
                log(
                    f"part {shard['part']} {route}: {seconds:.3f} s, {size / 1e6 / seconds:.0f} MB/s, "
                    f"server CPU {cpu[route][-1]:.3f} s, "
                    f"peak RSS +{(peak - baseline) / MIB:.0f} MiB"
                    + (f" (VmHWM +{(hwm - baseline) / MIB:.0f} MiB)" if hwm is not None else "")
                )
        final_rss = proc.memory_info().rss
    finally:
        bench.stop()
    routes = {r: summarise(times[r], size) for r in ("api", "raw")}
    for r in routes:
        routes[r]["server_cpu_median_s"] = statistics.median(cpu[r])
        routes[r]["peak_rss_sampled_mb"] = max(peaks[r]) / MIB
        routes[r]["peak_rss_sampled_over_baseline_mb"] = (max(peaks[r]) - baseline) / MIB
        if hwms[r]:
            routes[r]["peak_rss_hwm_mb"] = max(hwms[r]) / MIB
            routes[r]["peak_rss_hwm_over_baseline_mb"] = (max(hwms[r]) - baseline) / MIB
    ratio = routes["api"]["mb_per_s"] / routes["raw"]["mb_per_s"]
    pair_ratios = [r / a for a, r in zip(times["api"], times["raw"], strict=True)]
    api_peak = max([*peaks["api"], *hwms["api"]])
    bound = baseline + 2 * size
    return {
        "benchmark": "ingest",
        "label": args.label,
        "settings": {
            "shards": args.shards,
            "rows": args.rows,
            "dim": args.dim,
            "shard_bytes": size,
            "shard_mib": size / MIB,
            "chunk_mib": args.chunk_mib,
            "sample_ms": args.sample_ms,
            "raw_fsync": args.raw_fsync,
            "phases_instrumented": args.phases,
            "server": "uvicorn (h11, 1 process) in a child process; client httpx in the parent",
        },
        "rss": {
            "startup_mb": startup_rss / MIB,
            "baseline_mb": baseline / MIB,
            "final_mb": final_rss / MIB,
            "hwm_reset": hwm_ok,
            "api_peak_over_baseline_mb": (api_peak - baseline) / MIB,
            "api_peak_over_baseline_shards": (api_peak - baseline) / size,
        },
        "routes": routes,
        "ratio_api_over_raw": ratio,
        "api_phases_median_s": (
            {k: statistics.median(p.get(k, 0.0) for p in phase_log) for k in phase_log[0]} if phase_log else None
        ),
        "ratio_api_over_raw_pair_median": statistics.median(pair_ratios),
        "targets": {
            "ratio": {"value": ratio, "target": ">= 0.5", "pass": ratio >= 0.5},
            "rss": {
                "value_mb": api_peak / MIB,
                "bound_mb": bound / MIB,
                "target": "<= baseline + 2 x shard size",
                "pass": api_peak <= bound,
            },
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "load_avg_at_end": os.getloadavg(),
        },
        "wall_s": time.perf_counter() - started,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=16, help="shards uploaded on each route (default 16)")
    p.add_argument("--rows", type=int, default=16384, help="rows per shard (default 16384)")
    p.add_argument("--dim", type=int, default=4096, help="k, projection dimension (default 4096)")
    p.add_argument("--chunk-mib", type=int, default=1, help="client body chunk size in MiB (default 1)")
    p.add_argument("--sample-ms", type=float, default=5.0, help="RSS sampling period in ms (default 5)")
    p.add_argument("--raw-fsync", action="store_true", help="the raw route fsyncs its file before answering")
    p.add_argument("--phases", action="store_true", help="diagnostic: time the API path's steps in the server")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / ".work", help="parent of the work directory")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--label", default=None, help="free text stored in the JSON (e.g. which code was measured)")
    # child mode
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-upload", type=int, default=1 << 30, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ingest-", dir=args.work_dir))
    try:
        result = run(args, work)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
