"""Selection over trace scores: threshold policies, baselines, masks per silo and evaluation helpers.

Threshold policies (small frozen dataclasses; `parse_threshold` reads the CLI form, `format_threshold`
writes it):

- `MeanAnchorScore()` (``mean-anchor``): keep samples scoring at least the mean score of the anchor set's own
  samples. This is CLUES' rule and the default choice: it needs no guess of the noise rate.
- `TopFraction(q)` (``top:q``): keep exactly round(q·N) samples over all silos, best first. Use it when the
  budget is fixed or to compare methods at equal size.
- `FixedThreshold(v)` (``fixed:v``): keep samples scoring at least ``v``.

`apply_threshold` applies a policy to a `ScoreTable`. Baselines (`random_scores`, `perplexity_scores`,
`keep_all`) produce ScoreTables with T=1 parts, so the same policies select from them. `auroc` and
`precision_at_keep` measure how well scores and selections separate clean from noisy samples (pure numpy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from scoring.errors import ConfigError, DataError, IncompatibleArtifactError, ShapeMismatchError
from scoring.types import ScoreTable


def _real(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ConfigError(f"{field_name}: must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{field_name}: must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MeanAnchorScore:
    """Threshold = mean score of the anchor set's own samples (CLUES)."""


@dataclass(frozen=True)
class TopFraction:
    """Keep the global top ``fraction`` of samples over all silos.

    Attributes:
        fraction: q in [0, 1]; exactly floor(q·N + 1/2) samples are kept, with q read as its shortest decimal
            (so ``top:0.35`` of 10 keeps 4).
    """

    fraction: float

    def __post_init__(self) -> None:
        value = _real(self.fraction, "fraction")
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"fraction: must be in [0, 1], got {self.fraction!r}")
        object.__setattr__(self, "fraction", value)


@dataclass(frozen=True)
class FixedThreshold:
    """Keep samples whose score is at least ``value``."""

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _real(self.value, "value"))


ThresholdPolicy = MeanAnchorScore | TopFraction | FixedThreshold
_KINDS: dict[str, type] = {"mean-anchor": MeanAnchorScore, "top": TopFraction, "fixed": FixedThreshold}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}


def threshold_to_dict(policy: ThresholdPolicy) -> dict[str, Any]:
    """JSON form of a policy: ``{"kind": "mean-anchor" | "top" | "fixed", ...fields}``."""
    if type(policy) not in _KIND_OF:
        raise ConfigError(f"threshold: not a threshold policy: {policy!r}")
    return {"kind": _KIND_OF[type(policy)], **dataclasses.asdict(policy)}


def threshold_from_dict(data: dict[str, Any]) -> ThresholdPolicy:
    """Inverse of `threshold_to_dict`; raises `ConfigError` naming the bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"threshold: expected a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ConfigError(f"kind: must be one of {sorted(_KINDS)}, got {kind!r}")
    cls = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in data.items() if k != "kind"}
    if set(fields) != names:
        raise ConfigError(f"threshold {kind!r}: expected field(s) {sorted(names)}, got {sorted(fields)}")
    return cls(**fields)


def parse_threshold(text: str) -> ThresholdPolicy:
    """Read the CLI form: ``mean-anchor``, ``top:Q`` (0 ≤ Q ≤ 1) or ``fixed:V``.

    Raises:
        ConfigError: unknown form (names ``threshold``) or a bad number (names ``fraction`` or ``value``).
    """
    kind, sep, arg = str(text).strip().partition(":")
    if kind == "mean-anchor" and not sep:
        return MeanAnchorScore()
    field_name = {"top": "fraction", "fixed": "value"}.get(kind)
    if field_name is None or not sep:
        raise ConfigError(f"threshold: expected 'mean-anchor', 'top:Q' or 'fixed:V', got {text!r}")
    try:
        number = float(arg)
    except ValueError:
        raise ConfigError(f"{field_name}: not a number: {arg!r} (in threshold {text!r})") from None
    return TopFraction(number) if kind == "top" else FixedThreshold(number)


def format_threshold(policy: ThresholdPolicy) -> str:
    """Inverse of `parse_threshold` (``parse_threshold(format_threshold(p)) == p``)."""
    data = threshold_to_dict(policy)
    values = [repr(v) for k, v in data.items() if k != "kind"]
    return ":".join([data["kind"], *values])


def keep_count(n: int, fraction: float) -> int:
    """floor(q·n + 1/2) with q read as its shortest decimal representation (round half up, no float drift)."""
    return math.floor(Fraction(repr(float(fraction))) * n + Fraction(1, 2))


def top_fraction_mask(
    scores: np.ndarray, ids: Sequence[str], silos: Sequence[str], fraction: float
) -> tuple[np.ndarray, float]:
    """Keep exactly `keep_count` samples, ranked by score (descending), then silo, then id (ascending).

    Args:
        scores: (N,) finite scores.
        ids: (N,) sample ids.
        silos: (N,) silo names.
        fraction: q in [0, 1].

    Returns:
        ``(mask, threshold)``: the (N,) bool mask and the lowest kept score (+inf if nothing is kept). With
        ties at the boundary, some samples scoring exactly ``threshold`` are not kept: the count is exact.
    """
    n_keep = keep_count(len(scores), fraction)
    order = np.lexsort((np.asarray(ids, dtype=str), np.asarray(silos, dtype=str), -scores))  # (N,) best first
    mask = np.zeros(len(scores), dtype=bool)
    mask[order[:n_keep]] = True
    threshold = float(scores[order[n_keep - 1]]) if n_keep else math.inf
    return mask, threshold


def mean_anchor_threshold(anchor_scores: np.ndarray) -> float:
    """The CLUES threshold: the mean of the (M,) anchor samples' scores (M ≥ 1, finite)."""
    if anchor_scores.size == 0:
        raise DataError("anchor_table: no anchor scores to average")
    if not np.isfinite(anchor_scores).all():
        raise DataError("anchor_table: anchor scores hold NaN or Inf")
    return float(np.mean(anchor_scores, dtype=np.float64))


def check_threshold_preconditioning(policy: ThresholdPolicy, candidates: bool, anchors: bool) -> None:
    """Refuse a mean-anchor threshold when candidates and the anchor samples were not scored alike.

    The threshold compares candidate scores with the anchor samples' own scores, so both must be Adam-preconditioned
    or both plain: preconditioned gradients have systematically lower cosines with the plain anchor direction, and
    such a threshold keeps almost nothing. This happens when silos precondition with moments the coordinator does
    not hold (a scoring job made from a federated warmup).

    Args:
        policy: the threshold policy.
        candidates: whether the candidates' gradients are preconditioned.
        anchors: whether the anchor samples' own (role ``candidate``) gradients are preconditioned.

    Raises:
        ConfigError: naming ``threshold``, for `MeanAnchorScore` with ``candidates != anchors``.
    """
    if isinstance(policy, MeanAnchorScore) and candidates != anchors:
        how = ("Adam-preconditioned", "plain") if candidates else ("plain", "Adam-preconditioned")
        why = " (the coordinator holds no silo's Adam moments)" if candidates else ""
        raise ConfigError(
            f"threshold: 'mean-anchor' compares {how[0]} candidate gradients with {how[1]} anchor-sample gradients"
            f"{why}; use a 'top' or 'fixed' threshold, or no preconditioning"
        )


def check_score_preconditioning(score: str, candidates: bool, anchors: bool) -> None:
    """Refuse the ``calibrated`` score when candidates and the anchor samples were not scored alike.

    The calibrated score standardises each candidate's trace score against the anchor samples' own trace scores
    (`scoring.calibration`), so, as for `check_threshold_preconditioning`, both must be Adam-preconditioned or both
    plain; whatever the threshold, a calibration across the two would call most candidates bad.

    Args:
        score: the job's score kind (`scoring.config.SCORE_KINDS`).
        candidates: whether the candidates' gradients are preconditioned.
        anchors: whether the anchor samples' own (role ``candidate``) gradients are preconditioned.

    Raises:
        ConfigError: naming ``score``, for ``calibrated`` with ``candidates != anchors``.
    """
    if score == "calibrated" and candidates != anchors:
        how = ("Adam-preconditioned", "plain") if candidates else ("plain", "Adam-preconditioned")
        why = " (the coordinator holds no silo's Adam moments)" if candidates else ""
        raise ConfigError(
            f"score: 'calibrated' compares the trace scores of {how[0]} candidate gradients with those of {how[1]} "
            f"anchor-sample gradients{why}; use plain gradients (no preconditioning), or score 'trace'"
        )


def apply_threshold(table: ScoreTable, policy: ThresholdPolicy, anchor_table: ScoreTable | None = None) -> ScoreTable:
    """Select samples from ``table`` under ``policy``.

    Args:
        table: scores of all silos (N rows).
        policy: `MeanAnchorScore`, `TopFraction` or `FixedThreshold`.
        anchor_table: scores of the anchor samples (`scoring.traces.score_anchor_samples`); needed for
            `MeanAnchorScore` only, with the same number of checkpoints T as ``table``.

    Returns:
        A new `ScoreTable` with ``selected`` (N,) bool and ``threshold`` set. Threshold kinds keep
        ``score >= threshold``; `TopFraction` keeps exactly its count (see `top_fraction_mask`).

    Raises:
        ConfigError: `MeanAnchorScore` without ``anchor_table``, or an unknown policy.
        IncompatibleArtifactError: ``anchor_table`` has a different number of checkpoints.
        DataError: NaN/Inf scores.
    """
    if not np.isfinite(table.scores).all():
        raise DataError("scores hold NaN or Inf; refusing to select")
    if isinstance(policy, TopFraction):
        mask, threshold = top_fraction_mask(table.scores, table.ids, table.silos, policy.fraction)
        return dataclasses.replace(table, selected=mask, threshold=threshold)
    if isinstance(policy, FixedThreshold):
        threshold = policy.value
    elif isinstance(policy, MeanAnchorScore):
        if anchor_table is None:
            raise ConfigError("anchor_table: the mean-anchor threshold needs the anchor samples' ScoreTable")
        if anchor_table.parts.shape[1] != table.parts.shape[1]:
            raise IncompatibleArtifactError(
                f"anchor_table has {anchor_table.parts.shape[1]} checkpoints, table has {table.parts.shape[1]}"
            )
        threshold = mean_anchor_threshold(anchor_table.scores)
    else:
        raise ConfigError(f"threshold: not a threshold policy: {policy!r}")
    return dataclasses.replace(table, selected=table.scores >= threshold, threshold=threshold)


def _baseline_table(ids: Sequence[str], silos: Sequence[str], scores: np.ndarray) -> ScoreTable:
    return ScoreTable(ids=tuple(ids), silos=tuple(silos), scores=scores, parts=scores[:, None].copy())


def random_scores(ids: Sequence[str], silos: Sequence[str], seed: int) -> ScoreTable:
    """Baseline: i.i.d. uniform [0, 1) scores from ``numpy.random.default_rng(seed)`` (parts (N, 1))."""
    return _baseline_table(ids, silos, np.random.default_rng(seed).random(len(ids)))


def perplexity_scores(ids: Sequence[str], silos: Sequence[str], mean_losses: np.ndarray) -> ScoreTable:
    """Baseline: score = -(mean response-token loss), i.e. minus the log-perplexity (parts (N, 1)).

    Lower loss means higher score, so every policy keeps the samples the model finds most likely (perplexity
    filtering). ``mean_losses`` is (N,) and must be finite.
    """
    losses = np.asarray(mean_losses, dtype=np.float64)
    if losses.shape != (len(ids),):
        raise ShapeMismatchError(f"mean_losses must have shape ({len(ids)},), got {losses.shape}")
    if not np.isfinite(losses).all():
        raise DataError("mean_losses hold NaN or Inf")
    return _baseline_table(ids, silos, -losses)


def keep_all(ids: Sequence[str], silos: Sequence[str]) -> ScoreTable:
    """Baseline: every score is 1.0 (parts (N, 1)); any threshold <= 1, and mean-anchor, keep everything."""
    return _baseline_table(ids, silos, np.ones(len(ids)))


def masks_by_silo(table: ScoreTable) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """Split the selection per silo: silo -> (ids, (N_silo,) bool mask), in table order.

    Raises:
        ShapeMismatchError: no selection has been applied to ``table``.
    """
    if table.selected is None:
        raise ShapeMismatchError("no selection has been applied to this ScoreTable")
    silos = np.asarray(table.silos, dtype=object)
    out: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    for silo in dict.fromkeys(table.silos):
        rows = np.flatnonzero(silos == silo)
        out[silo] = (tuple(table.ids[i] for i in rows), table.selected[rows].copy())
    return out


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of (N,) values, tied values sharing the mean of their ranks. Returns (N,) float64."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])  # first index of each tie run
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks starts+1..ends
    return ranks


def auroc(scores: np.ndarray, positive_mask: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for finding positives (clean samples), via Mann–Whitney U.

    Equals P(score of a random positive > score of a random negative) + 0.5 · P(tie): 1.0 when every clean
    sample outscores every noisy one, 0.5 for uninformative (e.g. constant) scores.

    Args:
        scores: (N,) finite scores, higher = more likely clean.
        positive_mask: (N,) bool, True for clean samples; both classes must be present.
    """
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive_mask, dtype=bool)
    if scores.ndim != 1 or pos.shape != scores.shape:
        raise ShapeMismatchError(f"scores {scores.shape} and positive_mask {pos.shape} must be equal 1-D shapes")
    if not np.isfinite(scores).all():
        raise DataError("scores hold NaN or Inf")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative samples")
    u = average_ranks(scores)[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def precision_at_keep(selected: np.ndarray, clean_mask: np.ndarray) -> float:
    """Fraction of the kept samples that are clean: |kept ∩ clean| / |kept| (NaN when nothing is kept).

    Args:
        selected: (N,) bool selection mask.
        clean_mask: (N,) bool, True for clean samples.
    """
    sel = np.asarray(selected, dtype=bool)
    clean = np.asarray(clean_mask, dtype=bool)
    if sel.ndim != 1 or sel.shape != clean.shape:
        raise ShapeMismatchError(f"selected {sel.shape} and clean_mask {clean.shape} must be equal 1-D shapes")
    kept = int(sel.sum())
    return float((sel & clean).sum() / kept) if kept else math.nan
