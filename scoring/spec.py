"""What a scoring job is, typed and torch-free: the run every party rebuilds, its checkpoints, and how it scores.

The wire form (`JobSpec.to_dict`, what ``GET /v1/jobs/{id}`` shows under ``spec`` and what a silo's agent reads) is
unchanged from the untyped dict it replaces; `JobSpec.from_dict` reads it back, filling what an older coordinator
left out. `JobSpec.of` builds it from a stored job row. Each default has one home (`scoring.config`:
`DEFAULT_MAX_LEN`, ...), and `RunSpec.manifest` is the one definition of the part of a job that rebuilds a run
directory (`scoring.workflow.rebuild_run`, called by both the silo's agent and the coordinator's workers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from scoring.config import DEFAULT_GRADIENTS, DEFAULT_MAX_LEN, DEFAULT_SCORING_MODE, DEFAULT_TEMPLATE

LEGACY_SCORE_KIND = "trace"
"""The score kind of a job stored before score kinds existed (the pure CLUES trace); a new job's default is
`scoring.config.DEFAULT_SCORE_KIND`."""


@dataclass(frozen=True)
class CheckpointEntry:
    """Checkpoint ``index`` of a job: its step and learning rates, the Adam settings its moments were made with, and
    the SHA-256 of its uploaded bundle (None until uploaded)."""

    index: int
    step: int
    lr: float
    lr_last: float | None = None
    adam: dict[str, Any] | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "step": self.step,
            "lr": self.lr,
            "lr_last": self.lr_last,
            "adam": self.adam,
            "sha256": self.sha256,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointEntry:
        return cls(int(d["index"]), int(d["step"]), float(d["lr"]), d.get("lr_last"), d.get("adam"), d.get("sha256"))


@dataclass(frozen=True)
class RunSpec:
    """What rebuilds a run directory's ``run.json`` beside its checkpoints: the model, LoRA settings (and their
    init seed), tokenisation and the projection every party derives from one seed."""

    model: Any
    lora: dict[str, Any]
    projection: dict[str, Any]
    lora_init_seed: int = 0
    max_len: int = DEFAULT_MAX_LEN
    template: str = DEFAULT_TEMPLATE

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> RunSpec:
        """The run spec of a run directory's ``run.json`` (which holds more: its checkpoints)."""
        return cls(
            model=manifest["model"],
            lora=manifest["lora"],
            projection=manifest["projection"],
            lora_init_seed=int(manifest.get("lora_init_seed", 0)),
            max_len=int(manifest.get("max_len", DEFAULT_MAX_LEN)),
            template=manifest.get("template", DEFAULT_TEMPLATE),
        )

    def manifest(self) -> dict[str, Any]:
        """The run manifest's job-level keys (`scoring.workflow.write_run_dir` adds the checkpoints)."""
        return {
            "model": self.model,
            "lora": self.lora,
            "lora_init_seed": self.lora_init_seed,
            "max_len": self.max_len,
            "template": self.template,
            "projection": self.projection,
        }


class StoredJob(Protocol):
    """What `JobSpec.of` reads of a stored job (`storage.models.Job`)."""

    model: Any
    lora: dict[str, Any]
    projection: dict[str, Any]
    options: dict[str, Any] | None
    precondition: bool
    similarity: str
    threshold: dict[str, Any]
    checkpoints: Sequence[Any]


@dataclass(frozen=True)
class JobSpec:
    """The scoring spec every party computes under (see the module docstring).

    ``score``, ``signals``, ``fusion`` and ``signal_checkpoint``: how the job scores (`scoring.config`); a job
    stored before they existed is a pure trace job (score ``trace``, no signals, the last checkpoint)."""

    run: RunSpec
    checkpoints: tuple[CheckpointEntry, ...]
    precondition: bool = True
    similarity: str = "cosine"
    threshold: dict[str, Any] = field(default_factory=lambda: {"kind": "mean-anchor"})
    auto_score: bool = True
    warmup: dict[str, Any] | None = None
    score: str = LEGACY_SCORE_KIND
    signals: tuple[str, ...] = ()
    fusion: str | None = None
    signal_checkpoint: int | None = None
    """None: the last checkpoint."""
    scoring_mode: str = DEFAULT_SCORING_MODE
    """``shared`` or ``local`` (`scoring.config.SCORING_MODES`)."""
    gradients: str = DEFAULT_GRADIENTS
    """``projected`` or, in a ``local`` job, ``exact`` (`scoring.config.GRADIENT_KINDS`)."""
    aggregate_epsilon: float | None = None
    """In a ``local`` job: each silo's aggregate is an ε-DP release at this ε (`scoring.privacy.noisy_aggregate`);
    None: sent as counted."""

    @property
    def exact(self) -> bool:
        """Whether the job scores exact (unprojected) gradients, streamed (`scoring.exact_scoring`)."""
        return self.scoring_mode == "local" and self.gradients == "exact"

    @property
    def signal_index(self) -> int:
        """The checkpoint whose projection files carry the signals."""
        return len(self.checkpoints) - 1 if self.signal_checkpoint is None else self.signal_checkpoint

    @property
    def keeps_values(self) -> bool:
        """Whether each sample's raw values (its loss and signals) are gathered and stored: a calibrated job, or one
        that asks for signals."""
        return self.score == "calibrated" or bool(self.signals)

    def to_dict(self) -> dict[str, Any]:
        """The wire form."""
        return {
            **self.run.manifest(),
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "precondition": self.precondition,
            "similarity": self.similarity,
            "threshold": self.threshold,
            "auto_score": self.auto_score,
            "warmup": self.warmup,
            "score": self.score,
            "signals": list(self.signals),
            "fusion": self.fusion,
            "signal_checkpoint": self.signal_index,
            "scoring_mode": self.scoring_mode,
            "gradients": self.gradients,
            "aggregate_epsilon": self.aggregate_epsilon,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        """Read the wire form back; what a coordinator that predates a field left out takes its default."""
        return cls(
            run=RunSpec.from_manifest(d),
            checkpoints=tuple(CheckpointEntry.from_dict(c) for c in d["checkpoints"]),
            precondition=bool(d.get("precondition", True)),
            similarity=d.get("similarity", "cosine"),
            threshold=d.get("threshold") or {"kind": "mean-anchor"},
            auto_score=bool(d.get("auto_score", True)),
            warmup=d.get("warmup"),
            score=d.get("score", LEGACY_SCORE_KIND),
            signals=tuple(d.get("signals") or ()),
            fusion=d.get("fusion"),
            signal_checkpoint=d.get("signal_checkpoint"),
            scoring_mode=d.get("scoring_mode", DEFAULT_SCORING_MODE),
            gradients=d.get("gradients", DEFAULT_GRADIENTS),
            aggregate_epsilon=d.get("aggregate_epsilon"),
        )

    @classmethod
    def of(cls, job: StoredJob) -> JobSpec:
        """The spec of a stored job: its columns, and the options stored with it (missing ones take defaults)."""
        options = dict(job.options or {})
        checkpoints = sorted(job.checkpoints, key=lambda c: c.index)
        return cls(
            run=RunSpec(
                model=job.model,
                lora=job.lora,
                projection=job.projection,
                lora_init_seed=options.get("lora_init_seed", 0),
                max_len=options.get("max_len", DEFAULT_MAX_LEN),
                template=options.get("template", DEFAULT_TEMPLATE),
            ),
            checkpoints=tuple(
                CheckpointEntry(c.index, c.step, c.lr, c.lr_last, c.adam, c.blob_key) for c in checkpoints
            ),
            precondition=job.precondition,
            similarity=job.similarity,
            threshold=job.threshold,
            auto_score=options.get("auto_score", True),
            warmup=options.get("warmup"),
            score=options.get("score", LEGACY_SCORE_KIND),
            signals=tuple(options.get("signals", ())),
            fusion=options.get("fusion"),
            signal_checkpoint=options.get("signal_checkpoint"),
            scoring_mode=options.get("scoring_mode", DEFAULT_SCORING_MODE),
            gradients=options.get("gradients", DEFAULT_GRADIENTS),
            aggregate_epsilon=options.get("aggregate_epsilon"),
        )


def manifest_has_moments(manifest: Mapping[str, Any]) -> bool:
    """Whether every checkpoint of a run manifest (``run.json``) carries Adam moments, which preconditioning needs.
    A manifest written before the flag existed has them."""
    return all(entry.get("has_moments", True) for entry in manifest["checkpoints"])
