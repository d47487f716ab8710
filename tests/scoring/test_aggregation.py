"""Server-side aggregation: FedAvg is the exact weighted average, FedAdam/FedYogi match a hand computation over two
rounds, the state round-trips, and bad updates are refused with the silo and parameter named."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.errors import ConfigError, DataError, ShapeMismatchError
from scoring.federated.aggregation import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedTrimmedMean,
    FedYogi,
    Known,
    QualityFedAvg,
    RoundGuard,
    ServerState,
    SiloUpdate,
    build_aggregator,
    delta_norm,
    guard_round,
    lower_median,
    state_from_arrays,
    state_to_arrays,
)

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


# ---- robust rules and the round guard ----


def test_median_and_trimmed_mean_are_coordinate_wise_and_ignore_counts():
    updates = [SiloUpdate(f"s{i}", adapter(i), n) for i, n in enumerate((1, 1, 10**9, 1, 1))]
    stack = {n: np.stack([u.weights[n] for u in updates]).astype(np.float64) for n in NAMES}
    med, _ = FedMedian().aggregate(adapter(99), updates)
    trimmed, _ = FedTrimmedMean(trim=0.2).aggregate(adapter(99), updates)
    for name in NAMES:
        np.testing.assert_allclose(med[name], np.median(stack[name], axis=0), rtol=1e-6)
        np.testing.assert_allclose(trimmed[name], np.sort(stack[name], axis=0)[1:4].mean(axis=0), rtol=1e-6)
    assert build_aggregator("trimmed-mean", trim=0.1).trim == 0.1
    with pytest.raises(ConfigError, match="trim"):
        FedTrimmedMean(trim=0.5)
    with pytest.raises(ConfigError, match="takes no options"):
        build_aggregator("median", trim=0.1)


def test_the_lower_median_is_not_moved_by_one_outlier_of_two():
    assert lower_median([1.0, 1e30]) == 1.0 and lower_median([3.0, 1.0, 2.0]) == 2.0


def test_delta_norm_survives_values_that_would_overflow_a_square():
    g = {"p": np.zeros(4)}
    assert delta_norm({"p": np.full(4, 1e300)}, g) == pytest.approx(2e300)
    assert delta_norm({"p": np.array([3.0, 4.0, 0, 0])}, g) == pytest.approx(5.0)
    assert delta_norm(g, g) == 0.0


def byzantine_round():
    """Three silos around a global adapter: two honest (small deltas), one sending ×1e30 weights and 2^31−1 samples."""
    g = adapter(0)
    rng = np.random.default_rng(1)
    honest = [
        SiloUpdate(s, {n: (a + 0.01 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in g.items()}, 40, 2.0)
        for s in ("a", "b")
    ]
    evil = SiloUpdate("c", {n: (a * 1e30).astype(np.float32) for n, a in g.items()}, 2**31 - 1, 1e300)
    return g, [*honest, evil]


@pytest.mark.parametrize("rule", ["fedavg", "quality-fedavg", "fedadam", "median", "trimmed-mean"])
def test_one_byzantine_silo_among_three_moves_the_model_at_most_the_clip_bound_and_is_flagged(rule):
    g, updates = byzantine_round()
    known = {s: Known(40, (0.0, 2.0)) for s in ("a", "b", "c")}
    guarded, flags, figures = guard_round(g, updates, known, RoundGuard())
    bound = figures["clip_bound"]
    honest_norms = sorted(figures[f"norm.{s}"] for s in ("a", "b"))
    assert bound == pytest.approx(3.0 * honest_norms[1])  # the median of the three norms and figures["norm.c"] > 1e25
    kinds = {(f.silo, f.kind) for f in flags}
    assert kinds == {("c", "count_capped"), ("c", "mass_clamped"), ("c", "clipped")}
    assert guarded[2].num_samples == 40 and guarded[2].score_mass == 2.0
    new, _ = build_aggregator(rule).aggregate(g, guarded)
    moved = delta_norm(new, g)
    assert moved <= bound * (1 + 1e-5), (moved, bound)
    assert all(np.isfinite(a).all() for a in new.values())
    unguarded, _ = FedAvg().aggregate(g, updates)  # what the same round did before the guard
    assert delta_norm(unguarded, g) > 1e20


def test_without_a_scoring_job_counts_are_capped_at_a_multiple_of_the_median_and_mass_is_zero():
    g, updates = byzantine_round()
    guarded, flags, _ = guard_round(g, updates, {}, RoundGuard(max_count_ratio=10))
    assert [u.num_samples for u in guarded] == [40, 40, 400]
    assert [u.score_mass for u in guarded] == [0.0, 0.0, 0.0]
    assert {f.kind for f in flags if f.silo == "a"} == {"mass_clamped"}


def test_honest_rounds_pass_the_guard_untouched():
    g, updates = byzantine_round()
    honest = updates[:2]
    known = {s: Known(40, (2.0, 2.0)) for s in ("a", "b")}
    guarded, flags, _ = guard_round(g, honest, known, RoundGuard())
    assert flags == [] and guarded == honest


def test_absolute_clip_and_no_clip():
    g, updates = byzantine_round()
    known = {s: Known(2**31, (0.0, 1e301)) for s in ("a", "b", "c")}
    guarded, flags, figures = guard_round(g, updates, known, RoundGuard(clip="absolute", clip_norm=0.05))
    assert figures["clip_bound"] == 0.05 and all(delta_norm(u.weights, g) <= 0.05 + 1e-6 for u in guarded)
    assert [f.kind for f in flags] == ["clipped"] * 3
    _, flags, figures = guard_round(g, updates, known, RoundGuard(clip="none"))
    assert flags == [] and "clip_bound" not in figures
    with pytest.raises(ConfigError, match="clip_norm"):
        RoundGuard(clip="absolute")
    with pytest.raises(ConfigError, match="clip_factor"):
        RoundGuard(clip_factor=0.5)
