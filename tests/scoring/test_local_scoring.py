"""Silo-local scoring: a silo that scores its own samples against the published reference gets the coordinator's
scores and mask (the same gradients scored by `score_projections` + `calibrate` + `apply_threshold`), the reference
survives its wire format, and only the aggregate (kept count, histogram on the coordinator's bins) is built to leave."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scoring.calibration import calibrate
from scoring.config import ProjectionSpec, TraceConfig
from scoring.errors import ConfigError, DataError
from scoring.io.reference import reference_from_bytes, reference_to_bytes
from scoring.local_scoring import build_reference, default_bins, score_locally
from scoring.selection import FixedThreshold, MeanAnchorScore, TopFraction
from scoring.traces import build_anchor_directions, score_anchor_samples, score_projections
from scoring.types import ProjectedGrads

T, K, M, N = 3, 64, 8, 40
LRS = (3e-4, 2e-4, 1e-4)
SPEC = ProjectionSpec(kind="sjlt", dim=K, seed=0, param_hash="layout", param_count=10 * K, nnz=1)


def _grads(n: int, seed: int, shift: np.ndarray) -> list[np.ndarray]:
    """T checkpoints of n gradients: ``shift[i]`` times one shared direction, plus noise."""
    base = np.random.default_rng(0).normal(size=K)
    rng = np.random.default_rng(seed)
    return [(np.outer(shift, base) + rng.normal(size=(n, K))).astype(np.float32) for _ in range(T)]


def _seq(ids, mats, role):
    return [
        ProjectedGrads(ids=ids, matrix=m, spec=SPEC, checkpoint=t, lr=LRS[t], role=role) for t, m in enumerate(mats)
    ]


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(7)
    anchor_ids = tuple(f"a{i}" for i in range(M))
    cand_ids = tuple(f"c{i}" for i in range(N))
    anchors = _seq(anchor_ids, _grads(M, 1, np.full(M, 1.0)), "anchor")
    candidates = _seq(cand_ids, _grads(N, 2, np.linspace(-0.5, 1.5, N)), "candidate")  # from against to along
    loss = {"anchor": rng.uniform(1, 2, M), "cand": rng.uniform(1, 3, N)}
    uncond = {"anchor": loss["anchor"] + rng.uniform(0.5, 1, M), "cand": loss["cand"] + rng.uniform(-0.2, 1, N)}
    return anchors, candidates, loss, uncond


def _coordinator(world, score: str, policy):
    """What the coordinator computes today with every silo's projections in hand."""
    anchors, candidates, loss, uncond = world
    config = TraceConfig()
    table = score_projections({"silo": candidates}, anchors, config)
    anchor_table = score_anchor_samples(anchors, anchors, config)
    anchor_values = {"trace": anchor_table.scores, "loss": loss["anchor"], "loss_uncond": uncond["anchor"]}
    if score == "trace":
        scores, anchor_scores = table.scores, anchor_table.scores
    else:
        cand, anch = calibrate(
            {"trace": table.scores, "loss": loss["cand"], "loss_uncond": uncond["cand"]},
            anchor_values,
            ("trace", "perplexity", "ifd", "pmi"),
            "fisher",
        )
        scores, anchor_scores = cand.scores, anch.scores
    threshold = float(np.mean(anchor_scores)) if isinstance(policy, MeanAnchorScore) else policy.value
    return scores, threshold, anchor_values


@pytest.mark.parametrize(
    ("score", "policy"),
    [
        ("trace", MeanAnchorScore()),
        ("trace", FixedThreshold(0.0)),
        ("calibrated", MeanAnchorScore()),
        ("calibrated", FixedThreshold(-4.0)),
    ],
    ids=["trace-mean-anchor", "trace-fixed", "calibrated-mean-anchor", "calibrated-fixed"],
)
def test_a_silo_scores_its_samples_as_the_coordinator_would(world, score, policy):
    anchors, candidates, loss, uncond = world
    scores, threshold, anchor_values = _coordinator(world, score, policy)
    directions = build_anchor_directions(anchors, TraceConfig())
    reference = build_reference(
        directions, anchor_values, score=score, signals=("loss_uncond",), fusion="fisher", policy=policy
    )
    reference = reference_from_bytes(reference_to_bytes(reference))  # what the silo downloads
    local = score_locally(
        reference, [c.matrix for c in candidates], {"loss": loss["cand"], "loss_uncond": uncond["cand"]}
    )
    assert reference.threshold == pytest.approx(threshold, rel=1e-12)
    np.testing.assert_allclose(local.scores, scores, rtol=1e-5, atol=1e-6)  # float32 directions on the wire
    np.testing.assert_array_equal(local.selected, scores >= threshold)
    assert 0 < local.selected.sum() < N  # the masks compared keep some and drop some
    aggregate = local.aggregate(reference)
    assert aggregate.kept == int(local.selected.sum()) and aggregate.total == N
    assert sum(aggregate.histogram) == N and len(aggregate.histogram) == len(reference.bins) - 1


def test_the_reference_refuses_a_top_fraction_and_malformed_files(world):
    anchors, _, loss, _ = world
    directions = build_anchor_directions(anchors, TraceConfig())
    values = {"trace": np.zeros(M), "loss": loss["anchor"]}
    with pytest.raises(ConfigError, match="'top' needs every silo's scores"):
        build_reference(directions, values, score="trace", signals=(), fusion="fisher", policy=TopFraction(0.5))
    data = reference_to_bytes(
        build_reference(directions, values, score="trace", signals=(), fusion="fisher", policy=FixedThreshold(0.0))
    )
    assert reference_to_bytes(reference_from_bytes(data)) == data  # byte-stable
    with pytest.raises(DataError, match=r"ref: not a readable clues\.reference/1 file"):
        reference_from_bytes(data[:-4], "ref")
    with pytest.raises(DataError, match="not a readable"):
        reference_from_bytes(b"\x08" + b"\x00" * 7 + b"{}      ", "ref")


def test_the_bins_come_from_the_anchors_and_cover_every_score():
    edges = default_bins(np.array([1.0, 2.0, 3.0]), bins=4)
    assert edges[0] == -math.inf and edges[-1] == math.inf and edges[1:-1] == (0.0, 1.0, 2.0, 3.0, 4.0)
    counts, _ = np.histogram(np.array([-100.0, 0.5, 2.5, 100.0]), bins=np.asarray(edges))
    assert counts.sum() == 4 and counts[0] == 1 and counts[-1] == 1
