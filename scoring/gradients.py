"""Exact per-sample gradients of each sample's response loss with respect to the LoRA parameters only.

Contains the `GradientComputer` Protocol and three implementations:

- `VmapGradients`: ``torch.func.vmap(grad_and_value(...))`` over ``functional_call``; generic, bounded by
  ``chunk_size`` (samples per vmap slice).
- `HookGradients`: one batched forward + backward; forward hooks on peft's ``lora_A``/``lora_B`` capture each layer's
  input and output, `torch.autograd.grad` gives the output gradients, and the per-sample weight gradients are two
  batched matmuls per layer. Fastest; needs peft LoRA ``nn.Linear`` layers without dropout (scoring never uses it).
- `LoopGradients`: the plain batch-size-1 autograd loop on unpadded samples. The test oracle and benchmark baseline.

Choose with `build_gradient_computer(kind)`: ``hooks`` is the default, ``vmap`` the reference torch.func engine.

All engines share `response_losses`: the LM head runs only at positions whose next token carries a label (a
49k-vocabulary head at every position dominated memory), and every sample's loss is the mean over its response
tokens. Batches are right-padded and attention is causal, so padding never reaches a real token: a padded sample's
gradient equals its unpadded one, and no attention mask is passed.

`adam_precondition` turns candidate gradients into LESS/CLUES Adam updates m'/(sqrt(v')+eps) from moments keyed by
canonical parameter name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoring.config import AdamState
from scoring.errors import ConfigError, IncompatibleArtifactError, ShapeMismatchError
from scoring.models import canonical_name, lora_parameters

Grads = OrderedDict[str, Tensor]  # canonical name -> (B, *param_shape)
IGNORE = -100


def label_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Positions whose logits predict a labelled token, padded to a common count.

    Args:
        labels: (B, L) token ids with -100 where no loss is taken.

    Returns:
        pos: (B, K) positions t with labels[b, t+1] != -100 (padding entries point at 0).
        target: (B, K) the token ids labels[b, t+1] (0 on padding).
        weight: (B, K) 1/n_b on real entries, 0 on padding, so that sum(weight * nll) is the mean response loss.
    """
    shifted = labels[:, 1:]  # (B, L-1): the token each position predicts
    valid = shifted != IGNORE
    counts = valid.sum(1)  # (B,)
    if bool((counts == 0).any()):
        raise ShapeMismatchError("a sample in the batch has no response tokens to take a loss on")
    k = int(counts.max())
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :k]  # valid positions first, in order
    keep = torch.arange(k, device=labels.device)[None, :] < counts[:, None]  # (B, K)
    pos = torch.where(keep, order, torch.zeros_like(order))
    target = torch.where(keep, shifted.gather(1, order), torch.zeros_like(order))
    weight = keep.to(torch.float32) / counts[:, None].to(torch.float32)
    return pos, target, weight


def _causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder body, LM head) of a (possibly peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def response_losses(model: nn.Module, input_ids: Tensor, pos: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Mean response-token cross-entropy of each sample.

    Args:
        model: causal LM (peft-wrapped or not).
        input_ids: (B, L) right-padded token ids.
        pos, target, weight: from `label_positions`, each (B, K).

    Returns:
        (B,) float32 losses.
    """
    decoder, head = _causal_lm_parts(model)
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, L, H)
    index = pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, K, H)
    logits = head(hidden.gather(1, index)).float()  # (B, K, V): the head only where a label is
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")  # (B*K,)
    return (nll.view_as(weight) * weight).sum(1)


class GradientComputer(Protocol):
    """Per-sample LoRA gradients of a batch: ``compute(input_ids, labels) -> (grads, losses)``.

    ``grads`` maps canonical LoRA parameter names (model order) to float32 tensors (B, *param_shape); ``losses`` is
    the (B,) mean response loss of each sample.
    """

    def compute(self, input_ids: Tensor, labels: Tensor) -> tuple[Grads, Tensor]: ...


class _LossModule(nn.Module):
    """Wraps the model so that `functional_call` can run `response_losses` with substituted LoRA weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, pos: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        return response_losses(self.model, input_ids, pos, target, weight)


class VmapGradients:
    """torch.func engine: ``vmap(grad_and_value(loss))`` over samples, ``chunk_size`` samples at a time."""

    def __init__(self, model: nn.Module, chunk_size: int | None = None):
        if chunk_size is not None and chunk_size <= 0:
            raise ConfigError(f"chunk_size: must be positive, got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size
        self._wrapper = _LossModule(model)
        adapter = getattr(model, "active_adapter", "default")
        self._names = OrderedDict(
            (f"model.{name}", canonical_name(name, adapter)) for name, p in model.named_parameters() if p.requires_grad
        )

    def compute(self, input_ids: Tensor, labels: Tensor) -> tuple[Grads, Tensor]:
        from torch.func import functional_call, grad_and_value, vmap

        pos, target, weight = label_positions(labels)
        params = {full: p.detach() for full, p in self._wrapper.named_parameters() if full in self._names}

        def one_sample(p: dict[str, Tensor], ids: Tensor, ps: Tensor, tg: Tensor, w: Tensor) -> Tensor:
            out = functional_call(self._wrapper, p, (ids[None], ps[None], tg[None], w[None]))  # (1,)
            return out[0]

        per_sample = vmap(grad_and_value(one_sample), in_dims=(None, 0, 0, 0, 0), chunk_size=self.chunk_size)
        grads, losses = per_sample(params, input_ids, pos, target, weight)
        out = OrderedDict((self._names[full], grads[full].float()) for full in self._names)
        return out, losses.detach().float()


def _lora_modules(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module, float]]:
    """(canonical prefix, lora_A, lora_B, scaling) of every active peft LoRA layer, in module order."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            a, b = module.lora_A[adapter], module.lora_B[adapter]
            if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
                raise ConfigError(f"engine: the hooks engine supports Linear LoRA layers only, not {name}")
            dropout = module.lora_dropout[adapter]
            if not isinstance(dropout, nn.Identity) and module.training:
                raise ConfigError("engine: the hooks engine needs dropout off (call model.eval())")
            found.append((canonical_name(name, adapter), a, b, module.scaling[adapter]))
    return found


class HookGradients:
    """Per-sample grads from one batched backward: dL/dA_b = Σ_t gA_bt ⊗ x_bt, dL/dB_b = Σ_t gB_bt ⊗ a_bt.

    With a shared basis (`scoring.federated.adapters.attach_shared_basis`: lora_B's weight is B₀·R, only R trains)
    the gradients are R's: dL/dR_b = B₀ᵀ·dL/dB_b, from lora_B's hooks alone."""

    def __init__(self, model: nn.Module):
        from torch.nn.utils import parametrize

        self.model = model
        self._layers = _lora_modules(model)
        self._shared = bool(self._layers) and all(
            parametrize.is_parametrized(b, "weight") for _, _, b, _ in self._layers
        )
        expected = list(lora_parameters(model))
        parts = ("lora_R",) if self._shared else ("lora_A", "lora_B")
        produced = [f"{prefix}.{part}.weight" for prefix, *_ in self._layers for part in parts]
        if sorted(produced) != sorted(expected):
            raise ConfigError("engine: the model has trainable parameters besides LoRA A/B weights; use 'vmap'")
        self._order = expected

    def compute(self, input_ids: Tensor, labels: Tensor) -> tuple[Grads, Tensor]:
        pos, target, weight = label_positions(labels)
        captured: dict[int, list[Tensor]] = {}

        def save(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            captured[id(module)] = [args[0], output]  # input (B, L, in), output (B, L, out)

        hooked = [m for _, a, b, _ in self._layers for m in ((b,) if self._shared else (a, b))]
        handles = [m.register_forward_hook(save) for m in hooked]
        try:
            with torch.enable_grad():
                losses = response_losses(self.model, input_ids, pos, target, weight)
                out_grads = dict(
                    zip(
                        map(id, hooked),
                        torch.autograd.grad(losses.sum(), [captured[id(m)][1] for m in hooked]),
                        strict=True,
                    )
                )
        finally:
            for h in handles:
                h.remove()
        grads: dict[str, Tensor] = {}
        for prefix, a, b, _ in self._layers:
            a_out = captured[id(b)][0].detach().float()  # lora_B's input is lora_A's output: (B, L, r)
            g_b = out_grads[id(b)].float()  # (B, L, out)
            grad_b = torch.bmm(g_b.transpose(1, 2), a_out)  # (B, out, r)
            if self._shared:
                basis = b.parametrizations.weight.original.detach().float()  # B₀ (out, r)
                grads[f"{prefix}.lora_R.weight"] = torch.matmul(basis.T, grad_b)  # (B, r, r)
                continue
            x = captured[id(a)][0].detach().float()  # (B, L, in)
            g_a = out_grads[id(a)].float()  # (B, L, r)
            grads[f"{prefix}.lora_A.weight"] = torch.bmm(g_a.transpose(1, 2), x)  # (B, r, in)
            grads[f"{prefix}.lora_B.weight"] = grad_b  # (B, out, r)
        return OrderedDict((name, grads[name]) for name in self._order), losses.detach().float()


class LoopGradients:
    """Reference: one autograd backward per sample on its unpadded tokens (what LESS and CLUES do)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._params = lora_parameters(model)

    def compute(self, input_ids: Tensor, labels: Tensor) -> tuple[Grads, Tensor]:
        per_name: dict[str, list[Tensor]] = {name: [] for name in self._params}
        losses = []
        for row_ids, row_labels in zip(input_ids, labels, strict=True):
            length = int((row_labels != IGNORE).nonzero().max()) + 1  # drop the right padding
            ids, lab = row_ids[None, :length], row_labels[None, :length]
            pos, target, weight = label_positions(lab)
            with torch.enable_grad():
                loss = response_losses(self.model, ids, pos, target, weight)[0]
                grads = torch.autograd.grad(loss, list(self._params.values()))
            for name, g in zip(self._params, grads, strict=True):
                per_name[name].append(g.float())
            losses.append(loss.detach().float())
        return OrderedDict((n, torch.stack(gs)) for n, gs in per_name.items()), torch.stack(losses)


ENGINES = ("hooks", "vmap", "loop")


def build_gradient_computer(model: nn.Module, kind: str = "hooks", chunk_size: int | None = None) -> GradientComputer:
    """Builder: ``hooks`` (fastest), ``vmap`` (torch.func) or ``loop`` (reference)."""
    if kind == "hooks":
        return HookGradients(model)
    if kind == "vmap":
        return VmapGradients(model, chunk_size=chunk_size)
    if kind == "loop":
        return LoopGradients(model)
    raise ConfigError(f"engine: must be one of {ENGINES}, got {kind!r}")


def adam_precondition(
    grads: Mapping[str, Tensor],
    exp_avg: Mapping[str, Tensor],
    exp_avg_sq: Mapping[str, Tensor],
    adam: AdamState,
) -> Grads:
    """LESS/CLUES Adam update direction of each sample's gradient.

    m' = β₁m + (1-β₁)g, v' = β₂v + (1-β₂)g², result m'/(√v' + ε), computed per sample.

    Args:
        grads: name -> (B, *shape) per-sample gradients.
        exp_avg, exp_avg_sq: name -> (*shape) Adam first and second moments, keyed by the same canonical names.
        adam: betas and eps.
    """
    names = list(grads)
    for label, moments in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if set(moments) != set(names):
            missing, extra = sorted(set(names) - set(moments)), sorted(set(moments) - set(names))
            raise IncompatibleArtifactError(
                f"Adam {label} does not match the LoRA parameters: missing {missing[:3]}, unexpected {extra[:3]}"
            )
    out: Grads = OrderedDict()
    for name in names:
        g = grads[name].float()
        m, v = exp_avg[name].to(g), exp_avg_sq[name].to(g)
        if m.shape != g.shape[1:] or v.shape != g.shape[1:]:
            raise ShapeMismatchError(f"Adam moments for {name} have shape {tuple(m.shape)}, gradient {g.shape[1:]}")
        m_new = adam.beta1 * m + (1 - adam.beta1) * g
        v_new = adam.beta2 * v + (1 - adam.beta2) * g.square()
        out[name] = m_new / (v_new.sqrt() + adam.eps)
    return out
