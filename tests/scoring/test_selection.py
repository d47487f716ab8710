"""Tests of `scoring.selection`: policies, baselines, masks and evaluation helpers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from scoring.config import SCORE_KINDS
from scoring.errors import ConfigError, DataError, IncompatibleArtifactError, ShapeMismatchError
from scoring.selection import (
    FixedThreshold,
    MeanAnchorScore,
    TopFraction,
    apply_threshold,
    auroc,
    average_ranks,
    check_score_preconditioning,
    check_threshold_preconditioning,
    format_threshold,
    keep_all,
    keep_count,
    masks_by_silo,
    parse_threshold,
    perplexity_scores,
    precision_at_keep,
    random_scores,
    threshold_from_dict,
    threshold_to_dict,
)
from scoring.types import ScoreTable
from tests.scoring.reference import naive_auroc


def _table(scores, silos=None, ids=None, n_ckpt: int = 1) -> ScoreTable:
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    ids = ids or tuple(f"id{i}" for i in range(n))
    silos = silos or tuple("ab"[i % 2] for i in range(n))
    parts = np.repeat(scores[:, None] / n_ckpt, n_ckpt, axis=1)
    return ScoreTable(ids=tuple(ids), silos=tuple(silos), scores=scores, parts=parts)


@pytest.mark.parametrize(("n", "q"), list(itertools.product((0, 1, 7, 10, 101), (0.0, 0.05, 0.3, 0.35, 0.5, 1.0))))
def test_top_fraction_keeps_exact_count(n, q):
    rng = np.random.default_rng(n)
    scores = rng.integers(0, 3, n).astype(float)  # many ties
    out = apply_threshold(_table(scores), TopFraction(q), None)
    expected = math.floor(round(q * n, 9) + 0.5)
    assert int(out.selected.sum()) == expected == keep_count(n, q)
    if expected:
        assert out.threshold == scores[out.selected].min()
        assert (scores[~out.selected] <= out.threshold).all()
    else:
        assert out.threshold == math.inf


def test_top_fraction_breaks_ties_by_silo_then_id_not_row_order():
    scores = [1.0, 2.0, 2.0, 2.0, 0.5]
    silos = ("b", "b", "a", "b", "a")
    ids = ("x", "z", "q", "y", "w")
    out = apply_threshold(_table(scores, silos, ids), TopFraction(0.4), None)  # keeps 2 of 5
    assert out.selected.tolist() == [False, False, True, True, False]  # (a, q) then (b, y) among the 2.0s
    permuted = apply_threshold(_table(scores[::-1], silos[::-1], ids[::-1]), TopFraction(0.4), None)
    assert permuted.selected.tolist() == out.selected.tolist()[::-1]
    assert keep_count(10, 0.35) == 4 and keep_count(10, 0.25) == 3 and keep_count(3, 1 / 3) == 1


@pytest.mark.parametrize("policy", [MeanAnchorScore(), TopFraction(0.5), FixedThreshold(0.1)])
def test_only_mean_anchor_needs_candidates_and_anchors_scored_alike(policy):
    for same in (True, False):
        check_threshold_preconditioning(policy, same, same)
    for candidates, anchors in ((True, False), (False, True)):
        if isinstance(policy, MeanAnchorScore):
            with pytest.raises(ConfigError, match=r"^threshold: 'mean-anchor' compares") as err:
                check_threshold_preconditioning(policy, candidates, anchors)
            assert ("Adam-preconditioned candidate" in str(err.value)) == candidates
            assert ("holds no silo's Adam moments" in str(err.value)) == candidates
        else:
            check_threshold_preconditioning(policy, candidates, anchors)


@pytest.mark.parametrize("score", SCORE_KINDS)
def test_only_the_calibrated_score_needs_candidates_and_anchors_scored_alike(score):
    for same in (True, False):
        check_score_preconditioning(score, same, same)
    for candidates, anchors in ((True, False), (False, True)):
        if score == "calibrated":
            with pytest.raises(ConfigError, match=r"^score: 'calibrated' compares") as err:
                check_score_preconditioning(score, candidates, anchors)
            assert ("of Adam-preconditioned candidate" in str(err.value)) == candidates
            assert ("holds no silo's Adam moments" in str(err.value)) == candidates
            assert "score 'trace'" in str(err.value)
        else:
            check_score_preconditioning(score, candidates, anchors)


def test_mean_anchor_threshold_equals_manual_mean():
    rng = np.random.default_rng(0)
    table, anchors = _table(rng.normal(size=50), n_ckpt=3), _table(rng.normal(size=8), n_ckpt=3)
    out = apply_threshold(table, MeanAnchorScore(), anchors)
    manual = sum(anchors.scores.tolist()) / 8
    assert out.threshold == pytest.approx(manual, rel=1e-12)
    np.testing.assert_array_equal(out.selected, table.scores >= manual)
    assert table.selected is None  # the input is not modified
    with pytest.raises(ConfigError, match="anchor_table"):
        apply_threshold(table, MeanAnchorScore(), None)
    with pytest.raises(IncompatibleArtifactError, match="checkpoints"):
        apply_threshold(table, MeanAnchorScore(), _table([1.0], n_ckpt=2))
    with pytest.raises(DataError, match="no anchor scores"):
        apply_threshold(table, MeanAnchorScore(), _table([], n_ckpt=3))


def test_fixed_threshold_keeps_scores_at_or_above():
    out = apply_threshold(_table([0.1, 0.2, 0.3]), FixedThreshold(0.2))
    assert out.selected.tolist() == [False, True, True] and out.threshold == 0.2
    with pytest.raises(DataError, match="NaN"):
        apply_threshold(_table([0.1, np.nan]), FixedThreshold(0.0))


def test_masks_by_silo():
    out = apply_threshold(_table([3.0, 1.0, 2.0, 0.0, 5.0], silos=("b", "a", "b", "a", "c")), FixedThreshold(1.5))
    masks = masks_by_silo(out)
    assert list(masks) == ["b", "a", "c"]
    assert masks["b"][0] == ("id0", "id2") and masks["b"][1].tolist() == [True, True]
    assert masks["a"][0] == ("id1", "id3") and masks["a"][1].tolist() == [False, False]
    assert masks["c"][1].dtype == bool and masks["c"][1].tolist() == [True]
    assert out.masks()["b"] == {"id0": True, "id2": True}  # agrees with ScoreTable.masks
    with pytest.raises(ShapeMismatchError):
        masks_by_silo(_table([1.0]))


@pytest.mark.parametrize(
    "policy",
    [MeanAnchorScore(), TopFraction(0.3), TopFraction(1), FixedThreshold(-1e-5), FixedThreshold(2.5)],
)
def test_policy_round_trips(policy):
    assert parse_threshold(format_threshold(policy)) == policy
    assert threshold_from_dict(threshold_to_dict(policy)) == policy


def test_parse_threshold_cli_forms():
    assert parse_threshold("mean-anchor") == MeanAnchorScore()
    assert parse_threshold("top:0.3") == TopFraction(0.3)
    assert parse_threshold(" fixed:0.1 ") == FixedThreshold(0.1)
    assert threshold_to_dict(TopFraction(0.3)) == {"kind": "top", "fraction": 0.3}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("median", "threshold"),
        ("top", "threshold"),
        ("mean-anchor:1", "threshold"),
        ("top:abc", "fraction"),
        ("top:", "fraction"),
        ("top:1.5", "fraction"),
        ("top:-0.1", "fraction"),
        ("top:nan", "fraction"),
        ("fixed:x", "value"),
        ("fixed:inf", "value"),
    ],
)
def test_parse_threshold_rejects_bad_strings_naming_the_field(text, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        parse_threshold(text)


def test_threshold_from_dict_rejects_bad_dicts():
    with pytest.raises(ConfigError, match=r"^kind:"):
        threshold_from_dict({"kind": "bottom"})
    with pytest.raises(ConfigError, match="fraction"):
        threshold_from_dict({"kind": "top"})
    with pytest.raises(ConfigError, match="fraction"):
        threshold_from_dict({"kind": "top", "fraction": 0.1, "extra": 1})
    with pytest.raises(ConfigError, match=r"^fraction:"):
        threshold_from_dict({"kind": "top", "fraction": "0.1"})
    with pytest.raises(ConfigError, match=r"^value:"):
        FixedThreshold(True)


def test_baselines():
    ids, silos = ("a1", "a2", "b1"), ("a", "a", "b")
    r1, r2 = random_scores(ids, silos, seed=3), random_scores(ids, silos, seed=3)
    np.testing.assert_array_equal(r1.scores, r2.scores)
    assert r1.parts.shape == (3, 1) and ((r1.scores >= 0) & (r1.scores < 1)).all()
    assert not np.array_equal(r1.scores, random_scores(ids, silos, seed=4).scores)
    p = perplexity_scores(ids, silos, np.array([2.0, 0.5, 1.0]))
    np.testing.assert_array_equal(p.scores, [-2.0, -0.5, -1.0])
    assert apply_threshold(p, TopFraction(1 / 3)).selected.tolist() == [False, True, False]  # lowest loss
    with pytest.raises(ShapeMismatchError):
        perplexity_scores(ids, silos, np.ones(2))
    with pytest.raises(DataError):
        perplexity_scores(ids, silos, np.array([1.0, np.inf, 1.0]))
    everything = keep_all(ids, silos)
    assert apply_threshold(everything, FixedThreshold(1.0)).selected.all()
    assert apply_threshold(everything, MeanAnchorScore(), keep_all(("z",), ("__anchor__",))).selected.all()
    np.testing.assert_array_equal(everything.parts.sum(1), everything.scores)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    n = 60
    scores = rng.integers(0, 6, n).astype(float) + (seed % 2) * rng.normal(size=n)  # with and without ties
    positive = rng.random(n) < 0.4
    positive[:2] = [True, False]
    assert auroc(scores, positive) == pytest.approx(naive_auroc(scores.tolist(), positive.tolist()), abs=1e-12)


def test_auroc_extremes_and_errors():
    assert auroc(np.array([3.0, 4.0, 1.0, 2.0]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([3.0, 4.0, 1.0, 2.0]), np.array([False, False, True, True])) == 0.0
    assert auroc(np.full(7, 0.3), np.arange(7) % 2 == 0) == 0.5
    np.testing.assert_array_equal(average_ranks(np.array([5.0, 1.0, 5.0, 3.0])), [3.5, 1.0, 3.5, 2.0])
    with pytest.raises(DataError, match="both classes"):
        auroc(np.ones(3), np.ones(3, dtype=bool))
    with pytest.raises(DataError):
        auroc(np.array([1.0, np.nan]), np.array([True, False]))
    with pytest.raises(ShapeMismatchError):
        auroc(np.ones(3), np.ones(2, dtype=bool))


def test_precision_at_keep():
    selected = np.array([True, True, False, True])
    clean = np.array([True, False, False, True])
    assert precision_at_keep(selected, clean) == pytest.approx(2 / 3)
    assert math.isnan(precision_at_keep(np.zeros(4, bool), clean))
    with pytest.raises(ShapeMismatchError):
        precision_at_keep(selected, clean[:3])
