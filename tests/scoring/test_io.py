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
    proj = make(ids=["a", "é b ☃", 'c"quoted'])
    losses = np.array([1.0, 2.0, 3.5], dtype=np.float32)
    save_projection(tmp_path / "p.safetensors", proj, losses)
    back, back_losses, signals = load_projection(tmp_path / "p.safetensors")
    assert back.ids == proj.ids and back.spec == SPEC and back.checkpoint == 2 and back.lr == 1.5e-4
    assert back.role == "candidate" and back.preconditioned and back.extra == {"model": "tiny"}
    assert np.array_equal(back.matrix, proj.matrix) and back.matrix.dtype == np.float16
    assert np.array_equal(back_losses, losses) and signals == {}
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


@pytest.mark.parametrize(
    ("sample_id", "needle"),
    [("a\x00b", r"U\+0000"), ("a\nb", r"U\+000A"), ("\ud800", "lone surrogate"), ("x" * 501, "at most 500")],
)
def test_ids_that_no_party_could_store_are_refused_on_reading(tmp_path, sample_id, needle):
    save_projection(tmp_path / "p.safetensors", make(ids=["ok", sample_id, "fine"]), None)
    with pytest.raises(DataError, match=f"row 1 .*{needle}"):
        load_projection(tmp_path / "p.safetensors")


def test_float32_input_is_stored_as_float16():
    proj = ProjectedGrads(ids=("a",), matrix=np.ones((1, 8), np.float32), spec=SPEC, checkpoint=0, lr=1.0)
    back, losses, _ = projection_from_bytes(projection_to_bytes(proj))
    assert back.matrix.dtype == np.float16 and losses is None


def test_overflowing_values_are_refused_on_write():
    proj = ProjectedGrads(ids=("a",), matrix=np.full((1, 8), 1e6, np.float32), spec=SPEC, checkpoint=0, lr=1.0)
    with pytest.raises(DataError, match="NaN or Inf"):
        projection_to_bytes(proj)


def test_signals_round_trip_and_files_without_them_still_load(tmp_path):
    proj = make(n=3)
    losses = np.array([1.0, 2.0, 3.5], dtype=np.float32)
    signals = {"loss_uncond": np.array([2.5, 2.0, 4.0]), "n_tokens": np.array([7, 1, 30])}
    save_projection(tmp_path / "p.safetensors", proj, losses, signals)
    for back in (
        load_projection(tmp_path / "p.safetensors"),
        projection_from_bytes(projection_to_bytes(proj, losses, signals)),
    ):
        assert back.proj.ids == proj.ids and np.array_equal(back.losses, losses)
        assert sorted(back.signals) == ["loss_uncond", "n_tokens"]
        for name, values in signals.items():
            assert back.signals[name].dtype == np.float32 and np.array_equal(back.signals[name], values)
    only_uncond = projection_from_bytes(projection_to_bytes(proj, losses, {"loss_uncond": signals["loss_uncond"]}))
    assert list(only_uncond.signals) == ["loss_uncond"]
    plain = projection_from_bytes(projection_to_bytes(proj))  # a file from before the signals: nothing extra
    assert plain.losses is None and plain.signals == {}
    assert projection_to_bytes(proj, losses, signals) == projection_to_bytes(
        proj, losses, dict(reversed(signals.items()))
    )


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("loss_uncond", [1.0, np.nan, 2.0], "'loss_uncond' holds NaN or Inf"),
        ("loss_uncond", [1.0, np.inf, 2.0], "'loss_uncond' holds NaN or Inf"),
        ("loss_uncond", [1.0, 0.0, 2.0], "'loss_uncond' must be positive"),
        ("loss_uncond", [1.0, 2.0], "'loss_uncond' must be 3 float32 values"),
        ("loss_uncond", [[1.0, 2.0, 3.0]], "'loss_uncond' must be 3 float32 values"),
        ("n_tokens", [3, 0, 4], "'n_tokens' must be positive"),
        ("n_tokens", [3, 2.5, 4], "'n_tokens' must be whole numbers"),
        ("n_tokens", [3, 2, 4, 5], "'n_tokens' must be 3 float32 values"),
        ("perplexity", [1.0, 2.0, 3.0], "unknown signal 'perplexity'"),
    ],
)
def test_bad_signals_are_refused_on_write_and_on_read(name, values, message):
    proj = make(n=3)
    with pytest.raises(DataError, match=message):
        projection_to_bytes(proj, None, {name: np.asarray(values)})
    if name in ("loss_uncond", "n_tokens"):  # a file written by hand, as a hostile client would
        data = _bytes(
            matrix=np.zeros((3, 8), np.float16), ids=["a", "b", "c"], **{name: np.asarray(values, np.float32)}
        )
        with pytest.raises(DataError, match=f"upload: {message}"):
            projection_from_bytes(data, where="upload")


def test_a_signal_of_another_dtype_is_refused():
    data = _bytes(matrix=np.zeros((2, 8), np.float16), n_tokens=np.array([3, 4], np.int32))
    with pytest.raises(DataError, match="'n_tokens' must be 2 float32 values, got int32"):
        projection_from_bytes(data)


def _bytes(matrix=None, ids=None, **overrides):
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
    extra = {k: v for k, v in overrides.items() if isinstance(v, np.ndarray)}  # tensors beside matrix and ids
    meta.update({k: v for k, v in overrides.items() if k not in extra})
    meta = {k: v for k, v in meta.items() if v is not None}
    return save({"matrix": matrix, "ids": np.frombuffer(ids, np.uint8).copy(), **extra}, metadata=meta)


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


def test_load_projection_agrees_with_projection_from_bytes(tmp_path):
    proj = make(n=5)
    losses = np.arange(5, dtype=np.float32)
    save_projection(tmp_path / "p.safetensors", proj, losses)
    from_file, file_losses, _ = load_projection(tmp_path / "p.safetensors")
    from_bytes, bytes_losses, _ = projection_from_bytes((tmp_path / "p.safetensors").read_bytes())
    assert np.array_equal(from_file.matrix, from_bytes.matrix) and np.array_equal(file_losses, bytes_losses)
    assert {k: v for k, v in vars(from_file).items() if k != "matrix"} == {
        k: v for k, v in vars(from_bytes).items() if k != "matrix"
    }


def test_equal_projections_give_equal_bytes_that_any_reader_loads():
    proj = make(n=3, ids=["a", "bb", "ccc"])  # odd-length ids: the matrix must still be aligned
    data = projection_to_bytes(proj, np.ones(3, np.float32))
    assert all(projection_to_bytes(proj, np.ones(3, np.float32)) == data for _ in range(5))
    import torch
    from safetensors.torch import load as torch_load

    assert torch.equal(torch_load(data)["matrix"], torch.from_numpy(proj.matrix))


def test_empty_projection_round_trips():
    proj = ProjectedGrads(ids=(), matrix=np.zeros((0, 8), np.float16), spec=SPEC, checkpoint=0, lr=1.0)
    back = projection_from_bytes(projection_to_bytes(proj)).proj
    assert back.ids == () and back.matrix.shape == (0, 8)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "not a valid safetensors"),
        (_bytes(matrix=np.zeros((2, 8), np.float32)), "float16"),
        (_bytes(role="judge"), "role"),
    ],
)
def test_load_projection_errors_name_the_file(tmp_path, data, message):
    path = tmp_path / "shard 1.safetensors"
    path.write_bytes(data)
    with pytest.raises(DataError, match=f"^{tmp_path}/shard 1\\.safetensors: .*{message}"):
        load_projection(path)


def test_nan_in_the_last_row_chunk_is_found(tmp_path):
    matrix = np.zeros((4096 + 3, 8), np.float16)
    matrix[-1, -1] = np.nan
    ids = [f"s{i}" for i in range(len(matrix))]
    (tmp_path / "p.safetensors").write_bytes(_bytes(matrix=matrix, ids=ids))
    with pytest.raises(DataError, match=r"p\.safetensors: 'matrix' contains NaN or Inf"):
        load_projection(tmp_path / "p.safetensors")
    with pytest.raises(DataError, match="upload: 'matrix' contains NaN or Inf"):
        projection_from_bytes(_bytes(matrix=matrix, ids=ids), where="upload")


def test_a_dtype_numpy_lacks_is_a_data_error(tmp_path):
    header = b'{"matrix":{"dtype":"BF16","shape":[1,8],"data_offsets":[0,16]}}'
    data = len(header).to_bytes(8, "little") + header + bytes(16)
    (tmp_path / "p.safetensors").write_bytes(data)
    with pytest.raises(DataError, match="not a valid safetensors"):
        projection_from_bytes(data)
    with pytest.raises(DataError, match="not a valid safetensors"):
        load_projection(tmp_path / "p.safetensors")
