"""One round of each adapter kind (`scoring.federated.adapter_rounds.combine_round`): a ``stack`` round adds the
weighted sum of the silos' products to the global update exactly, whatever their ranks, and truncates past
``max_rank`` with its error reported; a ``shared-basis`` round leaves the basis and averages R, so the update is
B·mean(R)·A; the guard measures both in weight units; what does not fit is refused, naming it."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.errors import ConfigError, ShapeMismatchError
from scoring.federated.adapter_rounds import check_rule, combine_round, initial_global
from scoring.federated.aggregation import Known, SiloUpdate
from scoring.federated.lora_algebra import (
    A_SUFFIX,
    B_SUFFIX,
    R_SUFFIX,
    fold_shared_basis,
    leading,
    lora_modules,
    make_shared_basis,
    rank_layout,
    shared_basis_layout,
    update_layout,
)
from scoring.io import CheckpointBundle

MODULES = {"layers.0.self_attn.q_proj": (12, 10), "layers.0.mlp.down_proj": (10, 16)}  # out, in
ALPHA = 8.0
NO_CLIP = {"clip": "none"}


def layout(rank: int) -> list:
    out = []
    for module, (fan_out, fan_in) in MODULES.items():
        out += [(module + A_SUFFIX, (rank, fan_in)), (module + B_SUFFIX, (fan_out, rank))]
    return out


def adapter(rng, rank: int, zero_b: bool = False) -> dict:
    weights = {}
    for name, shape in layout(rank):
        zero = zero_b and name.endswith(B_SUFFIX)
        weights[name] = np.zeros(shape, np.float32) if zero else rng.normal(size=shape).astype(np.float32)
    return weights


def config(rank: int, alpha: float = ALPHA) -> dict:
    return {"r": rank, "lora_alpha": alpha, "peft_type": "LORA"}


def dense(weights: dict, scaling: float) -> dict:
    return {m: pair.delta() for m, pair in lora_modules(weights, scaling).items()}


def test_a_stack_round_adds_the_weighted_products_exactly_whatever_the_ranks():
    rng = np.random.default_rng(0)
    start = adapter(rng, 4, zero_b=True)  # the job's initial adapter: changes nothing
    ranks, counts = [2, 4, 8], [30, 10, 60]
    updates = [SiloUpdate(f"s{i}", adapter(rng, r), n) for i, (r, n) in enumerate(zip(ranks, counts, strict=True))]
    agg = {"kind": "stack", "rule": "fedavg", **NO_CLIP}  # stack_start fresh, the default
    first = combine_round(agg, start, config(4), updates, {}, None, alpha=ALPHA)
    w = np.asarray(counts, float) / sum(counts)
    want = {
        m: sum(
            wi * d[m]
            for wi, d in zip(w, [dense(u.weights, ALPHA / r) for u, r in zip(updates, ranks, strict=True)], strict=True)
        )
        for m in MODULES
    }
    got = dense(first.weights, 1.0)
    assert first.adapter_config["r"] == first.adapter_config["lora_alpha"] == sum(ranks)  # scaling 1
    assert first.report == {"kind": "stack", "rank": 14, "truncation_error": 0.0} and first.state is None
    for m in MODULES:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-5)
    # round 2 builds on round 1's global adapter: the global delta is the sum of both rounds' products
    second_updates = [SiloUpdate("s0", adapter(rng, 2), 5), SiloUpdate("s1", adapter(rng, 4), 15)]
    second = combine_round(agg, first.weights, first.adapter_config, second_updates, {}, None, alpha=ALPHA)
    assert second.report["rank"] == 14 + 6
    again = dense(second.weights, 1.0)
    for m in MODULES:
        round_two = (
            0.25 * dense(second_updates[0].weights, ALPHA / 2)[m] + 0.75 * dense(second_updates[1].weights, 2.0)[m]
        )
        np.testing.assert_allclose(again[m], want[m] + round_two, rtol=1e-4, atol=1e-4)
    # past max_rank: the best rank-k approximation, its error reported
    capped = combine_round(
        {**agg, "max_rank": 5}, first.weights, first.adapter_config, second_updates, {}, None, alpha=ALPHA
    )
    assert capped.report["rank"] == 5 and 0 < capped.report["truncation_error"] < 1
    for m in MODULES:
        s = np.linalg.svd(again[m], compute_uv=False)
        best = np.sqrt(np.sum(s[5:] ** 2)) / np.sqrt(np.sum(s**2))
        err = np.linalg.norm(dense(capped.weights, 1.0)[m] - again[m]) / np.linalg.norm(again[m])
        assert err == pytest.approx(best, rel=1e-3)
        assert err <= capped.report["truncation_error"] + 1e-6


def test_a_warm_stack_round_adds_each_silos_change_from_where_it_started():
    """Warm: a silo of rank r starts at the global adapter's leading r components, so its change is sᵢ·Bᵢ·Aᵢ minus
    those; the sum stays exact, the global adapter stays in SVD order and grows by Σ rᵢ."""
    rng = np.random.default_rng(5)
    agg = {"kind": "stack", "rule": "fedavg", "stack_start": "warm", **NO_CLIP}
    first = combine_round(agg, adapter(rng, 4, zero_b=True), config(4),
                          [SiloUpdate("s0", adapter(rng, 2), 1), SiloUpdate("s1", adapter(rng, 3), 1)], {}, None,
                          alpha=ALPHA)  # fmt: skip
    assert first.report["rank"] == 5 and first.report["truncation_error"] < 1e-6  # a zero global: fresh starts
    g = first.weights
    for m in MODULES:  # SVD order: orthogonal factors, decreasing singular values
        a = g[m + A_SUFFIX].astype(float)
        gram = a @ a.T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)
        assert np.all(np.diff(np.diag(gram)) <= 1e-5)
    ranks, counts = [2, 3], [10, 30]
    updates = [SiloUpdate(f"s{i}", adapter(rng, r), n) for i, (r, n) in enumerate(zip(ranks, counts, strict=True))]
    second = combine_round(agg, g, first.adapter_config, updates, {}, None, alpha=ALPHA)
    assert second.report["rank"] == 5 + 5 and second.report["truncation_error"] < 1e-5
    before, after = dense(g, 1.0), dense(second.weights, 1.0)
    for m in MODULES:
        change = sum(
            (n / 40) * (dense(u.weights, ALPHA / r)[m] - dense(leading(g, r), 1.0)[m])
            for u, r, n in zip(updates, ranks, counts, strict=True)
        )
        np.testing.assert_allclose(after[m], before[m] + change, rtol=1e-4, atol=1e-4)
    # a silo that sends back exactly where it started changes nothing
    still = [SiloUpdate("s0", {n: w / (4.0 if n.endswith(B_SUFFIX) else 1.0) for n, w in leading(g, 2).items()}, 1)]
    same = combine_round(agg, g, first.adapter_config, still, {}, None, alpha=ALPHA)
    for m in MODULES:
        np.testing.assert_allclose(dense(same.weights, 1.0)[m], before[m], atol=1e-5)


def test_a_shared_basis_round_averages_r_and_keeps_the_basis():
    rng = np.random.default_rng(1)
    basis = make_shared_basis(layout(4), 4, seed=7)
    assert [(n, tuple(np.shape(w))) for n, w in basis.items()] == shared_basis_layout(layout(4), 4)
    assert np.array_equal(make_shared_basis(layout(4), 4, seed=7)[next(iter(basis))], next(iter(basis.values())))
    r_names = [n for n in basis if n.endswith(R_SUFFIX)]
    updates = [SiloUpdate(f"s{i}", {n: rng.normal(size=(4, 4)).astype(np.float32) for n in r_names}, c)
               for i, c in enumerate((1, 3))]  # fmt: skip
    done = combine_round(
        {"kind": "shared-basis", "rule": "fedavg", **NO_CLIP}, basis, config(4), updates, {}, None, alpha=ALPHA
    )
    for name in basis:
        if not name.endswith(R_SUFFIX):
            assert np.array_equal(done.weights[name], basis[name])  # the basis never moves
    scaling = ALPHA / 4
    got = dense(fold_shared_basis(done.weights), scaling)
    for m in MODULES:
        a, b = basis[m + A_SUFFIX].astype(float), basis[m + B_SUFFIX].astype(float)
        mean_r = 0.25 * updates[0].weights[m + R_SUFFIX] + 0.75 * updates[1].weights[m + R_SUFFIX]
        np.testing.assert_allclose(got[m], scaling * b @ mean_r @ a, rtol=1e-5, atol=1e-6)
        # the basis is orthonormal up to a constant: A·Aᵀ ∝ I and Bᵀ·B ∝ I
        np.testing.assert_allclose(a @ a.T / (a @ a.T)[0, 0], np.eye(4), atol=1e-6)
        np.testing.assert_allclose(b.T @ b / (b.T @ b)[0, 0], np.eye(4), atol=1e-6)
    # an adaptive server optimizer runs on R and keeps its state
    adam = combine_round(
        {"kind": "shared-basis", "rule": "fedadam", **NO_CLIP}, basis, config(4), updates, {}, None, alpha=ALPHA
    )
    assert set(adam.state.m) == set(r_names)


def test_the_guard_measures_updates_in_weight_units_and_shrinks_products():
    rng = np.random.default_rng(2)
    start = adapter(rng, 4, zero_b=True)
    updates = [SiloUpdate(f"s{i}", adapter(rng, 4), 10) for i in range(3)]
    big = {n: w * (30.0 if n.endswith(B_SUFFIX) else 1.0) for n, w in updates[2].weights.items()}
    updates[2] = SiloUpdate("s2", big, 10)
    done = combine_round({"kind": "stack", "rule": "fedavg"}, start, config(4), updates, {}, None, alpha=ALPHA)
    assert [f.silo for f in done.flags if f.kind == "clipped"] == ["s2"]
    norms = {s: done.figures[f"norm.{s}"] for s in ("s0", "s1", "s2")}
    want = np.sqrt(sum(np.sum(d**2) for d in dense(updates[0].weights, ALPHA / 4).values()))
    assert norms["s0"] == pytest.approx(want, rel=1e-6)  # ‖s·B·A‖, not a parameter distance
    clipped = next(u for u in done.updates if u.silo == "s2")
    clipped_norm = np.sqrt(sum(np.sum(d**2) for d in dense(clipped.weights, 1.0).values()))
    assert clipped_norm == pytest.approx(done.figures["clip_bound"], rel=1e-6)
    # shared basis: R's change times the basis gain and the scaling is the weight change's norm
    basis = make_shared_basis(layout(4), 4, seed=0)
    r_names = [n for n in basis if n.endswith(R_SUFFIX)]
    ups = [SiloUpdate(f"s{i}", {n: rng.normal(size=(4, 4)).astype(np.float32) for n in r_names}, 1) for i in range(2)]
    done = combine_round({"kind": "shared-basis", "rule": "fedavg"}, basis, config(4), ups, {}, None, alpha=ALPHA)
    weight_change = dense(fold_shared_basis({**basis, **ups[0].weights}), ALPHA / 4)
    want = np.sqrt(sum(np.sum(d**2) for d in weight_change.values()))
    assert done.figures["norm.s0"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("rule", ["fedadam", "fedyogi", "median", "trimmed-mean"])
def test_stack_refuses_the_coordinate_rules(rule):
    with pytest.raises(ConfigError, match=f"aggregation.rule: '{rule}' does not work with kind 'stack'"):
        check_rule("stack", rule)
    check_rule("shared-basis", rule)  # R has shared coordinates
    with pytest.raises(ConfigError, match=r"aggregation\.kind"):
        check_rule("fedsvd", "fedavg")


def test_updates_that_do_not_fit_are_refused_naming_the_silo():
    rng = np.random.default_rng(3)
    start = adapter(rng, 4, zero_b=True)
    agg = {"kind": "stack", "rule": "fedavg"}
    ok = SiloUpdate("a", adapter(rng, 2), 1)
    missing = SiloUpdate("b", {k: v for k, v in adapter(rng, 2).items() if "down_proj" not in k}, 1)
    with pytest.raises(ShapeMismatchError, match="silo 'b': its adapter's modules differ"):
        combine_round(agg, start, config(4), [ok, missing], {}, None, alpha=ALPHA)
    wrong = adapter(rng, 2)
    wrong["layers.0.self_attn.q_proj" + A_SUFFIX] = rng.normal(size=(2, 11)).astype(np.float32)
    with pytest.raises(ShapeMismatchError, match="silo 'c'"):
        combine_round(agg, start, config(4), [ok, SiloUpdate("c", wrong, 1)], {}, None, alpha=ALPHA)
    basis = make_shared_basis(layout(4), 4, seed=0)
    with pytest.raises(ShapeMismatchError, match="silo 'a'"):  # a whole adapter where R was due
        combine_round({"kind": "shared-basis", "rule": "fedavg"}, basis, config(4), [ok], {}, None, alpha=ALPHA)


def test_layouts_of_each_kind():
    job = layout(4)
    assert update_layout("fedavg", job, 4) == [(n, tuple(s)) for n, s in job]
    assert update_layout("stack", job, 2) == rank_layout(job, 2) == layout(2)
    shared = shared_basis_layout(job, 4)
    assert update_layout("shared-basis", shared, 4) == [(m + R_SUFFIX, (4, 4)) for m in MODULES]
    initial = CheckpointBundle(job, adapter(np.random.default_rng(0), 4), {}, {}, config(4), {})
    assert initial_global("stack", initial, 4, 0) is initial
    sb = initial_global("shared-basis", initial, 4, 0)
    assert sb.layout == shared and not any(np.any(sb.adapter[m + R_SUFFIX]) for m in MODULES)
    with pytest.raises(ConfigError, match=r"lora\.rank: 12 exceeds"):
        make_shared_basis(job, 12, 0)


def test_a_count_cap_still_applies_to_the_exact_kinds():
    rng = np.random.default_rng(4)
    start = adapter(rng, 4, zero_b=True)
    updates = [SiloUpdate("a", adapter(rng, 4), 1000), SiloUpdate("b", adapter(rng, 4), 10)]
    done = combine_round({"kind": "stack", "rule": "fedavg", **NO_CLIP}, start, config(4), updates,
                         {"a": Known(count=10)}, None, alpha=ALPHA)  # fmt: skip
    assert [(f.silo, f.kind) for f in done.flags] == [("a", "count_capped")]
    want = {m: 0.5 * dense(updates[0].weights, 2.0)[m] + 0.5 * dense(updates[1].weights, 2.0)[m] for m in MODULES}
    for m, d in dense(done.weights, 1.0).items():
        np.testing.assert_allclose(d, want[m], rtol=1e-5, atol=1e-5)
