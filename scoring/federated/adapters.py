"""A silo's model for the exact aggregation kinds (`scoring.federated.adapter_rounds`): what it trains in a round.

- ``shared-basis``: `attach_shared_basis` freezes every LoRA layer's A and B at the job's shared basis and makes
  lora_B's weight B·R (a torch parametrization), so that R (r × r) is the only trainable parameter. Under its
  canonical name ``<module>.lora_R.weight`` (`scoring.models.canonical_name`), `local_update` and its moments handle
  it as any LoRA parameter, and peft's forward, which reads ``lora_B.weight``, computes s·B·R·A.
- ``stack``: the global adapter (the stack of every earlier round's factors, in SVD order) is added into the base
  weights (`StackBase.set_global`, W = W₀ + s·B·A; the originals are kept, so each round starts from W₀), and the
  silo trains an adapter of its own rank r on top. Fresh (the default): it starts from `fresh_adapter` (A drawn as
  peft draws it, from a seed that differs every round; B = 0). Warm: the adapter starts as the global adapter's
  leading r components, which are left out of the base weights, so the model is the global one and both factors
  have gradients from the first step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from scoring.errors import ShapeMismatchError
from scoring.federated.lora_algebra import (
    A_SUFFIX,
    B_SUFFIX,
    R_SUFFIX,
    Layout,
    leading,
    moments_carry_over,
    warm_started,
)

ADAPTER = "default"


class RightFactor(nn.Module):
    """The parametrization lora_B.weight = B·R, with R (r × r) the trainable parameter."""

    def __init__(self, r: torch.Tensor):
        super().__init__()
        self.R = nn.Parameter(r)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b @ self.R


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """Every peft LoRA layer by its canonical module name (``...q_proj``, as the adapter's keys begin)."""
    return {
        name: module
        for name, module in peft_model.named_modules()
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and ADAPTER in module.lora_A
    }


def _copy(param: torch.Tensor, array: np.ndarray, name: str) -> None:
    if tuple(param.shape) != tuple(np.shape(array)):
        raise ShapeMismatchError(f"{name}: shape {tuple(np.shape(array))}, the model's {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(torch.as_tensor(np.asarray(array), dtype=param.dtype, device=param.device))


def attach_shared_basis(peft_model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Fix every LoRA layer's A and B to ``weights`` (a shared-basis adapter: ``lora_A``, ``lora_B``, ``lora_R``
    per module) and make R the only trainable parameter, initialised from ``weights``. Idempotent for the same
    basis: a model already attached only has its R set.

    Raises:
        ShapeMismatchError: a module of the model has no factors in ``weights``, or a shape differs.
    """
    layers = lora_layers(peft_model)
    for module, layer in layers.items():
        names = [module + s for s in (A_SUFFIX, B_SUFFIX, R_SUFFIX)]
        missing = [n for n in names if n not in weights]
        if missing:
            raise ShapeMismatchError(f"shared basis: {missing[0]} is missing")
        a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        if parametrize.is_parametrized(b, "weight"):
            _copy(b.parametrizations.weight.original, weights[names[1]], names[1])
            _copy(b.parametrizations.weight[0].R, weights[names[2]], names[2])
        else:
            _copy(b.weight, weights[names[1]], names[1])
            r = torch.as_tensor(np.asarray(weights[names[2]]), dtype=b.weight.dtype, device=b.weight.device)
            parametrize.register_parametrization(b, "weight", RightFactor(r.clone()))
            b.parametrizations.weight.original.requires_grad_(False)
        _copy(a.weight, weights[names[0]], names[0])
        a.weight.requires_grad_(False)
    extra = {n.rsplit(".lora_", 1)[0] for n in weights} - set(layers)
    if extra:
        raise ShapeMismatchError(f"shared basis: module {sorted(extra)[0]} is not a LoRA layer of the model")


def _round_seed(seed: int, round: int) -> int:
    return int.from_bytes(hashlib.sha256(f"clues-stack:{seed}:{round}".encode()).digest()[:8], "little") >> 1


def fresh_adapter(layout: Layout, seed: int, round: int) -> dict[str, np.ndarray]:
    """A fresh LoRA adapter of ``layout`` for round ``round`` of a ``stack`` job: every lora_A drawn as peft draws
    it (kaiming-uniform, a = √5) from a generator seeded by ``seed`` and the round, every lora_B zero."""
    gen = torch.Generator().manual_seed(_round_seed(seed, round))
    out = {}
    for name, shape in layout:
        tensor = torch.zeros(tuple(shape))
        if name.endswith(A_SUFFIX):
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=gen)
        out[name] = tensor.numpy()
    return out


class StackBase:
    """The base weights of a silo's model under ``stack``: W₀ of every LoRA layer kept, so that `set_global` can
    put W₀ + s·B·A of each round's global adapter in place."""

    def __init__(self, peft_model: nn.Module):
        self.layers = lora_layers(peft_model)
        self.original = {m: layer.base_layer.weight.detach().clone() for m, layer in self.layers.items()}

    def set_global(self, weights: Mapping[str, np.ndarray], scaling: float, skip: int = 0) -> None:
        """W = W₀ + scaling·B·A for every layer (the global adapter's factors in ``weights``), without its first
        ``skip`` components (those the silo trains, warm-started).

        Raises:
            ShapeMismatchError: a layer without factors in ``weights``, or factors that do not fit it.
        """
        for module, layer in self.layers.items():
            a, b = weights.get(module + A_SUFFIX), weights.get(module + B_SUFFIX)
            if a is None or b is None:
                raise ShapeMismatchError(f"global adapter: no factors for {module}")
            base = layer.base_layer.weight
            if (np.shape(b)[0], np.shape(a)[1]) != tuple(base.shape) or np.shape(a)[0] != np.shape(b)[1]:
                raise ShapeMismatchError(
                    f"global adapter: {module}'s factors do not fit its weight {tuple(base.shape)}"
                )
            a, b = torch.as_tensor(np.asarray(a)[skip:]).float(), torch.as_tensor(np.asarray(b)[:, skip:]).float()
            delta = scaling * (b @ a)
            with torch.no_grad():
                base.copy_((self.original[module].float() + delta.to(base.device)).to(base.dtype))


class SiloAdapter:
    """A silo's peft model under an aggregation kind (see the module docstring): `begin` puts the round's global
    adapter in place and returns the weights the local update starts from (`local_update`'s ``global_weights``).

    Attributes:
        kind: ``fedavg``, ``stack`` or ``shared-basis``.
        carries_moments: whether the silo's AdamW moments carry over to the next round (`moments_carry_over`).
        warm: under ``stack``, start from the global adapter's leading components (else from a fresh adapter).
    """

    def __init__(self, kind: str, peft_model: nn.Module, seed: int, warm: bool = False):
        self.kind, self.model, self.seed, self.warm = kind, peft_model, seed, warm
        self.carries_moments = moments_carry_over(kind)
        self._stack = StackBase(peft_model) if kind == "stack" else None

    def update_config(self, adapter_config: Mapping) -> dict:
        """The peft config of what the silo uploads, given the round's global ``adapter_config``: under ``stack`` its
        own adapter's (this model's rank and alpha), else the global adapter's."""
        if self.kind != "stack":
            return dict(adapter_config)
        own = self.model.peft_config[ADAPTER]
        return {**adapter_config, "r": own.r, "lora_alpha": own.lora_alpha}

    def begin(self, weights: Mapping[str, np.ndarray], adapter_config: Mapping, round: int) -> dict[str, np.ndarray]:
        """The round's start: ``weights`` and ``adapter_config`` are its global adapter's.

        Raises:
            ShapeMismatchError: the global adapter does not fit the model.
        """
        from scoring.federated.adapter_rounds import scaling_of
        from scoring.models import lora_layout

        if self.kind == "shared-basis":
            attach_shared_basis(self.model, weights)
            return {n: np.asarray(w) for n, w in weights.items() if n.endswith(R_SUFFIX)}
        if self.kind == "stack":
            assert self._stack is not None
            layout, scaling = lora_layout(self.model), scaling_of(adapter_config)
            rank = int(layout[0][1][0])
            if not (self.warm and warm_started(weights, rank)):
                self._stack.set_global(weights, scaling)
                return fresh_adapter(layout, self.seed, round)
            # warm: train the global adapter's leading components, the rest frozen in the weights
            self._stack.set_global(weights, scaling, skip=rank)
            own = next(iter(self._stack.layers.values())).scaling[ADAPTER]  # α/r of this silo's adapter
            start = leading({n: weights[n] for n, _ in layout}, rank)
            return {n: w * (scaling / own) if n.endswith(B_SUFFIX) else w for n, w in start.items()}
        return dict(weights)
