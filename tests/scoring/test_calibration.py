"""Anchor calibration and fusion on synthetic score distributions: one-sided, leave-one-out, not outvoted."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.calibration import (
    SIGNAL_NAMES,
    badness,
    calibrate,
    fuse,
    fused_signals,
    length_buckets,
    log_upper_p,
    robust_z,
    robust_z_loo,
)
from scoring.config import FUSIONS, check_score_settings
from scoring.errors import ConfigError, DataError, ShapeMismatchError


def side(n, rng, trace=0.0, loss=2.0, uncond=3.0):
    """Raw values of n clean-looking samples: trace ~ N(trace, 1), ℓ(y|x) ~ N(loss, .1), ℓ(y|∅) ~ N(uncond, .1)."""
    return {
        "trace": rng.normal(trace, 1.0, n),
        "loss": rng.normal(loss, 0.1, n),
        "loss_uncond": rng.normal(uncond, 0.1, n),
    }


@pytest.fixture
def anchors():
    return side(40, np.random.default_rng(0))


def test_badness_directions():
    trace, loss, unc = np.array([1.0, -1.0]), np.array([1.0, 2.0]), np.array([2.0, 2.0])
    assert (badness("trace", trace=trace) == [-1.0, 1.0]).all()
    assert (badness("perplexity", loss=loss) == [1.0, 2.0]).all()
    assert badness("ifd", loss=loss, loss_uncond=unc) == pytest.approx([0.5, 1.0])
    assert badness("pmi", loss=loss, loss_uncond=unc) == pytest.approx([-1.0, 0.0])  # −(ℓ(y|∅) − ℓ(y|x))


def test_badness_refuses_missing_and_bad_values():
    with pytest.raises(ConfigError, match="'ifd' needs loss_uncond"):
        badness("ifd", loss=np.ones(2))
    with pytest.raises(ConfigError, match="unknown signal"):
        badness("length", loss=np.ones(2))
    with pytest.raises(DataError, match="NaN"):
        badness("perplexity", loss=np.array([1.0, np.nan]))
    with pytest.raises(DataError, match="positive"):
        badness("ifd", loss=np.ones(2), loss_uncond=np.array([1.0, 0.0]))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("bad", ["trace", "perplexity", "ifd", "pmi"])
def test_a_sample_bad_on_one_signal_alone_is_flagged_whatever_the_others_say(anchors, bad, fusion):
    rng = np.random.default_rng(1)
    cands = side(200, rng)
    for k in ("trace",):  # the others say "unusually good": high trace
        cands[k] = cands[k] + 3.0
    cands["loss_uncond"] = cands["loss_uncond"] + 0.5  # and a question that helps a lot (good IFD and PMI)
    i = 7
    if bad == "trace":
        cands["trace"][i] = -8.0
    elif bad == "perplexity":  # loss up, ℓ(y|∅) up alike: IFD and PMI stay typical
        cands["loss"][i], cands["loss_uncond"][i] = 3.5, 5.0
    elif bad == "ifd":
        cands["loss_uncond"][i] = cands["loss"][i] * 1.02  # the question does not help
    else:
        cands["loss_uncond"][i] = cands["loss"][i] + 0.01
    scored, _ = calibrate(cands, anchors, SIGNAL_NAMES, fusion)
    assert scored.scores[i] == scored.scores.min()  # the worst sample of all
    assert scored.z[i, scored.signals.index(bad)] > 3
    if bad != "pmi":  # IFD and PMI both see a question that does not help; either may be the larger
        assert scored.flagged_by[i] == bad or {bad, scored.flagged_by[i]} == {"ifd", "pmi"}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_unusually_good_values_are_never_flagged(anchors, fusion):
    rng = np.random.default_rng(2)
    typical = side(100, rng)
    better = {k: v.copy() for k, v in typical.items()}
    better["trace"] += 5.0  # every signal much better than any anchor
    better["loss"] -= 1.0
    better["loss_uncond"] += 1.0
    base, _ = calibrate(typical, anchors, SIGNAL_NAMES, fusion)
    good, _ = calibrate(better, anchors, SIGNAL_NAMES, fusion)
    assert (good.z < -3).all()
    assert (good.scores >= base.scores - 1e-12).all()  # better on every signal never scores worse
    if fusion == "fisher":  # nothing unusual in the bad direction: near the best score a sample can have
        assert (-good.scores < 1e-3).all()


def test_the_anchors_are_calibrated_leave_one_out(anchors):
    _, anchor_scores = calibrate(anchors, anchors, ("perplexity",), "max")
    ref = anchors["loss"]
    expected = [robust_z(np.delete(ref, j), ref[j : j + 1])[0] for j in range(len(ref))]
    np.testing.assert_allclose(anchor_scores.z[:, 0], expected)
    np.testing.assert_allclose(robust_z_loo(ref), expected)
    assert not np.allclose(expected, robust_z(ref, ref))  # not the in-sample z


def test_the_anchors_trace_values_are_used_as_given(anchors):
    """The trace entry of the anchors is their leave-one-out trace score (computed by the trace path); calibration
    uses it unchanged and standardises it leave-one-out like the other signals."""
    cands = side(10, np.random.default_rng(3))
    _, a1 = calibrate(cands, anchors, ("trace",), "max")
    shifted = anchors | {"trace": anchors["trace"] + 1.0}
    c2, a2 = calibrate(cands, shifted, ("trace",), "max")
    np.testing.assert_allclose(a1.z, a2.z)  # a shift of every anchor moves the reference, not their own z
    c1, _ = calibrate(cands, anchors, ("trace",), "max")
    assert (c2.z > c1.z).all()  # the candidates look worse against better anchors


def test_robust_z_is_robust_to_outlying_anchors():
    ref = np.r_[np.random.default_rng(4).normal(0, 1, 38), 100.0, -100.0]
    z = robust_z(ref, np.array([3.0]))[0]
    assert 2.3 < z < 3.7


def test_constant_anchor_values_fall_back_to_the_standard_deviation():
    ref = np.r_[np.zeros(30), np.ones(10)]
    assert robust_z(ref, np.array([1.0]))[0] == pytest.approx(1.0 / ref.std())
    assert np.isfinite(robust_z(np.zeros(5), np.array([1.0]))).all()


def test_fisher_and_max_fusions():
    z = np.array([[0.0, 0.0], [3.0, -10.0], [2.0, 2.0], [40.0, 0.0]])
    m = fuse(z, "max")
    assert m.tolist() == [0.0, 3.0, 2.0, 40.0]
    f = fuse(z, "fisher")
    assert f[1] > f[0]  # a very good second signal does not offset the bad first one
    assert f[2] > fuse(np.array([[2.0, 0.0]]), "fisher")[0]  # evidence adds up
    assert np.isfinite(f).all() and f[3] > f[1]  # no underflow far in the tail
    assert log_upper_p(np.array([29.9]))[0] == pytest.approx(log_upper_p(np.array([30.1]))[0], rel=0.02)
    with pytest.raises(ConfigError, match="fusion"):
        fuse(z, "mean")


def test_calibrate_refuses_bad_settings(anchors):
    cands = side(5, np.random.default_rng(5))
    with pytest.raises(ConfigError, match="signals"):
        calibrate(cands, anchors, ("trace", "trace"))
    with pytest.raises(ConfigError, match="signals"):
        calibrate(cands, anchors, ())
    with pytest.raises(ConfigError, match="loss_uncond"):
        calibrate({"trace": cands["trace"], "loss": cands["loss"]}, anchors, ("ifd",))
    with pytest.raises(ShapeMismatchError, match="one length"):
        calibrate(cands | {"loss": cands["loss"][:3]}, anchors, ("trace", "perplexity"))
    few = {k: v[:2] for k, v in anchors.items()}
    with pytest.raises(DataError, match="at least"):
        calibrate(cands, few, ("trace",))


def test_fused_signals_follow_what_the_silos_send():
    assert fused_signals(("loss_uncond", "n_tokens")) == ("trace", "perplexity", "ifd", "pmi")
    assert fused_signals(()) == ("trace", "perplexity")
    assert set(fused_signals(("loss_uncond",))) <= set(SIGNAL_NAMES)


def test_check_score_settings_names_the_field():
    check_score_settings("calibrated", ["loss_uncond"], "fisher")
    bad = [
        (("nope", [], "fisher"), "score"),
        (("trace", ["x"], "fisher"), "signals"),
        (("trace", ["n_tokens", "n_tokens"], "max"), "signals"),
        (("trace", [], "sum"), "fusion"),
    ]
    for args, field in bad:
        with pytest.raises(ConfigError, match=field):
            check_score_settings(*args)


def test_length_buckets_report_auroc_within_length_terciles():
    rng = np.random.default_rng(6)
    n_tokens = rng.integers(5, 100, 300).astype(float)
    clean = rng.random(300) > 0.3
    scores = clean + rng.normal(0, 0.5, 300)
    buckets = length_buckets(scores, clean, n_tokens)
    assert len(buckets) == 3 and sum(b["n"] for b in buckets) == 300
    assert all(b["auroc"] > 0.7 for b in buckets)
