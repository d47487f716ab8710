"""One silo's side of a federated LoRA round: load the global adapter, train locally, return the new weights.

Contains `get_lora_weights` / `set_lora_weights` (LoRA weights as float32 numpy arrays keyed by canonical name,
the form the coordinator averages), `LocalMoments` with `save_moments` / `load_moments` (the silo's own AdamW
state, which never leaves the silo), `round_batches` (which samples each micro-batch of a round holds) and
`local_update` (``cfg.steps`` AdamW steps, optionally with the FedProx proximal term).

The moments file has the tensor names of a warmup checkpoint's ``optimizer.safetensors`` (``exp_avg.<name>``,
``exp_avg_sq.<name>``, see `scoring.training`), plus the step count in the metadata, so a silo's moments can be
dropped into a checkpoint directory for Adam-preconditioned scoring.

The lr is constant within a round; the coordinator picks it per round with `scoring.config.round_lr`. AdamW's bias
correction continues across rounds when the previous round's moments are passed back in (torch keeps ``step``
as a float32 scalar tensor per parameter; `local_update` restores it through ``load_state_dict``).
"""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from scoring.batching import TokenizedSample, collate
from scoring.config import LocalTrainConfig, LoraSettings
from scoring.errors import DataError, ShapeMismatchError
from scoring.gradients import label_positions, response_losses
from scoring.models import lora_parameters
from wire.files import atomic_write_bytes

Weights = dict[str, np.ndarray]  # canonical name -> float32 array of the parameter's shape


def get_lora_weights(model: nn.Module) -> Weights:
    """A float32 numpy copy of every LoRA parameter, keyed by canonical name, in module order."""
    return {name: p.detach().float().cpu().numpy().copy() for name, p in lora_parameters(model).items()}


def _check_names_and_shapes(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], what: str):
    missing = [name for name in expected if name not in got]
    extra = [name for name in got if name not in expected]
    if missing or extra:
        raise ShapeMismatchError(f"{what}: missing parameter(s) {missing[:3]}, unexpected parameter(s) {extra[:3]}")
    for name, shape in expected.items():
        if tuple(got[name]) != tuple(shape):
            raise ShapeMismatchError(f"{what}: parameter {name!r} has shape {tuple(got[name])}, expected {shape}")


def set_lora_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Copy ``weights`` (canonical name -> array) into the model's LoRA parameters, in place.

    Every name and shape is checked before anything is written, so a mismatch leaves the model unchanged.

    Raises:
        ShapeMismatchError: a LoRA parameter is missing from ``weights``, a name is not a LoRA parameter, or a
            shape differs (names the parameter).
    """
    params = lora_parameters(model)
    expected = {name: tuple(p.shape) for name, p in params.items()}
    _check_names_and_shapes(expected, {name: np.shape(w) for name, w in weights.items()}, "weights")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.as_tensor(np.asarray(weights[name]), device=param.device, dtype=param.dtype))


@dataclass
class LocalMoments:
    """A silo's AdamW state, kept between rounds (never sent).

    Attributes:
        exp_avg: canonical name -> first moment m (float32, the parameter's shape).
        exp_avg_sq: canonical name -> second moment v.
        step: optimizer steps taken so far (drives Adam's bias correction).
    """

    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    step: int


def save_moments(path: Path | str, moments: LocalMoments) -> None:
    """Write ``moments`` as one safetensors file, atomically (see the module docstring for the layout)."""
    tensors = {f"exp_avg.{k}": v.detach().float().cpu().contiguous() for k, v in moments.exp_avg.items()}
    tensors |= {f"exp_avg_sq.{k}": v.detach().float().cpu().contiguous() for k, v in moments.exp_avg_sq.items()}
    atomic_write_bytes(Path(path), save(tensors, metadata={"step": str(int(moments.step))}))


def load_moments(path: Path | str) -> LocalMoments:
    """Read a file written by `save_moments`.

    Raises:
        DataError: not a safetensors file, no integer ``step`` >= 0 in the metadata, a tensor outside the
            ``exp_avg.``/``exp_avg_sq.`` groups, or groups that differ in names or shapes.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable safetensors moments file ({exc})") from exc
    step = metadata.get("step", "")
    if not step.isdigit():
        raise DataError(f"{path}: metadata field 'step' must be an integer >= 0, got {step!r}")
    groups: dict[str, dict[str, Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    for key, tensor in tensors.items():
        prefix, _, name = key.partition(".")
        if prefix not in groups or not name:
            raise DataError(f"{path}: tensor {key!r} is neither 'exp_avg.<name>' nor 'exp_avg_sq.<name>'")
        groups[prefix][name] = tensor.float()
    first = {k: tuple(v.shape) for k, v in groups["exp_avg"].items()}
    second = {k: tuple(v.shape) for k, v in groups["exp_avg_sq"].items()}
    if first != second:
        raise DataError(f"{path}: exp_avg and exp_avg_sq differ in parameter names or shapes")
    return LocalMoments(groups["exp_avg"], groups["exp_avg_sq"], int(step))


def round_batches(n: int, batch_size: int, count: int, seed: int, round: int) -> list[list[int]]:
    """Sample indices of the ``count`` micro-batches of a round.

    The samples are shuffled once with ``(seed, round)`` and the batches are consecutive windows of that order,
    repeated as often as needed (a batch may wrap around its end). Batches hold ``min(batch_size, n)`` samples, so
    no batch repeats a sample.
    """
    order = list(range(n))
    random.Random(f"clues-local:{seed}:{round}").shuffle(order)
    size = min(batch_size, n)
    stream = itertools.cycle(order)
    return [list(itertools.islice(stream, size)) for _ in range(count)]


@dataclass(frozen=True)
class LocalResult:
    """What a silo's round produced.

    Attributes:
        weights: the new LoRA weights (canonical name -> float32 array); the only thing the coordinator receives.
        moments: the AdamW state after the round (kept by the silo for the next round).
        mean_loss: mean training loss (response loss, without the proximal term) over the round's micro-batches.
        steps: optimizer steps taken.
        num_samples: how many training samples the silo holds (the FedAvg weight).
    """

    weights: Weights
    moments: LocalMoments
    mean_loss: float
    steps: int
    num_samples: int


def make_optimizer(params: OrderedDict[str, nn.Parameter], cfg: LocalTrainConfig, lr: float, moments):
    optimizer = torch.optim.AdamW(
        list(params.values()),
        lr=lr,
        betas=(cfg.adam.beta1, cfg.adam.beta2),
        eps=cfg.adam.eps,
        weight_decay=cfg.weight_decay,
    )
    if moments is None:
        return optimizer
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    _check_names_and_shapes(shapes, {k: tuple(v.shape) for k, v in moments.exp_avg.items()}, "moments.exp_avg")
    _check_names_and_shapes(shapes, {k: tuple(v.shape) for k, v in moments.exp_avg_sq.items()}, "moments.exp_avg_sq")
    # load_state_dict casts the moments to each parameter's dtype and device and keeps ``step`` a float32 scalar
    # tensor (on the CPU unless the optimizer is fused or capturable), as torch's AdamW expects.
    step = torch.tensor(float(moments.step), dtype=torch.float32)
    state = {
        i: {
            "step": step.clone(),
            "exp_avg": moments.exp_avg[name].detach().clone(),  # the optimizer updates its state in place
            "exp_avg_sq": moments.exp_avg_sq[name].detach().clone(),
        }
        for i, name in enumerate(params)
    }
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return optimizer


def moments_of(optimizer: torch.optim.Optimizer, params: OrderedDict[str, nn.Parameter]) -> LocalMoments:
    exp_avg, exp_avg_sq, steps = {}, {}, set()
    for name, param in params.items():
        st = optimizer.state[param]
        exp_avg[name] = st["exp_avg"].detach().float().cpu().clone()
        exp_avg_sq[name] = st["exp_avg_sq"].detach().float().cpu().clone()
        steps.add(int(st["step"]))
    if len(steps) != 1:  # every LoRA parameter gets a gradient each step
        raise ShapeMismatchError(f"moments: parameters took different numbers of steps {sorted(steps)}")
    return LocalMoments(exp_avg, exp_avg_sq, steps.pop())


def add_prox_grad(params: OrderedDict[str, nn.Parameter], anchor: dict[str, Tensor], mu: float) -> None:
    """Add ∇ μ/2·||w - w_global||² = μ(w - w_global) to each gradient (the same as adding the term to the loss)."""
    for name, param in params.items():
        pull = (param.detach() - anchor[name]) * mu
        param.grad = pull if param.grad is None else param.grad.add_(pull)


def start_round(
    model: nn.Module,
    data: Sequence[TokenizedSample],
    cfg: LocalTrainConfig,
    global_weights: Mapping[str, np.ndarray],
    lr: float,
    moments: LocalMoments | None,
) -> tuple[OrderedDict[str, nn.Parameter], torch.device, dict[str, Tensor], torch.optim.Optimizer]:
    """What every local round begins with: the global weights loaded, the LoRA parameters and their device, the
    FedProx anchor (a copy of the global weights when ``cfg.prox_mu > 0``) and AdamW with the silo's moments.

    Raises:
        DataError: ``data`` is empty.
        ShapeMismatchError: ``global_weights`` or ``moments`` do not match the model's LoRA parameters.
    """
    if not data:
        raise DataError("no training samples for the local update")
    set_lora_weights(model, global_weights)
    params = lora_parameters(model)
    device = next(iter(params.values())).device
    anchor = {name: p.detach().clone() for name, p in params.items()} if cfg.prox_mu > 0 else {}
    return params, device, anchor, make_optimizer(params, cfg, lr, moments)


def finish_step(
    params: OrderedDict[str, nn.Parameter], optimizer: torch.optim.Optimizer, anchor: dict[str, Tensor], cfg
) -> None:
    """Once the step's gradient is in ``param.grad``: add the FedProx pull, clip the global norm, step AdamW."""
    if cfg.prox_mu > 0:
        add_prox_grad(params, anchor, cfg.prox_mu)
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def local_update(
    model: nn.Module,
    data: Sequence[TokenizedSample],
    cfg: LocalTrainConfig,
    *,
    pad_id: int,
    global_weights: Mapping[str, np.ndarray],
    lr: float,
    moments: LocalMoments | None = None,
    round: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> LocalResult:
    """Run one silo's local training for a federated round, starting from the global adapter.

    Each optimizer step accumulates ``cfg.grad_accum`` micro-batches (`round_batches`) of the loss that
    `scoring.training.train_lora` uses (each sample's mean response loss, averaged over the batch); with
    ``cfg.prox_mu > 0`` the FedProx gradient μ(w - w_global) is added, then the gradient norm is clipped to
    ``cfg.max_grad_norm``. LoRA dropout is active during the round; the model is left in eval mode.

    Args:
        model: a peft-wrapped causal LM whose only trainable parameters are the LoRA ones (CPU or CUDA).
        data: this silo's tokenised training samples.
        cfg: local training settings.
        pad_id: the tokenizer's pad id.
        global_weights: the round's global LoRA weights (canonical name -> array), loaded into ``model`` first.
        lr: this round's learning rate (`scoring.config.round_lr`).
        moments: the AdamW state the silo kept from its previous round (None: fresh moments, step 0).
        round: the round index (seeds the shuffle).
        progress: called as ``progress(step, cfg.steps, loss)`` after every optimizer step.

    Returns:
        The new weights and moments, the mean training loss, the step count and ``len(data)``.

    Raises:
        DataError: ``data`` is empty.
        ShapeMismatchError: ``global_weights`` or ``moments`` do not match the model's LoRA parameters.
    """
    params, device, anchor, optimizer = start_round(model, data, cfg, global_weights, lr, moments)
    batches = round_batches(len(data), cfg.batch_size, cfg.steps * cfg.grad_accum, cfg.seed, round)
    losses: list[float] = []
    model.train()
    try:
        for step in range(cfg.steps):
            step_losses = []
            for indices in batches[step * cfg.grad_accum : (step + 1) * cfg.grad_accum]:
                batch = collate([data[i] for i in indices], pad_id)
                labels = batch.labels.to(device)
                pos, target, weight = label_positions(labels)
                loss = response_losses(model, batch.input_ids.to(device), pos, target, weight).mean()
                (loss / cfg.grad_accum).backward()
                step_losses.append(loss.item())
            finish_step(params, optimizer, anchor, cfg)
            losses.extend(step_losses)
            if progress:
                progress(step + 1, cfg.steps, sum(step_losses) / len(step_losses))
    finally:
        model.eval()
    return LocalResult(
        get_lora_weights(model), moments_of(optimizer, params), sum(losses) / len(losses), cfg.steps, len(data)
    )


def initial_adapter(
    model_ref: str,
    lora: LoraSettings,
    *,
    init_seed: int,
    random_b: bool,
    entry: dict,
    work_dir: Path,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> tuple[bytes, list[list], dict]:
    """A training job's round-0 adapter: the base model with a LoRA adapter initialised from ``init_seed`` (the same
    on every machine), as a checkpoint bundle's bytes with its ``entry``; also its layout and peft adapter config.

    ``work_dir`` holds the temporary adapter directory."""
    import json
    import tempfile

    from scoring.io import checkpoint_to_bytes
    from scoring.models import attach_lora, load_base_model, lora_layout, save_adapter

    base = load_base_model(model_ref, dtype=dtype, device=device, cache_dir=cache_dir)
    model = attach_lora(base.model, lora, init_seed=init_seed, random_b=random_b)
    layout = [[name, list(shape)] for name, shape in lora_layout(model)]
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        save_adapter(model, Path(tmp) / "adapter")
        data = checkpoint_to_bytes(Path(tmp), layout, entry)
        adapter_config = json.loads((Path(tmp) / "adapter" / "adapter_config.json").read_text())
    return data, layout, adapter_config
