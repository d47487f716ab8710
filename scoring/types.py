"""Small typed numpy containers passed between the scoring steps (no torch).

- `ProjectedGrads`: one party's projected gradients at one checkpoint (ids, (N, k) float16 matrix, spec, metadata).
- `ScoreTable`: per-sample trace scores with per-checkpoint parts, silo labels and the selection mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scoring.config import ProjectionSpec
from scoring.errors import ShapeMismatchError


@dataclass(frozen=True)
class ProjectedGrads:
    """Projected per-sample gradients of one party at one checkpoint.

    Attributes:
        ids: (N,) sample ids, unique.
        matrix: (N, k) float16 (or float32) projections; row i belongs to ``ids[i]``.
        spec: the projection spec the rows were made under.
        checkpoint: index t of the checkpoint (0-based).
        lr: learning rate η_t of that checkpoint.
        role: ``candidate`` (to be scored; possibly Adam-preconditioned) or ``anchor`` (plain gradients).
        preconditioned: whether the gradients were Adam-preconditioned before projection.
        extra: free-form provenance (model fingerprint, LoRA settings, groups, ...), JSON-serialisable.
    """

    ids: tuple[str, ...]
    matrix: np.ndarray
    spec: ProjectionSpec
    checkpoint: int
    lr: float
    role: str = "candidate"
    preconditioned: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2:
            raise ShapeMismatchError(f"matrix must be 2-D (N, k), got shape {self.matrix.shape}")
        if self.matrix.shape != (len(self.ids), self.spec.dim):
            raise ShapeMismatchError(
                f"matrix shape {self.matrix.shape} != (len(ids)={len(self.ids)}, spec.dim={self.spec.dim})"
            )
        if len(set(self.ids)) != len(self.ids):
            raise ShapeMismatchError("ids must be unique")
        if self.role not in ("candidate", "anchor"):
            raise ShapeMismatchError(f"role must be 'candidate' or 'anchor', got {self.role!r}")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ScoreTable:
    """Scores for N samples over T checkpoints.

    Attributes:
        ids: (N,) sample ids.
        silos: (N,) silo name of each sample.
        scores: (N,) float64 trace scores (higher = more aligned with the anchor set).
        parts: (N, T) float64 per-checkpoint contributions; ``parts.sum(1) == scores`` (for max-over-groups,
            the parts of the best group).
        selected: (N,) bool selection mask, or None before a threshold is applied.
        threshold: the threshold that produced ``selected`` (None before).
    """

    ids: tuple[str, ...]
    silos: tuple[str, ...]
    scores: np.ndarray
    parts: np.ndarray
    selected: np.ndarray | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.silos) != n or self.scores.shape != (n,) or self.parts.ndim != 2 or self.parts.shape[0] != n:
            raise ShapeMismatchError(
                f"inconsistent ScoreTable: ids {n}, silos {len(self.silos)}, scores {self.scores.shape}, "
                f"parts {self.parts.shape}"
            )
        if self.selected is not None and self.selected.shape != (n,):
            raise ShapeMismatchError(f"selected must have shape ({n},), got {self.selected.shape}")

    def masks(self) -> dict[str, dict[str, bool]]:
        """Per-silo mapping sample id -> kept."""
        if self.selected is None:
            raise ShapeMismatchError("no selection has been applied to this ScoreTable")
        out: dict[str, dict[str, bool]] = {}
        for sid, silo, keep in zip(self.ids, self.silos, self.selected.tolist(), strict=True):
            out.setdefault(silo, {})[sid] = bool(keep)
        return out
