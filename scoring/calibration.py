"""Anchor-calibrated signals and their fusion: the ``calibrated`` score kind.

Each signal s gives every sample a *badness* b_s (higher = more likely a bad training sample):

- ``trace``: −(CLUES trace score): a gradient that does not point the anchors' way;
- ``perplexity``: ℓ(y|x), the mean response loss: a response the model finds unlikely;
- ``ifd``: ℓ(y|x) / ℓ(y|∅) (instruction-following difficulty): the question does not make the answer likelier;
- ``pmi``: −(ℓ(y|∅) − ℓ(y|x)): the same, as a difference of log-likelihoods per token.

The trusted anchor set is the reference. Each badness is standardised against the anchors' own values with a
robust centre and scale, z_s = (b_s − median_anchors) / (1.4826 · MAD_anchors), so a z of 3 means "as unusual
as three standard deviations of clean data" whatever the signal's units. Every signal is one-sided: only the
direction that means bad counts (p_s = Φ̄(max(z_s, 0)), the upper-tail normal p-value of the bad direction alone:
a typical or unusually good value has p_s = 1/2 and adds nothing). The anchors themselves are scored
leave-one-out: anchor j is standardised against the other anchors only (and its trace score is already
leave-one-out, `scoring.traces.score_anchor_samples`), so the anchor scores that set a threshold are not compared
with themselves.

Fusion (`FUSIONS`), both monotone in every one-sided p-value, so a sample bad on one signal is flagged whatever
the others say:

- ``fisher`` (default): Fisher's statistic over the one-sided p-values, −2 Σ_s log(2 p_s) (0 for a sample that is
  nowhere worse than the typical anchor); evidence adds up over signals and one very small p dominates;
- ``max``: max_s z_s, the worst calibrated signal alone (the most conservative: the others cannot add or subtract).

The fused score is minus the statistic (higher = better, like the trace score), so every threshold policy of
`scoring.selection` applies unchanged: the mean anchor score, a top fraction, a fixed value, or an anchor quantile.

Length (the number of response tokens) is not a signal: it is reported (`length_buckets`) to check that no
signal merely prefers short or long answers.

Contents: `SIGNAL_NAMES`, `fused_signals`, `badness`, `robust_z`, `fuse`, `CalibratedScores`,
`AnchorCalibration` (the anchors' centre and scale per signal, which a silo-local job publishes), `calibrate`,
`length_buckets`, `EXPLANATIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from scoring.config import FUSIONS
from scoring.errors import ConfigError, DataError, ShapeMismatchError
from scoring.selection import auroc

SIGNAL_NAMES = ("trace", "perplexity", "ifd", "pmi")
"""Every signal `calibrate` knows, in report order."""

INPUTS = {"trace": ("trace",), "perplexity": ("loss",), "ifd": ("loss", "loss_uncond"), "pmi": ("loss", "loss_uncond")}
"""The raw per-sample values each signal is computed from (``loss_uncond`` comes from the silos on request)."""


MAD_TO_SIGMA = 1.4826
"""MAD × this = σ for normal data."""

MIN_SCALE = 1e-12

EXPLANATIONS = {
    "trace": "its training gradient does not point the way the anchors' gradient points",
    "perplexity": "the model finds the answer unusually unlikely",
    "ifd": "the answer barely depends on its question",
    "pmi": "the question adds little to the answer's likelihood",
}
"""What a flagged signal means, in words (dashboards and exports)."""


def fused_signals(sent: Sequence[str]) -> tuple[str, ...]:
    """The signals a calibrated job fuses, given the extra signals its silos send (`scoring.config.SIGNALS`): the
    trace and perplexity always (every projection file carries ℓ(y|x)); IFD and PMI when ℓ(y|∅) is sent."""
    return ("trace", "perplexity", "ifd", "pmi") if "loss_uncond" in sent else ("trace", "perplexity")


def _column(values: np.ndarray, name: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64)
    if out.ndim != 1:
        raise ShapeMismatchError(f"{name}: must be 1-D, got shape {out.shape}")
    if not np.isfinite(out).all():
        raise DataError(f"{name}: holds NaN or Inf")
    return out


def badness(
    name: str,
    *,
    trace: np.ndarray | None = None,
    loss: np.ndarray | None = None,
    loss_uncond: np.ndarray | None = None,
) -> np.ndarray:
    """The (N,) badness of signal ``name`` (higher = worse) from the raw per-sample values it needs.

    Raises:
        ConfigError: an unknown signal, or a value it needs is missing.
        DataError: a value is NaN/Inf, or ℓ(y|∅) is not positive (for ``ifd``).
    """
    if name not in SIGNAL_NAMES:
        raise ConfigError(f"signals: unknown signal {name!r}; choose from {list(SIGNAL_NAMES)}")
    given = {"trace": trace, "loss": loss, "loss_uncond": loss_uncond}
    missing = [k for k in INPUTS[name] if given[k] is None]
    if missing:
        raise ConfigError(f"signals: {name!r} needs {' and '.join(missing)}")
    v = {k: _column(given[k], k) for k in INPUTS[name]}
    if name == "trace":
        return -v["trace"]
    if name == "perplexity":
        return v["loss"]
    if name == "ifd":
        if (v["loss_uncond"] <= 0).any():
            raise DataError("loss_uncond: must be positive for the IFD ratio")
        return v["loss"] / v["loss_uncond"]
    return v["loss"] - v["loss_uncond"]


def _centre_scale(reference: np.ndarray) -> tuple[float, float]:
    centre = float(np.median(reference))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(reference - centre)))
    if scale < MIN_SCALE:  # over half the anchors share one value: fall back to the standard deviation
        scale = float(np.std(reference))
    return centre, max(scale, MIN_SCALE)


def robust_z(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(values − median(reference)) / (1.4826 · MAD(reference)); the scale falls back to the standard deviation
    when the MAD is 0 and to 1e-12 when that is 0 too. Needs at least two reference values."""
    ref = _column(reference, "reference")
    if ref.size < 2:
        raise DataError(f"calibration needs at least 2 anchor values, got {ref.size}")
    centre, scale = _centre_scale(ref)
    return (_column(values, "values") - centre) / scale


def robust_z_loo(reference: np.ndarray) -> np.ndarray:
    """Each reference value's z against the *other* reference values (needs at least 3)."""
    ref = _column(reference, "reference")
    if ref.size < 3:
        raise DataError(f"leave-one-out calibration needs at least 3 anchor values, got {ref.size}")
    out = np.empty_like(ref)
    for j in range(ref.size):
        centre, scale = _centre_scale(np.delete(ref, j))
        out[j] = (ref[j] - centre) / scale
    return out


def upper_p(z: np.ndarray) -> np.ndarray:
    """One-sided p-value Φ̄(z) = P(N(0,1) ≥ z), accurate far into the tail (erfc)."""
    erfc = np.vectorize(math.erfc, otypes=[np.float64])
    return 0.5 * erfc(np.asarray(z, dtype=np.float64) / math.sqrt(2.0))


def log_upper_p(z: np.ndarray) -> np.ndarray:
    """log Φ̄(z) without underflow: erfc while it is representable, the asymptotic series beyond."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    small = z < 30.0
    out[small] = np.log(np.maximum(upper_p(z[small]), 1e-300))
    big = z[~small]  # log Φ̄(z) ≈ −z²/2 − log(z √(2π)) + log(1 − 1/z²)
    out[~small] = -0.5 * big**2 - np.log(big * math.sqrt(2 * math.pi)) + np.log1p(-1.0 / big**2)
    return out


def fuse(z: np.ndarray, fusion: str) -> np.ndarray:
    """The fused badness of (N, S) calibrated z-values (see the module doc): ``fisher``, −2 Σ_s log(2 Φ̄(max(z_s, 0))),
    0 where no signal is worse than the anchors' median and growing like Σ_s z_s²/2 in the tail; or ``max``,
    max_s z_s."""
    if fusion not in FUSIONS:
        raise ConfigError(f"fusion: must be one of {list(FUSIONS)}, got {fusion!r}")
    z = np.asarray(z, dtype=np.float64)
    if fusion == "max":
        return z.max(axis=1)
    return -2.0 * log_upper_p(np.maximum(z, 0.0)).sum(axis=1) + 2.0 * z.shape[1] * math.log(0.5)


@dataclass(frozen=True)
class CalibratedScores:
    """Calibrated per-signal values and the fused score of N samples.

    Attributes:
        signals: the S signal names, column order.
        raw: (N, S) badness per signal.
        z: (N, S) calibrated z (positive = worse than a typical anchor).
        scores: (N,) fused score, higher = better (minus the fused badness).
        flagged_by: (N,) the signal with the largest z of each sample (what to tell its owner).
    """

    signals: tuple[str, ...]
    raw: np.ndarray
    z: np.ndarray
    scores: np.ndarray

    @property
    def flagged_by(self) -> list[str]:
        return [self.signals[i] for i in np.argmax(self.z, axis=1)]


def signal_inputs(values: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray | None]:
    """The raw values `badness` needs for signal ``name``, taken from ``values`` (None where absent)."""
    if name not in INPUTS:
        raise ConfigError(f"signals: unknown signal {name!r}; choose from {list(SIGNAL_NAMES)}")
    return {k: values.get(k) for k in INPUTS[name]}


@dataclass(frozen=True)
class AnchorCalibration:
    """What calibrating a sample needs of the anchors: each fused signal's robust centre and scale over the anchor
    samples' badness, and the fusion. Small enough to publish (2 numbers a signal): a silo that scores its own
    samples (`scoring.local_scoring`) calibrates them exactly as the coordinator would.

    Attributes:
        signals: the S fused signals, in column order.
        centres: (S,) median of the anchors' badness per signal.
        scales: (S,) 1.4826 · MAD (or the fallbacks of `robust_z`) per signal.
        fusion: ``fisher`` or ``max``.
    """

    signals: tuple[str, ...]
    centres: tuple[float, ...]
    scales: tuple[float, ...]
    fusion: str

    @classmethod
    def of(cls, anchors: Mapping[str, np.ndarray], signals: Sequence[str], fusion: str) -> AnchorCalibration:
        """From the anchors' raw values (``trace`` leave-one-out, ``loss``, ``loss_uncond``), M ≥ 2."""
        signals = _check_signals(signals, fusion)
        raw = _raw(anchors, signals)
        if raw.shape[0] < 2:
            raise DataError(f"calibration needs at least 2 anchor values, got {raw.shape[0]}")
        pairs = [_centre_scale(raw[:, i]) for i in range(len(signals))]
        return cls(signals, tuple(c for c, _ in pairs), tuple(s for _, s in pairs), fusion)

    def score(self, values: Mapping[str, np.ndarray]) -> CalibratedScores:
        """Calibrate and fuse N samples' raw values against the anchors."""
        raw = _raw(values, self.signals)
        z = (raw - np.asarray(self.centres)) / np.asarray(self.scales)
        return CalibratedScores(self.signals, raw, z, -fuse(z, self.fusion))


def _check_signals(signals: Sequence[str], fusion: str) -> tuple[str, ...]:
    signals = tuple(signals)
    if not signals or len(set(signals)) != len(signals):
        raise ConfigError(f"signals: need at least one signal and no repeats, got {list(signals)}")
    if fusion not in FUSIONS:
        raise ConfigError(f"fusion: must be one of {list(FUSIONS)}, got {fusion!r}")
    return signals


def _raw(side: Mapping[str, np.ndarray], signals: Sequence[str]) -> np.ndarray:
    """(N, S) badness of one side's samples (its values must share one length)."""
    lengths = {len(np.asarray(v)) for v in side.values() if v is not None}
    if len(lengths) > 1:
        raise ShapeMismatchError(f"signal values of one side must have one length, got {sorted(lengths)}")
    return np.stack([badness(s, **signal_inputs(side, s)) for s in signals], axis=1)


def calibrate(
    candidates: Mapping[str, np.ndarray],
    anchors: Mapping[str, np.ndarray],
    signals: Sequence[str] = SIGNAL_NAMES,
    fusion: str = "fisher",
) -> tuple[CalibratedScores, CalibratedScores]:
    """Calibrate ``signals`` against the anchors and fuse them, for the candidates and (leave-one-out) the anchors.

    Args:
        candidates: raw per-sample values of N candidates: ``trace`` (trace score), ``loss`` (ℓ(y|x)) and
            ``loss_uncond`` (ℓ(y|∅)), each (N,), as many as the signals need.
        anchors: the same for the M anchor samples (their ``trace`` leave-one-out), M ≥ 3.
        signals: which signals to fuse (at least one, no repeats).
        fusion: ``fisher`` or ``max``.

    Returns:
        (candidates', anchors' `CalibratedScores`); the anchors' z are leave-one-out.

    Raises:
        ConfigError: unknown or repeated signals, a value a signal needs is missing, or an unknown fusion.
        DataError: NaN/Inf values, too few anchors.
        ShapeMismatchError: arrays of different lengths within a side.
    """
    signals = _check_signals(signals, fusion)
    anchor_raw = _raw(anchors, signals)  # (M, S)
    if anchor_raw.shape[0] < 3:
        raise DataError(f"leave-one-out calibration needs at least 3 anchor values, got {anchor_raw.shape[0]}")
    anchor_z = np.stack([robust_z_loo(anchor_raw[:, i]) for i in range(len(signals))], axis=1)
    return (
        AnchorCalibration.of(anchors, signals, fusion).score(candidates),
        CalibratedScores(signals, anchor_raw, anchor_z, -fuse(anchor_z, fusion)),
    )


def length_buckets(scores: np.ndarray, clean: np.ndarray, n_tokens: np.ndarray, buckets: int = 3) -> list[dict]:
    """AUROC of ``scores`` within response-length terciles (or ``buckets`` quantile bins), to show that a score
    does not merely sort by length. Bins without both classes report ``auroc`` None."""
    n_tokens = _column(n_tokens, "n_tokens")
    edges = np.quantile(n_tokens, np.linspace(0, 1, buckets + 1))
    out = []
    for b in range(buckets):
        lo, hi = edges[b], edges[b + 1]
        rows = (n_tokens >= lo) & ((n_tokens <= hi) if b == buckets - 1 else (n_tokens < hi))
        both = clean[rows].any() and (~clean[rows]).any()
        out.append(
            {
                "tokens": [float(lo), float(hi)],
                "n": int(rows.sum()),
                "auroc": auroc(scores[rows], clean[rows]) if both else None,
            }
        )
    return out
