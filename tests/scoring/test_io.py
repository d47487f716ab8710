"""Projection files: round trip, validation of every field, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save

from scoring.config import ProjectionSpec
from scoring.errors import DataError
from scoring.io import load_projection, projection_from_bytes, projection_to_bytes, save_projection
from scoring.types import ProjectedGrads

SPEC = ProjectionSpec(kind="sjlt", dim=8, seed=1, param_hash="abc", param_count=100, nnz=4)


def make(n=3, ids=None):
    rng = np.random.default_rng(0)
    return ProjectedGrads(
        ids=tuple(ids or [f"s{i}" for i in range(n)]),
        matrix=rng.normal(size=(n, 8)).astype(np.float16),
        spec=SPEC,
        checkpoint=2,
        lr=1.5e-4,
        role="candidate",
        preconditioned=True,
        extra={"model": "tiny"},
    )


def test_round_trip_keeps_everything(tmp_path):
    proj = make(ids=["a", "é\nb", 'c"quoted'])
    losses = np.array([1.0, 2.0, 3.5], dtype=np.float32)
    save_projection(tmp_path / "p.safetensors", proj, losses)
    back, back_losses = load_projection(tmp_path / "p.safetensors")
    assert back.ids == proj.ids and back.spec == SPEC and back.checkpoint == 2 and back.lr == 1.5e-4
    assert back.role == "candidate" and back.preconditioned and back.extra == {"model": "tiny"}
    assert np.array_equal(back.matrix, proj.matrix) and back.matrix.dtype == np.float16
    assert np.array_equal(back_losses, losses)
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_float32_input_is_stored_as_float16():
    proj = ProjectedGrads(ids=("a",), matrix=np.ones((1, 8), np.float32), spec=SPEC, checkpoint=0, lr=1.0)
    back, losses = projection_from_bytes(projection_to_bytes(proj))
    assert back.matrix.dtype == np.float16 and losses is None


def test_overflowing_values_are_refused_on_write():
    proj = ProjectedGrads(ids=("a",), matrix=np.full((1, 8), 1e6, np.float32), spec=SPEC, checkpoint=0, lr=1.0)
    with pytest.raises(DataError, match="NaN or Inf"):
        projection_to_bytes(proj)


def _bytes(matrix=None, ids=None, **meta_overrides):
    matrix = np.zeros((2, 8), np.float16) if matrix is None else matrix
    ids = json.dumps(["a", "b"] if ids is None else ids).encode()
    meta = {
        "format": "clues.projection/1",
        "spec": SPEC.to_json(),
        "checkpoint": "0",
        "lr": "1.0",
        "role": "candidate",
        "preconditioned": "false",
        "extra": "{}",
    }
    meta.update(meta_overrides)
    meta = {k: v for k, v in meta.items() if v is not None}
    return save({"matrix": matrix, "ids": np.frombuffer(ids, np.uint8).copy()}, metadata=meta)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not a safetensors file", "not a valid safetensors"),
        (_bytes(format="other/1"), "format"),
        (_bytes(spec=None), "'spec' is missing"),
        (_bytes(spec='{"kind": "nope"}'), "bad metadata"),
        (_bytes(lr="nan"), "'lr' must be finite"),
        (_bytes(matrix=np.zeros((2, 8), np.float32)), "float16"),
        (_bytes(matrix=np.zeros((2, 4), np.float16)), "spec.dim"),
        (_bytes(matrix=np.full((2, 8), np.inf, np.float16)), "NaN or Inf"),
        (_bytes(ids=["a"]), "len\\(ids\\)"),
        (_bytes(ids=["a", "a"]), "unique"),
        (_bytes(ids=["a", 3]), "non-empty strings"),
        (_bytes(role="judge"), "role"),
    ],
)
def test_malformed_files_are_refused_with_the_field_named(data, message):
    with pytest.raises(DataError, match=message):
        projection_from_bytes(data, where="upload")


def test_missing_file():
    with pytest.raises(DataError, match="no such projection file"):
        load_projection("/nonexistent/p.safetensors")
