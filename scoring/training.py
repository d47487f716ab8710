"""A plain LoRA SFT loop (AdamW, warmup + linear/cosine/constant schedule, gradient accumulation) that saves T
evenly spaced checkpoints for influence traces, and the reader for those checkpoints.

A checkpoint directory ``ckpt-NNN/`` holds:

- ``adapter/``: the LoRA adapter in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``).
- ``optimizer.safetensors``: Adam moments keyed by canonical parameter name (``exp_avg.<name>``, ``exp_avg_sq.<name>``).
- ``checkpoint.json``: index, step, ``lr`` (η_t: the mean learning rate over the steps since the previous checkpoint,
  so that a checkpoint taken where a linear schedule reaches 0 still weighs what its interval did), ``lr_last`` and
  the Adam betas/eps.

``run.json`` at the top lists them and is written last, so a crashed run never looks finished.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from scoring.batching import Batch, TokenizedSample, make_batches
from scoring.config import AdamState, TrainingConfig
from scoring.errors import ConfigError, DataError
from scoring.gradients import label_positions, response_losses
from scoring.models import lora_parameters, save_adapter
from wire.files import atomic_write_bytes


@dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint: where it is, η_t and the Adam hyper-parameters."""

    index: int
    step: int
    lr: float
    lr_last: float
    path: Path
    adam: AdamState

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def moments(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(exp_avg, exp_avg_sq), each canonical name -> tensor."""
        state = load_file(str(self.path / "optimizer.safetensors"))
        exp_avg = {k.removeprefix("exp_avg."): v for k, v in state.items() if k.startswith("exp_avg.")}
        exp_avg_sq = {k.removeprefix("exp_avg_sq."): v for k, v in state.items() if k.startswith("exp_avg_sq.")}
        return exp_avg, exp_avg_sq


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    return factor


def checkpoint_steps(total_steps: int, num_checkpoints: int) -> list[int]:
    """Optimizer steps (1-based) after which to save: evenly spaced, the last at ``total_steps``."""
    if num_checkpoints > total_steps:
        raise ConfigError(f"num_checkpoints: {num_checkpoints} exceeds the {total_steps} optimizer steps of the run")
    return [round(total_steps * (i + 1) / num_checkpoints) for i in range(num_checkpoints)]


def _epoch_batches(data: Sequence[TokenizedSample], cfg: TrainingConfig, pad_id: int, epoch: int) -> list[Batch]:
    order = list(data)
    random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    return make_batches(order, cfg.batch_size, pad_id, bucket=False)


def _save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, info: dict) -> None:
    save_adapter(model, path / "adapter")
    state: dict[str, Tensor] = {}
    for name, param in lora_parameters(model).items():
        st = optimizer.state.get(param, {})
        state[f"exp_avg.{name}"] = st.get("exp_avg", torch.zeros_like(param)).detach().float().cpu().contiguous()
        state[f"exp_avg_sq.{name}"] = st.get("exp_avg_sq", torch.zeros_like(param)).detach().float().cpu().contiguous()
    atomic_write_bytes(path / "optimizer.safetensors", save(state))
    atomic_write_bytes(path / "checkpoint.json", json.dumps(info, indent=2).encode())


def train_lora(
    model: nn.Module,
    data: Sequence[TokenizedSample],
    cfg: TrainingConfig,
    out_dir: Path | str,
    *,
    pad_id: int,
    run_info: dict | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[Checkpoint]:
    """Train the LoRA parameters of ``model`` and save ``cfg.num_checkpoints`` checkpoints under ``out_dir``.

    Args:
        model: a peft-wrapped causal LM whose only trainable parameters are the LoRA ones.
        data: tokenised training samples.
        cfg: optimisation settings.
        out_dir: run directory (``ckpt-NNN/`` and ``run.json`` are written there).
        pad_id: the tokenizer's pad id.
        run_info: extra provenance stored in ``run.json`` (model reference, LoRA settings, projection spec, ...).
        progress: called as ``progress(step, total_steps, loss)`` after every optimizer step.

    Returns:
        The saved checkpoints, in order.
    """
    if not data:
        raise DataError("no training samples")
    out_dir = Path(out_dir)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size / cfg.grad_accum)
    total = max(1, math.floor(steps_per_epoch * cfg.epochs))
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    save_at = checkpoint_steps(total, cfg.num_checkpoints)
    params = list(lora_parameters(model).values())
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam.beta1, cfg.adam.beta2), eps=cfg.adam.eps, weight_decay=cfg.weight_decay
    )
    factor = lr_lambda(cfg.schedule, total, int(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    device = next(model.parameters()).device
    model.train()
    checkpoints: list[Checkpoint] = []
    step, micro, epoch, lrs_since = 0, 0, 0, []
    while step < total:
        for batch in _epoch_batches(data, cfg, pad_id, epoch):
            ids, labels = batch.input_ids.to(device), batch.labels.to(device)
            pos, target, weight = label_positions(labels)
            loss = response_losses(model, ids, pos, target, weight).mean()
            (loss / cfg.grad_accum).backward()
            micro += 1
            if micro % cfg.grad_accum:
                continue
            lrs_since.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if progress:
                progress(step, total, loss.item())
            if step in save_at:
                index = len(checkpoints)
                ckpt = Checkpoint(
                    index, step, sum(lrs_since) / len(lrs_since), lrs_since[-1], out_dir / f"ckpt-{index:03d}", cfg.adam
                )
                _save_checkpoint(model, optimizer, ckpt.path, checkpoint_entry(ckpt))
                checkpoints.append(ckpt)
                lrs_since = []
            if step >= total:
                break
        epoch += 1
    model.eval()
    write_run_manifest(out_dir, [checkpoint_entry(c) for c in checkpoints], cfg, run_info)
    return checkpoints


def write_run_manifest(out_dir: Path, entries: list[dict], cfg: TrainingConfig | None, run_info: dict | None) -> None:
    """Write ``run.json`` (atomically, last: a run without it is unfinished)."""
    manifest = {"checkpoints": entries, "training": cfg.to_dict() if cfg else None, **(run_info or {})}
    atomic_write_bytes(Path(out_dir) / "run.json", json.dumps(manifest, indent=2).encode())


def checkpoint_entry(ckpt: Checkpoint) -> dict:
    """The JSON entry of a checkpoint in ``run.json`` and its ``checkpoint.json``."""
    return {
        "index": ckpt.index,
        "step": ckpt.step,
        "lr": ckpt.lr,
        "lr_last": ckpt.lr_last,
        "dir": ckpt.path.name,
        "adam": ckpt.adam.to_dict(),
    }


def read_run(run_dir: Path | str) -> tuple[dict, list[Checkpoint]]:
    """Read ``run.json`` of a finished run; returns (manifest, checkpoints)."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "run.json"
    if not manifest_path.is_file():
        raise DataError(f"{run_dir}: no run.json — not a finished warmup run (run 'clues warmup' first)")
    manifest = json.loads(manifest_path.read_text())
    checkpoints = []
    for entry in manifest.get("checkpoints", []):
        path = run_dir / entry["dir"]
        if not (path / "adapter" / "adapter_config.json").is_file():
            raise DataError(f"{path}: checkpoint adapter missing")
        checkpoints.append(
            Checkpoint(
                entry["index"],
                entry["step"],
                float(entry["lr"]),
                float(entry["lr_last"]),
                path,
                AdamState.from_dict(entry["adam"]),
            )
        )
    if not checkpoints:
        raise DataError(f"{run_dir}: run.json lists no checkpoints")
    return manifest, checkpoints
