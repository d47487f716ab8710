"""Projection files: safetensors holding sample ids, an fp16 (N, k) matrix, optional per-sample losses, and the
projection spec plus provenance in the metadata. numpy only, so the coordinator can validate uploads without torch.

Layout of a file (format ``clues.projection/1``):

- tensor ``matrix``: (N, k) float16 projections.
- tensor ``ids``: uint8, the UTF-8 bytes of a JSON list of N sample ids (any characters allowed).
- tensor ``losses`` (optional): (N,) float32 mean response loss of each sample (feeds the perplexity baseline).
- metadata: ``format``, ``spec`` (ProjectionSpec JSON), ``checkpoint``, ``lr``, ``role``, ``preconditioned``,
  ``extra`` (JSON).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from scoring.config import ProjectionSpec
from scoring.errors import ConfigError, DataError, ScoringError
from scoring.types import ProjectedGrads

FORMAT = "clues.projection/1"


def projection_to_bytes(proj: ProjectedGrads, losses: np.ndarray | None = None) -> bytes:
    """Serialise projections (matrix stored as float16) to safetensors bytes."""
    with np.errstate(over="ignore"):  # values beyond float16 become Inf and are refused just below
        matrix = np.ascontiguousarray(proj.matrix, dtype=np.float16)
    if not np.isfinite(matrix).all():
        raise DataError("projection matrix has NaN or Inf values (after conversion to float16)")
    tensors: dict[str, np.ndarray] = {
        "matrix": matrix,
        "ids": np.frombuffer(json.dumps(list(proj.ids)).encode(), dtype=np.uint8).copy(),
    }
    if losses is not None:
        losses = np.asarray(losses, dtype=np.float32)
        if losses.shape != (len(proj.ids),):
            raise DataError(f"losses must have shape ({len(proj.ids)},), got {losses.shape}")
        tensors["losses"] = losses
    metadata = {
        "format": FORMAT,
        "spec": proj.spec.to_json(),
        "checkpoint": str(proj.checkpoint),
        "lr": repr(float(proj.lr)),
        "role": proj.role,
        "preconditioned": "true" if proj.preconditioned else "false",
        "extra": json.dumps(proj.extra, sort_keys=True),
    }
    return save(tensors, metadata=metadata)


def _meta(metadata: dict[str, str], key: str, where: str) -> str:
    if key not in metadata:
        raise DataError(f"{where}: metadata field '{key}' is missing")
    return metadata[key]


def _parse_metadata(metadata: dict[str, str], where: str) -> dict[str, Any]:
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
    except (ConfigError, ValueError) as exc:
        raise DataError(f"{where}: bad metadata ({exc})") from exc
    if not np.isfinite(out["lr"]):
        raise DataError(f"{where}: metadata field 'lr' must be finite")
    return out


def projection_from_bytes(data: bytes, where: str = "projection") -> tuple[ProjectedGrads, np.ndarray | None]:
    """Parse and validate safetensors bytes; return the projections and the optional losses.

    Raises:
        DataError: on any malformed content (names ``where`` and the field), NaN/Inf, or inconsistent shapes.
    """
    try:
        tensors = load(data)
        metadata = _read_metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise DataError(f"{where}: not a valid safetensors file ({exc})") from exc
    meta = _parse_metadata(metadata, where)
    for name in ("matrix", "ids"):
        if name not in tensors:
            raise DataError(f"{where}: tensor '{name}' is missing")
    matrix, raw_ids = tensors["matrix"], tensors["ids"]
    if matrix.dtype != np.float16 or matrix.ndim != 2:
        raise DataError(f"{where}: 'matrix' must be 2-D float16, got {matrix.dtype} with shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise DataError(f"{where}: 'matrix' contains NaN or Inf")
    try:
        ids = json.loads(raw_ids.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: 'ids' is not a UTF-8 JSON list ({exc})") from exc
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise DataError(f"{where}: 'ids' must be a list of non-empty strings")
    losses = tensors.get("losses")
    if losses is not None and (losses.shape != (len(ids),) or not np.isfinite(losses).all()):
        raise DataError(f"{where}: 'losses' must be {len(ids)} finite values")
    try:
        proj = ProjectedGrads(ids=tuple(ids), matrix=matrix, **meta)
    except ScoringError as exc:
        raise DataError(f"{where}: {exc}") from exc
    return proj, losses


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (header = 8-byte little-endian length + JSON)."""
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("bad header length")
    header = json.loads(data[8 : 8 + n])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("bad __metadata__")
    return metadata


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_projection(path: Path | str, proj: ProjectedGrads, losses: np.ndarray | None = None) -> None:
    """Write a projection file atomically."""
    atomic_write_bytes(path, projection_to_bytes(proj, losses))


def load_projection(path: Path | str) -> tuple[ProjectedGrads, np.ndarray | None]:
    """Read and validate a projection file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such projection file")
    return projection_from_bytes(path.read_bytes(), where=str(path))
