"""Per-sample signals a silo computes beside its gradients, for the calibrated score (`scoring.calibration`).

A silo already sends each sample's conditional response loss ℓ(y|x) (the mean response-token cross-entropy, from
the gradient pass). A job may also ask for:

- ``loss_uncond``: ℓ(y|∅), the same response tokens after an empty prompt (`scoring.batching.unconditional_samples`),
  one forward pass without backward at one checkpoint. With ℓ(y|x) it gives IFD = ℓ(y|x)/ℓ(y|∅) and PMI =
  ℓ(y|∅) − ℓ(y|x): how much the question helps predict the answer (an answer given to another question gains
  nothing from its prompt).
- ``n_tokens``: the number of response tokens the losses average over.

Nothing else leaves the silo: three scalars per sample, no text and no token ids.

The names a job may ask for are `scoring.config.SIGNALS`. Contents: `forward_losses` (mean response losses without
gradients) and `sample_signals` (both extra signals of a list of samples at the model's current weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from scoring.batching import TokenizedSample, make_batches, unconditional_samples
from scoring.data import Sample
from scoring.gradients import label_positions, response_losses


@torch.no_grad()
def forward_losses(model: nn.Module, tokenized: Sequence[TokenizedSample], batch_size: int, pad_id: int) -> np.ndarray:
    """Mean response-token loss of each sample at the model's current weights, forward passes only.

    Batches are right-padded and bucketed by length like the gradient pass (`scoring.gradients.response_losses`),
    so each value equals the loss the gradient engines report for the same tokens.

    Returns:
        (N,) float64 losses in the order of ``tokenized``.
    """
    device = next(model.parameters()).device
    order = {item.id: i for i, item in enumerate(tokenized)}
    out = np.zeros(len(tokenized), dtype=np.float64)
    for batch in make_batches(tokenized, batch_size, pad_id):
        input_ids, labels = batch.input_ids.to(device), batch.labels.to(device)
        losses = response_losses(model, input_ids, *label_positions(labels))
        out[[order[i] for i in batch.ids]] = losses.float().cpu().numpy()
    return out


def sample_signals(
    model: nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    tokenized: Sequence[TokenizedSample],
    *,
    template: str = "auto",
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """The extra signals of ``samples`` at the model's current weights (call it at the job's signal checkpoint).

    Args:
        model: the LoRA model, at the checkpoint the job names.
        tokenizer: its tokenizer.
        samples: the samples, in the order of ``tokenized``.
        tokenized: their `scoring.batching.tokenize_samples` output under ``template``.
        batch_size: samples per forward pass.

    Returns:
        ``{"loss_uncond": (N,) float64, "n_tokens": (N,) float64}`` in the order of ``samples``.
    """
    uncond = unconditional_samples(samples, tokenized, tokenizer, template)
    was_training = model.training
    model.eval()
    try:
        loss_uncond = forward_losses(model, uncond, batch_size, tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    n_tokens = np.array([item.num_response_tokens for item in tokenized], dtype=np.float64)
    return {"loss_uncond": loss_uncond, "n_tokens": n_tokens}
