"""The method's steps as plain functions: warmup -> project -> score (thresholds live in `scoring.selection`).

The CLI, the silo agent and the coordinator's workers all call these; they do no I/O beyond the run and
projection directories they are given.

A *run directory* (made by `run_warmup`) holds ``run.json`` (model reference, LoRA settings, template, max_len,
projection spec, the LoRA ``layout`` it hashes, checkpoints with η_t) and ``ckpt-NNN/`` checkpoints (see
`scoring.training`). `checkpoint_bundles` packs its checkpoints for the coordinator (``clues.checkpoint/1``, see
`scoring.io`) and `write_run_dir` rebuilds a run directory from them.

A *projection directory* (made by `project_samples`) holds ``ckpt-NNN.<role>.safetensors`` files (see `scoring.io`):
role ``candidate`` for samples to be scored (Adam-preconditioned when asked), and, for the anchor set, also role
``anchor`` (plain gradients, from which the anchor direction is built). Every file carries each sample's response
loss ℓ(y|x); the files of the signal checkpoint also carry the extra signals asked for (`scoring.signals`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scoring.batching import make_batches, tokenize_samples
from scoring.config import (
    DEFAULT_MAX_LEN,
    SIGNALS,
    AdamState,
    LoraSettings,
    ProjectionSpec,
    TraceConfig,
    TrainingConfig,
    parameter_layout_hash,
)
from scoring.data import Sample
from scoring.errors import ConfigError, DataError
from scoring.gradients import adam_precondition, build_gradient_computer
from scoring.io import (
    CheckpointBundle,
    checkpoint_to_bytes,
    load_projection,
    save_projection,
    write_checkpoint_dir,
)
from scoring.models import attach_lora, load_base_model, lora_layout, save_adapter
from scoring.projection import build_projector, make_spec
from scoring.signals import sample_signals
from scoring.spec import JobSpec, manifest_has_moments
from scoring.traces import score_anchor_samples, score_projections
from scoring.training import Checkpoint, checkpoint_entry, read_run, train_lora, write_run_manifest
from scoring.types import ProjectedGrads, ScoreTable
from wire.files import atomic_dir, atomic_write_bytes

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class ModelOptions:
    """Where and how the model runs (not part of any fingerprint: results agree across devices and dtypes)."""

    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: Path | None = None


@dataclass(frozen=True)
class ProjectOptions:
    """How per-sample gradients are computed and projected.

    Attributes:
        engine: ``hooks`` (default, fastest), ``vmap`` (torch.func) or ``loop`` (reference).
        batch_size: samples per gradient batch.
        chunk_size: vmap slice size (vmap engine only).
        precondition: Adam-precondition candidate gradients with the checkpoint's moments (LESS/CLUES).
        signals: extra per-sample signals to compute (`scoring.config.SIGNALS`; `scoring.signals.sample_signals`),
            written into the files of ``signal_checkpoint``; empty: none (the pure CLUES protocol).
        signal_checkpoint: the checkpoint index at which the signals are computed; None: the last one.
    """

    engine: str = "hooks"
    batch_size: int = 8
    chunk_size: int | None = None
    precondition: bool = True
    signals: tuple[str, ...] = ()
    signal_checkpoint: int | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown or len(set(self.signals)) != len(self.signals):
            raise ConfigError(f"signals: expected distinct names among {list(SIGNALS)}, got {list(self.signals)}")
        t = self.signal_checkpoint
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 0):
            raise ConfigError(f"signal_checkpoint: must be a checkpoint index >= 0 or None, got {t!r}")

    @classmethod
    def for_job(
        cls, how: JobSpec, engine: str = "hooks", batch_size: int = 8, precondition: bool | None = None
    ) -> ProjectOptions:
        """The options a job's gradients are computed under: its preconditioning (unless ``precondition`` says
        otherwise), signals and signal checkpoint, with this party's engine and batch size."""
        return cls(
            engine=engine,
            batch_size=batch_size,
            precondition=how.precondition if precondition is None else precondition,
            signals=how.signals,
            signal_checkpoint=how.signal_index,
        )


def load_run_model(run_dir: Path, opts: ModelOptions) -> tuple[nn.Module, object, dict, list[Checkpoint]]:
    """The base model of a run with a LoRA adapter attached (weights set per checkpoint by `use_checkpoint`)."""
    manifest, checkpoints = read_run(run_dir)
    lora = LoraSettings.from_dict(manifest["lora"])
    model, tokenizer = _lora_model(manifest["model"], lora, manifest["lora_init_seed"], False, opts)
    return model, tokenizer, manifest, checkpoints


def _lora_model(ref: str, lora: LoraSettings, init_seed: int, random_b: bool, opts: ModelOptions):
    """Base model with a fresh, seeded LoRA adapter, in eval mode. Eager attention: the vmap engine needs it, and
    SDPA's CPU kernel moves gradients by ~1e-4 relative against the batch-size-1 reference."""
    base = load_base_model(
        ref, dtype=opts.dtype, device=opts.device, attn_implementation="eager", cache_dir=opts.cache_dir
    )
    model = attach_lora(base.model, lora, init_seed=init_seed, random_b=random_b)
    model.eval()
    return model, base.tokenizer


def use_checkpoint(model: nn.Module, ckpt: Checkpoint) -> None:
    """Load a checkpoint's adapter weights into ``model`` in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(ckpt.adapter_dir / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise DataError(f"{ckpt.adapter_dir}: adapter lacks {missing[:3]}")


def run_warmup(
    model_ref: str,
    samples: Sequence[Sample],
    out_dir: Path,
    *,
    lora: LoraSettings,
    training: TrainingConfig | None,
    projection: dict,
    max_len: int = DEFAULT_MAX_LEN,
    template: str = "auto",
    lora_init_seed: int = 0,
    random_b: bool = True,
    model_opts: ModelOptions = ModelOptions(),
    progress: Callable[[int, int, float], None] | None = None,
) -> list[Checkpoint]:
    """Train LoRA on ``samples`` and save checkpoints plus ``run.json`` under ``out_dir``.

    With ``training=None`` no step is taken: one checkpoint of the initial adapter is saved with η=1 and no Adam
    moments (scoring "without warmup").

    ``random_b`` (default) draws lora_B at random instead of peft's zeros: at B=0 every lora_A gradient is zero, so
    early checkpoints would score with half the LoRA coordinates silent. On PubMedQA (bench/quality.py) this raised
    the trace AUROC from 0.85 to 0.94.

    Args:
        projection: ``{"kind", "dim", "seed", "nnz"}``; the spec is completed with the model's LoRA layout.
    """
    model, tokenizer = _lora_model(model_ref, lora, lora_init_seed, random_b, model_opts)
    layout = lora_layout(model)
    spec = make_spec(projection["kind"], projection["dim"], projection["seed"], layout, nnz=projection.get("nnz", 4))
    info = {
        "model": model_ref,
        "lora": lora.to_dict(),
        "lora_init_seed": lora_init_seed,
        "max_len": max_len,
        "template": template,
        "projection": spec.to_dict(),
        "layout": [[name, list(shape)] for name, shape in layout],
        "num_train_samples": len(samples),
    }
    out_dir = Path(out_dir)
    if training is None:
        return _save_initial_checkpoint(model, out_dir, info)
    data = tokenize_samples(samples, tokenizer, max_len, template=template)
    return train_lora(model, data, training, out_dir, pad_id=tokenizer.pad_token_id, run_info=info, progress=progress)


def _save_initial_checkpoint(model: nn.Module, out_dir: Path, info: dict) -> list[Checkpoint]:
    ckpt = Checkpoint(0, 0, 1.0, 1.0, out_dir / "ckpt-000", AdamState())
    save_adapter(model, ckpt.adapter_dir)
    entry = {**checkpoint_entry(ckpt), "has_moments": False}
    atomic_write_bytes(ckpt.path / "checkpoint.json", json.dumps(entry, indent=2).encode())
    write_run_manifest(out_dir, [entry], None, info)
    return [ckpt]


def checkpoint_bundles(run_dir: Path) -> list[bytes]:
    """Every checkpoint of a finished run as a ``clues.checkpoint/1`` bundle (what the admin uploads), in order."""
    manifest, checkpoints = read_run(run_dir)
    if "layout" not in manifest:
        raise DataError(f"{run_dir}: run.json has no 'layout' (an older warmup run); run 'clues warmup' again")
    entries = manifest["checkpoints"]
    return [checkpoint_to_bytes(c.path, manifest["layout"], e) for c, e in zip(checkpoints, entries, strict=True)]


def rebuild_run(
    spec: JobSpec,
    bundles: Sequence[CheckpointBundle],
    dest: Path,
    *,
    finish: Callable[[Path], None] | None = None,
    concurrent: bool = False,
) -> Path:
    """The job's run directory at ``dest``, rebuilt from its checkpoint bundles: what the silo's agent and the
    coordinator's workers both do before projecting. Built aside and renamed into place (`wire.files.atomic_dir`),
    so a crash never leaves half a run.

    Args:
        finish: called on the directory before it is renamed into place (a silo adds its own Adam moments there).
        concurrent: other processes may rebuild the same run at once; a finished copy of theirs (with
            ``run.json``) stands and this one is dropped.
    """
    with atomic_dir(dest, complete="run.json" if concurrent else None) as tmp:
        write_run_dir(spec.run.manifest(), bundles, tmp)
        if finish is not None:
            finish(tmp)
    return dest


def write_run_dir(run_info: dict, bundles: Sequence[CheckpointBundle], dest: Path) -> list[Checkpoint]:
    """Rebuild a run directory from validated checkpoint bundles (`scoring.io.checkpoint_from_bytes`).

    Args:
        run_info: the ``run.json`` fields besides the checkpoints: ``model``, ``lora``, ``lora_init_seed``,
            ``max_len``, ``template``, ``projection`` (whose ``param_hash`` must be the bundles' layout hash).
        bundles: one per checkpoint, in any order; distinct indices, one layout.
        dest: the run directory; ``run.json`` is removed first and written last.

    Returns:
        The run's checkpoints, as `scoring.training.read_run` gives them.
    """
    if not bundles:
        raise DataError("write_run_dir: no checkpoint bundles")
    layout = bundles[0].layout
    if any(b.layout != layout for b in bundles):
        raise DataError("write_run_dir: the checkpoint bundles have different layouts")
    indices = sorted(b.index for b in bundles)
    if len(set(indices)) != len(indices):
        raise DataError(f"write_run_dir: checkpoint indices repeat: {indices}")
    if "projection" in run_info:
        expected = ProjectionSpec.from_dict(run_info["projection"]).param_hash
        if parameter_layout_hash(layout) != expected:
            raise DataError(f"write_run_dir: the bundles' layout does not hash to the projection's {expected}")
    dest = Path(dest)
    (dest / "run.json").unlink(missing_ok=True)
    entries = []
    for bundle in sorted(bundles, key=lambda b: b.index):
        path = dest / f"ckpt-{bundle.index:03d}"
        write_checkpoint_dir(bundle, path)
        entries.append(bundle.run_entry(path.name))
    info = {k: v for k, v in run_info.items() if k != "checkpoints"}
    info["layout"] = [[name, list(shape)] for name, shape in layout]
    write_run_manifest(dest, entries, None, info)
    return read_run(dest)[1]


def project_samples(
    run_dir: Path,
    samples: Sequence[Sample],
    out_dir: Path,
    *,
    anchor: bool = False,
    opts: ProjectOptions = ProjectOptions(),
    model_opts: ModelOptions = ModelOptions(),
    progress: Progress | None = None,
) -> list[Path]:
    """Project every sample's gradient at every checkpoint of a run; write one file per checkpoint and role.

    Candidates (``anchor=False``) are written as role ``candidate`` (Adam-preconditioned when
    ``opts.precondition``). The anchor set (``anchor=True``) is written as role ``anchor`` with plain gradients, and
    also as role ``candidate`` (treated like any silo's samples) so that anchor samples can be scored for the
    mean-anchor-score threshold. Each file also carries every sample's mean response loss, and the files of
    ``opts.signal_checkpoint`` the signals ``opts.signals`` (computed at that checkpoint's weights).

    Raises:
        ConfigError: preconditioning without Adam moments, or a signal checkpoint the run does not have.

    Returns:
        The written file paths.
    """
    try:
        return _project_samples(run_dir, samples, out_dir, anchor, opts, model_opts, progress)
    finally:
        release_memory()


def release_memory() -> None:
    """Hand the freed model, activations and gradient buffers back to the OS.

    glibc keeps freed heap memory: after projecting with SmolLM2 a process stays at ~6.3 GiB resident with nothing
    alive, enough that three silo agents waiting for their scores on one 23 GiB machine got one OOM-killed.
    ``malloc_trim`` brings it back to ~0.4 GiB (measured). A no-op off glibc.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class GradientBatch:
    """One batch of a `GradientPass` at one checkpoint.

    Attributes:
        ids: the batch's sample ids.
        rows: their positions in the pass's ``samples``.
        grads: name -> (B, *shape) plain per-sample LoRA gradients (what anchor directions are built from).
        candidate: the gradients as candidates are scored: Adam-preconditioned when the pass preconditions, else
            ``grads`` itself.
        losses: (B,) mean response losses ℓ(y|x).
    """

    ids: list[str]
    rows: list[int]
    grads: dict[str, torch.Tensor]
    candidate: dict[str, torch.Tensor]
    losses: torch.Tensor


class GradientPass:
    """Exact per-sample LoRA gradients of ``samples`` at every checkpoint of a run, batch by batch: the one gradient
    loop behind `project_samples` and the exact silo-local scoring of `scoring.exact_scoring`.

    The model, tokens and batches are prepared once; `checkpoints` moves the model to each checkpoint in turn and
    `batches` gives that checkpoint's gradients (it may be iterated more than once per checkpoint)::

        with GradientPass(run_dir, samples, opts, model_opts, progress) as grads:
            for ckpt in grads.checkpoints():
                for batch in grads.batches(ckpt):
                    ...
                signals = grads.signals(ckpt)  # the signals asked for, at the signal checkpoint only

    Leaving the ``with`` block drops the model; call `release_memory` after it to hand the memory back to the OS.

    Raises:
        ConfigError: preconditioning without Adam moments, or a signal checkpoint the run does not have.
    """

    def __init__(
        self,
        run_dir: Path,
        samples: Sequence[Sample],
        opts: ProjectOptions = ProjectOptions(),
        model_opts: ModelOptions = ModelOptions(),
        progress: Progress | None = None,
        passes: int = 1,
    ) -> None:
        self.model, self.tokenizer, self.manifest, self.run_checkpoints = load_run_model(run_dir, model_opts)
        if opts.precondition and not manifest_has_moments(self.manifest):
            raise ConfigError("precondition: the run has no Adam moments (it was not trained); use --no-precondition")
        self.opts, self.samples, self.progress = opts, samples, progress
        self.signal_at = _signal_checkpoint(opts, [c.index for c in self.run_checkpoints])
        self.tokenized = tokenize_samples(
            samples, self.tokenizer, self.manifest["max_len"], template=self.manifest["template"]
        )
        self._batches = make_batches(self.tokenized, opts.batch_size, self.tokenizer.pad_token_id)
        self._order = {s.id: i for i, s in enumerate(samples)}
        self._engine = build_gradient_computer(self.model, opts.engine, chunk_size=opts.chunk_size)
        self._device = next(self.model.parameters()).device
        self._moments = None
        self.done, self.total = 0, passes * len(self.run_checkpoints) * len(self.tokenized)

    def __enter__(self) -> GradientPass:
        return self

    def __exit__(self, *exc: object) -> None:
        self.model = self._engine = self._moments = None

    @property
    def spec(self) -> ProjectionSpec:
        """The run's projection spec."""
        return ProjectionSpec.from_dict(self.manifest["projection"])

    def checkpoints(self) -> Iterator[Checkpoint]:
        """The run's checkpoints in order, the model moved to each before it is yielded."""
        for ckpt in self.run_checkpoints:
            use_checkpoint(self.model, ckpt)
            self._moments = ckpt.moments() if self.opts.precondition else None
            yield ckpt

    def batches(self, ckpt: Checkpoint) -> Iterator[GradientBatch]:
        """Every batch's gradients at ``ckpt`` (the checkpoint `checkpoints` last yielded)."""
        for batch in self._batches:
            grads, losses = self._engine.compute(batch.input_ids.to(self._device), batch.labels.to(self._device))
            candidate = grads if self._moments is None else adam_precondition(grads, *self._moments, ckpt.adam)
            yield GradientBatch(batch.ids, [self._order[i] for i in batch.ids], grads, candidate, losses.detach())
            self.done += len(batch.ids)
            if self.progress:
                self.progress(self.done, self.total)

    def signals(self, ckpt: Checkpoint) -> dict[str, np.ndarray] | None:
        """The signals ``opts.signals`` at ``ckpt`` when it is the signal checkpoint ((N,) each, in the order of
        ``samples``); None elsewhere or when none are asked for."""
        if not self.opts.signals or ckpt.index != self.signal_at:
            return None
        computed = sample_signals(
            self.model,
            self.tokenizer,
            self.samples,
            self.tokenized,
            template=self.manifest["template"],
            batch_size=self.opts.batch_size,
        )
        return {name: computed[name] for name in self.opts.signals}


def _project_samples(
    run_dir: Path,
    samples: Sequence[Sample],
    out_dir: Path,
    anchor: bool,
    opts: ProjectOptions,
    model_opts: ModelOptions,
    progress: Progress | None,
) -> list[Path]:
    with GradientPass(run_dir, samples, opts, model_opts, progress) as grads:
        return _project_pass(grads, samples, out_dir, anchor)


def _project_pass(grads: GradientPass, samples: Sequence[Sample], out_dir: Path, anchor: bool) -> list[Path]:
    spec, manifest = grads.spec, grads.manifest
    projector = build_projector(spec)
    roles = ("candidate", "anchor") if anchor else ("candidate",)
    ids = tuple(s.id for s in samples)
    extra = {"model": manifest["model"], "lora": manifest["lora"], "num_samples": len(ids)}
    written = []
    for ckpt in grads.checkpoints():
        matrices = {role: np.zeros((len(samples), spec.dim), dtype=np.float16) for role in roles}
        loss = np.zeros(len(samples))
        for batch in grads.batches(ckpt):
            matrices["candidate"][batch.rows] = projector.project(batch.candidate).cpu().numpy()
            if anchor:
                matrices["anchor"][batch.rows] = projector.project(batch.grads).cpu().numpy()
            loss[batch.rows] = batch.losses.cpu().numpy()
        signals = grads.signals(ckpt)
        for role in roles:
            proj = ProjectedGrads(
                ids=ids,
                matrix=matrices[role],
                spec=spec,
                checkpoint=ckpt.index,
                lr=ckpt.lr,
                role=role,
                preconditioned=role == "candidate" and grads.opts.precondition,
                extra=extra,
            )
            path = Path(out_dir) / f"ckpt-{ckpt.index:03d}.{role}.safetensors"
            save_projection(path, proj, losses=loss, signals=signals)
            written.append(path)
    return written


def _signal_checkpoint(opts: ProjectOptions, indices: Sequence[int]) -> int:
    """The checkpoint index the signals are computed at (the last one unless ``opts`` names one the run has)."""
    if opts.signal_checkpoint is None:
        return max(indices)
    if opts.signal_checkpoint not in indices:
        raise ConfigError(f"signal_checkpoint: the run has checkpoints {list(indices)}, not {opts.signal_checkpoint}")
    return opts.signal_checkpoint


def load_projection_dir(path: Path, role: str) -> tuple[list[ProjectedGrads], np.ndarray | None]:
    """All ``ckpt-NNN.<role>.safetensors`` of a projection directory in checkpoint order, and the losses of the
    first checkpoint (the loss of the model at checkpoint 0: the perplexity baseline)."""
    files = sorted(Path(path).glob(f"ckpt-*.{role}.safetensors"))
    if not files:
        raise DataError(f"{path}: no ckpt-*.{role}.safetensors files (run 'clues project' first)")
    loaded = [load_projection(f) for f in files]
    return [f.proj for f in loaded], loaded[0].losses


def score_dirs(
    silo_dirs: dict[str, Path], anchor_dir: Path, config: TraceConfig, anchor_groups: Sequence[str] | None = None
) -> tuple[ScoreTable, ScoreTable]:
    """Trace scores of every silo's samples and of the anchor samples themselves."""
    anchors, _ = load_projection_dir(anchor_dir, "anchor")
    anchors_as_candidates, _ = load_projection_dir(anchor_dir, "candidate")
    candidates = {name: load_projection_dir(d, "candidate")[0] for name, d in silo_dirs.items()}
    table = score_projections(candidates, anchors, config, anchor_groups=anchor_groups)
    anchor_table = score_anchor_samples(anchors_as_candidates, anchors, config, anchor_groups=anchor_groups)
    return table, anchor_table
