"""DP-SGD at a silo: the accountant against `dp-accounting` and TF Privacy's published table, σ calibration, the
ledger (refuses past its budget, survives a restart), clipping, the noise scale, and the DP-SGD round itself against
plain local training where the two must agree (no noise, no clipping, every sample in every step)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scoring.batching import collate, tokenize_samples
from scoring.config import DPSettings, LocalTrainConfig
from scoring.data import load_pubmedqa
from scoring.errors import ConfigError, DataError
from scoring.federated.dp import add_noise, clip_and_sum, dp_local_update, poisson_sample, secret_generator
from scoring.federated.local import get_lora_weights, local_update, set_lora_weights
from scoring.gradients import LoopGradients
from scoring.models import lora_parameters
from scoring.privacy import (
    AGGREGATE_SENSITIVITY,
    RDP_ORDERS,
    BudgetExceededError,
    PrivacyLedger,
    PrivacyPlan,
    ReleaseLedger,
    discrete_laplace,
    discrete_laplace_variance,
    dp_sgd_epsilon,
    dp_sgd_noise,
    noisy_aggregate,
)
from tests.conftest import tiny_lora_model
from tests.scoring.test_data import PUBMEDQA

# TF Privacy's MNIST DP-SGD tutorial (tutorials/README.md): N = 60000, batch 256, δ = 1e-5, RDP accountant with
# the classic RDP-to-DP conversion ε = min_α RDP(α) + log(1/δ)/(α - 1): (σ, epochs, published ε)
PUBLISHED = [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)]


def _classic_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting import rdp

    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))  # TF Privacy's orders
    accountant = rdp.RdpAccountant(orders)
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    return min(r + math.log(1 / delta) / (a - 1) for a, r in zip(orders, accountant._rdp, strict=True))


@pytest.mark.parametrize(("sigma", "epochs", "published"), PUBLISHED)
def test_the_accountant_reproduces_tf_privacy_s_published_table(sigma, epochs, published):
    n, batch, delta = 60_000, 256, 1e-5
    steps = math.ceil(epochs * n / batch)
    assert _classic_epsilon(sigma, batch / n, steps, delta) == pytest.approx(published, rel=0.01)
    # what clues reports: the same events, with dp-accounting's tighter conversion, so never more than published
    ours = dp_sgd_epsilon(sigma, batch / n, steps, delta)
    assert 0.75 * published < ours <= published


def test_the_reported_epsilon_is_dp_accounting_s_own():
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(list(RDP_ORDERS))
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(0.9)), 300
        )
    )
    assert dp_sgd_epsilon(0.9, 0.02, 300, 1e-4) == accountant.get_epsilon(1e-4)
    assert dp_sgd_epsilon(0.9, 0.02, 0, 1e-4) == 0.0


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_sigma_is_calibrated_to_the_target_epsilon(target):
    q, steps, delta = 8 / 300, 40, 1 / 300
    sigma = dp_sgd_noise(target, q, steps, delta)
    assert dp_sgd_epsilon(sigma, q, steps, delta) == pytest.approx(target, rel=1e-3)
    assert dp_sgd_epsilon(0.97 * sigma, q, steps, delta) > target  # the smallest σ that fits, not any σ


def test_a_plan_derives_sigma_or_reports_epsilon_and_delta_defaults_to_one_over_n():
    by_target = PrivacyPlan.of(DPSettings(epsilon=3.0), num_samples=200, expected_batch=8, planned_steps=20)
    assert by_target.delta == 1 / 200 and by_target.sampling_rate == 8 / 200 and by_target.epsilon_budget == 3.0
    by_sigma = PrivacyPlan.of(
        DPSettings(noise_multiplier=by_target.noise_multiplier), num_samples=200, expected_batch=8, planned_steps=20
    )
    assert by_sigma.epsilon_budget == pytest.approx(3.0, rel=1e-3)
    small = PrivacyPlan.of(
        DPSettings(noise_multiplier=1.0, delta=1e-6), num_samples=4, expected_batch=8, planned_steps=1
    )
    assert small.sampling_rate == 1.0 and small.delta == 1e-6


# --- the ledger ---


def _plan(**kw):
    return PrivacyPlan.of(DPSettings(epsilon=2.0, **kw), num_samples=100, expected_batch=10, planned_steps=30)


def test_the_ledger_refuses_past_its_budget_and_records_nothing(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", "job1", _plan())
    spent = [ledger.charge(r, 10) for r in range(3)]
    assert spent == sorted(spent) and spent[-1] == pytest.approx(2.0, rel=1e-3)
    with pytest.raises(BudgetExceededError, match=r"round 3 of training job job1: 1 more DP-SGD step\(s\) would"):
        ledger.charge(3, 1)
    assert [r["round"] for r in ledger.rounds] == [0, 1, 2]
    assert ledger.summary()["epsilon_spent"] == spent[-1] and ledger.summary()["steps"] == 30


def test_the_ledger_survives_a_restart_and_a_round_is_charged_once(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, "job1", _plan())
    first = ledger.charge(0, 10)
    assert ledger.charge(0, 10) == first  # the same round again (a re-sent update) costs nothing more
    again = PrivacyLedger.open(path, "job1", _plan())  # a restarted agent
    assert again.rounds == ledger.rounds and again.epsilon_spent == first
    again.charge(1, 10)
    assert json.loads(path.read_text())["rounds"][1]["steps"] == 10
    with pytest.raises(DataError, match="not job2"):
        PrivacyLedger.open(path, "job2", _plan())
    with pytest.raises(DataError, match="planned as"):
        PrivacyLedger.open(path, "job1", _plan(clip_norm=0.5))
    path.write_text("{")
    with pytest.raises(DataError, match="not a privacy ledger"):
        PrivacyLedger.open(path, "job1", _plan())


# --- the mechanism ---


def test_clipping_bounds_every_sample_s_contribution():
    gen = torch.Generator().manual_seed(0)
    grads = {"a": 10 * torch.randn(5, 3, 4, generator=gen), "b": 0.001 * torch.randn(5, 7, generator=gen)}
    grads["a"][2] *= 1e-4  # one sample already inside the bound: left as it is
    summed, norms = clip_and_sum(grads, 1.5)
    for i in range(5):
        alone, _ = clip_and_sum({k: v[i : i + 1] for k, v in grads.items()}, 1.5)
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in alone.values()))
        assert norm <= 1.5 * (1 + 1e-6)
        if norms[i] > 1.5:
            assert norm == pytest.approx(1.5, rel=1e-5)
        else:
            torch.testing.assert_close(alone["a"], grads["a"][i])
    total = sum(clip_and_sum({k: v[i : i + 1] for k, v in grads.items()}, 1.5)[0]["a"] for i in range(5))
    torch.testing.assert_close(summed["a"], total)


def test_the_noise_has_standard_deviation_sigma_c():
    gen = torch.Generator().manual_seed(1234)
    out = add_noise({"w": torch.zeros(200, 500)}, 0.7, gen)["w"].double()
    n = out.numel()
    assert abs(float(out.mean())) < 4 * 0.7 / math.sqrt(n)
    # the sample variance of n normal draws has standard error σ²·√(2/(n-1)); allow four of them
    assert abs(float(out.var()) - 0.49) < 4 * 0.49 * math.sqrt(2 / (n - 1))
    assert torch.equal(
        out, add_noise({"w": torch.zeros(200, 500)}, 0.7, torch.Generator().manual_seed(1234))["w"].double()
    )


def test_poisson_sampling_draws_each_sample_at_the_rate():
    gen = torch.Generator().manual_seed(5)
    sizes = [len(poisson_sample(1000, 0.05, gen)) for _ in range(200)]
    assert abs(np.mean(sizes) - 50) < 4 * math.sqrt(1000 * 0.05 * 0.95 / 200)
    assert poisson_sample(10, 1.0, gen) == list(range(10))
    a, b = secret_generator(), secret_generator()
    assert poisson_sample(1000, 0.5, a) != poisson_sample(1000, 0.5, b)  # unseeded: not reproducible by anyone


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_lora_model()
    data = tokenize_samples(load_pubmedqa(PUBMEDQA, limit=6), tok, max_len=48)
    return model, tok, data, get_lora_weights(model)


def _dp(setup, cfg, plan, seed, **kw):
    model, tok, data, start = setup
    generator = torch.Generator().manual_seed(seed)
    return dp_local_update(
        model, data, cfg, plan, pad_id=tok.pad_token_id, global_weights=start, lr=cfg.lr, generator=generator, **kw
    )


def test_without_noise_or_clipping_dp_sgd_is_plain_local_training(setup):
    """Every sample in every step (q = 1), C far above any gradient, σ = 0: the DP-SGD gradient is the mean of the
    per-sample gradients, which plain training on one batch of all samples takes too."""
    model, tok, data, start = setup
    cfg = LocalTrainConfig(steps=3, batch_size=len(data), lr=1e-2, max_grad_norm=0.0)
    dp = _dp(setup, cfg, PrivacyPlan(1e6, 0.0, 1.0, 1e-5, 1.0, 3), 0, engine="loop")
    plain = local_update(model, data, cfg, pad_id=tok.pad_token_id, global_weights=start, lr=cfg.lr)
    for name in plain.weights:
        np.testing.assert_allclose(dp.weights[name], plain.weights[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert dp.mean_loss == pytest.approx(plain.mean_loss, rel=1e-5)


def test_a_dp_step_is_adamw_on_the_clipped_mean_gradient(setup):
    """σ = 0, q = 1 and a clip norm below every sample's gradient norm: the step is AdamW on the mean of the clipped
    per-sample gradients (computed here by the reference loop engine)."""
    model, tok, data, start = setup
    cfg = LocalTrainConfig(steps=1, batch_size=len(data), lr=1e-3, max_grad_norm=0.0)
    dp = _dp(setup, cfg, PrivacyPlan(0.05, 0.0, 1.0, 1e-5, 1.0, 1), 0)
    set_lora_weights(model, start)
    model.eval()
    batch = collate(list(data), tok.pad_token_id)
    grads, _ = LoopGradients(model).compute(batch.input_ids, batch.labels)
    summed, norms = clip_and_sum(grads, 0.05)
    assert (norms > 0.05).all()  # every sample is clipped
    params = lora_parameters(model)
    for name, p in params.items():
        p.grad = summed[name] / len(data)
    torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0).step()
    for name, expected in get_lora_weights(model).items():
        np.testing.assert_allclose(dp.weights[name], expected, rtol=1e-5, atol=1e-7, err_msg=name)


def test_the_generator_decides_the_noise_and_the_batches(setup):
    cfg = LocalTrainConfig(steps=1, batch_size=2, lr=1e-3, max_grad_norm=0.0)
    plan = PrivacyPlan.of(
        DPSettings(noise_multiplier=1.0, clip_norm=0.1), num_samples=6, expected_batch=3, planned_steps=1
    )
    runs = [_dp(setup, cfg, plan, seed) for seed in (0, 0, 1)]
    name = next(iter(setup[3]))
    np.testing.assert_array_equal(runs[0].weights[name], runs[1].weights[name])
    assert not np.array_equal(runs[0].weights[name], runs[2].weights[name])
    assert all(np.isfinite(w).all() for r in runs for w in r.weights.values())


# --- noise on a silo-local job's aggregate ---------------------------------------------------------------------


def test_a_noisy_aggregate_is_consistent_integers():
    rng = np.random.default_rng(0)
    for _ in range(200):
        histogram = rng.integers(0, 4, size=12).tolist()
        kept = int(rng.integers(0, sum(histogram) + 1))
        k, total, bins = noisy_aggregate(kept, histogram, epsilon=0.5, rng=rng)
        assert all(isinstance(b, int) and b >= 0 for b in bins) and total == sum(bins) and total >= 1
        assert isinstance(k, int) and 0 <= k <= total  # what the coordinator's validation asks of any aggregate
    # a one-sample silo at a small ε draws a noisy total <= 0 often; the release is still one the coordinator takes
    totals = [noisy_aggregate(0, [1, 0, 0], epsilon=0.1, rng=rng)[1] for _ in range(200)]
    assert min(totals) == 1


def test_the_aggregate_noise_is_discrete_laplace_at_the_stated_scale():
    """Two-sided geometric noise: mean 0, variance 2e^-a/(1-e^-a)^2 with a = ε/Δ, and P(k)/P(k+1) = e^a (the ε-DP
    ratio for a sensitivity-Δ integer query)."""
    epsilon, n = 1.0, 400_000
    noise = discrete_laplace(n, epsilon, np.random.default_rng(7))
    var = discrete_laplace_variance(epsilon)
    assert noise.dtype.kind == "i" and abs(noise.mean()) < 5 * math.sqrt(var / n)
    assert noise.var() == pytest.approx(var, rel=0.02)
    a = epsilon / AGGREGATE_SENSITIVITY
    counts = {k: int((noise == k).sum()) for k in range(0, 4)}
    for k in range(3):
        assert counts[k] / counts[k + 1] == pytest.approx(math.exp(a), rel=0.05)


def test_a_small_silo_s_noisy_total_stays_near_the_truth():
    """Post-processing projects the noisy bins onto the noisy total: the 40 empty bins of a 9-sample silo do not
    inflate it (clipping each bin at 0 would add ~0.9 per empty bin)."""
    rng = np.random.default_rng(3)
    histogram = [0] * 20 + [4, 5] + [0] * 20
    draws = [noisy_aggregate(6, histogram, 1.0, rng=rng) for _ in range(4000)]
    totals = np.array([t for _, t, _ in draws])
    assert abs(totals.mean() - 9) < 0.5  # the clip at 1 is far (2 noise std): nearly unbiased
    bins = np.array([b for _, _, b in draws])
    share = bins[:, 20:22].sum() / bins.sum()  # at ε = 1 (noise std 4.2 per bin) a 9-sample histogram is mostly noise,
    assert share > 3 * 2 / 42  # but the two true bins still hold several times their share


def test_more_privacy_means_more_noise_and_a_bad_epsilon_is_refused():
    assert discrete_laplace_variance(0.1) > discrete_laplace_variance(1.0) > discrete_laplace_variance(10.0)
    for bad in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ConfigError, match="aggregate_epsilon"):
            noisy_aggregate(1, [1, 1], bad)


def test_the_release_ledger_sums_epsilon_refuses_past_the_limit_and_survives_a_restart(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    ledger = ReleaseLedger.open(path)
    assert ledger.epsilon_spent == 0 and not path.exists()
    assert ledger.charge("job-1", 0.5, limit=1.0) == pytest.approx(0.5)
    assert ledger.charge("job-1", 0.5, limit=1.0) == pytest.approx(0.5)  # drawn once: charged once
    with pytest.raises(BudgetExceededError, match="past its own limit ε = 1"):
        ledger.charge("job-2", 0.75, limit=1.0)
    again = ReleaseLedger.open(path)
    assert [r["job"] for r in again.releases] == ["job-1"] and again.epsilon_spent == pytest.approx(0.5)
    assert again.charge("job-2", 0.25) == pytest.approx(0.75)
    assert ReleaseLedger.open(path).epsilon_spent == pytest.approx(0.75)
    path.write_text('{"format": "clues.release-ledger/1", "releases": [{"job": "x", "epsilon": -1}]}')
    with pytest.raises(DataError, match="not a release ledger"):
        ReleaseLedger.open(path)
