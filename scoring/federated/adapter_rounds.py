"""One federated round's aggregation for each adapter kind (`scoring.federated.lora_algebra.ADAPTER_KINDS`), as
pure numpy: the round guard over the right space, then the rule.

- ``fedavg``: the rule (`scoring.federated.aggregation.apply_rule`) on the adapter's factors, each averaged
  separately (mean(B)·mean(A) ≠ mean(B·A): not exact, kept for comparison).
- ``stack`` (FLoRA): every silo trains an adapter of its own rank on top of the global model; the round adds
  Σᵢ wᵢ·ΔWᵢ to the global update exactly, by stacking the factors (`lora_algebra.stack_round`). The global
  adapter is the stack of every round's factors, of scaling 1, truncated by SVD only past ``max_rank`` (the error is
  reported). ``stack_start`` ``fresh`` (the default) is FLoRA's restart: each round a silo's adapter starts with A
  drawn anew and B = 0, and ΔWᵢ = sᵢ·Bᵢ·Aᵢ. With ``warm`` the global adapter is kept in SVD order and a silo of
  rank rᵢ starts from its leading rᵢ components (the rest stays in its frozen weights), so both factors learn from
  the first step, as when LoRA training continues; its change ΔWᵢ = sᵢ·Bᵢ·Aᵢ − (those components) is still exact
  and the global rank still grows by Σ rᵢ a round. The weights wᵢ are the rule's (``fedavg``/``fedprox``:
  selected counts; ``quality-fedavg``: score mass); the guard bounds ‖ΔWᵢ‖ and shrinks an update by scaling its
  B side (`ProductSpace`).
- ``shared-basis`` (Fed-SB): A and B are fixed and shared; silos train and upload only R. The rule runs on R
  (averaging is exact: B·(Σ wᵢRᵢ)·A = Σ wᵢ·B·Rᵢ·A; FedAdam/FedYogi and the robust rules act on R's coordinates,
  which the orthonormal basis maps isometrically, up to a constant, onto the weight update). The guard measures R's
  changes in weight units (`lora_algebra.basis_gain` × scaling).

The rules that have no meaning for a kind are refused when the job is created (`check_rule`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scoring.errors import ConfigError, DataError, ShapeMismatchError
from scoring.federated.aggregation import (
    Flag,
    Known,
    ParameterSpace,
    RoundGuard,
    ServerState,
    SiloUpdate,
    Weights,
    apply_rule,
    build_aggregator,
    guard_round,
)
from scoring.federated.lora_algebra import (
    ADAPTER_KINDS,
    B_SUFFIX,
    R_SUFFIX,
    basis_gain,
    global_rank,
    lora_modules,
    make_shared_basis,
    module_sizes,
    product_norm,
    shared_basis_layout,
    stack_round,
    warm_delta,
    warm_started,
)

STACK_RULES = ("fedavg", "quality-fedavg", "fedprox")
"""The rules a ``stack`` round takes: they only weigh the silos' products."""


def silo_rank(settings: Mapping[str, Any], silo: str | None) -> int:
    """A silo's LoRA rank in a training job (its settings or its spec: ``aggregation``, ``lora``): its
    ``aggregation.silo_ranks`` entry under ``stack``, else the job's ``lora.rank``. The coordinator checks the
    silo's uploads against it and the silo trains at it."""
    ranks = (settings.get("aggregation") or {}).get("silo_ranks") or {}
    return int(ranks.get(silo, settings["lora"]["rank"]))


def check_rule(kind: str, rule: str) -> None:
    """Refuse a rule that has no meaning for the adapter kind.

    Raises:
        ConfigError: an unknown kind; for ``stack``, a rule other than the weighted sums (an adaptive server
            optimizer or a coordinate-wise robust rule acts on coordinates, and the factors of a product have none
            that silos share; on the dense products it would leave LoRA's low rank).
    """
    if kind not in ADAPTER_KINDS:
        raise ConfigError(f"aggregation.kind: must be one of {list(ADAPTER_KINDS)}, got {kind!r}")
    if kind == "stack" and rule not in STACK_RULES:
        raise ConfigError(
            f"aggregation.rule: {rule!r} does not work with kind 'stack' (it takes {list(STACK_RULES)}): the "
            "silos' factors have no shared coordinates, and the rule on the dense products would not be low-rank; "
            "use kind 'shared-basis', whose R matrices share coordinates, for it"
        )


class ProductSpace:
    """Updates of a ``stack`` round: each silo's factors (scaling folded into B), any rank, for the job's modules;
    the size of an update is ‖Σ Bᵢ·Aᵢ‖ over its modules, and shrinking scales its B (so its product)."""

    def __init__(self, modules: Mapping[str, Any]):
        self.modules = modules  # name -> lora_algebra.ModuleSize

    def check(self, updates: Sequence[SiloUpdate]) -> None:
        if not updates:
            raise ConfigError("updates: need at least one silo update to aggregate")
        for u in updates:
            try:
                pairs = lora_modules(u.weights)
            except ShapeMismatchError as exc:
                raise ShapeMismatchError(f"silo {u.silo!r}: {exc}") from None
            if set(pairs) != set(self.modules) or len(u.weights) != 2 * len(pairs):
                raise ShapeMismatchError(f"silo {u.silo!r}: its adapter's modules differ from the job's")
            for module, pair in pairs.items():
                size = self.modules[module]
                if pair.a.shape[1] != size.fan_in or pair.b.shape[0] != size.fan_out:
                    raise ShapeMismatchError(
                        f"silo {u.silo!r}: {module} is {pair.b.shape[0]} × {pair.a.shape[1]}, the model's "
                        f"{size.fan_out} × {size.fan_in}"
                    )
                if not (np.isfinite(pair.a).all() and np.isfinite(pair.b).all()):
                    raise DataError(f"silo {u.silo!r}: {module} holds NaN or Inf")

    def norm(self, weights: Weights) -> float:
        return product_norm(weights)

    def shrink(self, weights: Weights, scale: float) -> dict[str, np.ndarray]:
        return {n: np.asarray(w, np.float64) * (scale if n.endswith(B_SUFFIX) else 1.0) for n, w in weights.items()}


def scaling_of(adapter_config: Mapping[str, Any]) -> float:
    """peft's LoRA scaling lora_alpha / r of an adapter config (no rsLoRA)."""
    return float(adapter_config["lora_alpha"]) / float(adapter_config["r"])


def fold_scaling(weights: Weights, alpha: float) -> dict[str, np.ndarray]:
    """A silo's ``stack`` update with its scaling α/rᵢ folded into B (rᵢ read from the factors' shapes)."""
    out = {}
    for name, w in weights.items():
        w = np.asarray(w, np.float64)
        out[name] = w * (alpha / w.shape[1]) if name.endswith(B_SUFFIX) else w
    return out


def shared_basis_gain(global_weights: Weights, scaling: float) -> dict[str, float]:
    """Per R tensor: the factor that turns a change of R into the norm of the weight change it makes."""
    return {
        name: scaling * basis_gain(global_weights, name.removesuffix(R_SUFFIX))
        for name in global_weights
        if name.endswith(R_SUFFIX)
    }


@dataclass(frozen=True)
class RoundResult:
    """A round combined: the new global adapter's ``weights`` and peft ``adapter_config``, the server ``state``
    (None: the kind keeps none), the guard's ``updates`` (as aggregated), ``flags`` and ``figures``, and ``report``
    (``kind``; for ``stack`` the new ``rank`` and the truncation ``error``)."""

    weights: dict[str, np.ndarray]
    adapter_config: dict[str, Any]
    state: ServerState | None
    updates: list[SiloUpdate]
    flags: list[Flag]
    figures: dict[str, float]
    report: dict[str, Any] = field(default_factory=dict)


def combine_round(
    aggregation: Mapping[str, Any],
    global_weights: Weights,
    adapter_config: Mapping[str, Any],
    updates: Sequence[SiloUpdate],
    known: Mapping[str, Known],
    state: ServerState | None,
    *,
    alpha: float,
) -> RoundResult:
    """Guard then aggregate one round under ``aggregation`` (a job's settings: ``kind``, ``rule`` and their
    options, the guard's fields). ``global_weights`` and ``adapter_config`` are the round's start adapter;
    ``updates`` what the silos sent (for ``stack``, their own adapters with their own scaling ``alpha``/rᵢ, α the
    job's LoRA alpha; for ``shared-basis``, R only).

    Raises:
        ConfigError: the rule does not work with the kind (`check_rule`), bad weights.
        ShapeMismatchError, DataError: an update that does not fit the round.
    """
    kind, rule = str(aggregation.get("kind", "fedavg")), str(aggregation["rule"])
    check_rule(kind, rule)
    guard = RoundGuard.from_dict(aggregation)
    config = dict(adapter_config)
    if kind == "fedavg":
        guarded, flags, figures = guard_round(global_weights, updates, known, guard)
        new, state = apply_rule(aggregation, global_weights, guarded, state)
        return RoundResult(new, config, state, guarded, flags, figures, {"kind": kind})
    if kind == "shared-basis":
        r_names = [n for n in global_weights if n.endswith(R_SUFFIX)]
        global_r = {n: global_weights[n] for n in r_names}
        space = ParameterSpace(global_r, shared_basis_gain(global_weights, scaling_of(config)))
        guarded, flags, figures = guard_round(global_r, updates, known, guard, space)
        new_r, state = apply_rule(aggregation, global_r, guarded, state)
        return RoundResult({**global_weights, **new_r}, config, state, guarded, flags, figures, {"kind": kind})
    warm = aggregation.get("stack_start") == "warm"
    scaling, before = scaling_of(config), global_rank(global_weights)
    changes, ranks = [], []
    modules = module_sizes([(n, np.shape(w)) for n, w in global_weights.items()])
    ProductSpace(modules).check(updates)  # the silos' own adapters fit the job's modules before their ranks are read
    for u in updates:
        own = fold_scaling(u.weights, alpha)
        rank = next(iter(lora_modules(own).values())).rank
        if warm and warm_started(global_weights, rank):  # the change is what it trained minus where it started
            own = warm_delta(own, global_weights, scaling)
        changes.append(SiloUpdate(u.silo, own, u.num_samples, u.score_mass))
        ranks.append(rank)
    guarded, flags, figures = guard_round(global_weights, changes, known, guard, ProductSpace(modules))
    weights = build_aggregator("fedavg" if rule == "fedprox" else rule).weights(guarded)
    stacked = stack_round(
        global_weights,
        scaling,
        [u.weights for u in guarded],
        weights,
        aggregation.get("max_rank"),
        rank=before + sum(ranks) if warm else None,  # warm changes subtract components the global holds already
    )
    config |= {"r": stacked.rank, "lora_alpha": float(stacked.rank)}  # scaling 1: B carries it
    report = {"kind": kind, "rank": stacked.rank, "truncation_error": stacked.error}
    return RoundResult(stacked.weights, config, None, guarded, flags, figures, report)


def initial_global(kind: str, initial: Any, rank: int, seed: int) -> Any:
    """A federated job's round-0 global adapter (a `scoring.io.CheckpointBundle`) from the seeded initial LoRA
    adapter ``initial``: itself for ``fedavg`` and ``stack``, and for ``shared-basis`` the basis drawn from ``seed``
    (`lora_algebra.make_shared_basis`) with R = 0, under `lora_algebra.shared_basis_layout`.

    Raises:
        ConfigError: ``rank`` exceeds a module's sizes (``shared-basis``).
    """
    if kind != "shared-basis":
        return initial
    return dataclasses.replace(
        initial,
        layout=shared_basis_layout(initial.layout, rank),
        adapter=make_shared_basis(initial.layout, rank, seed),
        dtypes={},
    )
