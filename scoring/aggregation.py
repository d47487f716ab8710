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


AGGREGATORS: dict[str, type[FedAvg]] = {cls.name: cls for cls in (FedAvg, QualityFedAvg, FedAdam, FedYogi)}


def build_aggregator(name: str, **options: float) -> FedAvg:
    """An aggregator by name (`AGGREGATORS`); ``options`` go to the adaptive ones (eta, beta1, beta2, tau)."""
    if name not in AGGREGATORS:
        raise ConfigError(f"aggregation: must be one of {sorted(AGGREGATORS)}, got {name!r}")
    cls = AGGREGATORS[name]
    if options and not issubclass(cls, FedOpt):
        raise ConfigError(f"aggregation {name!r} takes no options, got {sorted(options)}")
    return cls(**options)
