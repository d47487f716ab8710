"""Exact LoRA aggregation (`scoring.federated.lora_algebra`): a stack of the silos' factors is the weighted sum of
their updates, to float precision and whatever their ranks; the SVD truncation is the best approximation and
reports its error; and what does not fit is refused, naming it (the shared basis: test_adapter_rounds.py)."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.errors import ConfigError, ShapeMismatchError
from scoring.federated.lora_algebra import Factors, lora_modules, stack, truncate

OUT, IN = 12, 10


def silo(rng, rank: int, alpha: float = 16.0) -> dict[str, Factors]:
    weights = {}
    for module in ("layers.0.self_attn.q_proj", "layers.0.mlp.up_proj"):
        weights[f"{module}.lora_A.weight"] = rng.normal(size=(rank, IN)).astype(np.float32)
        weights[f"{module}.lora_B.weight"] = rng.normal(size=(OUT, rank)).astype(np.float32)
    return lora_modules(weights, scaling=alpha / rank)


def test_a_stack_is_the_weighted_sum_of_the_updates_whatever_the_ranks():
    rng = np.random.default_rng(0)
    silos = [silo(rng, 4), silo(rng, 8, alpha=8.0), silo(rng, 2)]
    counts = [30, 10, 60]
    stacked = stack(silos, counts)
    w = np.asarray(counts, np.float64) / sum(counts)
    for module, pair in stacked.items():
        want = sum(wi * s[module].delta() for wi, s in zip(w, silos, strict=True))
        np.testing.assert_allclose(pair.delta(), want, rtol=1e-12, atol=1e-12)
        assert pair.rank == 4 + 8 + 2
    # FedAvg's separate averages of A and B (equal ranks) are far from the average update: why stacking exists
    same = [silo(rng, 4), silo(rng, 4)]
    module = next(iter(same[0]))
    naive = Factors(np.mean([s[module].a for s in same], 0), np.mean([s[module].b for s in same], 0), 4.0)
    exact = stack(same, [1, 1])[module].delta()
    assert np.linalg.norm(naive.delta() - exact) > 0.1 * np.linalg.norm(exact)


def test_truncation_is_exact_at_full_rank_and_reports_its_error_below():
    rng = np.random.default_rng(1)
    stacked = stack([silo(rng, 4), silo(rng, 4)], [1, 3])
    for pair in stacked.values():
        dense = pair.delta()
        full, error = truncate(pair, pair.rank)
        assert error == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_allclose(full.delta(), dense, rtol=1e-10, atol=1e-10)
        low, error = truncate(pair, 3)
        u, s, vt = np.linalg.svd(dense)
        best = (u[:, :3] * s[:3]) @ vt[:3]
        np.testing.assert_allclose(low.delta(), best, rtol=1e-9, atol=1e-9)  # Eckart–Young: the best rank 3
        assert error == pytest.approx(np.linalg.norm(dense - best) / np.linalg.norm(dense), rel=1e-9)
        assert low.rank == 3 and 0 < error < 1


def test_what_does_not_fit_is_refused():
    rng = np.random.default_rng(3)
    with pytest.raises(ShapeMismatchError, match="without its pair"):
        lora_modules({"m.lora_A.weight": np.zeros((2, IN))})
    with pytest.raises(ShapeMismatchError, match="not an r×in, out×r pair"):
        lora_modules({"m.lora_A.weight": np.zeros((2, IN)), "m.lora_B.weight": np.zeros((OUT, 3))})
    one, other = silo(rng, 4), {k: Factors(np.zeros((4, IN + 1)), v.b) for k, v in silo(rng, 4).items()}
    with pytest.raises(ShapeMismatchError, match="in/out sizes differ"):
        stack([one, other], [1, 1])
    with pytest.raises(ShapeMismatchError, match="modules differ"):
        stack([one, dict(list(one.items())[:1])], [1, 1])
    with pytest.raises(ConfigError, match="weights"):
        stack([one, one], [1, -1])
    with pytest.raises(ConfigError, match="rank"):
        truncate(next(iter(one.values())), 0)
