"""Merging the silos' LoRA adapters into one with peft's ``add_weighted_adapter`` ("merged" training mode).

Each silo trains once on its selected samples; the coordinator loads every adapter into one peft model and combines
them with weights ∝ selected sample counts (`count_weights`) by default. The kinds (`MERGE_KINDS`) are peft's:

- ``cat``: exact. A = concat_i(w_i·s_i·A_i), B = concat_i(B_i), so ΔW = Σ_i w_i·s_i·B_i·A_i (s_i = alpha_i / r_i);
  the rank is the sum of the ranks, so mixed ranks are fine.
- ``svd`` and the ``*_svd`` kinds: the weighted sum of the ΔW_i, truncated to ``svd_rank`` (default: the largest
  input rank) by an SVD; mixed ranks are fine.
- ``linear`` (and ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): A and B are combined separately,
  A = Σ_i √(w_i·s_i)·A_i and B = Σ_i √(w_i·s_i)·B_i, so ΔW = B·A carries cross terms B_i·A_j: a rough, cheap
  approximation that needs equal ranks (refused otherwise; use ``cat`` or an ``*_svd`` kind).

The merged adapter has scaling 1 (peft sets its alpha to its rank). `lora_deltas` gives ΔW per adapted module, the
quantity the kinds are defined on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from scoring.config import DENSITY_MERGE_KINDS, MERGE_KINDS
from scoring.errors import ConfigError

MIXED_RANK_KINDS = frozenset({"cat"} | {k for k in MERGE_KINDS if k.endswith("svd")})
DENSITY_KINDS = DENSITY_MERGE_KINDS


def count_weights(counts: Sequence[int]) -> list[float]:
    """Merge weights ∝ selected sample counts, summing to 1."""
    if not counts or any(c < 0 for c in counts) or sum(counts) <= 0:
        raise ConfigError(f"counts: need non-negative selected sample counts with a positive sum, got {list(counts)}")
    total = sum(counts)
    return [c / total for c in counts]


def _ranks(model: nn.Module, adapter: str) -> set[int]:
    return {m.r[adapter] for m in model.modules() if hasattr(m, "lora_A") and adapter in getattr(m, "r", {})}


def merge_adapters(
    base: nn.Module,
    adapters: Mapping[str, Path],
    weights: Sequence[float],
    *,
    kind: str = "cat",
    name: str = "merged",
    density: float | None = None,
    svd_rank: int | None = None,
) -> nn.Module:
    """Load every silo's adapter (peft format) onto ``base`` and add their weighted combination as ``name``.

    Args:
        base: the base model (not yet wrapped by peft).
        adapters: silo name -> adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        weights: one per adapter, in mapping order (e.g. `count_weights`).
        kind: one of `MERGE_KINDS`.
        density: fraction of values kept by the ties / dare / magnitude kinds (required for them), in (0, 1].
        svd_rank: rank of the ``*svd`` results (default: the largest input rank).

    Returns:
        The peft model with all adapters loaded and ``name`` active.

    Raises:
        ConfigError: unknown kind, weights not one per adapter or not finite, a missing density, or ``linear``-type
            kinds over adapters of different ranks.
    """
    from peft import PeftModel

    if kind not in MERGE_KINDS:
        raise ConfigError(f"kind: must be one of {MERGE_KINDS}, got {kind!r}")
    if len(weights) != len(adapters) or not adapters or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights: need one finite weight per adapter ({len(adapters)}), got {list(weights)}")
    if kind in DENSITY_KINDS and not (density is not None and 0 < density <= 1):
        raise ConfigError(f"density: kind {kind!r} needs a density in (0, 1], got {density!r}")
    if name in adapters:
        raise ConfigError(f"name: {name!r} is also a silo's adapter name")
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for silo in names[1:]:
        model.load_adapter(str(adapters[silo]), adapter_name=silo)
    ranks = {silo: _ranks(model, silo) for silo in names}
    if kind not in MIXED_RANK_KINDS and len(set().union(*ranks.values())) > 1:
        raise ConfigError(f"kind {kind!r} needs adapters of one rank, got {ranks}; use 'cat' or an '*_svd' kind")
    model.add_weighted_adapter(names, list(weights), name, combination_type=kind, svd_rank=svd_rank, density=density)
    model.set_adapter(name)
    return model


@torch.no_grad()
def lora_deltas(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B · A of ``adapter`` for every module it adapts (module path -> (out, in) float32)."""
    out = {}
    for path, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            a = module.lora_A[adapter].weight.float()
            b = module.lora_B[adapter].weight.float()
            out[path] = module.scaling[adapter] * (b @ a)
    return out
