"""DP-SGD in a silo's local training: Poisson-sampled batches, each sample's LoRA gradient clipped to C, Gaussian
noise σC on the sum (`scoring.privacy` accounts for it).

The per-sample gradients come from the same engines as scoring (`scoring.gradients`: one batched backward with the
``hooks`` engine), so DP-SGD costs about what scoring's gradient pass costs per sample. One optimizer step:

1. draw the step's batch: each of the N samples joins independently with probability q (Poisson sampling, what the
   accountant assumes); the batch is processed ``cfg.batch_size`` samples at a time;
2. clip each sample's gradient (all LoRA parameters together) to norm ``C`` and sum;
3. add N(0, σ²C²) to every coordinate of the sum and divide by the expected batch q·N;
4. hand that to AdamW as the gradient. The FedProx pull, weight decay and the global-norm clip act on the noisy
   gradient and the weights only, so they are post-processing and cost no privacy.

Dropout is off (the model runs in eval mode: the hooks engine needs it, and DP-SGD's sensitivity is for a
deterministic per-sample gradient). The noise and the sampling draw from a generator seeded from the operating
system's randomness unless the caller passes one: noise that someone could regenerate from a known seed protects
nothing. Tests pass a seeded generator.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from scoring.batching import TokenizedSample, collate
from scoring.config import LocalTrainConfig
from scoring.federated.local import (
    LocalMoments,
    LocalResult,
    finish_step,
    get_lora_weights,
    moments_of,
    start_round,
)
from scoring.gradients import build_gradient_computer
from scoring.privacy import PrivacyPlan


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the operating system's randomness (for the noise and the sampling)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> list[int]:
    """The indices of a Poisson-sampled batch: each of ``n`` samples joins independently with probability ``rate``
    (the batch may be empty)."""
    keep = torch.rand(n, generator=generator, device=generator.device) < rate
    return keep.nonzero().flatten().tolist()


def clip_and_sum(grads: Mapping[str, Tensor], clip_norm: float) -> tuple[dict[str, Tensor], Tensor]:
    """Scale each sample's gradient (B rows of every tensor in ``grads``, taken together) to norm at most
    ``clip_norm`` and sum over the samples; also returns each sample's norm before clipping, (B,)."""
    norms = torch.sqrt(sum(g.flatten(1).double().pow(2).sum(1) for g in grads.values())).float()
    factor = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return {name: torch.einsum("b,b...->...", factor.to(g.dtype), g) for name, g in grads.items()}, norms


def add_noise(summed: Mapping[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """``summed`` plus N(0, std²) on every coordinate (float32, from ``generator``)."""
    out = {}
    for name, value in summed.items():
        noise = torch.randn(value.shape, generator=generator, device=generator.device, dtype=torch.float32)
        out[name] = value.float() + std * noise.to(value.device)
    return out


def dp_local_update(
    model: nn.Module,
    data: Sequence[TokenizedSample],
    cfg: LocalTrainConfig,
    plan: PrivacyPlan,
    *,
    pad_id: int,
    global_weights: Mapping[str, np.ndarray],
    lr: float,
    moments: LocalMoments | None = None,
    generator: torch.Generator | None = None,
    engine: str = "hooks",
    progress: Callable[[int, int, float], None] | None = None,
) -> LocalResult:
    """One silo's local training for a federated round with DP-SGD (see the module docstring): ``cfg.steps`` AdamW
    steps, each on a Poisson batch at ``plan.sampling_rate`` with clipping to ``plan.clip_norm`` and noise
    ``plan.noise_multiplier · plan.clip_norm``. ``cfg.batch_size`` is only how many samples go through the model at
    once; ``cfg.grad_accum`` is unused (the batch is the Poisson one). Charge the round to the silo's
    `scoring.privacy.PrivacyLedger` before its result leaves the silo.

    Returns:
        As `scoring.federated.local.local_update`; ``mean_loss`` is over the samples drawn (NaN if none was).

    Raises:
        DataError: ``data`` is empty.
        ShapeMismatchError: ``global_weights`` or ``moments`` do not match the model's LoRA parameters.
    """
    params, device, anchor, optimizer = start_round(model, data, cfg, global_weights, lr, moments)
    generator = generator or secret_generator(device)
    model.eval()  # no dropout: the sensitivity bound is for a deterministic per-sample gradient
    computer = build_gradient_computer(model, engine)
    expected = plan.sampling_rate * len(data)
    losses: list[float] = []
    for step in range(cfg.steps):
        drawn = poisson_sample(len(data), plan.sampling_rate, generator)
        summed = {name: torch.zeros(p.shape, dtype=torch.float32, device=device) for name, p in params.items()}
        step_losses: list[float] = []
        for start in range(0, len(drawn), cfg.batch_size):
            batch = collate([data[i] for i in drawn[start : start + cfg.batch_size]], pad_id)
            grads, batch_losses = computer.compute(batch.input_ids.to(device), batch.labels.to(device))
            clipped, _ = clip_and_sum(grads, plan.clip_norm)
            for name, value in clipped.items():
                summed[name] += value
            step_losses.extend(batch_losses.tolist())
        noisy = add_noise(summed, plan.noise_multiplier * plan.clip_norm, generator)
        for name, param in params.items():
            param.grad = (noisy[name] / expected).to(dtype=param.dtype, device=param.device)
        finish_step(params, optimizer, anchor, cfg)
        losses.extend(step_losses)
        if progress:
            progress(step + 1, cfg.steps, sum(step_losses) / len(step_losses) if step_losses else float("nan"))
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return LocalResult(get_lora_weights(model), moments_of(optimizer, params), mean_loss, cfg.steps, len(data))
