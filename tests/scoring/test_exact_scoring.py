"""Exact silo-local scoring: the coordinator's streamed anchor pass and a silo's streamed scoring give what the
coordinator computes with every unprojected gradient in hand (`score_projections`, `score_anchor_samples`,
`build_reference`, `score_locally`), on a real tiny model run, through the reference's wire format."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scoring.config import DEFAULT_FUSION, DEFAULT_SIGNALS
from scoring.errors import IncompatibleArtifactError, ShapeMismatchError
from scoring.exact_scoring import exact_anchor_values, exact_local_scores
from scoring.io.reference import reference_from_bytes, reference_to_bytes
from scoring.local_scoring import build_reference
from scoring.selection import MeanAnchorScore
from scoring.workflow import ProjectOptions
from tests.conftest import expected_exact

OPTS = ProjectOptions(batch_size=4, precondition=True, signals=DEFAULT_SIGNALS)


@pytest.fixture(scope="module")
def coordinator_side(tiny_data):
    """The reference and silo a's scores computed from the unprojected matrices by the coordinator's functions."""
    reference, anchor_trace, scores, values = expected_exact(tiny_data, silos=("a",))
    return reference, anchor_trace, scores["a"], values["a"]


def test_exact_scores_equal_the_coordinator_side_computation(tiny_data, coordinator_side):
    expected_ref, expected_anchor_trace, expected, expected_values = coordinator_side
    directions, values = exact_anchor_values(tiny_data.run_dir, tiny_data.samples["anchors"], "cosine", OPTS)
    np.testing.assert_allclose(values["trace"], expected_anchor_trace, rtol=1e-6, atol=1e-12)
    reference = build_reference(
        directions,
        values,
        score="calibrated",
        signals=DEFAULT_SIGNALS,
        fusion=DEFAULT_FUSION,
        policy=MeanAnchorScore(),
    )
    for got, want in zip(reference.directions, expected_ref.directions, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
    assert reference.threshold == pytest.approx(expected_ref.threshold, rel=1e-6)
    wire = reference_from_bytes(reference_to_bytes(reference))  # float32 directions, as a silo receives them
    local, silo_values = exact_local_scores(tiny_data.run_dir, tiny_data.samples["a"], wire, OPTS)
    for name, v in expected_values.items():
        np.testing.assert_allclose(silo_values[name], v, rtol=1e-6)
    np.testing.assert_allclose(local.trace, expected.trace, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(local.scores, expected.scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(local.selected, expected.selected)
    assert local.aggregate(wire).total == len(tiny_data.samples["a"])


def test_a_reference_that_is_not_the_runs_is_refused(tiny_data, coordinator_side):
    reference = coordinator_side[0]
    short = dataclasses.replace(reference, directions=tuple(d[:, :-1] for d in reference.directions))
    with pytest.raises(ShapeMismatchError, match="exact gradients"):
        exact_local_scores(tiny_data.run_dir, tiny_data.samples["a"], short, OPTS)
    one = dataclasses.replace(reference, directions=reference.directions[:1], lrs=reference.lrs[:1])
    with pytest.raises(ShapeMismatchError, match="checkpoint"):
        exact_local_scores(tiny_data.run_dir, tiny_data.samples["a"], one, OPTS)
    other_lr = dataclasses.replace(reference, lrs=tuple(2 * lr for lr in reference.lrs))
    with pytest.raises(IncompatibleArtifactError, match="learning rate"):
        exact_local_scores(tiny_data.run_dir, tiny_data.samples["a"], other_lr, OPTS)


def test_one_anchor_is_refused(tiny_data):
    with pytest.raises(ShapeMismatchError, match="two anchors"):
        exact_anchor_values(tiny_data.run_dir, tiny_data.samples["anchors"][:1], "cosine", OPTS)
