"""The silo-local scoring reference as one safetensors file (format ``clues.reference/1``), numpy only:

- tensors ``direction.<t>``: (G, k) float32, the anchor directions of checkpoint t;
- metadata: ``format`` and ``reference`` (JSON: ``groups``, ``lrs``, ``similarity``, ``score``, ``calibration``
  (``signals``, ``centres``, ``scales``, ``fusion``, or null), ``threshold``, ``bins`` with ``"-inf"``/``"inf"``
  for the open outer edges).

A reader gets the directions back as float64 of the stored float32 values; a coordinator that scores the same job
from the same file gets the same numbers as its silos (`scoring.local_scoring`).
"""

from __future__ import annotations

import json
import math

import numpy as np
from safetensors import SafetensorError, deserialize

from scoring.calibration import AnchorCalibration
from scoring.errors import ConfigError, DataError, ShapeMismatchError
from scoring.io._safetensors import RawTensor, _read_metadata, _write_raw
from scoring.local_scoring import ScoringReference

REFERENCE_FORMAT = "clues.reference/1"


def _edge(value: float) -> float | str:
    return value if math.isfinite(value) else ("-inf" if value < 0 else "inf")


def reference_to_bytes(reference: ScoringReference) -> bytes:
    """The reference as ``clues.reference/1`` bytes (byte-stable: the same reference gives the same bytes)."""
    cal = reference.calibration
    meta = {
        "groups": list(reference.groups),
        "lrs": list(reference.lrs),
        "similarity": reference.similarity,
        "score": reference.score,
        "calibration": None
        if cal is None
        else {
            "signals": list(cal.signals),
            "centres": list(cal.centres),
            "scales": list(cal.scales),
            "fusion": cal.fusion,
        },
        "threshold": reference.threshold,
        "bins": [_edge(b) for b in reference.bins],
    }
    tensors: dict[str, RawTensor] = {}
    for t, d in enumerate(reference.directions):
        array = np.ascontiguousarray(d, dtype="<f4")
        tensors[f"direction.{t}"] = ("F32", array.shape, array.tobytes())
    return _write_raw(tensors, {"format": REFERENCE_FORMAT, "reference": json.dumps(meta, sort_keys=True)})


def reference_from_bytes(data: bytes, where: str = "reference") -> ScoringReference:
    """Read ``clues.reference/1`` bytes.

    Raises:
        DataError: not such a file, or a malformed field (the message names ``where``).
    """
    try:
        metadata = _read_metadata(data)
        if metadata.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, not {REFERENCE_FORMAT!r}")
        meta = json.loads(metadata["reference"])
        raw = {name: t for name, t in deserialize(data)}
        directions = []
        for t in range(len(meta["lrs"])):
            tensor = raw[f"direction.{t}"]
            if tensor["dtype"] != "F32" or len(tensor["shape"]) != 2:
                raise ValueError(f"direction.{t}: need a 2-D float32 tensor")
            array = np.frombuffer(bytes(tensor["data"]), dtype="<f4").reshape(tensor["shape"])
            directions.append(array.astype(np.float64))
        cal = meta["calibration"]
        calibration = None
        if cal is not None:
            calibration = AnchorCalibration(
                tuple(str(s) for s in cal["signals"]),
                tuple(float(c) for c in cal["centres"]),
                tuple(float(s) for s in cal["scales"]),
                str(cal["fusion"]),
            )
        return ScoringReference(
            directions=tuple(directions),
            groups=tuple(str(g) for g in meta["groups"]),
            lrs=tuple(float(lr) for lr in meta["lrs"]),
            similarity=str(meta["similarity"]),
            score=str(meta["score"]),
            calibration=calibration,
            threshold=float(meta["threshold"]),
            bins=tuple(float(b) for b in meta["bins"]),
        )
    except (SafetensorError, ValueError, KeyError, TypeError, ConfigError, ShapeMismatchError) as exc:
        raise DataError(f"{where}: not a readable {REFERENCE_FORMAT} file ({type(exc).__name__}: {exc})") from exc
