"""Per-sample gradient + projection throughput: ours against the batched-backward limit and the LESS/CLUES loop.

One model, one batch: B sequences of T random token ids (seeded), the last quarter of each labelled as the response
(random tokens rather than PubMedQA: the cost depends on B, T and the model only, and no padding blurs the limit).
LoRA r=8 on q_proj and v_proj with lora_B drawn at random (``attach_lora(random_b=True)``), so every gradient is
non-trivial. Methods:

- ``a`` (the limit): one batched LoRA forward+backward of the summed response losses,
  ``response_losses(model, ids, *label_positions(labels)).sum().backward()`` (the same LM-head-at-labels trick as
  our engines, so the comparison is strict); it yields the batch gradient only, no per-sample gradients.
- ``a_hf`` (reference): the standard ``model(input_ids, labels=labels).loss.backward()`` (LM head at every position).
- ``hooks`` and ``vmap`` (ours, "b"): per-sample gradients from `build_gradient_computer` (vmap with chunk_size=B)
  followed by the SJLT projection to k dims (``make_spec("sjlt", k, 0, lora_layout(model))``).
- ``c`` (LESS/CLUES): the batch-size-1 ``loop`` engine followed by a dense Rademacher projection whose blocks are
  regenerated on every call, TRAK ``BasicProjector`` style (`TrakDenseProjector`, defined here: it is the baseline,
  not the product).

Timing: one warmup call of each method, then repetitions interleaved a, a_hf, hooks, vmap, c, a, ... so that the
noise of a shared machine falls on all methods alike; samples/s = B / median seconds. ``c`` may run fewer
repetitions (``--reps-c``); its warmup runs the loop on one sample only. Threads: one by default (``--threads``;
on a shared 2-core machine two OpenMP threads stall whenever the other tenant holds a core). Peak RSS: a
fresh child process (``--only METHOD``, run before the parent loads anything) per method loads the model and runs
the method once; ``peak_rss_mb`` is the child's ``ru_maxrss`` (load included), ``compute_rss_mb`` the peak during
the call only (``/proc/self/clear_refs`` reset after loading; Linux).

Targets (pass/fail printed under ``targets``), with b = hooks (the default engine; vmap reported beside):

- samples/s of b / samples/s of a >= 0.85;
- samples/s of b / samples/s of c >= 1.5;
- peak RSS of b <= 1.10 · (peak RSS of a + 2·B·P·4 bytes), P = number of LoRA parameters.

Usage::

    python bench/pergrad.py --config tiny --out bench/results/pergrad-tiny.json
    python bench/pergrad.py --config smollm2 --out bench/results/pergrad-smollm2.json

One JSON object goes to stdout (and to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from common import emit, make_log  # bench/common.py (the script's directory is on sys.path)
from torch import Tensor, nn

from scoring.config import LoraSettings
from scoring.gradients import build_gradient_computer, label_positions, response_losses
from scoring.models import attach_lora, load_base_model, lora_layout
from scoring.projection import DENSE_BLOCK_ENTRIES, build_projector, flatten_grads, make_spec

METHODS = ("a", "a_hf", "hooks", "vmap", "c")


@dataclass(frozen=True)
class Config:
    """One benchmark setting."""

    model: str
    batch: int
    seq_len: int
    proj_dim: int
    reps: int
    reps_c: int
    threads: int  # torch intra-op threads; 0 = torch's default (one per core)


CONFIGS = {
    # tiny: P = 3584 LoRA parameters, so k = 1024 (< P) keeps the projection a compression.
    # One thread for both: on a shared 2-core machine a 2-thread OpenMP region stalls whenever the other process
    # holds a core (the same SmolLM2 batch measured 4.6 s and 34 s within one repetition); one thread is stable.
    "tiny": Config(model="tiny", batch=8, seq_len=64, proj_dim=1024, reps=30, reps_c=30, threads=1),
    "smollm2": Config(model="smollm2", batch=8, seq_len=256, proj_dim=8192, reps=5, reps_c=3, threads=1),
}


log = make_log("pergrad")


def make_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(B, T) random token ids from [3, vocab) and labels: ids on the last T//4 positions, -100 before."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen)  # (B, T)
    labels = torch.full_like(ids, -100)
    n_resp = max(2, seq_len // 4)
    labels[:, -n_resp:] = ids[:, -n_resp:]
    return ids, labels


def load_model(cfg: Config) -> nn.Module:
    """The base model with LoRA r=8 on q_proj/v_proj, lora_B random (non-zero lora_A gradients), in eval mode."""
    base = load_base_model(cfg.model)
    model = attach_lora(
        base.model, LoraSettings(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj")), random_b=True
    )
    model.eval()
    return model


class TrakDenseProjector:
    """Baseline: dense ±1/√k projection regenerated block by block on every call (TRAK ``BasicProjector`` style).

    For each block of ``rows`` coordinates of the flattened gradient, a torch.Generator is seeded with
    ``seed + 10_000 · block`` (as TRAK does), a (rows, k) 0/1 block is drawn with ``torch.randint`` on the CPU and
    mapped to ±1, multiplied into the output and dropped. The draw buffer is reused across blocks (generous to the
    baseline). Block size = the same 2^23 entries (32 MiB) as `scoring.projection.DenseProjector`.
    """

    def __init__(self, dim: int, seed: int = 0, block_entries: int = DENSE_BLOCK_ENTRIES):
        self.dim, self.seed = dim, seed
        self.rows = max(1, block_entries // dim)

    def project(self, grads: dict[str, Tensor]) -> Tensor:
        flat = flatten_grads(grads)  # (B, D)
        b, d = flat.shape
        out = torch.zeros(b, self.dim)  # (B, k)
        buf = torch.empty(self.rows, self.dim)  # (rows, k), reused
        gen = torch.Generator(device="cpu")
        for i, start in enumerate(range(0, d, self.rows)):
            stop = min(d, start + self.rows)
            gen.manual_seed(self.seed + 10_000 * i)
            block = buf[: stop - start]
            torch.randint(0, 2, block.shape, generator=gen, out=block)
            block.mul_(2.0).sub_(1.0)  # {0, 1} -> {-1, +1}
            out.addmm_(flat[:, start:stop], block)
        return out.mul_(1.0 / math.sqrt(self.dim))


class Bench:
    """The model, the batch and one callable per method; each call returns its stage times in seconds."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model = load_model(cfg)
        vocab = self.model.get_base_model().config.vocab_size
        self.ids, self.labels = make_batch(vocab, cfg.batch, cfg.seq_len)
        self.layout = lora_layout(self.model)
        self.num_params = sum(math.prod(shape) for _, shape in self.layout)
        self.sjlt = build_projector(make_spec("sjlt", cfg.proj_dim, 0, self.layout))
        self.dense = TrakDenseProjector(cfg.proj_dim)
        self.engines = {
            "hooks": build_gradient_computer(self.model, "hooks"),
            "vmap": build_gradient_computer(self.model, "vmap", chunk_size=cfg.batch),
            "loop": build_gradient_computer(self.model, "loop"),
        }
        self.last: dict[str, tuple[dict, Tensor]] = {}  # method -> (grads, projection) of its last call

    def run(self, method: str) -> dict[str, float]:
        ids, labels = self.ids, self.labels
        start = time.perf_counter()
        if method == "a":
            response_losses(self.model, ids, *label_positions(labels)).sum().backward()
            self.model.zero_grad(set_to_none=True)
            return {"total": time.perf_counter() - start}
        if method == "a_hf":
            self.model(input_ids=ids, labels=labels).loss.backward()
            self.model.zero_grad(set_to_none=True)
            return {"total": time.perf_counter() - start}
        engine, projector = (self.engines["loop"], self.dense) if method == "c" else (self.engines[method], self.sjlt)
        grads, _ = engine.compute(ids, labels)
        mid = time.perf_counter()
        proj = projector.project(grads)
        end = time.perf_counter()
        self.last[method] = (grads, proj)
        return {"total": end - start, "grad": mid - start, "proj": end - mid}


def max_rel_diff(x: dict[str, Tensor], y: dict[str, Tensor], rows: int) -> float:
    """max |x - y| / max |y| over the first ``rows`` samples of two per-sample gradient dicts."""
    fx, fy = flatten_grads(x)[:rows], flatten_grads(y)[:rows]
    return float((fx - fy).abs().max() / fy.abs().max())


def check_agreement(bench: Bench) -> dict[str, float]:
    """Hooks/vmap per-sample gradients vs the loop engine on the same sample (the warmup calls supply them)."""
    loop_grads = bench.last["c"][0]
    rows = next(iter(loop_grads.values())).shape[0]
    return {
        "hooks_vs_loop_max_rel": max_rel_diff(bench.last["hooks"][0], loop_grads, rows),
        "vmap_vs_loop_max_rel": max_rel_diff(bench.last["vmap"][0], loop_grads, rows),
    }


def time_methods(bench: Bench) -> tuple[dict[str, list[dict[str, float]]], dict[str, float]]:
    """Warm up every method once, then interleave the timed repetitions."""
    cfg = bench.cfg
    for method in METHODS:
        log(f"warmup {method}")
        if method == "c":  # the loop on one sample (for the agreement check); the dense projection needs no warmup
            bench.last["c"] = (bench.engines["loop"].compute(bench.ids[:1], bench.labels[:1])[0], torch.empty(0))
        else:
            bench.run(method)
    agreement = check_agreement(bench)
    log(f"agreement {agreement}")
    times: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for rep in range(max(cfg.reps, cfg.reps_c)):
        for method in METHODS:
            if rep >= (cfg.reps_c if method == "c" else cfg.reps):
                continue
            gc.collect()
            times[method].append(bench.run(method))
            log(f"rep {rep} {method}: {times[method][-1]['total']:.3f} s")
    return times, agreement


def summarise(times: list[dict[str, float]], batch: int) -> dict:
    """Median and minimum of every stage over the repetitions, and samples/s from the median total."""
    out: dict = {"reps": len(times)}
    for stage in times[0]:
        values = [t[stage] for t in times]
        out[f"{stage}_median_s"] = statistics.median(values)
        out[f"{stage}_min_s"] = min(values)
    out["times_s"] = [round(t["total"], 4) for t in times]
    out["samples_per_s"] = batch / out["total_median_s"]
    return out


def rss_child(config: str, method: str, cfg: Config) -> dict:
    """Run ``--only method`` in a fresh interpreter and return its memory report."""
    cmd = [sys.executable, __file__, "--config", config, "--only", method, "--proj-dim", str(cfg.proj_dim)]
    cmd += ["--batch", str(cfg.batch), "--seq-len", str(cfg.seq_len), "--threads", str(cfg.threads)]
    log(f"child {method}")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def child_main(cfg: Config, method: str) -> dict:
    """Load, reset the RSS high-water mark, run ``method`` once on the full batch; report peaks in MiB."""
    bench = Bench(cfg)
    gc.collect()
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after_load = _current_rss_mb()
    reset = _reset_peak()
    seconds = bench.run(method)["total"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "peak_rss_mb": max(load_peak, peak),
        "compute_rss_mb": peak if reset else None,
        "rss_after_load_mb": after_load,
        "seconds": seconds,
    }


def _current_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM, which ru_maxrss of a live process reads
        return True
    except OSError:
        return False


def targets(methods: dict, rss: dict, cfg: Config, num_params: int) -> dict:
    """Pass/fail of the three targets (b = hooks), plus the same figures for vmap."""
    sps = {m: methods[m]["samples_per_s"] for m in METHODS}
    extra = 2 * cfg.batch * num_params * 4 / 2**20  # MiB
    out: dict = {"rss_extra_allowance_mb": extra}
    for b in ("hooks", "vmap"):
        over_a, over_c = sps[b] / sps["a"], sps[b] / sps["c"]
        out[f"{b}_over_a"] = {"value": over_a, "target": ">= 0.85", "pass": over_a >= 0.85}
        out[f"{b}_over_c"] = {"value": over_c, "target": ">= 1.5", "pass": over_c >= 1.5}
        for key in ("peak_rss_mb", "compute_rss_mb"):
            if rss[b][key] is None or rss["a"][key] is None:
                continue
            bound = 1.10 * (rss["a"][key] + extra)
            out[f"{b}_{key}"] = {"value": rss[b][key], "bound": bound, "pass": rss[b][key] <= bound}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--batch", type=int, default=None, help="B (default per config: 8)")
    p.add_argument("--seq-len", type=int, default=None, help="T tokens per sample (tiny 64, smollm2 256)")
    p.add_argument("--proj-dim", type=int, default=None, help="k (tiny 1024, smollm2 8192)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (tiny 30, smollm2 5)")
    p.add_argument("--reps-c", type=int, default=None, help="timed repetitions of c (tiny 30, smollm2 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, 0 = torch default (default 1)")
    p.add_argument("--only", choices=METHODS, default=None, help="child mode: run one method once, report RSS")
    p.add_argument("--no-rss", action="store_true", help="skip the per-method RSS children")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    cfg = CONFIGS[args.config]
    overrides = {"batch": args.batch, "seq_len": args.seq_len, "proj_dim": args.proj_dim}
    overrides |= {"reps": args.reps, "reps_c": args.reps_c, "threads": args.threads}
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if args.only:
        print(json.dumps(child_main(cfg, args.only)))
        return 0
    started = time.perf_counter()
    # Children first, while this process holds no model: their peaks never coexist with the timing run's memory.
    rss = {} if args.no_rss else {m: rss_child(args.config, m, cfg) for m in METHODS}
    bench = Bench(cfg)
    log(f"{args.config}: P={bench.num_params} B={cfg.batch} T={cfg.seq_len} k={cfg.proj_dim}")
    times, agreement = time_methods(bench)
    methods = {m: summarise(times[m], cfg.batch) for m in METHODS}
    num_params = bench.num_params
    for m in rss:
        methods[m] |= {k: v for k, v in rss[m].items() if k != "method"}
    result = {
        "benchmark": "pergrad",
        "config": args.config,
        "settings": asdict(cfg) | {"lora": "q_proj,v_proj r=8 alpha=16, random lora_B", "inputs": "random tokens"},
        "num_lora_params": num_params,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg(),
        },
        "methods": methods,
        "ratios": {
            f"{b}_over_{r}": methods[b]["samples_per_s"] / methods[r]["samples_per_s"]
            for b in ("hooks", "vmap")
            for r in ("a", "a_hf", "c")
        },
        "targets": targets(methods, rss, cfg, num_params) if rss else None,
        "agreement": agreement,
        "wall_s": time.perf_counter() - started,
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
