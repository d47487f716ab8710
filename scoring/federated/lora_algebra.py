"""Exact aggregation of LoRA updates, as pure numpy (`scoring.federated.adapter_rounds` runs the rounds).

FedAvg averages each silo's ``lora_A`` and ``lora_B`` separately, and mean(B)·mean(A) ≠ mean(B·A): the averaged
adapter is not the average of the silos' weight updates (FLoRA's "aggregation noise"). Two exact alternatives:

- **stacking** (FLoRA): put the silos' factors side by side, A = [A₁; …; Aₙ] and B = [w₁s₁B₁, …, wₙsₙBₙ], so that
  B·A = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ exactly (`stack`), whatever each silo's rank rᵢ (sᵢ = αᵢ/rᵢ, peft's LoRA scaling; the
  stacked pair has scaling 1). Its rank Σ rᵢ grows with the silos and the rounds (`stack_round`), truncated if
  need be with an SVD computed from the factors (`truncate`, whose relative Frobenius error is returned, 0 when
  the rank kept covers the stack's).
- **shared basis** (Fed-SB): B and A are fixed and shared (`make_shared_basis`), each silo trains only an r×r
  matrix Rᵢ between them (ΔW = s·B·Rᵢ·A), and averaging R is exact because the map is linear:
  B·(Σ wᵢRᵢ)·A = Σ wᵢ·B·Rᵢ·A (so every rule of `scoring.federated.aggregation` runs on R as it is).

Weights are `Weights` (canonical peft names → arrays, as `scoring.federated.aggregation` takes them); a module's
factors are ``<module>.lora_A.weight`` (r × in) and ``<module>.lora_B.weight`` (out × r). Arithmetic runs in float64.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from scoring.errors import ConfigError, ShapeMismatchError

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"

Weights = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Factors:
    """One module's LoRA pair: ``a`` (r × in), ``b`` (out × r) and the scaling s, so that ΔW = s·b·a."""

    a: np.ndarray
    b: np.ndarray
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> np.ndarray:
        """The dense weight update s·b·a (out × in), in float64."""
        return self.scaling * (np.asarray(self.b, np.float64) @ np.asarray(self.a, np.float64))


def lora_modules(weights: Weights, scaling: float = 1.0) -> dict[str, Factors]:
    """The LoRA pairs in ``weights`` by module name, in the order of ``weights``.

    Raises:
        ShapeMismatchError: a module with only one factor, or factors whose ranks differ.
    """
    modules: dict[str, Factors] = {}
    names = [n.removesuffix(A_SUFFIX if n.endswith(A_SUFFIX) else B_SUFFIX) for n in weights if _is_factor(n)]
    for module in dict.fromkeys(names):  # in the order of ``weights``
        a, b = weights.get(module + A_SUFFIX), weights.get(module + B_SUFFIX)
        if a is None or b is None:
            raise ShapeMismatchError(f"{module}: has {'lora_B' if a is None else 'lora_A'} without its pair")
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(f"{module}: lora_A {a.shape} and lora_B {b.shape} are not an r×in, out×r pair")
        modules[module] = Factors(a, b, scaling)
    return modules


def _check_weights(weights: Sequence[float], n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"weights: need {n} finite, non-negative weights with a positive sum, got {list(weights)}")
    return w / w.sum()


def stack(silos: Sequence[Mapping[str, Factors]], weights: Sequence[float]) -> dict[str, Factors]:
    """Every module's stacked pair: B·A = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ exactly (weights normalised to sum 1; scaling 1).

    Silos may have different ranks, not different modules or shapes.

    Raises:
        ConfigError: bad weights, or no silo.
        ShapeMismatchError: silos with different modules, or a module whose in/out sizes differ between silos.
    """
    if not silos:
        raise ConfigError("silos: need at least one silo's factors to stack")
    w = _check_weights(weights, len(silos))
    modules = list(silos[0])
    for i, silo in enumerate(silos):
        if set(silo) != set(modules):
            raise ShapeMismatchError(f"silo {i}: modules differ from silo 0's")
    out = {}
    for module in modules:
        pairs = [silo[module] for silo in silos]
        ins, outs = {p.a.shape[1] for p in pairs}, {p.b.shape[0] for p in pairs}
        if len(ins) != 1 or len(outs) != 1:
            raise ShapeMismatchError(f"{module}: in/out sizes differ between silos ({sorted(ins)}, {sorted(outs)})")
        a = np.concatenate([np.asarray(p.a, np.float64) for p in pairs], axis=0)
        b = np.concatenate([wi * p.scaling * np.asarray(p.b, np.float64) for wi, p in zip(w, pairs, strict=True)], 1)
        out[module] = Factors(a, b, 1.0)
    return out


def truncate(factors: Factors, rank: int) -> tuple[Factors, float]:
    """The best rank-``rank`` approximation of s·b·a (Eckart–Young), computed from the factors without forming the
    dense matrix, and its relative Frobenius error ‖ΔW − ΔWᵣ‖ / ‖ΔW‖ (0 when ``rank`` ≥ the product's rank).

    The result splits the singular values evenly between the factors (b = U·√Σ, a = √Σ·Vᵀ) with scaling 1, in
    decreasing order, and has min(``rank``, the factors' rank) components: zero ones past the product's rank (which
    is at most its in and out sizes), so that every module of an adapter keeps one rank.
    """
    if rank < 1:
        raise ConfigError(f"rank: must be at least 1, got {rank}")
    a, b = np.asarray(factors.a, np.float64), factors.scaling * np.asarray(factors.b, np.float64)
    qb, rb = np.linalg.qr(b)  # b = qb·rb, qb: out × k
    qa, ra = np.linalg.qr(a.T)  # aᵀ = qa·ra, so a = raᵀ·qaᵀ
    u, s, vt = np.linalg.svd(rb @ ra.T)  # the k×k core of b·a = qb·(rb·raᵀ)·qaᵀ
    total = float(np.sqrt(np.sum(s**2)))
    kept = min(rank, len(s))
    error = float(np.sqrt(np.sum(s[kept:] ** 2))) / total if total > 0 else 0.0
    root = np.sqrt(s[:kept])
    new_b = (qb @ u[:, :kept]) * root
    new_a = root[:, None] * (vt[:kept] @ qa.T)
    width = min(rank, factors.rank)  # a product of lower rank is padded with zero components: one rank per adapter
    if kept < width:
        new_a = np.concatenate([new_a, np.zeros((width - kept, new_a.shape[1]))], axis=0)
        new_b = np.concatenate([new_b, np.zeros((new_b.shape[0], width - kept))], axis=1)
    return Factors(new_a, new_b, 1.0), error


# ---- adapter layouts and weights of the exact aggregation kinds (what the wire carries) ----

ADAPTER_KINDS = ("fedavg", "stack", "shared-basis")
"""How a federated job aggregates LoRA adapters: ``fedavg`` averages each factor separately (the rule acts on A and
B), ``stack`` sums the silos' products exactly, ``shared-basis`` averages R between a fixed, shared B and A."""

R_SUFFIX = ".lora_R.weight"


def moments_carry_over(kind: str) -> bool:
    """Whether a silo's AdamW moments carry over from one round to the next under aggregation ``kind``: not under
    ``stack``, whose trainable adapter is new every round (fresh, or the global adapter's leading components in the
    SVD order of that round)."""
    return kind != "stack"


Layout = Sequence[tuple[str, Sequence[int]]]


@dataclass(frozen=True)
class ModuleSize:
    """A LoRA-adapted linear layer: its input and output sizes."""

    fan_in: int
    fan_out: int


def module_sizes(layout: Layout) -> dict[str, ModuleSize]:
    """The adapted modules of a standard LoRA layout (``lora_A`` r × in, ``lora_B`` out × r), in layout order.

    Raises:
        ShapeMismatchError: a factor without its pair, or pairs whose shapes do not fit.
    """
    shapes = {name: tuple(shape) for name, shape in layout}
    modules = lora_modules({name: np.empty(shape, np.float32) for name, shape in shapes.items() if _is_factor(name)})
    order = [name.removesuffix(A_SUFFIX) for name, _ in layout if name.endswith(A_SUFFIX)]
    return {m: ModuleSize(modules[m].a.shape[1], modules[m].b.shape[0]) for m in order}


def _is_factor(name: str) -> bool:
    return name.endswith(A_SUFFIX) or name.endswith(B_SUFFIX)


def rank_layout(layout: Layout, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """The standard LoRA layout of the same modules at rank ``rank`` (``lora_A`` then ``lora_B`` per module)."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for module, size in module_sizes(layout).items():
        out += [(module + A_SUFFIX, (rank, size.fan_in)), (module + B_SUFFIX, (size.fan_out, rank))]
    return out


def shared_basis_layout(layout: Layout, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """A shared-basis adapter's layout: per module ``lora_A`` (r × in) and ``lora_B`` (out × r), fixed, and
    ``lora_R`` (r × r), trained."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, shape in rank_layout(layout, rank):
        out.append((name, shape))
        if name.endswith(B_SUFFIX):
            out.append((name.removesuffix(B_SUFFIX) + R_SUFFIX, (rank, rank)))
    return out


def update_layout(kind: str, job_layout: Layout, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """What a silo of rank ``rank`` uploads each round under aggregation ``kind``, given the job's layout (the
    initial adapter's; for ``shared-basis`` the one with R): the whole adapter (``fedavg``), its own rank-``rank``
    adapter (``stack``), or only the R matrices (``shared-basis``)."""
    if kind == "fedavg":
        return [(name, tuple(shape)) for name, shape in job_layout]
    if kind == "stack":
        return rank_layout(job_layout, rank)
    if kind == "shared-basis":
        return [(name, tuple(shape)) for name, shape in job_layout if name.endswith(R_SUFFIX)]
    raise ConfigError(f"aggregation.kind: must be one of {list(ADAPTER_KINDS)}, got {kind!r}")


def _module_seed(seed: int, module: str) -> np.random.Generator:
    digest = np.frombuffer(hashlib.sha256(module.encode()).digest()[:8], dtype=np.uint64)[0]
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(digest)]))


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A rows × cols matrix with orthonormal columns (rows ≥ cols), from a Gaussian draw and its QR."""
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.diag(r))  # a unique QR: the draw's sign convention, not LAPACK's


def make_shared_basis(layout: Layout, rank: int, seed: int) -> dict[str, np.ndarray]:
    """The fixed factors of a shared-basis adapter, and R = 0 (so the adapter starts as the base model), as float32
    weights in `shared_basis_layout` order.

    Per module (seeded by ``seed`` and the module's name): A has orthonormal rows times √(1/3) and B orthonormal
    columns times √(out/(3r)), the norms peft's kaiming-uniform initialisation gives a LoRA factor of these shapes,
    so that a step on R moves the weights about as far as a LoRA step on B would. As both are orthonormal up to a
    constant, ‖B·X·A‖ = c·‖X‖ with c = `basis_gain`: norms of R updates are norms of weight updates.

    Raises:
        ConfigError: ``rank`` exceeds a module's in or out size (the basis would not be orthonormal).
    """
    weights: dict[str, np.ndarray] = {}
    for module, size in module_sizes(layout).items():
        if rank > min(size.fan_in, size.fan_out):
            raise ConfigError(f"lora.rank: {rank} exceeds {module}'s sizes {size.fan_in} × {size.fan_out}")
        rng = _module_seed(seed, module)
        a = _orthonormal(rng, size.fan_in, rank).T * math.sqrt(1.0 / 3.0)
        b = _orthonormal(rng, size.fan_out, rank) * math.sqrt(size.fan_out / (3.0 * rank))
        weights[module + A_SUFFIX] = a.astype(np.float32)
        weights[module + B_SUFFIX] = b.astype(np.float32)
        weights[module + R_SUFFIX] = np.zeros((rank, rank), np.float32)
    return weights


def basis_gain(weights: Weights, module: str) -> float:
    """c with ‖B·X·A‖_F = c·‖X‖_F for a shared basis made by `make_shared_basis` (the product of the factors'
    scales)."""
    a, b = np.asarray(weights[module + A_SUFFIX], np.float64), np.asarray(weights[module + B_SUFFIX], np.float64)
    return float(np.linalg.norm(a[0]) * np.linalg.norm(b[:, 0]))


def fold_shared_basis(weights: Weights) -> dict[str, np.ndarray]:
    """A shared-basis adapter as a standard LoRA adapter of the same rank and scaling: lora_B := B·R (exact: the
    update s·B·R·A is unchanged). Weights without R are returned as they are."""
    if not any(name.endswith(R_SUFFIX) for name in weights):
        return dict(weights)
    out = {}
    for name, array in weights.items():
        if name.endswith(R_SUFFIX):
            continue
        if name.endswith(B_SUFFIX):
            r = np.asarray(weights[name.removesuffix(B_SUFFIX) + R_SUFFIX], np.float64)
            array = (np.asarray(array, np.float64) @ r).astype(np.asarray(array).dtype)
        out[name] = array
    return out


def is_zero_delta(weights: Weights) -> bool:
    """True when every lora_B is zero: the adapter does not change the model (a fresh LoRA)."""
    return all(not np.any(np.asarray(w)) for name, w in weights.items() if name.endswith(B_SUFFIX))


@dataclass(frozen=True)
class Stacked:
    """A `stack` round's new global adapter: ``weights`` (standard LoRA factors, scaling 1: B absorbs it), its
    ``rank``, and the relative Frobenius ``error`` of the SVD truncation (the largest over modules; 0: exact)."""

    weights: dict[str, np.ndarray]
    rank: int
    error: float


def global_rank(weights: Weights) -> int:
    """The rank of a global adapter's factors (0 when it changes nothing, `is_zero_delta`)."""
    if is_zero_delta(weights):
        return 0
    return int(np.shape(next(w for n, w in weights.items() if n.endswith(A_SUFFIX)))[0])


def warm_started(global_weights: Weights, rank: int) -> bool:
    """Whether a ``stack`` silo of rank ``rank`` starts its round warm from ``global_weights`` (its leading
    components; the global adapter has at least ``rank``) rather than from a fresh adapter. Silo and coordinator
    both decide with this."""
    return global_rank(global_weights) >= rank


def leading(weights: Weights, rank: int) -> dict[str, np.ndarray]:
    """The first ``rank`` components of each module's factors (lora_A's rows, lora_B's columns): after a
    ``stack`` round, whose global adapter is in SVD order (`stack_round`), the best rank-``rank`` part of it."""
    return {n: np.asarray(w)[:rank] if n.endswith(A_SUFFIX) else np.asarray(w)[:, :rank] for n, w in weights.items()}


def warm_delta(update: Weights, global_weights: Weights, global_scaling: float) -> dict[str, np.ndarray]:
    """A warm-started silo's weight change as factors: what it trained (scaling folded into B) minus the leading
    components it started from, [Bᵢ, −s·B_g[:, :rᵢ]]·[Aᵢ; A_g[:rᵢ]] (rank 2rᵢ, exact)."""
    rank = int(np.shape(next(w for n, w in update.items() if n.endswith(A_SUFFIX)))[0])
    start = leading(global_weights, rank)
    out = {}
    for name, w in update.items():
        w, g = np.asarray(w, np.float64), np.asarray(start[name], np.float64)
        out[name] = (
            np.concatenate([w, g], axis=0) if name.endswith(A_SUFFIX) else np.concatenate([w, -global_scaling * g], 1)
        )
    return out


def stack_round(
    global_weights: Weights,
    global_scaling: float,
    updates: Sequence[Weights],
    weights: Sequence[float],
    max_rank: int | None = None,
    rank: int | None = None,
) -> Stacked:
    """The exact ``stack`` round: the global adapter's update plus Σᵢ wᵢ·Bᵢ·Aᵢ (weights normalised), as one
    stacked adapter of scaling 1; a global adapter that changes nothing (`is_zero_delta`) is dropped rather than
    stacked. ``updates`` are the silos' factors with their scaling folded into B already (any ranks). With
    ``rank`` (the rank the sum has, e.g. when warm-started updates subtract components the global adapter already
    holds), the result is refactored by `truncate` to min(``rank``, ``max_rank``) in SVD order, and the error is
    float noise unless ``max_rank`` cuts; else it is truncated only past ``max_rank``. The error returned is the
    largest over modules.

    Raises:
        ConfigError, ShapeMismatchError: as `stack`.
    """
    silos = [lora_modules(u) for u in updates]
    round_stack = stack(silos, weights)
    if not is_zero_delta(global_weights):
        current = lora_modules(global_weights, global_scaling)
        if list(current) != list(round_stack):
            raise ShapeMismatchError("global adapter: its modules differ from the silos'")
        round_stack = {
            m: Factors(
                np.concatenate([np.asarray(old.a, np.float64), new.a], axis=0),
                np.concatenate([old.scaling * np.asarray(old.b, np.float64), new.b], axis=1),
            )
            for (m, old), new in zip(current.items(), round_stack.values(), strict=True)
        }
    stacked = next(iter(round_stack.values())).rank
    keep = min(rank if rank is not None else stacked, max_rank if max_rank is not None else stacked)
    error = 0.0
    if keep < stacked or rank is not None:
        truncated = {}
        for module, pair in round_stack.items():
            truncated[module], err = truncate(pair, keep)
            error = max(error, err)
        round_stack, stacked = truncated, keep
    out: dict[str, np.ndarray] = {}
    for module, pair in round_stack.items():
        out[module + A_SUFFIX] = pair.a.astype(np.float32)
        out[module + B_SUFFIX] = pair.b.astype(np.float32)
    return Stacked(out, stacked, error)


def product_norm(weights: Weights, scaling: float = 1.0) -> float:
    """‖Σ_modules s·B·A‖_F over all modules (the norm of the weight update), from the factors:
    ‖B·A‖² = tr((BᵀB)(AAᵀ))."""
    total = 0.0
    for pair in lora_modules(weights, scaling).values():
        a, b = np.asarray(pair.a, np.float64), np.asarray(pair.b, np.float64)
        total += pair.scaling**2 * max(float(np.sum((b.T @ b) * (a @ a.T))), 0.0)
    return math.sqrt(total)
