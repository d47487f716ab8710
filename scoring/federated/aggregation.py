"""Server-side aggregation of LoRA adapters for federated rounds, as pure numpy functions and small classes.

Weights are mappings from canonical parameter name (the keys peft saves) to arrays; every silo's update must carry
exactly the global adapter's names and shapes. Arithmetic runs in float64 and results are cast back to the global
adapter's dtypes.

- `FedAvg`: the average of the silos' adapters weighted by their selected sample counts (McMahan et al., 2017).
- `QualityFedAvg`: the same, weighted by each silo's selected score mass (the sum of its selected samples' scores).
- `FedAdam`, `FedYogi`: adaptive server optimizers (Reddi et al., 2021, "Adaptive Federated Optimization",
  Algorithm 2) on the pseudo-gradient Δ_t = FedAvg(updates) − x_t:

      m_t = β₁·m_{t−1} + (1 − β₁)·Δ_t
      v_t = β₂·v_{t−1} + (1 − β₂)·Δ_t²                         (FedAdam)
      v_t = v_{t−1} − (1 − β₂)·Δ_t²·sign(v_{t−1} − Δ_t²)       (FedYogi)
      x_{t+1} = x_t + η·m_t / (√v_t + τ)

  with m_{−1} = 0 and v_{−1} = τ² (the paper's v_{−1} ≥ τ²), no bias correction. Their state (m, v, the round) is
  returned by every call and is plain arrays, so the coordinator persists it between rounds (`state_to_arrays`).

- `FedMedian`, `FedTrimmedMean`: coordinate-wise median and trimmed mean of the silos' adapters (Yin et al.,
  2018, "Byzantine-Robust Distributed Learning"; Flower ships them as FedMedian and FedTrimmedAvg). Unweighted: a
  sample count cannot buy a silo more say.

Before any rule, `guard_round` bounds what one silo can do to a round (`RoundGuard`): the claimed sample count is
capped at what the coordinator knows the silo selected (or, with no scoring job, at a multiple of the round's lower
median count), the claimed score mass is clamped to what its scores allow, and each update's delta from the global
adapter is clipped in L2 norm to ``clip_factor`` × the lower median of the round's delta norms (or to an absolute
``clip_norm``). Whatever one silo sends, the global adapter then moves by at most the clip bound. Each intervention is
returned as a `Flag` for the round's history.

FedProx is a silo-side change (a proximal term in the local loss) and is not aggregated differently: the server uses
`FedAvg` for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from scoring.errors import ConfigError, DataError, ShapeMismatchError

Weights = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class SiloUpdate:
    """One silo's adapter after its local training in a round.

    Attributes:
        silo: its name (messages only).
        weights: canonical parameter name -> array, the same names and shapes as the global adapter.
        num_samples: selected samples it trained on (the FedAvg weight), ≥ 1.
        score_mass: the sum of its selected samples' scores (the `QualityFedAvg` weight).
    """

    silo: str
    weights: Weights
    num_samples: int
    score_mass: float = 0.0


@dataclass
class ServerState:
    """Server optimizer state carried between rounds (empty for the averaging rules)."""

    round: int = 0
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)


def state_to_arrays(state: ServerState) -> dict[str, np.ndarray]:
    """Flat arrays (``m.<name>``, ``v.<name>``, ``round``) for a safetensors file; inverse `state_from_arrays`."""
    out = {f"m.{k}": v for k, v in state.m.items()} | {f"v.{k}": v for k, v in state.v.items()}
    return out | {"round": np.array([state.round], dtype=np.int64)}


def state_from_arrays(arrays: Mapping[str, np.ndarray]) -> ServerState:
    rounds = arrays.get("round")
    if rounds is None or rounds.shape != (1,):
        raise DataError("server state: 'round' is missing or not a single value")
    m = {k.removeprefix("m."): np.asarray(v) for k, v in arrays.items() if k.startswith("m.")}
    v = {k.removeprefix("v."): np.asarray(a) for k, a in arrays.items() if k.startswith("v.")}
    if set(m) != set(v):
        raise DataError("server state: first and second moments name different parameters")
    return ServerState(int(rounds[0]), m, v)


def _check_updates(global_weights: Weights, updates: Sequence[SiloUpdate]) -> None:
    if not updates:
        raise ConfigError("updates: need at least one silo update to aggregate")
    names = set(global_weights)
    for u in updates:
        if set(u.weights) != names:
            missing, extra = sorted(names - set(u.weights)), sorted(set(u.weights) - names)
            raise ShapeMismatchError(f"silo {u.silo!r}: parameters differ (missing {missing[:3]}, extra {extra[:3]})")
        for name, array in u.weights.items():
            if np.shape(array) != np.shape(global_weights[name]):
                raise ShapeMismatchError(
                    f"silo {u.silo!r}: {name} has shape {np.shape(array)}, the global adapter "
                    f"{np.shape(global_weights[name])}"
                )
            if not np.isfinite(array).all():
                raise DataError(f"silo {u.silo!r}: {name} holds NaN or Inf")


def weighted_average(updates: Sequence[SiloUpdate], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Σ_i w_i·x_i / Σ_i w_i per parameter, in float64.

    Raises:
        ConfigError: a weight is negative or not finite, or they sum to zero.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"weights: need {len(updates)} finite, non-negative weights with a positive sum, got {w}")
    w = w / w.sum()
    names = list(updates[0].weights)
    return {
        n: sum(wi * np.asarray(u.weights[n], dtype=np.float64) for wi, u in zip(w, updates, strict=True)) for n in names
    }


def _cast_like(arrays: Mapping[str, np.ndarray], like: Weights) -> dict[str, np.ndarray]:
    return {n: np.asarray(a).astype(np.asarray(like[n]).dtype) for n, a in arrays.items()}


class FedAvg:
    """Average weighted by each silo's selected sample count."""

    name = "fedavg"

    def weights(self, updates: Sequence[SiloUpdate]) -> list[float]:
        for u in updates:
            if u.num_samples < 1:
                raise ConfigError(f"silo {u.silo!r}: num_samples must be at least 1, got {u.num_samples}")
        return [float(u.num_samples) for u in updates]

    def aggregate(
        self, global_weights: Weights, updates: Sequence[SiloUpdate], state: ServerState | None = None
    ) -> tuple[dict[str, np.ndarray], ServerState]:
        """The new global adapter and the (unchanged but for the round) state."""
        _check_updates(global_weights, updates)
        state = state or ServerState()
        average = weighted_average(updates, self.weights(updates))
        return _cast_like(average, global_weights), ServerState(state.round + 1, state.m, state.v)


class QualityFedAvg(FedAvg):
    """Average weighted by each silo's selected score mass (silos whose data align better with the anchors count
    more); a silo with no positive mass gets weight 0."""

    name = "quality-fedavg"

    def weights(self, updates: Sequence[SiloUpdate]) -> list[float]:
        masses = [u.score_mass for u in updates]
        if not all(math.isfinite(m) for m in masses):
            raise ConfigError(f"score_mass: must be finite, got {masses}")
        weights = [max(m, 0.0) for m in masses]
        if sum(weights) <= 0:
            raise ConfigError("score_mass: no silo has a positive selected score mass")
        return weights


@dataclass
class FedOpt(FedAvg):
    """Base of the adaptive server optimizers: η (server learning rate), β₁, β₂, τ (adaptivity)."""

    eta: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("eta", "tau"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{name}: must be positive and finite, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)!r}")

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def aggregate(
        self, global_weights: Weights, updates: Sequence[SiloUpdate], state: ServerState | None = None
    ) -> tuple[dict[str, np.ndarray], ServerState]:
        _check_updates(global_weights, updates)
        state = state or ServerState()
        average = weighted_average(updates, FedAvg.weights(self, updates))
        new, m, v = {}, {}, {}
        for name, x in global_weights.items():
            x64 = np.asarray(x, dtype=np.float64)
            delta = average[name] - x64
            m_prev = state.m.get(name, np.zeros_like(x64))
            v_prev = state.v.get(name, np.full_like(x64, self.tau**2))
            if m_prev.shape != x64.shape or v_prev.shape != x64.shape:
                raise ShapeMismatchError(f"server state: {name} has shape {m_prev.shape}, the adapter {x64.shape}")
            m[name] = self.beta1 * m_prev + (1 - self.beta1) * delta
            v[name] = self.second_moment(v_prev, delta)
            new[name] = x64 + self.eta * m[name] / (np.sqrt(v[name]) + self.tau)
        return _cast_like(new, global_weights), ServerState(state.round + 1, m, v)


@dataclass
class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta**2


@dataclass
class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        d2 = delta**2
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)


class FedMedian(FedAvg):
    """The coordinate-wise median of the silos' adapters (unweighted)."""

    name = "median"

    def aggregate(
        self, global_weights: Weights, updates: Sequence[SiloUpdate], state: ServerState | None = None
    ) -> tuple[dict[str, np.ndarray], ServerState]:
        _check_updates(global_weights, updates)
        state = state or ServerState()
        new = {n: np.median(_stacked(updates, n), axis=0) for n in global_weights}
        return _cast_like(new, global_weights), ServerState(state.round + 1, state.m, state.v)


@dataclass
class FedTrimmedMean(FedAvg):
    """The coordinate-wise mean after dropping the ``floor(trim·n)`` largest and smallest values (unweighted)."""

    trim: float = 0.2
    name = "trimmed-mean"

    def __post_init__(self) -> None:
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"trim: must be in [0, 0.5), got {self.trim!r}")

    def aggregate(
        self, global_weights: Weights, updates: Sequence[SiloUpdate], state: ServerState | None = None
    ) -> tuple[dict[str, np.ndarray], ServerState]:
        _check_updates(global_weights, updates)
        state = state or ServerState()
        k = math.floor(self.trim * len(updates))
        new = {}
        for n in global_weights:
            values = np.sort(_stacked(updates, n), axis=0)
            new[n] = values[k : len(updates) - k].mean(axis=0)
        return _cast_like(new, global_weights), ServerState(state.round + 1, state.m, state.v)


def _stacked(updates: Sequence[SiloUpdate], name: str) -> np.ndarray:
    return np.stack([np.asarray(u.weights[name], dtype=np.float64) for u in updates])


AGGREGATORS: dict[str, type[FedAvg]] = {
    cls.name: cls for cls in (FedAvg, QualityFedAvg, FedAdam, FedYogi, FedMedian, FedTrimmedMean)
}
OPTIONS = {
    FedAdam: ("eta", "beta1", "beta2", "tau"),
    FedYogi: ("eta", "beta1", "beta2", "tau"),
    FedTrimmedMean: ("trim",),
}


def build_aggregator(name: str, **options: float) -> FedAvg:
    """An aggregator by name (`AGGREGATORS`); ``options`` go to the adaptive ones (eta, beta1, beta2, tau) and to
    the trimmed mean (trim)."""
    if name not in AGGREGATORS:
        raise ConfigError(f"aggregation: must be one of {sorted(AGGREGATORS)}, got {name!r}")
    cls = AGGREGATORS[name]
    extra = sorted(set(options) - set(OPTIONS.get(cls, ())))
    if extra:
        raise ConfigError(f"aggregation {name!r} takes no options {extra}")
    return cls(**options)


# ---- bounding one silo's influence on a round ----

CLIP_KINDS = ("median", "absolute", "none")
GUARD_FIELDS = ("clip", "clip_factor", "clip_norm", "max_count_ratio")
"""The aggregation settings that configure `RoundGuard` (the rest configure the rule)."""
ADAPTER_FIELDS = ("kind", "silo_ranks", "max_rank", "stack_start")
"""The aggregation settings that choose the adapter kind (`scoring.federated.adapter_rounds`)."""


@dataclass(frozen=True)
class RoundGuard:
    """How a round bounds each silo's update (see the module docstring).

    Attributes:
        clip: ``median`` (relative to the round's lower median delta norm), ``absolute`` (``clip_norm``) or
            ``none``.
        clip_factor: the multiple of the lower median norm an update's delta may reach (``median``).
        clip_norm: the absolute bound on an update's delta norm (``absolute``).
        max_count_ratio: with no known selected count, a claimed count is capped at this multiple of the round's
            lower median claimed count.
    """

    clip: str = "median"
    clip_factor: float = 3.0
    clip_norm: float | None = None
    max_count_ratio: float = 10.0

    def __post_init__(self) -> None:
        if self.clip not in CLIP_KINDS:
            raise ConfigError(f"clip: must be one of {CLIP_KINDS}, got {self.clip!r}")
        if not (math.isfinite(self.clip_factor) and self.clip_factor >= 1.0):
            raise ConfigError(f"clip_factor: must be finite and at least 1, got {self.clip_factor!r}")
        if self.clip == "absolute" and not (self.clip_norm is not None and 0 < self.clip_norm < math.inf):
            raise ConfigError(f"clip_norm: clip 'absolute' needs a positive, finite norm, got {self.clip_norm!r}")
        if not (math.isfinite(self.max_count_ratio) and self.max_count_ratio >= 1.0):
            raise ConfigError(f"max_count_ratio: must be finite and at least 1, got {self.max_count_ratio!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> RoundGuard:
        return cls(**{k: d[k] for k in GUARD_FIELDS if d.get(k) is not None})


@dataclass(frozen=True)
class Known:
    """What the coordinator knows about one silo's selection from the scoring job: ``count``, the most samples it
    may train on, and ``mass``, the (lowest, highest) score mass its selection can have. None: nothing known."""

    count: int | None = None
    mass: tuple[float, float] | None = None


@dataclass(frozen=True)
class Flag:
    """One intervention on a silo's update: ``kind`` is ``count_capped``, ``mass_clamped`` or ``clipped``."""

    silo: str
    kind: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"silo": self.silo, "kind": self.kind, "detail": self.detail}


def lower_median(values: Sequence[float]) -> float:
    """The ⌈n/2⌉-th smallest value: one outlier among two cannot move it (``np.median`` would average them)."""
    return float(sorted(values)[(len(values) - 1) // 2])


def delta_norm(update: Weights, global_weights: Weights) -> float:
    """‖update − global‖₂ over every parameter, in float64 without overflow (scaled by the largest entry)."""
    deltas = [np.asarray(update[n], dtype=np.float64) - np.asarray(global_weights[n], dtype=np.float64) for n in update]
    top = max((float(np.abs(d).max(initial=0.0)) for d in deltas), default=0.0)
    if top == 0.0:
        return 0.0
    if not math.isfinite(top):
        return math.inf
    return top * math.sqrt(sum(float(np.sum((d / top) ** 2)) for d in deltas))


class ParameterSpace:
    """Updates as points in the global adapter's parameter space (every rule but ``stack``): an update must carry
    the global adapter's names and shapes, its size is ‖update − global‖ (each tensor's difference times its
    ``gain``, default 1: a shared basis gives R's differences in weight units), and shrinking it moves it toward
    the global adapter."""

    def __init__(self, global_weights: Weights, gain: Mapping[str, float] | None = None):
        self.global_weights, self.gain = global_weights, dict(gain or {})

    def check(self, updates: Sequence[SiloUpdate]) -> None:
        _check_updates(self.global_weights, updates)

    def norm(self, weights: Weights) -> float:
        def scaled(arrays: Weights) -> dict[str, np.ndarray]:
            return {n: self.gain.get(n, 1.0) * np.asarray(a, dtype=np.float64) for n, a in arrays.items()}

        return (
            delta_norm(scaled(weights), scaled(self.global_weights))
            if self.gain
            else delta_norm(weights, self.global_weights)
        )

    def shrink(self, weights: Weights, scale: float) -> dict[str, np.ndarray]:
        out = {}
        for n, x in weights.items():
            g = np.asarray(self.global_weights[n], dtype=np.float64)
            out[n] = g + scale * (np.asarray(x, dtype=np.float64) - g)
        return out


def guard_round(
    global_weights: Weights,
    updates: Sequence[SiloUpdate],
    known: Mapping[str, Known],
    guard: RoundGuard,
    space: ParameterSpace | None = None,
) -> tuple[list[SiloUpdate], list[Flag], dict[str, float]]:
    """The updates as the round's rule may use them, the flags, and the figures (``clip_bound``, and each silo's
    delta norm as ``norm.<silo>``).

    Counts are capped and score masses clamped (`Known`), then each delta is clipped (`RoundGuard`). ``space``
    says what an update's delta and its norm are (default `ParameterSpace` of ``global_weights``; a ``stack``
    round passes `scoring.federated.adapter_rounds.ProductSpace`). Updates that do not fit it are refused as by
    every rule (`ShapeMismatchError`)."""
    space = space if space is not None else ParameterSpace(global_weights)
    space.check(updates)
    flags: list[Flag] = []
    median_count = lower_median([u.num_samples for u in updates])
    counted = []
    for u in updates:
        k = known.get(u.silo, Known())
        count, mass = u.num_samples, u.score_mass
        cap = k.count if k.count is not None else max(1, int(guard.max_count_ratio * median_count))
        if count > cap:
            why = "its selection in the scoring job" if k.count is not None else "the round's median × max_count_ratio"
            flags.append(Flag(u.silo, "count_capped", f"claimed {count} samples, capped at {cap} ({why})"))
            count = cap
        lo, hi = k.mass if k.mass is not None else (0.0, 0.0)
        if not lo - 1e-6 * (1 + abs(lo)) <= mass <= hi + 1e-6 * (1 + abs(hi)):
            clamped = min(max(mass, lo), hi)
            why = "what its scores allow" if k.mass is not None else "no scoring job gives it scores"
            flags.append(Flag(u.silo, "mass_clamped", f"claimed score mass {mass:.6g}, set to {clamped:.6g} ({why})"))
            mass = clamped
        counted.append(SiloUpdate(u.silo, u.weights, count, mass))
    norms = {u.silo: space.norm(u.weights) for u in counted}
    figures = {f"norm.{s}": n for s, n in norms.items()}
    if guard.clip == "none":
        return counted, flags, figures
    bound = guard.clip_norm if guard.clip == "absolute" else guard.clip_factor * lower_median(list(norms.values()))
    assert bound is not None
    figures["clip_bound"] = bound
    out = []
    for u in counted:
        norm = norms[u.silo]
        if norm <= bound:
            out.append(u)
            continue
        scale = bound / norm if math.isfinite(norm) else 0.0
        flags.append(Flag(u.silo, "clipped", f"update norm {norm:.4g} clipped to {bound:.4g}"))
        out.append(SiloUpdate(u.silo, space.shrink(u.weights, scale), u.num_samples, u.score_mass))
    return out, flags, figures


def known_of_scores(selection: Mapping[str, object], rows: Sequence[tuple[float, bool]]) -> Known:
    """What a silo may claim under ``selection`` (a training job's ``source``, ``fraction``) given its
    ``(score, selected)`` rows in the scoring job: the most samples it trains on, and the lowest and highest score
    mass those can have (its selection's exactly, for ``selected``; the k lowest and highest scores otherwise)."""
    scores = np.sort([score for score, _ in rows])
    kept = [score for score, selected in rows if selected]
    source = selection["source"]
    if source == "selected":
        return Known(len(kept), (float(np.sum(kept)), float(np.sum(kept))))
    fraction = float(selection.get("fraction") or 0.05)  # type: ignore[arg-type]
    k = {"all": len(rows), "random": len(kept)}.get(str(source)) or max(1, round(fraction * len(rows)))
    return Known(k, (float(scores[:k].sum()), float(scores[len(scores) - k :].sum())))


def apply_rule(
    aggregation: Mapping[str, object], global_weights: Weights, updates: Sequence[SiloUpdate], state: ServerState | None
) -> tuple[dict[str, np.ndarray], ServerState]:
    """One round of a training job's rule on updates `guard_round` returned: ``aggregation`` is the job's settings
    (``rule`` and its options; the guard's fields are skipped, and ``fedprox`` aggregates as ``fedavg``)."""
    skip = ("rule", *GUARD_FIELDS, *ADAPTER_FIELDS)
    options = {k: v for k, v in aggregation.items() if k not in skip and v is not None}
    rule = "fedavg" if aggregation["rule"] == "fedprox" else str(aggregation["rule"])
    return build_aggregator(rule, **options).aggregate(global_weights, updates, state)  # type: ignore[arg-type]
