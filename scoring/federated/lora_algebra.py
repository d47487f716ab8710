"""Exact aggregation of LoRA updates (issue 22's math; not wired into training jobs yet), as pure numpy.

FedAvg averages each silo's ``lora_A`` and ``lora_B`` separately, and mean(B)·mean(A) ≠ mean(B·A): the averaged
adapter is not the average of the silos' weight updates (FLoRA's "aggregation noise"). Two exact alternatives:

- **stacking** (FLoRA): put the silos' factors side by side, A = [A₁; …; Aₙ] and B = [w₁s₁B₁, …, wₙsₙBₙ], so that
  B·A = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ exactly (`stack`), whatever each silo's rank rᵢ (sᵢ = αᵢ/rᵢ, peft's LoRA scaling; the
  stacked pair has scaling 1). Its rank Σ rᵢ grows with the silos, so a round either folds it into a dense delta
  (`delta`, exact) or truncates it with an SVD computed from the factors (`truncate`, whose relative Frobenius
  error is returned, 0 when the rank kept covers the stack's).
- **shared basis** (Fed-SB): B and A are fixed and shared, each silo trains only an r×r matrix Rᵢ between them
  (ΔW = s·B·Rᵢ·A), and averaging R is exact because the map is linear: B·(Σ wᵢRᵢ)·A = Σ wᵢ·B·Rᵢ·A
  (`shared_basis_average`).

Weights are `Weights` (canonical peft names → arrays, as `scoring.federated.aggregation` takes them); a module's
factors are ``<module>.lora_A.weight`` (r × in) and ``<module>.lora_B.weight`` (out × r). Arithmetic runs in float64.
"""

from __future__ import annotations

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
    """The LoRA pairs in ``weights`` by module name.

    Raises:
        ShapeMismatchError: a module with only one factor, or factors whose ranks differ.
    """
    modules: dict[str, Factors] = {}
    names = {n.removesuffix(A_SUFFIX) for n in weights if n.endswith(A_SUFFIX)}
    names |= {n.removesuffix(B_SUFFIX) for n in weights if n.endswith(B_SUFFIX)}
    for module in sorted(names):
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
        if list(silo) != modules:
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

    The result splits the singular values evenly between the factors (b = U·√Σ, a = √Σ·Vᵀ) with scaling 1.
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
    return Factors(new_a, new_b, 1.0), error


def shared_basis_average(rs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σᵢ wᵢ·Rᵢ (weights normalised): with B and A shared and fixed, B·(Σ wᵢRᵢ)·A = Σ wᵢ·B·Rᵢ·A exactly.

    Raises:
        ConfigError: bad weights, or no matrix.
        ShapeMismatchError: the Rᵢ are not square matrices of one size.
    """
    if not rs:
        raise ConfigError("rs: need at least one silo's R to average")
    w = _check_weights(weights, len(rs))
    shapes = {np.shape(r) for r in rs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or len(set(next(iter(shapes)))) != 1:
        raise ShapeMismatchError(f"rs: need square matrices of one size, got shapes {sorted(shapes)}")
    return np.tensordot(w, np.stack([np.asarray(r, np.float64) for r in rs]), axes=1)
