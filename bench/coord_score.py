"""Coordinator trace scoring throughput: the worker's shard path against a raw numpy pass over in-memory arrays.

Data (seeded, synthetic): ``--samples`` candidates of one silo × ``--checkpoints`` checkpoints × k = ``--dim`` float16
projections, stored as a silo agent uploads them: one `scoring.io.projection_to_bytes` shard per (checkpoint,
part) of ``--part-rows`` rows, put into a real `storage.blobs.LocalBlobStore` and registered as shard rows through
`storage.repository` (SQLite under the work directory), plus ``--anchors`` anchor projections per checkpoint
(roles ``anchor`` and ``candidate``, owner ``__anchor__``) as `workers.pipeline.project_anchors` stores them.
Learning rates η_t differ per checkpoint; cosine similarity, one anchor group.

Methods, same data, same maths:

- ``ours``: what `workers.pipeline.score_job` does for the silo's samples, with its own functions: list the shard
  rows, `load_shard` the anchors and `build_anchor_directions`, then part by part (`workers.pipeline.prefetched`:
  part p+1's T shards are loaded — SHA-256 checked against the blob key, then memory-mapped — in a thread while
  part p is scored) `trace_block` (fp16 → float32 per chunk, cosine against ḡ_t, η-weighted) and `best_group`.
  Anchor self-scores, the threshold and writing 100k score rows to the database are not in the timed loop; one
  complete `score_job` is timed once beside it (``--no-full-job`` skips it).
- ``raw``: the same float16 arrays held in memory (the very arrays that were serialised), per part and checkpoint,
  per chunk of the same size (``min(chunk_rows, part rows)``): ``np.copyto`` into a reused float32 buffer,
  ``block @ direction_t`` (float32), row norms, ``η_t · dots / norms`` summed over t in float64. The directions are
  the ones ``ours`` builds (computed once, outside the timing). No I/O, no checksum, no checks.

BLAS: one thread by default (see the comment at the top; ``OPENBLAS_NUM_THREADS`` overrides).

Timing: one warm-up pass of each (the blob files are in the page cache afterwards, as on a coordinator that just
received them), then ``--reps`` repetitions of each, interleaved (order rotated, and reversed every other rep);
samples/s = samples / median seconds; ``ratio_ours_over_raw`` = samples/s(ours) / samples/s(raw). The scores of the
two methods are compared (max abs difference).

Memory: each method once more in a fresh child process (``--only``): ``peak_rss_mb`` is its high-water mark
(``VmHWM``); ``compute_rss_mb`` the peak of the pass alone (``/proc/self/clear_refs`` reset after set-up; the raw
child holds the arrays in memory, as the raw method needs them, so its set-up RSS is their size). RSS counts the
pages of memory-mapped files the process touched.

Target: samples/s(ours) ≥ 0.7 · samples/s(raw).

Usage::

    python bench/coord_score.py --out bench/results/coord_score.json   # 100k × 4 × 4096 fp16 (~3.3 GB of blobs)

One JSON object goes to stdout (and to ``--out``); progress goes to stderr. Work files go under ``bench/.work/``
and are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One BLAS thread (before numpy loads OpenBLAS). On this shared 2-core host a 2-thread sgemv stalls whenever the other
# tenant holds a core: the raw pass measured 0.65-0.77 s per part with two threads and 0.35-0.41 s with one. The
# product path does not use BLAS here (`similarity_block` takes numpy's vecdot for few groups), so one thread makes
# the raw reference strict. Override with the environment variables.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from common import emit, make_log  # bench/common.py (the script's directory is on sys.path)

from scoring.config import ProjectionSpec, TraceConfig
from scoring.io import load_projection, projection_to_bytes
from scoring.traces import AnchorDirections, best_group, build_anchor_directions, trace_block
from scoring.types import ProjectedGrads
from storage import repository as repo
from storage.db import make_engine, upgrade
from workers.config import ServiceSettings
from workers.pipeline import ANCHOR_OWNER, Resources, load_shard, prefetched, score_job, shards_by_part

ROOT = Path(__file__).resolve().parents[1]
SILO = "bench"
PARAM_COUNT = 1_000_000
MIB = 1 << 20


log = make_log("coord_score")


@dataclass(frozen=True)
class Settings:
    samples: int
    checkpoints: int
    dim: int
    part_rows: int
    anchors: int
    chunk_rows: int

    @property
    def lrs(self) -> list[float]:
        return [1e-3 * 0.7**t for t in range(self.checkpoints)]

    @property
    def spec(self) -> ProjectionSpec:
        return ProjectionSpec(kind="sjlt", dim=self.dim, seed=0, param_hash="bench-coord", param_count=PARAM_COUNT)

    @property
    def config(self) -> TraceConfig:
        return TraceConfig(similarity="cosine", chunk_rows=self.chunk_rows)

    def part_sizes(self) -> list[int]:
        full, rest = divmod(self.samples, self.part_rows)
        return [self.part_rows] * full + ([rest] if rest else [])


# ------------------------------------------------------------------------------------------------------------
# Data


def open_resources(data_dir: Path) -> Resources:
    settings = ServiceSettings(data_dir=data_dir)
    engine = make_engine(settings.storage.database_url)
    upgrade(engine)
    engine.dispose()
    return Resources.from_settings(settings)


def build(res: Resources, cfg: Settings, keep_arrays: bool) -> tuple[str, list[list[np.ndarray]]]:
    """Store the anchor and silo shards and register them; return the job id and, if asked, the silo's arrays
    as ``arrays[part][checkpoint]`` (N_part, k) float16."""
    rng = np.random.default_rng(0)
    spec, lrs = cfg.spec, cfg.lrs
    with res.sessions.begin() as session:
        silo, _ = repo.create_silo(session, name=SILO)
        job = repo.create_job(
            session,
            name="bench-coord-score",
            model="tiny:0",
            lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
            projection=spec.to_dict(),
            similarity="cosine",
            threshold={"kind": "mean-anchor"},
            precondition=True,
            options={},
            checkpoints=[{"index": t, "step": t + 1, "lr": lr, "lr_last": lr, "adam": {}} for t, lr in enumerate(lrs)],
            silo_names=[SILO],
        )
        job_id, silo_id = job.id, silo.id

    def store(session, owner: str, part: int, proj: ProjectedGrads) -> None:
        ref = res.blobs.put_bytes(projection_to_bytes(proj))
        repo.add_shard(
            session,
            job_id=job_id,
            owner=owner,
            checkpoint=proj.checkpoint,
            part=part,
            role=proj.role,
            sample_ids=list(proj.ids),
            blob_key=ref.key,
            size_bytes=ref.size,
        )

    # A shared signal direction per checkpoint, so that cosines are not all ~0.
    signal = rng.standard_normal((cfg.checkpoints, cfg.dim)).astype(np.float32)
    anchor_ids = tuple(f"a{i}" for i in range(cfg.anchors))
    with res.sessions.begin() as session:
        ref = res.blobs.put_bytes(b"bench anchor samples (not read: the anchor projections are stored)")
        repo.set_anchor_set(session, job_id=job_id, blob_key=ref.key, size_bytes=ref.size, sample_ids=list(anchor_ids))
        for t, lr in enumerate(lrs):
            rows = (rng.standard_normal((cfg.anchors, cfg.dim), dtype=np.float32) + signal[t]).astype(np.float16)
            for role, precond in (("anchor", False), ("candidate", True)):
                proj = ProjectedGrads(anchor_ids, rows, spec, t, lr, role=role, preconditioned=precond)
                store(session, ANCHOR_OWNER, 0, proj)
    arrays: list[list[np.ndarray]] = []
    start = 0
    sizes = cfg.part_sizes()
    for part, n in enumerate(sizes):
        ids = tuple(f"s{i}" for i in range(start, start + n))
        weight = rng.uniform(-0.5, 0.5, size=(n, 1)).astype(np.float32)  # how much of the signal each sample has
        per_ckpt = []
        with res.sessions.begin() as session:
            for t, lr in enumerate(lrs):
                noise = rng.standard_normal((n, cfg.dim), dtype=np.float32)
                noise += weight * signal[t]
                matrix = noise.astype(np.float16)
                del noise
                store(session, SILO, part, ProjectedGrads(ids, matrix, spec, t, lr, preconditioned=True))
                if keep_arrays:
                    per_ckpt.append(matrix)
        arrays.append(per_ckpt)
        start += n
        log(f"stored part {part + 1}/{len(sizes)} ({n} rows x {cfg.checkpoints} checkpoints)")
    with res.sessions.begin() as session:
        repo.mark_complete(session, job_id=job_id, silo_id=silo_id, num_samples=cfg.samples)
        repo.update_job(session, job_id=job_id, status="scoring", anchor_status="done")
    return job_id, arrays


def load_arrays(res: Resources, job_id: str) -> list[list[np.ndarray]]:
    """The silo's arrays read back from the blob store into memory (the raw child's input)."""
    with res.sessions() as session:
        parts = shards_by_part(repo.list_shards(session, job_id=job_id, owner=SILO))
    return [[load_projection(res.blobs.path(s.blob_key))[0].matrix for s in shards] for shards in parts.values()]


# ------------------------------------------------------------------------------------------------------------
# The two methods


def ours(res: Resources, job_id: str, config: TraceConfig) -> tuple[np.ndarray, AnchorDirections]:
    """`score_job`'s scoring loop over the silo's shards (its functions, in its order, with its prefetching)."""
    with res.sessions() as session:
        anchor_rows = repo.list_shards(session, job_id=job_id, owner=ANCHOR_OWNER, role="anchor")
        parts = shards_by_part(repo.list_shards(session, job_id=job_id, owner=SILO))
    anchors = [load_shard(res, s)[0] for s in anchor_rows]
    directions = build_anchor_directions(anchors, config)
    scores = [np.zeros(0)]
    for _, part, seq in prefetched(res, [(SILO, part, shards) for part, shards in parts.items()]):
        block_scores, _, _ = best_group(trace_block(directions, seq, config, f"{SILO} part {part}"))
        scores.append(block_scores)
    return np.concatenate(scores), directions


def raw(arrays: list[list[np.ndarray]], directions: AnchorDirections, chunk_rows: int) -> np.ndarray:
    """The same maths on in-memory float16 arrays, no I/O and no checks."""
    dirs = [d[0].astype(np.float32) for d in directions.directions]  # (k,) float32 per checkpoint
    lrs = directions.lrs
    chunk = min(chunk_rows, max(len(p[0]) for p in arrays))
    buf = np.empty((chunk, len(dirs[0])), dtype=np.float32)
    out = []
    for part in arrays:
        n = len(part[0])
        acc = np.zeros(n)
        for matrix, direction, lr in zip(part, dirs, lrs, strict=True):
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                block = buf[: stop - start]
                np.copyto(block, matrix[start:stop], casting="same_kind")
                dots = block @ direction  # (n_chunk,)
                norms = np.sqrt(np.einsum("ij,ij->i", block, block))
                acc[start:stop] += lr * (dots / norms)
        out.append(acc)
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------------------
# Memory children


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM
        return True
    except OSError:
        return False


def anchor_directions(res: Resources, job_id: str, config: TraceConfig) -> AnchorDirections:
    with res.sessions() as session:
        anchor_rows = repo.list_shards(session, job_id=job_id, owner=ANCHOR_OWNER, role="anchor")
    return build_anchor_directions([load_shard(res, s)[0] for s in anchor_rows], config)


def child_main(args: argparse.Namespace, cfg: Settings) -> dict:
    """``--only METHOD --data-dir D --job J``: set up, reset the high-water mark, run the method once.

    Peaks are ``VmHWM`` of /proc/self/status, not ``ru_maxrss``: a child started by vfork + exec inherits its
    parent's high-water mark in ``ru_maxrss`` (Linux keeps it in the signal struct), and the parent holds the
    arrays of the raw method."""
    res = open_resources(args.data_dir)
    directions = anchor_directions(res, args.job, cfg.config)
    arrays = load_arrays(res, args.job) if args.only == "raw" else None
    gc.collect()
    setup_peak = _status_mb("VmHWM")
    after_setup = _status_mb("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    if args.only == "raw":
        assert arrays is not None
        raw(arrays, directions, cfg.chunk_rows)
    else:
        ours(res, args.job, cfg.config)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {
        "method": args.only,
        "peak_rss_mb": max(setup_peak, peak),
        "compute_rss_mb": peak if reset else None,
        "compute_rss_over_setup_mb": peak - after_setup if reset else None,
        "rss_after_setup_mb": after_setup,
        "seconds": seconds,
    }


def rss_child(method: str, data_dir: Path, job_id: str, cfg: Settings) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", method, "--data-dir", str(data_dir)]
    cmd += ["--job", job_id, "--samples", str(cfg.samples), "--checkpoints", str(cfg.checkpoints)]
    cmd += ["--dim", str(cfg.dim), "--part-rows", str(cfg.part_rows), "--anchors", str(cfg.anchors)]
    cmd += ["--chunk-rows", str(cfg.chunk_rows)]
    log(f"child {method}")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"child {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# ------------------------------------------------------------------------------------------------------------
# Main


def summarise(seconds: list[float], samples: int) -> dict:
    med = statistics.median(seconds)
    return {
        "reps": len(seconds),
        "median_s": med,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "times_s": [round(s, 3) for s in seconds],
        "samples_per_s": samples / med,
    }


def run(args: argparse.Namespace, cfg: Settings, work: Path) -> dict:
    started = time.perf_counter()
    data_dir = work / "coord"
    res = open_resources(data_dir)
    parts = cfg.part_sizes()
    log(
        f"storing {cfg.samples} samples x {cfg.checkpoints} checkpoints x k={cfg.dim} fp16 as {len(parts)} parts "
        f"of <= {cfg.part_rows} rows ({cfg.samples * cfg.checkpoints * cfg.dim * 2 / 1e9:.2f} GB) under {work}"
    )
    t0 = time.perf_counter()
    job_id, arrays = build(res, cfg, keep_arrays=True)
    build_s = time.perf_counter() - t0
    blob_bytes = sum(f.stat().st_size for f in res.settings.storage.blob_dir.rglob("*") if f.is_file())
    log(f"stored in {build_s:.0f} s ({blob_bytes / 1e9:.2f} GB of blobs); warm-up")
    config = cfg.config
    reference, directions = ours(res, job_id, config)
    check = raw(arrays, directions, cfg.chunk_rows)
    max_abs_diff = float(np.abs(reference - check).max())
    log(f"warm-up done; max |ours - raw| = {max_abs_diff:.3g} (scores span {np.ptp(reference):.3g})")
    names = ["raw", "ours"]
    run_method = {
        "raw": lambda: raw(arrays, directions, cfg.chunk_rows),
        "ours": lambda: ours(res, job_id, config),
    }
    times: dict[str, list[float]] = {m: [] for m in names}
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate, and reverse every other rep
        for method in order if rep % 2 == 0 else order[::-1]:
            gc.collect()
            start = time.perf_counter()
            run_method[method]()
            times[method].append(time.perf_counter() - start)
            log(f"rep {rep} {method}: {times[method][-1]:.2f} s")
    methods = {m: summarise(times[m], cfg.samples) for m in names}
    ratio = methods["ours"]["samples_per_s"] / methods["raw"]["samples_per_s"]
    pair_ratios = [r / o for o, r in zip(times["ours"], times["raw"], strict=True)]
    arrays.clear()  # frees the in-memory copy before score_job and the children run
    del check
    gc.collect()
    full_job = None
    if args.full_job:
        log("one complete score_job (anchor self-scores, threshold, 100k score rows written)")
        start = time.perf_counter()
        table = score_job(res, job_id)
        full_job = {
            "seconds": time.perf_counter() - start,
            "samples": len(table.ids),
            "max_abs_diff_vs_ours": float(np.abs(table.scores - reference).max()),
        }
        log(f"score_job: {full_job['seconds']:.2f} s")
    rss = {}
    if not args.no_rss:
        rss = {m: rss_child(m, data_dir, job_id, cfg) for m in ("ours", "raw")}
        for m in rss:
            methods[m] |= {k: v for k, v in rss[m].items() if k != "method"}
    return {
        "benchmark": "coord_score",
        "label": args.label,
        "settings": {
            "samples": cfg.samples,
            "checkpoints": cfg.checkpoints,
            "dim": cfg.dim,
            "part_rows": cfg.part_rows,
            "parts": len(parts),
            "anchors": cfg.anchors,
            "chunk_rows": cfg.chunk_rows,
            "similarity": "cosine",
            "lrs": cfg.lrs,
            "reps": args.reps,
            "blob_bytes": blob_bytes,
            "page_cache": "warm (blobs just written, one warm-up pass)",
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        },
        "build_s": build_s,
        "methods": methods,
        "ratio_ours_over_raw": ratio,
        "ratio_ours_over_raw_pair_median": statistics.median(pair_ratios),
        "max_abs_diff_ours_vs_raw": max_abs_diff,
        "score_job_full": full_job,
        "targets": {"ours_over_raw": {"value": ratio, "target": ">= 0.7", "pass": ratio >= 0.7}},
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
    p.add_argument("--samples", type=int, default=100_000, help="candidate samples (default 100000)")
    p.add_argument("--checkpoints", type=int, default=4, help="T (default 4)")
    p.add_argument("--dim", type=int, default=4096, help="k (default 4096)")
    p.add_argument("--part-rows", type=int, default=8192, help="rows per uploaded shard part (default 8192)")
    p.add_argument("--anchors", type=int, default=64, help="anchor samples (default 64)")
    p.add_argument(
        "--chunk-rows", type=int, default=TraceConfig().chunk_rows, help="TraceConfig.chunk_rows (default as score_job)"
    )
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each method (default 3)")
    p.add_argument("--full-job", action=argparse.BooleanOptionalAction, default=True, help="also time score_job once")
    p.add_argument("--no-rss", action="store_true", help="skip the per-method RSS children")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / ".work", help="parent of the work directory")
    p.add_argument("--keep", action="store_true", help="keep the work directory (blobs, database)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--label", default=None, help="free text stored in the JSON (e.g. which code was measured)")
    p.add_argument("--only", choices=("ours", "raw"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Settings(args.samples, args.checkpoints, args.dim, args.part_rows, args.anchors, args.chunk_rows)
    if args.only:
        print(json.dumps(child_main(args, cfg)))
        return 0
    needed = cfg.samples * cfg.checkpoints * cfg.dim * 2
    free = shutil.disk_usage(args.work_dir.parent if not args.work_dir.exists() else args.work_dir).free
    if free < 1.5 * needed:
        raise SystemExit(f"need ~{needed / 1e9:.1f} GB of disk under {args.work_dir}, {free / 1e9:.1f} GB free")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="coord-", dir=args.work_dir))
    try:
        result = run(args, cfg, work)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
