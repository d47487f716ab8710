"""Tests of `scoring.traces` against the naive loops in `reference.py`."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

from scoring.config import ProjectionSpec, TraceConfig
from scoring.errors import ConfigError, DataError, IncompatibleArtifactError, ShapeMismatchError
from scoring.traces import (
    VECDOT_MAX_GROUPS,
    anchor_direction,
    best_group,
    group_directions,
    score_anchor_samples,
    score_projections,
    trace_parts,
)
from scoring.types import ProjectedGrads
from tests.scoring.reference import naive_trace_scores
from wire import ANCHOR_OWNER

K = 16
LRS = (3e-4, 2e-4, 1e-4)


def _spec(dim: int = K, seed: int = 0) -> ProjectionSpec:
    return ProjectionSpec(kind="sjlt", dim=dim, seed=seed, param_hash="abc", param_count=1000, nnz=4)


def _grads(mats, role="candidate", lrs=LRS, spec=None, ids=None, **kw) -> list[ProjectedGrads]:
    spec = spec or _spec(mats[0].shape[1])
    ids = ids or tuple(f"s{i}" for i in range(len(mats[0])))
    return [
        ProjectedGrads(ids=ids, matrix=m, spec=spec, checkpoint=t, lr=lrs[t], role=role, **kw)
        for t, m in enumerate(mats)
    ]


def _mats(rng, n_ckpt: int, n: int, dtype=np.float16, k: int = K) -> list[np.ndarray]:
    return [rng.standard_normal((n, k)).astype(dtype) for _ in range(n_ckpt)]


def _tol(ref: np.ndarray) -> dict:
    # float32 matmul of exact float16 values: ~1e-7·√k relative to the scale of the terms.
    return {"rtol": 1e-5, "atol": 1e-6 * max(1e-300, float(np.abs(ref).max()))}


GRID = list(itertools.product(("cosine", "dot"), (None, 2), (1, 3, 10_000), (1, 3), (np.float16, np.float32)))


@pytest.mark.parametrize(("similarity", "n_groups", "chunk_rows", "n_ckpt", "dtype"), GRID)
def test_score_projections_matches_reference(similarity, n_groups, chunk_rows, n_ckpt, dtype):
    rng = np.random.default_rng(hash((similarity, n_groups, chunk_rows, n_ckpt)) % 2**32)
    silo_a, silo_b, anchors = (
        _mats(rng, n_ckpt, 7, dtype),
        _mats(rng, n_ckpt, 4, dtype),
        _mats(rng, n_ckpt, 6),
    )
    silo_a[0][2] = 0  # a zero-norm candidate row: cosine gives 0, not NaN
    groups = None if n_groups is None else ["x", "y", "x", "y", "y", "x"]
    cands = {"a": _grads(silo_a), "b": _grads(silo_b, ids=("u", "v", "w", "z"))}
    config = TraceConfig(similarity=similarity, chunk_rows=chunk_rows)

    table = score_projections(cands, _grads(anchors, role="anchor"), config, anchor_groups=groups)

    assert table.ids == ("s0", "s1", "s2", "s3", "s4", "s5", "s6", "u", "v", "w", "z")
    assert table.silos == ("a",) * 7 + ("b",) * 4
    assert table.parts.shape == (11, n_ckpt) and table.selected is None
    np.testing.assert_array_equal(table.parts.sum(1), table.scores)
    for name, rows in (("a", slice(0, 7)), ("b", slice(7, 11))):
        mats = [m.astype(np.float64).tolist() for m in {"a": silo_a, "b": silo_b}[name]]
        ref_scores, ref_parts = naive_trace_scores(
            mats, [a.astype(np.float64).tolist() for a in anchors], LRS[:n_ckpt], similarity, groups
        )
        np.testing.assert_allclose(table.scores[rows], ref_scores, **_tol(np.array(ref_parts)))
        np.testing.assert_allclose(table.parts[rows], ref_parts, **_tol(np.array(ref_parts)))
    if similarity == "cosine":
        assert table.scores[2] == pytest.approx(sum(table.parts[2, 1:]))  # row 2 is zero only at t=0
        assert table.parts[2, 0] == 0.0


@pytest.mark.parametrize(
    ("similarity", "chunk_rows", "n_groups"),
    list(itertools.product(("cosine", "dot"), (1, 3, 64), (3, VECDOT_MAX_GROUPS + 2))),
)
def test_trace_parts_matches_reference_per_group(similarity, chunk_rows, n_groups):
    # n_groups above VECDOT_MAX_GROUPS exercises the BLAS matmul branch.
    rng = np.random.default_rng(7)
    n_anchor = 2 * n_groups - 1
    cands, anchors = _mats(rng, 3, 9), _mats(rng, 3, n_anchor)
    labels = [f"g{i % n_groups:02d}" for i in range(n_anchor)]
    names, _ = group_directions(anchors[0], labels, similarity)
    assert names == tuple(sorted(set(labels)))
    dirs = [group_directions(a, labels, similarity)[1] for a in anchors]
    parts = trace_parts(cands, dirs, LRS, similarity, chunk_rows)
    assert parts.shape == (9, 3, n_groups) and parts.dtype == np.float64
    c64 = [c.astype(np.float64).tolist() for c in cands]
    for g, name in enumerate(names):
        members = [i for i, lab in enumerate(labels) if lab == name]
        sub = [a[members].astype(np.float64).tolist() for a in anchors]
        _, ref_parts = naive_trace_scores(c64, sub, LRS, similarity)
        np.testing.assert_allclose(parts[:, :, g], ref_parts, **_tol(np.array(ref_parts)))


def test_best_group_takes_max_after_summing_over_checkpoints():
    # group 0 wins checkpoint 0 but group 1 wins the sum: LESS takes the max of the sums.
    parts = np.array([[[5.0, 1.0], [0.0, 3.0], [0.0, 3.0]]])  # (N=1, T=3, G=2)
    scores, best, group = best_group(parts)
    assert group.tolist() == [1] and scores.tolist() == [7.0] and best.tolist() == [[1.0, 3.0, 3.0]]
    scores, best, group = best_group(np.zeros((0, 3, 2)))
    assert scores.shape == (0,) and best.shape == (0, 3) and group.shape == (0,)


def test_anchor_direction_cosine_is_mean_of_unit_rows_and_dot_is_mean():
    anchors = np.array([[3.0, 4.0], [0.0, 2.0]])
    np.testing.assert_allclose(anchor_direction(anchors, "cosine"), [0.3, 0.9])
    np.testing.assert_allclose(anchor_direction(anchors, "dot"), [1.5, 3.0])
    with pytest.raises(DataError, match="zero norm"):
        anchor_direction(np.array([[1.0, 0.0], [0.0, 0.0]]), "cosine")
    np.testing.assert_allclose(anchor_direction(np.array([[1.0, 0.0], [0.0, 0.0]]), "dot"), [0.5, 0.0])
    with pytest.raises(DataError, match="NaN or Inf"):
        anchor_direction(np.array([[1.0, np.inf]]), "dot")
    with pytest.raises(ShapeMismatchError):
        anchor_direction(np.zeros((0, 2)), "dot")
    with pytest.raises(ConfigError, match="similarity"):
        anchor_direction(anchors, "euclid")


def test_memmap_streaming_matches_in_memory(tmp_path):
    rng = np.random.default_rng(1)
    n, k = 200_000, 64
    data = rng.standard_normal((n, k), dtype=np.float32).astype(np.float16)
    mm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float16, shape=(n, k))
    mm[:] = data
    mm.flush()
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    dirs = [anchor_direction(rng.standard_normal((4, k)), "cosine")[None, :]]

    tracemalloc.start()
    streamed = trace_parts([mm], dirs, [1.0], "cosine", chunk_rows=4096)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    in_memory = trace_parts([data], dirs, [1.0], "cosine", chunk_rows=n)

    np.testing.assert_allclose(streamed, in_memory, rtol=1e-6, atol=1e-7)
    # output (n·8 bytes) + O(chunk_rows·k) working memory; far below the n·k·4 bytes of a full float32 copy.
    assert peak < n * 8 + 4096 * k * 4 * 4 + 2**20, peak


def test_chunk_rows_does_not_change_results():
    rng = np.random.default_rng(2)
    cands, dirs = _mats(rng, 2, 1000, k=32), [rng.standard_normal((2, 32)) for _ in range(2)]
    results = [trace_parts(cands, dirs, [1.0, 0.5], "dot", c) for c in (1, 7, 256, 1000, 5000)]
    for other in results[1:]:  # equal up to float32 rounding (BLAS kernels differ with the block size)
        np.testing.assert_allclose(other, results[0], **_tol(results[0]))


@pytest.mark.parametrize("bad", (np.nan, np.inf, -np.inf))
@pytest.mark.parametrize("similarity", ("cosine", "dot"))
def test_nan_or_inf_candidates_raise_data_error_naming_row(bad, similarity):
    rng = np.random.default_rng(3)
    cands = _mats(rng, 2, 10)
    cands[1][6, 3] = bad
    with pytest.raises(DataError, match=r"checkpoint 1: rows \[6\]"):
        trace_parts(cands, [np.ones((1, K))] * 2, [1.0, 1.0], similarity, chunk_rows=4)
    table_cands = {"s": _grads(cands[:2], lrs=(1.0, 1.0))}
    anchors = _grads(_mats(rng, 2, 3), role="anchor", lrs=(1.0, 1.0))
    with pytest.raises(DataError, match="silo 's'"):
        score_projections(table_cands, anchors, TraceConfig(similarity=similarity))
    bad_anchors = _replace(anchors, 1, matrix=np.where(np.eye(3, K) > 0, bad, 1.0).astype(np.float16))
    with pytest.raises(DataError, match="anchor rows"):
        score_projections({"s": _grads(_mats(rng, 2, 3), lrs=(1.0, 1.0))}, bad_anchors, TraceConfig())


def test_float32_overflow_falls_back_to_float64():
    big = np.full((3, 4), 1e30, dtype=np.float64)  # squares overflow float32
    parts = trace_parts([big], [np.array([[0.5, 0.5, 0.5, 0.5]])], [2.0], "cosine", chunk_rows=2)
    np.testing.assert_allclose(parts[:, 0, 0], 2.0)


def test_trace_parts_rejects_bad_shapes_and_inputs():
    c = np.zeros((5, 4), np.float16)
    d = np.ones((1, 4))
    with pytest.raises(ShapeMismatchError):
        trace_parts([c, np.zeros((6, 4), np.float16)], [d, d], [1.0, 1.0], "dot", 2)
    with pytest.raises(ShapeMismatchError):
        trace_parts([c], [np.ones((1, 3))], [1.0], "dot", 2)
    with pytest.raises(ShapeMismatchError):
        trace_parts([c], [d, d], [1.0], "dot", 2)
    with pytest.raises(ShapeMismatchError):
        trace_parts([], [], [], "dot", 2)
    with pytest.raises(DataError, match="learning rate"):
        trace_parts([c], [d], [float("nan")], "dot", 2)
    with pytest.raises(DataError, match="directions"):
        trace_parts([c], [d * np.nan], [1.0], "dot", 2)
    with pytest.raises(DataError, match="floating"):
        trace_parts([c.astype(np.int32)], [d], [1.0], "dot", 2)
    with pytest.raises(ConfigError, match="chunk_rows"):
        trace_parts([c], [d], [1.0], "dot", 0)


@pytest.fixture
def setup():
    rng = np.random.default_rng(4)
    return {"a": _grads(_mats(rng, 3, 5)), "b": _grads(_mats(rng, 3, 2), ids=("x", "y"))}, _grads(
        _mats(rng, 3, 4), role="anchor"
    )


def _replace(grads, t, **changes):
    out = list(grads)
    g = out[t]
    fields = {f: getattr(g, f) for f in ("ids", "matrix", "spec", "checkpoint", "lr", "role", "preconditioned")}
    out[t] = ProjectedGrads(**{**fields, **changes})
    return out


def test_spec_mismatch_raises(setup):
    cands, anchors = setup
    cands["b"] = _replace(cands["b"], 1, spec=_spec(seed=1))
    with pytest.raises(IncompatibleArtifactError, match="seed"):
        score_projections(cands, anchors, TraceConfig())


def test_lr_mismatch_raises(setup):
    cands, anchors = setup
    cands["a"] = _replace(cands["a"], 2, lr=LRS[2] * 1.01)
    with pytest.raises(IncompatibleArtifactError, match="learning rate"):
        score_projections(cands, anchors, TraceConfig())
    cands["a"] = _replace(cands["a"], 2, lr=float(np.float32(LRS[2])))  # float32 round trip is tolerated
    score_projections(cands, anchors, TraceConfig())


def test_id_order_mismatch_raises(setup):
    cands, anchors = setup
    cands["b"] = _replace(cands["b"], 2, ids=("y", "x"))
    with pytest.raises(IncompatibleArtifactError, match="ids"):
        score_projections(cands, anchors, TraceConfig())
    with pytest.raises(IncompatibleArtifactError, match="anchor ids"):
        score_projections(setup[0], _replace(anchors, 1, ids=("s1", "s0", "s2", "s3")), TraceConfig())


def test_checkpoint_count_order_role_and_preconditioning_checks(setup):
    cands, anchors = setup
    with pytest.raises(IncompatibleArtifactError, match="checkpoints"):
        score_projections({"a": cands["a"][:2]}, anchors, TraceConfig())
    with pytest.raises(IncompatibleArtifactError, match="checkpoint 2"):
        score_projections({"a": _replace(cands["a"], 1, checkpoint=2)}, anchors, TraceConfig())
    with pytest.raises(IncompatibleArtifactError, match="role"):
        score_projections(cands, _replace(anchors, 0, role="candidate"), TraceConfig())
    with pytest.raises(IncompatibleArtifactError, match="role"):
        score_projections({"a": anchors}, anchors, TraceConfig())
    with pytest.raises(IncompatibleArtifactError, match="preconditioned"):
        pre = [_replace(cands["b"], t, preconditioned=True)[t] for t in range(3)]
        score_projections({"a": cands["a"], "b": pre}, anchors, TraceConfig())
    with pytest.raises(ConfigError, match="reserved"):
        score_projections({ANCHOR_OWNER: cands["a"]}, anchors, TraceConfig())
    with pytest.raises(ShapeMismatchError, match="anchor_groups"):
        score_projections(cands, anchors, TraceConfig(), anchor_groups=["g"] * 3)


@pytest.mark.parametrize(
    ("similarity", "groups", "precondition"),
    list(itertools.product(("cosine", "dot"), (None, ["g", "h", "g", "h"]), (False, True))),
)
def test_anchor_samples_are_scored_leave_one_out(setup, similarity, groups, precondition):
    _, anchors = setup
    rng = np.random.default_rng(9)
    # as candidates: the plain anchors, or a different ("preconditioned") version of the same samples
    cand_mats = [
        a.matrix * (rng.uniform(0.5, 2.0, a.matrix.shape).astype(np.float16) if precondition else 1) for a in anchors
    ]
    as_candidates = [_replace(anchors, t, role="candidate", matrix=m)[t] for t, m in enumerate(cand_mats)]
    own = score_anchor_samples(as_candidates, anchors, TraceConfig(similarity=similarity, chunk_rows=3), groups)
    assert own.silos == (ANCHOR_OWNER,) * 4 and own.ids == anchors[0].ids
    cands = [m.astype(np.float64).tolist() for m in cand_mats]
    mats = [a.matrix.astype(np.float64).tolist() for a in anchors]
    ref_scores, ref_parts = naive_trace_scores(cands, mats, LRS, similarity, groups, leave_one_out=True)
    np.testing.assert_allclose(own.scores, ref_scores, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(own.parts, ref_parts, rtol=1e-5, atol=1e-9)
    including_self, _ = naive_trace_scores(cands, mats, LRS, similarity, groups)
    assert not np.allclose(own.scores, including_self)


def test_leave_one_out_needs_two_anchors_per_group_and_matching_ids(setup):
    _, anchors = setup
    with pytest.raises(ShapeMismatchError, match="two anchors"):
        score_anchor_samples(anchors, anchors, TraceConfig(), anchor_groups=["g", "g", "g", "h"])
    shuffled = [_replace(anchors, t, ids=("s1", "s0", "s2", "s3"), role="candidate")[t] for t in range(3)]
    with pytest.raises(IncompatibleArtifactError, match="anchors' ids"):
        score_anchor_samples(shuffled, anchors, TraceConfig())


def test_score_anchor_samples_checks_like_score_projections(setup):
    _, anchors = setup
    config = TraceConfig(similarity="cosine", chunk_rows=2)
    as_candidates = [_replace(anchors, t, role="candidate", preconditioned=True)[t] for t in range(3)]
    np.testing.assert_array_equal(score_anchor_samples(as_candidates, anchors, config).scores.shape, (4,))
    with pytest.raises(IncompatibleArtifactError, match="learning rate"):
        score_anchor_samples(_replace(as_candidates, 0, lr=1.0), anchors, config)
