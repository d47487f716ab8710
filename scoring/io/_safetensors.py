"""What the two wire formats share: safetensors headers read and written without torch, finiteness checks, the
constants of both formats."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import SafetensorError

from scoring.errors import DataError

FORMAT = "clues.projection/1"
CHECKPOINT_FORMAT = "clues.checkpoint/1"
FINITE_CHUNK_ROWS = 4096
"""Rows per chunk when checking finiteness, so no full-size boolean temporary is made."""
F16_SCRATCH_ELEMENTS = 1 << 19
"""Elements per block of the float16 finiteness check (a 1 MiB uint16 scratch buffer)."""

# KeyError/TypeError: a dtype numpy lacks; RecursionError: a header's JSON nested too deeply
_READ_ERRORS = (SafetensorError, ValueError, KeyError, TypeError, RecursionError)
_FLOAT_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}  # and BF16 (as float32)
_DTYPE_CODES = {dtype: code for code, dtype in _FLOAT_DTYPES.items()}
_GROUPS = ("adapter", "exp_avg", "exp_avg_sq")
_ENTRY_FIELDS = ("index", "step", "lr", "lr_last", "adam")
_UPDATE_FIELDS = ("round", "num_samples", "score_mass", "train_loss")
MAX_COUNT = 2**31 - 1
"""The largest sample count an update may claim (a 32-bit database integer)."""

Layout = tuple[tuple[str, tuple[int, ...]], ...]
RawTensor = tuple[str, tuple[int, ...], bytes | memoryview]
"""(safetensors dtype code, shape, little-endian data as bytes)."""


# ------------------------------------------------------------------------------------------------------------
# Shared helpers


def _all_finite(array: np.ndarray, chunk_rows: int = FINITE_CHUNK_ROWS) -> bool:
    if array.ndim == 0:
        return bool(np.isfinite(array))
    if array.dtype == np.float16:
        return _all_finite_f16(array)
    return all(np.isfinite(array[i : i + chunk_rows]).all() for i in range(0, array.shape[0], chunk_rows))


def _all_finite_f16(array: np.ndarray) -> bool:
    """`_all_finite` of a float16 array from its bits: NaN/Inf are exactly the values whose 5 exponent bits are all
    set, i.e. ``bits & 0x7FFF >= 0x7C00``. Integer ops run ~8x faster than ``np.isfinite`` on float16 (which
    numpy computes element by element), and a ~1 MiB scratch block keeps the temporaries small."""
    bits = array.view(np.uint16)
    rows = max(1, F16_SCRATCH_ELEMENTS // max(1, math.prod(array.shape[1:])))
    scratch = np.empty((min(rows, array.shape[0]), *array.shape[1:]), dtype=np.uint16)
    for i in range(0, array.shape[0], rows):
        block = scratch[: min(rows, array.shape[0] - i)]
        np.bitwise_and(bits[i : i + rows], 0x7FFF, out=block)
        if block.size and block.max() >= 0x7C00:
            return False
    return True


def _meta(metadata: Mapping[str, str], key: str, where: str) -> str:
    if key not in metadata:
        raise DataError(f"{where}: metadata field '{key}' is missing")
    return metadata[key]


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


def _write_raw(tensors: Mapping[str, RawTensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes with the header in a fixed order (the Rust writer orders metadata at random, and the
    coordinator tells a re-upload from a conflict by its bytes): 8-byte little-endian length, JSON header padded
    to 8 bytes, then the data, widest dtype first so that every tensor is aligned to its item size."""

    def order(name: str) -> tuple[int, str]:
        _, shape, data = tensors[name]
        return -(len(data) // math.prod(shape) if math.prod(shape) else 8), name

    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors, key=order):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *chunks])
