"""Projection files (format ``clues.projection/1``): see `scoring.io`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load

from scoring.config import SIGNALS, ProjectionSpec
from scoring.data import id_problem
from scoring.errors import ConfigError, DataError, ScoringError
from scoring.io._safetensors import (
    _READ_ERRORS,
    FORMAT,
    RawTensor,
    _all_finite,
    _meta,
    _read_metadata,
    _write_raw,
)
from scoring.types import ProjectedGrads
from wire.files import atomic_write_bytes

# ------------------------------------------------------------------------------------------------------------
# Projection files


class ProjectionFile(NamedTuple):
    """A parsed, validated projection file.

    Attributes:
        proj: the projections.
        losses: (N,) float32 mean response loss ℓ(y|x) of each sample, or None when the file has none.
        signals: signal name (`scoring.config.SIGNALS`) -> (N,) float32 values, for those the file carries.
    """

    proj: ProjectedGrads
    losses: np.ndarray | None
    signals: dict[str, np.ndarray]


def check_signal(name: str, values: np.ndarray, n: int, where: str = "projection") -> np.ndarray:
    """Refuse a per-sample signal that is not (n,) finite float32 values of its kind: ``loss_uncond`` positive,
    ``n_tokens`` positive integers. Returns ``values``.

    Raises:
        DataError: naming ``where`` and the field.
    """
    if name not in SIGNALS:
        raise DataError(f"{where}: unknown signal '{name}'; the signals are {list(SIGNALS)}")
    if values.dtype != np.float32 or values.shape != (n,):
        raise DataError(f"{where}: '{name}' must be {n} float32 values, got {values.dtype} with shape {values.shape}")
    if not np.isfinite(values).all():
        raise DataError(f"{where}: '{name}' holds NaN or Inf")
    if not (values > 0).all():
        raise DataError(f"{where}: '{name}' must be positive")
    if name == "n_tokens" and not (values == np.round(values)).all():
        raise DataError(f"{where}: 'n_tokens' must be whole numbers of tokens")
    return values


def projection_to_bytes(
    proj: ProjectedGrads, losses: np.ndarray | None = None, signals: Mapping[str, np.ndarray] | None = None
) -> bytes:
    """Serialise projections (matrix stored as float16) to safetensors bytes; equal inputs give equal bytes.

    Args:
        proj: the projections.
        losses: (N,) mean response losses ℓ(y|x), or None.
        signals: per-sample signals by name (`scoring.config.SIGNALS`), each (N,), stored as float32.

    Raises:
        DataError: NaN/Inf projections, or losses or signals of the wrong shape or kind (see `check_signal`).
    """
    with np.errstate(over="ignore"):  # values beyond float16 become Inf and are refused just below
        matrix = np.ascontiguousarray(proj.matrix, dtype="<f2")
    if not _all_finite(matrix):
        raise DataError("projection matrix has NaN or Inf values (after conversion to float16)")
    ids = json.dumps(list(proj.ids)).encode()
    tensors: dict[str, RawTensor] = {
        "matrix": ("F16", matrix.shape, memoryview(matrix.reshape(-1).view(np.uint8))),  # no copy
        "ids": ("U8", (len(ids),), ids),
    }
    if losses is not None:
        losses = np.asarray(losses, dtype="<f4")
        if losses.shape != (len(proj.ids),):
            raise DataError(f"losses must have shape ({len(proj.ids)},), got {losses.shape}")
        tensors["losses"] = ("F32", losses.shape, losses.tobytes())
    for name, values in sorted((signals or {}).items()):
        with np.errstate(over="ignore", invalid="ignore"):
            array = check_signal(name, np.asarray(values, dtype="<f4"), len(proj.ids))
        tensors[name] = ("F32", array.shape, array.tobytes())
    metadata = {
        "format": FORMAT,
        "spec": proj.spec.to_json(),
        "checkpoint": str(proj.checkpoint),
        "lr": repr(float(proj.lr)),
        "role": proj.role,
        "preconditioned": "true" if proj.preconditioned else "false",
        "extra": json.dumps(proj.extra, sort_keys=True),
    }
    return _write_raw(tensors, metadata)


def _parse_metadata(metadata: Mapping[str, str], where: str) -> dict[str, Any]:
    if _meta(metadata, "format", where) != FORMAT:
        raise DataError(f"{where}: format must be {FORMAT!r}, got {metadata['format']!r}")
    try:
        spec = ProjectionSpec.from_json(_meta(metadata, "spec", where))
        out = {
            "spec": spec,
            "checkpoint": int(_meta(metadata, "checkpoint", where)),
            "lr": float(_meta(metadata, "lr", where)),
            "role": _meta(metadata, "role", where),
            "preconditioned": _meta(metadata, "preconditioned", where) == "true",
            "extra": json.loads(metadata.get("extra", "{}")),
        }
    except (ConfigError, ValueError, RecursionError) as exc:
        raise DataError(f"{where}: bad metadata ({exc})") from exc
    if not np.isfinite(out["lr"]):
        raise DataError(f"{where}: metadata field 'lr' must be finite")
    return out


def _validate(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], where: str, check_finite: bool = True
) -> ProjectionFile:
    """Check a parsed projection file field by field.

    ``check_finite=False`` skips the NaN/Inf scan of the matrix only (see `map_projection`)."""
    meta = _parse_metadata(metadata, where)
    for name in ("matrix", "ids"):
        if name not in tensors:
            raise DataError(f"{where}: tensor '{name}' is missing")
    matrix, raw_ids = tensors["matrix"], tensors["ids"]
    if matrix.dtype != np.float16 or matrix.ndim != 2:
        raise DataError(f"{where}: 'matrix' must be 2-D float16, got {matrix.dtype} with shape {matrix.shape}")
    if check_finite and not _all_finite(matrix):
        raise DataError(f"{where}: 'matrix' contains NaN or Inf")
    try:
        ids = json.loads(raw_ids.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{where}: 'ids' is not a UTF-8 JSON list ({type(exc).__name__}: {exc})") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise DataError(f"{where}: 'ids' must be a list of non-empty strings")
    for row, sample_id in enumerate(ids):
        if problem := id_problem(sample_id):
            raise DataError(f"{where}: id of row {row} ({sample_id[:40]!r}) {problem}")
    losses = tensors.get("losses")
    if losses is not None and (losses.shape != (len(ids),) or not np.isfinite(losses).all()):
        raise DataError(f"{where}: 'losses' must be {len(ids)} finite values")
    signals = {name: check_signal(name, tensors[name], len(ids), where) for name in SIGNALS if name in tensors}
    try:
        proj = ProjectedGrads(ids=tuple(ids), matrix=matrix, **meta)
    except ScoringError as exc:
        raise DataError(f"{where}: {exc}") from exc
    return ProjectionFile(proj, losses, signals)


def projection_from_bytes(data: bytes, where: str = "projection") -> ProjectionFile:
    """Parse and validate safetensors bytes.

    Raises:
        DataError: on any malformed content (names ``where`` and the field), NaN/Inf, or inconsistent shapes.
    """
    try:
        tensors = load(data)
        metadata = _read_metadata(data)
    except _READ_ERRORS as exc:
        raise DataError(f"{where}: not a valid safetensors file ({exc})") from exc
    return _validate(tensors, metadata, where)


def save_projection(
    path: Path | str,
    proj: ProjectedGrads,
    losses: np.ndarray | None = None,
    signals: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write a projection file atomically (arguments as `projection_to_bytes`)."""
    atomic_write_bytes(path, projection_to_bytes(proj, losses, signals))


def load_projection(path: Path | str) -> ProjectionFile:
    """Read and validate a projection file. The float16 matrix is read straight into its array (one copy, and no
    mapping of the file's data pages, so memory grows by the matrix alone).

    Raises:
        DataError: as `projection_from_bytes`, naming the file.
    """
    path = Path(path)
    return _read_projection_file(path, str(path), mapped=False, check_finite=True)


def map_projection(path: Path | str, where: str | None = None, check_finite: bool = False) -> ProjectionFile:
    """Open a projection file whose content was validated before (a stored shard): every field is checked as in
    `load_projection`, but the float16 matrix is a read-only `np.memmap` of the file (no copy, nothing read until
    it is used) and, unless ``check_finite``, its values are not scanned for NaN/Inf. Scoring that feeds it to
    `scoring.traces.trace_parts` still refuses non-finite rows (its float64 re-check of non-finite results).

    The file must not change while the result is in use (blob store files never do).

    Raises:
        DataError: as `load_projection`, naming ``where`` (default: the path).
    """
    path = Path(path)
    return _read_projection_file(path, where or str(path), mapped=True, check_finite=check_finite)


def _read_projection_file(path: Path, where: str, *, mapped: bool, check_finite: bool) -> ProjectionFile:
    if not path.is_file():
        raise DataError(f"{where}: no such projection file")
    try:
        with safe_open(str(path), framework="np") as f:  # parses and checks the header (offsets, sizes, dtypes)
            metadata = f.metadata() or {}
            names = list(f.keys())
            matrix = _f16_matrix(path, mapped) if "matrix" in names else None
            tensors = {name: f.get_tensor(name) for name in names if name != "matrix" or matrix is None}
        if matrix is not None:
            tensors["matrix"] = matrix
    except (*_READ_ERRORS, OSError) as exc:
        raise DataError(f"{where}: not a valid safetensors file ({exc})") from exc
    return _validate(tensors, metadata, where, check_finite=check_finite)


def _f16_matrix(path: Path, mapped: bool) -> np.ndarray | None:
    """The ``matrix`` tensor of a safetensors file whose header `safe_open` accepted, read into a new array or
    memory-mapped; None when it is not float16 (the caller reads it the generic way, and validation refuses it)."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(size))["matrix"]
        if info["dtype"] != "F16":
            return None
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        dtype = np.dtype("<f2")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError("matrix: data_offsets do not match its shape")
        offset = 8 + size + begin
        if mapped and end > begin:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        array = np.empty(shape, dtype=dtype)
        fh.seek(offset)
        if fh.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - begin:
            raise ValueError("matrix: file is truncated")
        return array
