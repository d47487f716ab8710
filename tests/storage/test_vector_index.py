"""VectorIndex (search, metadata checks, persistence) and near_duplicates, against brute-force numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from storage.errors import IntegrityError, NotFoundError
from storage.vector_index import VectorIndex, near_duplicates, normalize_rows


def _rows(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_normalize_rows_keeps_zero_rows():
    out = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float16))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        normalize_rows(np.array([[np.nan, 1.0]]))


def test_search_matches_brute_force():
    matrix, queries = _rows(50), _rows(7, seed=1)
    ids = [f"s{i}" for i in range(50)]
    index = VectorIndex.build(ids, matrix * 3.0, fingerprint="fp")  # scale must not matter
    got_ids, sims = index.search(queries, k=5)
    cos = normalize_rows(queries) @ normalize_rows(matrix).T  # (7, 50)
    order = np.argsort(-cos, axis=1)[:, :5]
    assert got_ids == [[ids[j] for j in row] for row in order]
    np.testing.assert_allclose(sims, np.take_along_axis(cos, order, axis=1), atol=1e-5)
    assert sims.shape == (7, 5) and len(index) == 50 and index.dim == 16


def test_search_clips_k_and_handles_zero_queries():
    index = VectorIndex.build(["a", "b"], np.eye(2, dtype=np.float32), fingerprint="fp")
    ids, sims = index.search(np.array([[1.0, 0.0], [0.0, 0.0]]), k=10)
    assert ids[0] == ["a", "b"] and sims.shape == (2, 2)
    np.testing.assert_allclose(sims[0], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(sims[1], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        index.search(np.zeros((1, 3)), k=1)


def test_bytes_round_trip_and_refusals():
    index = VectorIndex.build(["x", "y", "z"], _rows(3), fingerprint="abc123")
    data = index.to_bytes()
    back = VectorIndex.from_bytes(data, expected_fingerprint="abc123", expected_dim=16)
    assert back.ids == ["x", "y", "z"] and back.fingerprint == "abc123"
    assert back.search(_rows(2, seed=3), k=2)[0] == index.search(_rows(2, seed=3), k=2)[0]
    with pytest.raises(IntegrityError, match="built for projection 'abc123', not 'other'"):
        VectorIndex.from_bytes(data, expected_fingerprint="other")
    with pytest.raises(IntegrityError, match="dimension 16, expected 32"):
        VectorIndex.from_bytes(data, expected_dim=32)
    with pytest.raises(IntegrityError, match="bad magic"):
        VectorIndex.from_bytes(b"garbage")
    with pytest.raises(IntegrityError):
        VectorIndex.from_bytes(data[:-40])


def test_save_load(tmp_path: Path):
    path = tmp_path / "idx" / "job.vindex"
    index = VectorIndex.build(["a", "b"], _rows(2), fingerprint="fp")
    index.save(path)
    index.save(path)  # overwrite atomically
    assert sorted(p.name for p in path.parent.iterdir()) == ["job.vindex"]
    assert VectorIndex.load(path, expected_fingerprint="fp", expected_dim=16).ids == ["a", "b"]
    with pytest.raises(NotFoundError):
        VectorIndex.load(tmp_path / "missing")


def test_near_duplicates_across_owners():
    rng = np.random.default_rng(0)
    a, b, c = _rows(300, d=32, seed=1), _rows(200, d=32, seed=2), _rows(100, d=32, seed=3)
    b[5] = a[10] * 2.0 + 1e-4 * rng.standard_normal(32)  # planted across owners
    c[7] = a[20]
    a[30] = a[31]  # within one owner: excluded by default
    groups = {
        "beta": ([f"b{i}" for i in range(200)], b),
        "alpha": ([f"a{i}" for i in range(300)], a.astype(np.float16)),
        "gamma": ([f"c{i}" for i in range(100)], c),
    }
    pairs = near_duplicates(groups, threshold=0.98, k=4)
    # both planted pairs have cosine 1 - O(1e-7) (alpha is float16), so their order is not asserted, only sorting
    assert {(p["owner_a"], p["sample_a"], p["owner_b"], p["sample_b"]) for p in pairs} == {
        ("alpha", "a20", "gamma", "c7"),
        ("alpha", "a10", "beta", "b5"),
    }
    assert len(pairs) == 2
    assert all(0.98 <= p["similarity"] <= 1.0 for p in pairs)
    assert pairs == sorted(pairs, key=lambda p: -p["similarity"])

    within = near_duplicates(groups, threshold=0.98, k=4, cross_owner_only=False)
    assert {(p["sample_a"], p["sample_b"]) for p in within} == {("a10", "b5"), ("a20", "c7"), ("a30", "a31")}


def test_near_duplicates_chunked_queries_match_brute_force(monkeypatch):
    import storage.vector_index as vi

    monkeypatch.setattr(vi, "CHUNK_ROWS", 7)
    base = _rows(40, d=8)
    other = base[::3] + 0.01 * _rows(14, d=8, seed=5)
    pairs = near_duplicates({"x": ([f"x{i}" for i in range(40)], base), "y": ([f"y{i}" for i in range(14)], other)})
    cos = normalize_rows(other) @ normalize_rows(base).T  # (14, 40)
    expected = {(f"x{j}", f"y{i}") for i, j in zip(*np.nonzero(cos >= 0.98), strict=True)}
    assert {(p["sample_a"], p["sample_b"]) for p in pairs} == expected and expected


def test_near_duplicates_edge_cases():
    assert near_duplicates({}) == []
    assert near_duplicates({"a": ([], np.zeros((0, 4))), "b": (["x"], np.ones((1, 4)))}) == []
    with pytest.raises(ValueError, match="one dimension"):
        near_duplicates({"a": (["x"], np.ones((1, 4))), "b": (["y"], np.ones((1, 5)))})
