"""One silo's federated round: LocalTrainConfig, round_lr, weight exchange, moments files and `local_update`.

The optimizer oracle is AdamW written out by hand (decoupled weight decay, bias correction with the continued
step count, global-norm clipping), not torch's implementation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from scoring.batching import collate, tokenize_samples
from scoring.config import AdamState, LocalTrainConfig, round_lr
from scoring.data import load_pubmedqa
from scoring.errors import ConfigError, DataError, ShapeMismatchError
from scoring.federated.local import (
    LocalMoments,
    get_lora_weights,
    load_moments,
    local_update,
    round_batches,
    save_moments,
    set_lora_weights,
)
from scoring.gradients import label_positions, response_losses
from scoring.models import lora_parameters
from scoring.training import Checkpoint
from tests.conftest import tiny_lora_model
from tests.scoring.test_data import PUBMEDQA


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_lora_model()
    data = tokenize_samples(load_pubmedqa(PUBMEDQA, limit=6), tok, max_len=48)
    return model, tok, data, get_lora_weights(model)


def _update(setup, cfg, **kwargs):
    model, tok, data, start = setup
    kwargs.setdefault("global_weights", start)
    kwargs.setdefault("lr", cfg.lr)
    return local_update(model, data, cfg, pad_id=tok.pad_token_id, **kwargs)


def _random_moments(weights, step, seed=1):
    gen = torch.Generator().manual_seed(seed)
    exp_avg = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}
    exp_avg_sq = {k: 1e-6 * torch.rand(v.shape, generator=gen) for k, v in weights.items()}
    return LocalMoments(exp_avg, exp_avg_sq, step)


def _assert_weights_close(a, b, **tol):
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], **tol, err_msg=name)


# --- config ---


def test_round_lr_schedules():
    cfg = LocalTrainConfig(lr=1e-3)
    assert [round_lr(cfg, r, 4) for r in range(4)] == [1e-3] * 4
    linear = LocalTrainConfig(lr=1e-3, schedule="linear")
    assert [round_lr(linear, r, 4) for r in range(4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    cosine = LocalTrainConfig(lr=1e-3, schedule="cosine")
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * r / 3)) for r in range(3)]
    assert [round_lr(cosine, r, 3) for r in range(3)] == pytest.approx(expected)
    assert round_lr(cosine, 1, 2) == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match="round"):
        round_lr(cfg, 4, 4)
    with pytest.raises(ConfigError, match="rounds"):
        round_lr(cfg, 0, 0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": -1}, "batch_size"),
        ({"grad_accum": 1.5}, "grad_accum"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"schedule": "step"}, "schedule"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"prox_mu": -1.0}, "prox_mu"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
        ({"seed": -1}, "seed"),
    ],
)
def test_local_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        LocalTrainConfig(**kwargs)


def test_local_config_json_round_trip():
    cfg = LocalTrainConfig(steps=3, prox_mu=0.01, schedule="cosine", adam=AdamState(beta2=0.98))
    assert cfg.to_dict()["adam"] == {"beta1": 0.9, "beta2": 0.98, "eps": 1e-8}
    assert LocalTrainConfig.from_json(cfg.to_json()) == cfg
    assert LocalTrainConfig.from_dict({}) == LocalTrainConfig()
    assert cfg.fingerprint() != LocalTrainConfig().fingerprint()
    with pytest.raises(ConfigError, match="unknown field"):
        LocalTrainConfig.from_dict({"rounds": 3})


# --- weights and moments ---


def test_set_get_round_trip_and_mismatches(setup):
    model = setup[0]
    weights = get_lora_weights(model)
    assert list(weights) == list(lora_parameters(model))
    assert all(w.dtype == np.float32 for w in weights.values())
    changed = {k: v + 1.0 for k, v in weights.items()}
    set_lora_weights(model, changed)
    _assert_weights_close(get_lora_weights(model), changed, rtol=0, atol=0)
    first = next(iter(weights))
    bad_shape = {**weights, first: np.zeros((1, 1), np.float32)}
    with pytest.raises(ShapeMismatchError, match=re.escape(first)):
        set_lora_weights(model, bad_shape)
    with pytest.raises(ShapeMismatchError, match="missing"):
        set_lora_weights(model, {k: v for k, v in weights.items() if k != first})
    with pytest.raises(ShapeMismatchError, match=r"extra\.weight"):
        set_lora_weights(model, {**weights, "extra.weight": np.zeros(1, np.float32)})
    _assert_weights_close(get_lora_weights(model), changed, rtol=0, atol=0)  # a refused set writes nothing
    set_lora_weights(model, weights)


def test_moments_round_trip_and_checkpoint_layout(tmp_path, setup):
    moments = _random_moments(setup[3], step=7)
    save_moments(tmp_path / "optimizer.safetensors", moments)
    again = load_moments(tmp_path / "optimizer.safetensors")
    assert again.step == 7 and list(again.exp_avg) == list(moments.exp_avg)
    for group in ("exp_avg", "exp_avg_sq"):
        for name, tensor in getattr(moments, group).items():
            assert torch.equal(getattr(again, group)[name], tensor)
    # the same file is a warmup checkpoint's optimizer.safetensors
    exp_avg, exp_avg_sq = Checkpoint(0, 7, 1e-3, 1e-3, tmp_path, AdamState()).moments()
    assert all(torch.equal(exp_avg_sq[k], v) for k, v in moments.exp_avg_sq.items())
    assert set(exp_avg) == set(moments.exp_avg)


def test_load_moments_rejects_malformed_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="junk"):
        load_moments(tmp_path / "junk")
    good = {"a": torch.zeros(2)}
    save_moments(tmp_path / "m", LocalMoments(good, {"b": torch.zeros(2)}, 1))
    with pytest.raises(DataError, match="differ"):
        load_moments(tmp_path / "m")
    from safetensors.torch import save_file

    save_file({"exp_avg.a": torch.zeros(2), "exp_avg_sq.a": torch.zeros(2)}, str(tmp_path / "nostep"))
    with pytest.raises(DataError, match="step"):
        load_moments(tmp_path / "nostep")


# --- batches ---


def test_round_batches_cycle_a_seeded_shuffle():
    batches = round_batches(10, 4, 5, seed=3, round=2)
    assert batches == round_batches(10, 4, 5, seed=3, round=2)
    assert batches != round_batches(10, 4, 5, seed=3, round=3)
    assert batches != round_batches(10, 4, 5, seed=4, round=2)
    flat = [i for b in batches for i in b]
    assert all(len(b) == 4 for b in batches) and Counter(flat) == Counter(2 * list(range(10)))
    assert flat[:10] == flat[10:]  # one order, repeated
    assert all(sorted(b) == [0, 1, 2] for b in round_batches(3, 8, 2, 0, 0))  # capped at n, no repeats


# --- local_update ---


def _hand_adamw_step(setup, cfg, weights, moments, lr, batch_indices):
    """One AdamW step written out: the oracle for `local_update`."""
    model, tok, data, _ = setup
    set_lora_weights(model, weights)
    params = lora_parameters(model)
    batch = collate([data[i] for i in batch_indices], tok.pad_token_id)
    pos, target, weight = label_positions(batch.labels)
    loss = response_losses(model, batch.input_ids, pos, target, weight).mean()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    scale = min(1.0, cfg.max_grad_norm / (float(norm) + 1e-6)) if cfg.max_grad_norm > 0 else 1.0
    b1, b2, eps, t = cfg.adam.beta1, cfg.adam.beta2, cfg.adam.eps, moments.step + 1
    out, m_new, v_new = {}, {}, {}
    for name, g in grads.items():
        g = g.double() * scale
        m = b1 * moments.exp_avg[name].double() + (1 - b1) * g
        v = b2 * moments.exp_avg_sq[name].double() + (1 - b2) * g * g
        w = torch.from_numpy(weights[name]).double() * (1 - lr * cfg.weight_decay)
        w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        out[name], m_new[name], v_new[name] = w.float().numpy(), m.float(), v.float()
    return out, LocalMoments(m_new, v_new, t), loss.item()


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_one_step_equals_hand_written_adamw_from_saved_moments(setup, max_grad_norm):
    cfg = LocalTrainConfig(steps=1, batch_size=3, lr=1e-2, weight_decay=0.1, max_grad_norm=max_grad_norm, seed=5)
    start = setup[3]
    moments = _random_moments(start, step=5)
    result = _update(setup, cfg, moments=moments, round=1)
    (indices,) = round_batches(len(setup[2]), 3, 1, seed=5, round=1)
    weights, expected_moments, loss = _hand_adamw_step(setup, cfg, start, moments, cfg.lr, indices)
    _assert_weights_close(result.weights, weights, rtol=1e-5, atol=1e-7)
    assert result.moments.step == 6 and result.steps == 1 and result.num_samples == len(setup[2])
    for name in weights:
        torch.testing.assert_close(result.moments.exp_avg[name], expected_moments.exp_avg[name])
        torch.testing.assert_close(result.moments.exp_avg_sq[name], expected_moments.exp_avg_sq[name])
    assert result.mean_loss == pytest.approx(loss, rel=1e-6)
    untouched = _random_moments(start, step=5)
    assert all(torch.equal(moments.exp_avg[k], untouched.exp_avg[k]) for k in start)  # the input is left alone


def test_continuing_from_saved_moments_equals_one_longer_round(tmp_path, setup):
    n = len(setup[2])  # full-data batches: both calls see the same batches
    cfg2 = LocalTrainConfig(steps=2, batch_size=n, lr=1e-2)
    cfg1 = LocalTrainConfig(steps=1, batch_size=n, lr=1e-2)
    both = _update(setup, cfg2)
    first = _update(setup, cfg1)
    save_moments(tmp_path / "m.safetensors", first.moments)
    second = _update(setup, cfg1, global_weights=first.weights, moments=load_moments(tmp_path / "m.safetensors"))
    assert second.moments.step == both.moments.step == 2
    _assert_weights_close(second.weights, both.weights, rtol=1e-5, atol=1e-7)
    # fresh moments (bias correction restarting at step 1) give a different second step
    fresh = _update(setup, cfg1, global_weights=first.weights)
    assert max(np.abs(fresh.weights[k] - both.weights[k]).max() for k in both.weights) > 1e-4


def test_grad_accum_equals_one_big_batch(setup):
    accum = _update(setup, LocalTrainConfig(steps=1, batch_size=3, grad_accum=2, lr=1e-2, max_grad_norm=0.0))
    big = _update(setup, LocalTrainConfig(steps=1, batch_size=6, lr=1e-2, max_grad_norm=0.0))
    _assert_weights_close(accum.weights, big.weights, rtol=1e-5, atol=1e-7)


def _distance(weights, start):
    return math.sqrt(sum(float(((weights[k] - start[k]) ** 2).sum()) for k in start))


def test_prox_term_pulls_towards_the_global_weights(setup):
    base = {"steps": 6, "batch_size": 2, "lr": 2e-2}
    free = _update(setup, LocalTrainConfig(**base))
    prox = _update(setup, LocalTrainConfig(**base, prox_mu=50.0))
    start = setup[3]
    assert _distance(prox.weights, start) < 0.8 * _distance(free.weights, start)


def test_deterministic_modes_and_progress(setup):
    model = setup[0]
    cfg = LocalTrainConfig(steps=3, batch_size=2, lr=1e-2)
    modes = []
    a = _update(setup, cfg, progress=lambda step, total, loss: modes.append((step, total, model.training)))
    b = _update(setup, cfg)
    assert modes == [(1, 3, True), (2, 3, True), (3, 3, True)] and not model.training
    _assert_weights_close(a.weights, b.weights, rtol=0, atol=0)
    assert a.mean_loss == b.mean_loss and math.isfinite(a.mean_loss)
    other = _update(setup, LocalTrainConfig(steps=3, batch_size=2, lr=1e-2, seed=1))
    assert any(not np.array_equal(a.weights[k], other.weights[k]) for k in a.weights)
    assert _distance(a.weights, setup[3]) > 0


def test_local_update_refuses_bad_inputs(setup):
    model, tok, _, start = setup
    with pytest.raises(DataError, match="no training samples"):
        local_update(model, [], LocalTrainConfig(), pad_id=tok.pad_token_id, global_weights=start, lr=1e-3)
    first = next(iter(start))
    with pytest.raises(ShapeMismatchError, match="missing"):
        _update(setup, LocalTrainConfig(steps=1), global_weights={k: v for k, v in start.items() if k != first})
    moments = _random_moments(start, 1)
    moments.exp_avg_sq[first] = torch.zeros(3)
    with pytest.raises(ShapeMismatchError, match="exp_avg_sq"):
        _update(setup, LocalTrainConfig(steps=1), moments=moments)


@pytest.mark.gpu
def test_cuda_matches_cpu(setup):
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    cfg = LocalTrainConfig(steps=2, batch_size=3, lr=1e-2, prox_mu=0.1)
    moments = _random_moments(setup[3], step=3)
    cpu = _update(setup, cfg, moments=moments)
    _, tok, data, start = setup
    gpu_model = tiny_lora_model()[0].cuda()
    gpu = local_update(gpu_model, data, cfg, pad_id=tok.pad_token_id, global_weights=start, lr=cfg.lr, moments=moments)
    assert next(gpu_model.parameters()).device.type == "cuda" and gpu.moments.step == 5
    _assert_weights_close(gpu.weights, cpu.weights, rtol=1e-3, atol=1e-5)


def test_paths_are_accepted_as_str(tmp_path, setup):
    moments = _random_moments(setup[3], step=2)
    save_moments(str(tmp_path / "m"), moments)
    assert load_moments(str(Path(tmp_path) / "m")).step == 2
