"""A silo's model under the exact kinds (`scoring.federated.adapters`), on the tiny Llama: with a shared basis only
R trains and the model is the folded standard LoRA adapter; under ``stack`` the global adapter sits in the base
weights and a fresh adapter trains on top; and a bundle with R is written as a peft adapter that peft loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scoring.batching import tokenize_samples
from scoring.config import LocalTrainConfig, LoraSettings
from scoring.data import Sample
from scoring.federated.adapters import SiloAdapter, fresh_adapter
from scoring.federated.local import local_update, set_lora_weights
from scoring.federated.lora_algebra import (
    A_SUFFIX,
    B_SUFFIX,
    R_SUFFIX,
    fold_shared_basis,
    make_shared_basis,
    shared_basis_layout,
)
from scoring.io import CheckpointBundle, write_checkpoint_dir
from scoring.models import attach_lora, load_adapter, load_base_model, lora_layout, lora_parameters, save_adapter

LORA = LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12]])


def model(rank: int = 4):
    base = load_base_model("tiny:0")
    peft = attach_lora(base.model, LoraSettings(rank=rank, alpha=8.0, target_modules=LORA.target_modules), init_seed=0)
    peft.eval()
    return peft, base.tokenizer


def logits(m) -> torch.Tensor:
    with torch.no_grad():
        return m(IDS).logits


def samples(tokenizer):
    rows = [Sample(f"s{i}", (("user", f"question {i} about x"),), f"answer {i} is y") for i in range(6)]
    return tokenize_samples(rows, tokenizer, 64)


def test_a_shared_basis_trains_r_only_and_is_the_folded_adapter(tmp_path):
    m, tok = model()
    layout = lora_layout(m)
    basis = make_shared_basis(layout, 4, seed=3)
    adapter = SiloAdapter("shared-basis", m, seed=0)
    start = adapter.begin(basis, {"r": 4, "lora_alpha": 8.0}, round=0)
    assert list(start) == [n for n in basis if n.endswith(R_SUFFIX)]
    assert [n for n, _ in lora_layout(m)] == list(start)  # R is the only trainable parameter
    cfg = LocalTrainConfig(steps=3, batch_size=2, lr=5e-2, max_grad_norm=0.0)
    result = local_update(m, samples(tok), cfg, pad_id=tok.pad_token_id, global_weights=start, lr=5e-2)
    assert set(result.weights) == set(start) and any(np.any(w) for w in result.weights.values())
    for name in basis:  # the basis did not move
        if not name.endswith(R_SUFFIX):
            module, _, part = name.rpartition(".lora_")
            layer = m.get_submodule(module)
            held = (
                layer.lora_A["default"].weight
                if part.startswith("A")
                else layer.lora_B["default"].parametrizations.weight.original
            )
            np.testing.assert_array_equal(held.detach().numpy(), basis[name])
    # the same model as a standard LoRA adapter with lora_B := B·R
    plain, _ = model()
    set_lora_weights(plain, fold_shared_basis({**basis, **result.weights}))
    torch.testing.assert_close(logits(m), logits(plain), rtol=1e-4, atol=1e-5)
    # and written as a peft adapter directory, it loads in peft as that model
    save_adapter(plain, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    entry = {"index": 0, "step": 3, "lr": 0.05, "lr_last": 0.05, "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}}
    bundle = CheckpointBundle(shared_basis_layout(layout, 4), {**basis, **result.weights}, {}, {}, config, entry)
    write_checkpoint_dir(bundle, tmp_path / "ckpt")
    loaded = load_adapter(load_base_model("tiny:0").model, tmp_path / "ckpt" / "adapter", trainable=False)
    loaded.eval()
    torch.testing.assert_close(logits(loaded), logits(plain), rtol=1e-4, atol=1e-5)


def global_model(global_weights):
    """peft with the global (stacked, scaling 1) adapter loaded: the model a stack silo must start a round at."""
    ref, _ = model(rank=6)
    set_lora_weights(ref, global_weights)
    for layer in (mod for mod in ref.modules() if hasattr(mod, "scaling") and isinstance(mod.scaling, dict)):
        layer.scaling["default"] = 1.0  # the global adapter's scaling is 1 (lora_alpha = r)
    return ref


@pytest.mark.parametrize("warm", [False, True])
def test_a_stack_silo_starts_each_round_at_the_global_model(warm):
    rng = np.random.default_rng(0)
    m, _ = model(rank=2)
    global_layout = [(n, (6, s[1]) if n.endswith(A_SUFFIX) else (s[0], 6)) for n, s in lora_layout(model(rank=6)[0])]
    global_weights = {n: rng.normal(scale=0.05, size=s).astype(np.float32) for n, s in global_layout}
    adapter = SiloAdapter("stack", m, seed=0, warm=warm)
    assert not adapter.carries_moments
    start = adapter.begin(global_weights, {"r": 6, "lora_alpha": 6.0}, round=1)
    set_lora_weights(m, start)
    # base weights + the trainable adapter's start: the global model, warm or fresh
    torch.testing.assert_close(logits(m), logits(global_model(global_weights)), rtol=1e-4, atol=1e-4)
    layout = lora_layout(m)
    if warm:  # the leading 2 components of the global adapter, rescaled to this adapter's α/r = 4
        for name, w in start.items():
            lead = global_weights[name][:2] if name.endswith(A_SUFFIX) else global_weights[name][:, :2] / 4.0
            np.testing.assert_allclose(w, lead, rtol=1e-6)
    else:  # fresh: seeded by the round, peft's kaiming draw for A, zero B
        assert all(not np.any(w) for n, w in start.items() if n.endswith(B_SUFFIX))
        assert all(np.array_equal(fresh_adapter(layout, 0, 1)[n], w) for n, w in start.items())
        assert not np.array_equal(fresh_adapter(layout, 0, 2)[layout[0][0]], start[layout[0][0]])
        assert 0 < np.abs(start[layout[0][0]]).max() <= 1 / np.sqrt(layout[0][1][1])
    # a second round's global replaces the first's (W = W₀ + ΔW, not accumulated); a global adapter that changes
    # nothing starts even a warm silo fresh
    zero = {n: np.zeros_like(w) for n, w in global_weights.items()}
    again = adapter.begin(zero, {"r": 6, "lora_alpha": 6.0}, round=2)
    assert all(not np.any(w) for n, w in again.items() if n.endswith(B_SUFFIX))
    plain, _ = model(rank=2)
    set_lora_weights(plain, {n: np.zeros_like(w) for n, w in start.items()})
    set_lora_weights(m, {n: np.zeros_like(w) for n, w in start.items()})
    torch.testing.assert_close(logits(m), logits(plain))
    assert set(lora_parameters(m)) == {n for n, _ in layout}


def test_per_sample_gradients_of_r_match_autograd_and_drive_dp_sgd():
    from scoring.batching import collate
    from scoring.config import DPSettings
    from scoring.federated.dp import dp_local_update
    from scoring.gradients import build_gradient_computer, label_positions, response_losses
    from scoring.privacy import PrivacyPlan

    m, tok = model()
    basis = make_shared_basis(lora_layout(m), 4, seed=1)
    rng = np.random.default_rng(0)
    basis = {n: rng.normal(scale=0.3, size=w.shape).astype(np.float32) if n.endswith(R_SUFFIX) else w
             for n, w in basis.items()}  # fmt: skip
    start = SiloAdapter("shared-basis", m, seed=0).begin(basis, {"r": 4, "lora_alpha": 8.0}, round=0)
    data = samples(tok)
    batch = collate(data[:3], tok.pad_token_id)
    grads, _ = build_gradient_computer(m, "hooks").compute(batch.input_ids, batch.labels)
    assert list(grads) == list(start) and all(g.shape == (3, 4, 4) for g in grads.values())
    params = lora_parameters(m)
    for i in range(3):
        one = collate([data[i]], tok.pad_token_id)
        pos, target, weight = label_positions(one.labels)
        m.zero_grad()
        response_losses(m, one.input_ids, pos, target, weight).sum().backward()
        for name, p in params.items():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)
    plan = PrivacyPlan.of(DPSettings(noise_multiplier=0.5, clip_norm=1.0), num_samples=6, expected_batch=3,
                          planned_steps=2)  # fmt: skip
    cfg = LocalTrainConfig(steps=2, batch_size=3, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    result = dp_local_update(m, data, cfg, plan, pad_id=tok.pad_token_id, global_weights=start, lr=1e-2, generator=gen)
    assert set(result.weights) == set(start) and result.steps == 2
    assert any(not np.array_equal(result.weights[n], start[n]) for n in start)
