"""Server-side aggregation: FedAvg is the exact weighted average, FedAdam/FedYogi match a hand computation over two
rounds, the state round-trips, and bad updates are refused with the silo and parameter named."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.aggregation import (
    FedAdam,
    FedAvg,
    FedYogi,
    QualityFedAvg,
    ServerState,
    SiloUpdate,
    build_aggregator,
    state_from_arrays,
    state_to_arrays,
)
from scoring.errors import ConfigError, DataError, ShapeMismatchError

NAMES = {"layers.0.q_proj.lora_A.weight": (4, 16), "layers.0.q_proj.lora_B.weight": (16, 4)}


def adapter(seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape).astype(dtype) for n, shape in NAMES.items()}


def test_fedavg_is_the_exact_weighted_average():
    updates = [SiloUpdate(f"s{i}", adapter(i), n) for i, n in enumerate((10, 30, 60))]
    new, state = FedAvg().aggregate(adapter(99), updates)
    for name in NAMES:
        want = (10 * updates[0].weights[name] + 30 * updates[1].weights[name] + 60 * updates[2].weights[name]) / 100
        assert new[name].dtype == np.float32
        np.testing.assert_allclose(new[name], want, rtol=1e-6, atol=1e-7)
    assert state.round == 1


def test_quality_weights_follow_the_selected_score_mass_and_ignore_negative_mass():
    a, b, c = (SiloUpdate(s, adapter(i), 5, mass) for i, (s, mass) in enumerate((("a", 3.0), ("b", 1.0), ("c", -2.0))))
    new, _ = QualityFedAvg().aggregate(adapter(9), [a, b, c])
    for name in NAMES:
        np.testing.assert_allclose(new[name], 0.75 * a.weights[name] + 0.25 * b.weights[name], rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="positive selected score mass"):
        QualityFedAvg().aggregate(adapter(9), [c])


def test_fedadam_matches_a_hand_computation_over_two_rounds():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x0 = {"p": np.array([1.0, -2.0])}
    opt = FedAdam(eta=eta, beta1=b1, beta2=b2, tau=tau)
    # round 1: silos at 2.0/-1.0 (3 samples) and 0.0/-3.0 (1 sample): average 1.5, -1.5; delta 0.5, 0.5
    r1 = [SiloUpdate("a", {"p": np.array([2.0, -1.0])}, 3), SiloUpdate("b", {"p": np.array([0.0, -3.0])}, 1)]
    x1, s1 = opt.aggregate(x0, r1)
    d1 = np.array([0.5, 0.5])
    m1 = (1 - b1) * d1
    v1 = b2 * tau**2 + (1 - b2) * d1**2
    want1 = x0["p"] + eta * m1 / (np.sqrt(v1) + tau)
    np.testing.assert_allclose(x1["p"], want1, rtol=1e-12)
    # round 2: one silo at x1 + (-0.2, 0.4)
    d2 = np.array([-0.2, 0.4])
    x2, s2 = opt.aggregate(x1, [SiloUpdate("a", {"p": x1["p"] + d2}, 2)], s1)
    m2 = b1 * m1 + (1 - b1) * d2
    v2 = b2 * v1 + (1 - b2) * d2**2
    np.testing.assert_allclose(x2["p"], want1 + eta * m2 / (np.sqrt(v2) + tau), rtol=1e-12)
    assert s2.round == 2
    np.testing.assert_allclose(s2.m["p"], m2, rtol=1e-12)


def test_fedyogi_second_moment_moves_additively():
    tau, b2 = 1e-3, 0.99
    x0 = {"p": np.array([0.0])}
    x1, s1 = FedYogi(eta=1.0, beta1=0.0, beta2=b2, tau=tau).aggregate(x0, [SiloUpdate("a", {"p": np.array([0.3])}, 1)])
    v1 = tau**2 - (1 - b2) * 0.09 * np.sign(tau**2 - 0.09)
    np.testing.assert_allclose(s1.v["p"], [v1], rtol=1e-12)
    np.testing.assert_allclose(x1["p"], [0.3 / (np.sqrt(v1) + tau)], rtol=1e-12)


def test_state_round_trips_through_flat_arrays():
    _, state = FedAdam().aggregate(adapter(0), [SiloUpdate("a", adapter(1), 2)])
    back = state_from_arrays(state_to_arrays(state))
    assert back.round == 1 and set(back.m) == set(NAMES)
    for name in NAMES:
        np.testing.assert_array_equal(back.v[name], state.v[name])
    with pytest.raises(DataError, match="round"):
        state_from_arrays({})


def test_bad_updates_name_the_silo_and_parameter():
    good = adapter(0)
    wrong_shape = {**good, "layers.0.q_proj.lora_A.weight": np.zeros((8, 16), np.float32)}
    with pytest.raises(ShapeMismatchError, match=r"silo 'x'.*lora_A"):
        FedAvg().aggregate(good, [SiloUpdate("x", wrong_shape, 1)])
    missing = {k: v for k, v in good.items() if "lora_B" not in k}
    with pytest.raises(ShapeMismatchError, match="missing"):
        FedAvg().aggregate(good, [SiloUpdate("x", missing, 1)])
    nan = {**good, "layers.0.q_proj.lora_B.weight": np.full((16, 4), np.nan, np.float32)}
    with pytest.raises(DataError, match="NaN"):
        FedAvg().aggregate(good, [SiloUpdate("x", nan, 1)])
    with pytest.raises(ConfigError, match="num_samples"):
        FedAvg().aggregate(good, [SiloUpdate("x", good, 0)])
    with pytest.raises(ConfigError, match="at least one"):
        FedAvg().aggregate(good, [])


def test_build_aggregator_by_name():
    assert isinstance(build_aggregator("fedyogi", eta=0.5), FedYogi)
    with pytest.raises(ConfigError, match="one of"):
        build_aggregator("fedmedian")
    with pytest.raises(ConfigError, match="no options"):
        build_aggregator("fedavg", eta=1.0)
    with pytest.raises(ConfigError, match="beta1"):
        FedAdam(beta1=1.0)
    assert ServerState().round == 0
