"""Silo-local scoring: the coordinator publishes what scoring needs of its anchors, each silo scores its own samples
with it, and only aggregates leave the silo.

The coordinator builds a `ScoringReference` from its anchor samples (`build_reference`):

- the anchor directions ḡ_t of every checkpoint (`scoring.traces.AnchorDirections`; exact gradients, D values per
  checkpoint, or projections) and the learning rates η_t;
- for a ``calibrated`` job, each fused signal's robust centre and scale over the anchors
  (`scoring.calibration.AnchorCalibration`) and the fusion;
- the threshold, set from the anchors alone: the mean of their leave-one-out scores (``mean-anchor``) or a fixed
  value. A ``top`` fraction needs every silo's scores and is refused;
- the histogram bin edges every silo reports on (fixed by the coordinator, so the histograms add up).

A silo computes its samples' trace terms against the published directions with the coordinator's own code
(`scoring.traces.trace_parts`, `scoring.traces.best_group`), calibrates and fuses them with the coordinator's own
`AnchorCalibration.score`, and applies the threshold (`score_locally`): the scores equal the coordinator's for the same
gradients, to float rounding. It keeps the per-sample scores and mask, and sends only `LocalAggregate`: how many it
keeps and the histogram of its scores. The reference travels as one safetensors file (`scoring.io.reference`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from scoring.calibration import AnchorCalibration, CalibratedScores, fused_signals
from scoring.config import SCORE_KINDS, SIMILARITIES
from scoring.errors import ConfigError, DataError, ShapeMismatchError
from scoring.selection import FixedThreshold, MeanAnchorScore, ThresholdPolicy, mean_anchor_threshold
from scoring.traces import AnchorDirections, best_group, trace_parts

HISTOGRAM_BINS = 40
"""Bins between the outer edges of `default_bins` (plus one open bin below and one above)."""


@dataclass(frozen=True)
class ScoringReference:
    """What a silo needs to score its own samples exactly as the coordinator would (see the module docstring).

    Attributes:
        directions: T arrays (G, k): the anchor directions of each checkpoint and group.
        groups: the G group names.
        lrs: the T learning rates η_t.
        similarity: ``cosine`` or ``dot``.
        score: ``trace`` or ``calibrated``.
        calibration: the anchors' calibration (``calibrated`` jobs; None for ``trace``).
        threshold: keep samples scoring at least this.
        bins: (B + 1,) increasing histogram edges, the outer two -inf and +inf.
    """

    directions: tuple[np.ndarray, ...]
    groups: tuple[str, ...]
    lrs: tuple[float, ...]
    similarity: str
    score: str
    calibration: AnchorCalibration | None
    threshold: float
    bins: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.score not in SCORE_KINDS:
            raise ConfigError(f"score: must be one of {list(SCORE_KINDS)}, got {self.score!r}")
        if (self.score == "calibrated") != (self.calibration is not None):
            raise ConfigError("calibration: a calibrated reference carries the anchors' calibration, a trace one none")
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"similarity: must be one of {list(SIMILARITIES)}, got {self.similarity!r}")
        if len(self.directions) != len(self.lrs) or not self.directions:
            raise ShapeMismatchError(f"{len(self.directions)} checkpoint direction(s) for {len(self.lrs)} rate(s)")
        shapes = {d.shape for d in self.directions}
        if len(shapes) != 1 or next(iter(shapes))[0] != len(self.groups):
            raise ShapeMismatchError(f"directions must all be (G={len(self.groups)}, k), got {sorted(shapes)}")
        edges = np.asarray(self.bins, dtype=np.float64)
        if edges.size < 3 or edges[0] != -math.inf or edges[-1] != math.inf or not (np.diff(edges) > 0).all():
            raise DataError("bins: need increasing edges from -inf to +inf")
        if not math.isfinite(self.threshold):
            raise DataError(f"threshold: must be finite, got {self.threshold!r}")

    @property
    def dim(self) -> int:
        """k: the length of one checkpoint's gradient (D unprojected, the projection's k otherwise)."""
        return int(self.directions[0].shape[1])


@dataclass(frozen=True)
class LocalScores:
    """A silo's own scoring (kept at the silo) and the aggregate it sends.

    Attributes:
        scores: (N,) the job's score of each sample (the trace score, or the fused calibrated score).
        trace: (N,) the trace score alone.
        parts: (N, T) its per-checkpoint terms η_t · sim (best group).
        selected: (N,) bool, ``scores >= threshold``.
        calibrated: a calibrated job's per-signal values, z and fused scores (None for a trace job).
    """

    scores: np.ndarray
    trace: np.ndarray
    parts: np.ndarray
    selected: np.ndarray
    calibrated: CalibratedScores | None

    @property
    def flagged_by(self) -> list[str] | None:
        """The signal with the largest calibrated z of each sample (None for a trace job)."""
        return None if self.calibrated is None else self.calibrated.flagged_by

    def aggregate(self, reference: ScoringReference) -> LocalAggregate:
        counts, _ = np.histogram(self.scores, bins=np.asarray(reference.bins))
        return LocalAggregate(int(self.selected.sum()), int(self.scores.size), tuple(int(c) for c in counts))


@dataclass(frozen=True)
class LocalAggregate:
    """All that leaves a silo in a silo-local job: how many samples it keeps of how many, and the histogram of its
    scores on the reference's bins."""

    kept: int
    total: int
    histogram: tuple[int, ...]


def check_local_threshold(scoring_mode: str, policy: ThresholdPolicy) -> None:
    """Refuse a threshold a silo-local job cannot set from its anchors alone (a ``top`` fraction)."""
    if scoring_mode == "local" and not isinstance(policy, MeanAnchorScore | FixedThreshold):
        raise ConfigError(
            "threshold: a silo-local job (scoring_mode 'local') sets its threshold from the anchors alone: "
            "'mean-anchor' or 'fixed' ('top' needs every silo's scores)"
        )


def default_bins(anchor_scores: np.ndarray, bins: int = HISTOGRAM_BINS) -> tuple[float, ...]:
    """``bins`` equal bins over the anchors' score range widened by half of it on each side, with an open bin below
    and above (the edges depend on the anchors only, so every silo bins alike)."""
    lo, hi = float(np.min(anchor_scores)), float(np.max(anchor_scores))
    pad = max(hi - lo, 1e-6) / 2
    return (-math.inf, *np.linspace(lo - pad, hi + pad, bins + 1).tolist(), math.inf)


def display_edges(bins: Sequence[float]) -> list[float]:
    """A reference's histogram edges with its two open outer bins drawn one bin wide (for the dashboards)."""
    inner = list(bins[1:-1])
    width = (inner[-1] - inner[0]) / max(1, len(inner) - 1)
    return [inner[0] - width, *inner, inner[-1] + width]


def build_reference(
    directions: AnchorDirections,
    anchor_values: Mapping[str, np.ndarray],
    *,
    score: str,
    signals: Sequence[str],
    fusion: str,
    policy: ThresholdPolicy,
    bins: Sequence[float] | None = None,
) -> ScoringReference:
    """The reference of a silo-local job, from the anchor directions and the anchor samples' own raw values.

    Args:
        directions: the anchor directions (`scoring.traces.build_anchor_directions`).
        anchor_values: the anchor samples' ``trace`` (leave-one-out, `scoring.traces.score_anchor_samples`),
            ``loss`` and, when sent, ``loss_uncond``, each (M,).
        score: ``trace`` or ``calibrated``.
        signals: the extra signals the job asks of the silos (`scoring.config.SIGNALS`); the fused signals follow
            from them (`scoring.calibration.fused_signals`).
        fusion: ``fisher`` or ``max``.
        policy: `MeanAnchorScore` or `FixedThreshold`.
        bins: histogram edges (default `default_bins` of the anchors' scores).

    Raises:
        ConfigError: a ``top`` policy (it needs every silo's scores) or bad settings.
    """
    calibration = None
    anchor_scores = np.asarray(anchor_values["trace"], dtype=np.float64)
    if score == "calibrated":
        calibration = AnchorCalibration.of(anchor_values, fused_signals(signals), fusion)
        from scoring.calibration import calibrate

        _, anchors = calibrate(anchor_values, anchor_values, calibration.signals, fusion)
        anchor_scores = anchors.scores  # leave-one-out, as the coordinator sets a mean-anchor threshold
    check_local_threshold("local", policy)
    threshold = mean_anchor_threshold(anchor_scores) if isinstance(policy, MeanAnchorScore) else float(policy.value)
    return ScoringReference(
        directions=tuple(np.asarray(d, dtype=np.float64) for d in directions.directions),
        groups=directions.groups,
        lrs=tuple(float(lr) for lr in directions.lrs),
        similarity=directions.similarity,
        score=score,
        calibration=calibration,
        threshold=threshold,
        bins=tuple(bins) if bins is not None else default_bins(anchor_scores),
    )


def score_locally(
    reference: ScoringReference,
    candidates_per_ckpt: Sequence[np.ndarray],
    values: Mapping[str, np.ndarray] | None = None,
    chunk_rows: int = 65536,
) -> LocalScores:
    """Score a silo's N samples against the published reference (see the module docstring).

    Args:
        reference: the job's `ScoringReference`.
        candidates_per_ckpt: T arrays (N, k): the samples' gradients (as the job prepares them: preconditioned or
            not, projected or not) at each checkpoint.
        values: the samples' ``loss`` and, when the job fuses them, ``loss_uncond`` (calibrated jobs).
        chunk_rows: rows multiplied at a time.

    Raises:
        ShapeMismatchError: T or k differ from the reference's.
        ConfigError, DataError: as `scoring.traces.trace_parts` and `scoring.calibration.AnchorCalibration.score`.
    """
    if len(candidates_per_ckpt) != len(reference.lrs):
        raise ShapeMismatchError(
            f"{len(candidates_per_ckpt)} checkpoint(s) of gradients; the job has {len(reference.lrs)}"
        )
    parts = trace_parts(
        candidates_per_ckpt, list(reference.directions), list(reference.lrs), reference.similarity, chunk_rows
    )
    return score_parts(reference, parts, values)


def score_parts(
    reference: ScoringReference, parts: np.ndarray, values: Mapping[str, np.ndarray] | None = None
) -> LocalScores:
    """`score_locally` from the samples' trace terms (N, T, G) against the reference's directions (a silo that
    streams its exact gradients, `scoring.exact_scoring`, computes them batch by batch)."""
    trace, best_parts, _ = best_group(parts)
    calibrated = None
    scores = trace
    if reference.calibration is not None:
        calibrated = reference.calibration.score({**(values or {}), "trace": trace})
        scores = calibrated.scores
    return LocalScores(scores, trace, best_parts, scores >= reference.threshold, calibrated)
