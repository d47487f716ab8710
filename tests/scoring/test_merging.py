"""Adapter merging with peft: cat equals the exact weighted ΔW sum (also over mixed ranks), linear equals its A/B
arithmetic, svd at full rank is exact, and unsupported combinations are refused."""

from __future__ import annotations

import pytest
import torch

from scoring.config import LoraSettings
from scoring.errors import ConfigError
from scoring.federated.merging import count_weights, lora_deltas, merge_adapters
from scoring.models import attach_lora, load_base_model, save_adapter


def _adapter(tmp_path, name: str, rank: int, seed: int):
    lm = load_base_model("tiny:0")
    model = attach_lora(lm.model, LoraSettings(rank=rank, alpha=2.0 * rank), init_seed=seed, random_b=True)
    save_adapter(model, tmp_path / name)
    return tmp_path / name, lora_deltas(model, "default"), model


def _check(merged, want, rtol=1e-5):
    got = lora_deltas(merged, "merged")
    assert set(got) == set(want)
    for path, delta in want.items():
        torch.testing.assert_close(got[path], delta, rtol=rtol, atol=1e-6)


def test_cat_is_the_exact_weighted_sum_of_deltas_even_with_mixed_ranks(tmp_path):
    (d0, w0, _), (d1, w1, _) = _adapter(tmp_path, "a", 4, 1), _adapter(tmp_path, "b", 2, 2)
    weights = count_weights([30, 10])
    merged = merge_adapters(load_base_model("tiny:0").model, {"a": d0, "b": d1}, weights, kind="cat")
    _check(merged, {p: weights[0] * w0[p] + weights[1] * w1[p] for p in w0})


def test_linear_follows_its_separate_a_and_b_arithmetic(tmp_path):
    (d0, _, m0), (d1, _, m1) = _adapter(tmp_path, "a", 4, 1), _adapter(tmp_path, "b", 4, 2)
    weights = [0.7, 0.3]
    merged = merge_adapters(load_base_model("tiny:0").model, {"a": d0, "b": d1}, weights, kind="linear")
    want = {}
    mods0, mods1 = dict(m0.named_modules()), dict(m1.named_modules())
    for path, mod0 in mods0.items():
        if hasattr(mod0, "lora_A") and "default" in mod0.lora_A:
            mod1 = mods1[path]
            c = [(w * m.scaling["default"]) ** 0.5 for w, m in zip(weights, (mod0, mod1), strict=True)]
            a = c[0] * mod0.lora_A["default"].weight + c[1] * mod1.lora_A["default"].weight
            b = c[0] * mod0.lora_B["default"].weight + c[1] * mod1.lora_B["default"].weight
            want[path] = (b @ a).detach()
    _check(merged, want)


def test_svd_at_full_rank_is_exact(tmp_path):
    (d0, w0, _), (d1, w1, _) = _adapter(tmp_path, "a", 2, 1), _adapter(tmp_path, "b", 2, 2)
    merged = merge_adapters(load_base_model("tiny:0").model, {"a": d0, "b": d1}, [0.5, 0.5], kind="svd", svd_rank=4)
    _check(merged, {p: 0.5 * w0[p] + 0.5 * w1[p] for p in w0}, rtol=1e-4)


def test_refusals(tmp_path):
    (d0, _, _), (d1, _, _) = _adapter(tmp_path, "a", 4, 1), _adapter(tmp_path, "b", 2, 2)
    base = load_base_model("tiny:0").model
    with pytest.raises(ConfigError, match="one rank"):
        merge_adapters(base, {"a": d0, "b": d1}, [0.5, 0.5], kind="linear")
    with pytest.raises(ConfigError, match="density"):
        merge_adapters(base, {"a": d0}, [1.0], kind="ties")
    with pytest.raises(ConfigError, match="kind"):
        merge_adapters(base, {"a": d0}, [1.0], kind="average")
    with pytest.raises(ConfigError, match="one finite weight"):
        merge_adapters(base, {"a": d0, "b": d1}, [1.0], kind="cat")
    with pytest.raises(ConfigError, match="counts"):
        count_weights([0, 0])
