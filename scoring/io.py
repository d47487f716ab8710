"""The wire formats, numpy only: the coordinator validates uploads with them without loading torch.

**Projection file** (format ``clues.projection/1``; `save_projection`, `load_projection`, `projection_from_bytes`,
`map_projection` for stored files validated before; each reader returns a `ProjectionFile`):

- tensor ``matrix``: (N, k) float16 projections.
- tensor ``ids``: uint8, the UTF-8 bytes of a JSON list of N sample ids (any characters allowed).
- tensor ``losses`` (optional): (N,) float32 mean response loss ℓ(y|x) of each sample (the perplexity signal).
- tensors ``loss_uncond`` and ``n_tokens`` (optional; the `scoring.config.SIGNALS` a job asks for, in the file of
  its signal checkpoint): (N,) float32 ℓ(y|∅) (positive) and the number of response tokens (positive integers), see
  `scoring.signals`.
- metadata: ``format``, ``spec`` (ProjectionSpec JSON), ``checkpoint``, ``lr``, ``role``, ``preconditioned``,
  ``extra`` (JSON).

**Checkpoint bundle** (format ``clues.checkpoint/1``; `checkpoint_to_bytes`, `checkpoint_from_bytes`,
`write_checkpoint_dir`): one checkpoint directory of a warmup run (see `scoring.training`) as one file.

- tensors ``adapter.<name>``: the peft adapter weights, names as peft saved them, in their saved dtype.
- tensors ``exp_avg.<name>``, ``exp_avg_sq.<name>``: the Adam moments (absent for an untrained run).
- metadata: ``format``, ``layout`` (JSON ``[[name, shape], ...]`` in `lora_layout` order, hashing to the projection
  spec's ``param_hash``), ``adapter_config`` (peft's JSON), ``checkpoint`` (the ``checkpoint.json`` entry), and
  optionally ``update`` (JSON: a silo's federated-round update: ``round``, ``num_samples``, ``score_mass``,
  ``train_loss``).

The same format carries the adapters of federated training: the global adapter of each round and each silo's
update are bundles without moments (a silo's Adam moments never leave it); `bundle_to_bytes` writes one from arrays
and `read_bundle` checks one against a layout hash instead of a projection spec.

numpy has no bfloat16, so the bundle codec reads tensors as raw bytes (`safetensors.deserialize`) and writes the
safetensors layout itself: a bfloat16 adapter (a warmup run in bfloat16) is held as float32 arrays of equal value and
written back as bfloat16.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import SafetensorError, deserialize, safe_open
from safetensors.numpy import load

from scoring.config import SIGNALS, AdamState, ProjectionSpec, parameter_layout_hash
from scoring.data import id_problem
from scoring.errors import ConfigError, DataError, ScoringError
from scoring.types import ProjectedGrads

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


# ------------------------------------------------------------------------------------------------------------
# Checkpoint bundles


@dataclass(frozen=True)
class CheckpointBundle:
    """One validated checkpoint of a warmup run (see the module docstring for the wire format).

    Attributes:
        layout: ordered (canonical name, shape) of the LoRA parameters; hashes to the spec's ``param_hash``.
        adapter: name -> weight array, names as peft saves them (bfloat16 weights as float32 of equal value).
        exp_avg: name -> Adam first moment; empty for an untrained run.
        exp_avg_sq: name -> Adam second moment; empty for an untrained run.
        adapter_config: peft's ``adapter_config.json``.
        entry: the checkpoint's ``checkpoint.json`` entry (index, step, lr, lr_last, adam).
        dtypes: bundle tensor name (``adapter.<name>``, ...) -> safetensors dtype code (``F32``, ``BF16``, ...);
            a tensor not listed is written in its array's dtype.
        update: a silo's round update (``round``, ``num_samples``, ``score_mass``, ``train_loss``); None otherwise.
    """

    layout: Layout
    adapter: dict[str, np.ndarray]
    exp_avg: dict[str, np.ndarray]
    exp_avg_sq: dict[str, np.ndarray]
    adapter_config: dict[str, Any]
    entry: dict[str, Any]
    dtypes: dict[str, str] = field(default_factory=dict)
    update: dict[str, Any] | None = None

    @property
    def index(self) -> int:
        return int(self.entry["index"])

    @property
    def has_moments(self) -> bool:
        return bool(self.exp_avg)

    def run_entry(self, dir_name: str) -> dict[str, Any]:
        """The entry of this checkpoint in ``checkpoint.json`` and ``run.json`` when written to ``dir_name``."""
        return {**self.entry, "dir": dir_name, "has_moments": self.has_moments}


def _read_raw(data: bytes, where: str) -> tuple[dict[str, RawTensor], dict[str, str]]:
    try:
        tensors = {name: (t["dtype"], tuple(t["shape"]), t["data"]) for name, t in deserialize(data)}
        metadata = _read_metadata(data)
    except _READ_ERRORS as exc:
        raise DataError(f"{where}: not a valid safetensors file ({exc})") from exc
    return tensors, metadata


def _to_array(raw: RawTensor, name: str, where: str) -> np.ndarray:
    dtype, shape, data = raw
    if dtype == "BF16":  # the top half of a float32
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype not in _FLOAT_DTYPES:
        raise DataError(f"{where}: tensor '{name}' has dtype {dtype}; weights and moments must be floating point")
    return np.frombuffer(data, _FLOAT_DTYPES[dtype]).reshape(shape)


def _to_raw(array: np.ndarray, dtype: str | None, name: str) -> RawTensor:
    dtype = dtype or _DTYPE_CODES.get(array.dtype.newbyteorder("<"))
    if dtype == "BF16":
        bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
        if (bits & 0xFFFF).any():
            raise DataError(f"tensor '{name}': values are not exact bfloat16 values")
        return dtype, tuple(array.shape), (bits >> 16).astype("<u2").tobytes()
    if dtype not in _FLOAT_DTYPES:
        raise DataError(f"tensor '{name}': dtype {dtype or array.dtype} is not a floating-point safetensors dtype")
    return dtype, tuple(array.shape), np.ascontiguousarray(array, _FLOAT_DTYPES[dtype]).tobytes()


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shown(names: Sequence[str]) -> str:
    return repr(list(names[:3])) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def _parse_layout(layout: object, where: str) -> Layout:
    """A layout from JSON or from `lora_layout`: unique names, shapes of non-negative integers."""
    try:
        out = tuple((pair[0], tuple(pair[1])) for pair in layout)  # type: ignore[attr-defined]
    except (TypeError, IndexError, KeyError) as exc:
        raise DataError(f"{where}: layout must be a list of [name, shape] pairs ({exc})") from exc
    for name, shape in out:
        if not isinstance(name, str) or not all(_is_count(d) for d in shape):
            raise DataError(f"{where}: layout entry {[name, list(shape)]!r} is not [name, shape]")
    if not out or len({name for name, _ in out}) != len(out):
        raise DataError(f"{where}: layout must name each parameter once (and at least one)")
    return out


def _check_tensors(layout: Layout, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """``adapter.<name>`` for every layout name with its shape; the two moments likewise, or neither (untrained)."""
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        group, _, name = key.partition(".")
        if group not in _GROUPS:
            raise DataError(f"{where}: unexpected tensor '{key}' (expected adapter.*, exp_avg.*, exp_avg_sq.*)")
        groups.setdefault(group, {})[name] = tuple(shape)
    expected = dict(layout)
    for group in _GROUPS:
        if group != "adapter" and "exp_avg" not in groups and "exp_avg_sq" not in groups:
            continue  # an untrained run has no moments
        got = groups.get(group, {})
        missing = [name for name in expected if name not in got]
        extra = sorted(set(got) - set(expected))
        if missing or extra:
            raise DataError(
                f"{where}: the '{group}' tensors do not match the layout: missing {_shown(missing)}, "
                f"unexpected {_shown(extra)}"
            )
        for name, shape in expected.items():
            if got[name] != shape:
                raise DataError(f"{where}: tensor '{group}.{name}' has shape {got[name]}; the layout says {shape}")


def _check_entry(entry: object, where: str) -> dict[str, Any]:
    """The checkpoint entry's index, step, lr, lr_last and adam, checked (other fields, e.g. ``dir``, dropped)."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: the checkpoint entry must be a JSON object")
    missing = [key for key in _ENTRY_FIELDS if key not in entry]
    if missing:
        raise DataError(f"{where}: the checkpoint entry lacks {missing}")
    for key in ("index", "step"):
        if not _is_count(entry[key]):
            raise DataError(f"{where}: checkpoint '{key}' must be an integer >= 0, got {entry[key]!r}")
    for key in ("lr", "lr_last"):
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise DataError(f"{where}: checkpoint '{key}' must be a finite number >= 0, got {value!r}")
    try:
        AdamState.from_dict(entry["adam"])
    except (ConfigError, TypeError) as exc:
        raise DataError(f"{where}: checkpoint 'adam': {exc}") from exc
    return {key: entry[key] for key in _ENTRY_FIELDS}


def _check_update(update: object, where: str) -> dict[str, Any]:
    """A silo update's ``round`` and ``num_samples`` (integers ≥ 0, the count at most `MAX_COUNT`), ``score_mass``
    (finite) and ``train_loss`` (finite, ≥ 0)."""
    if not isinstance(update, dict):
        raise DataError(f"{where}: the update must be a JSON object")
    missing = [key for key in _UPDATE_FIELDS if key not in update]
    if missing:
        raise DataError(f"{where}: the update lacks {missing}")
    for key in ("round", "num_samples"):
        if not _is_count(update[key]):
            raise DataError(f"{where}: update '{key}' must be an integer >= 0, got {update[key]!r}")
    if update["num_samples"] > MAX_COUNT:
        raise DataError(f"{where}: update 'num_samples' must be at most {MAX_COUNT}, got {update['num_samples']}")
    for key in ("score_mass", "train_loss"):
        value = update[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DataError(f"{where}: update '{key}' must be a finite number, got {value!r}")
    if update["train_loss"] < 0:
        raise DataError(
            f"{where}: update 'train_loss' is a cross-entropy and cannot be negative, got {update['train_loss']}"
        )
    return {key: update[key] for key in _UPDATE_FIELDS}


def _json_meta(metadata: Mapping[str, str], key: str, kind: type, where: str) -> Any:
    try:
        value = json.loads(_meta(metadata, key, where))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{where}: metadata field '{key}' is not JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, kind):
        raise DataError(f"{where}: metadata field '{key}' must be a JSON {'object' if kind is dict else 'list'}")
    return value


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: no such file (not a checkpoint directory of a finished run?)")
    return path.read_bytes()


def checkpoint_to_bytes(
    ckpt_dir: Path | str, layout: Sequence[tuple[str, Sequence[int]]], entry: dict[str, Any] | None = None
) -> bytes:
    """Bundle a checkpoint directory (``adapter/``, ``optimizer.safetensors`` when trained, ``checkpoint.json``).

    The bytes are canonical: the same checkpoint gives the same file, whether bundled from the run that trained it or
    from a directory that `write_checkpoint_dir` rebuilt (JSON re-serialised; the entry keeps only index, step, lr,
    lr_last and adam).

    Args:
        ckpt_dir: a ``ckpt-NNN/`` directory of a run (see `scoring.training`).
        layout: the run's ordered LoRA layout (``run.json``'s ``layout``, i.e. `lora_layout` of its model).
        entry: the checkpoint's ``run.json`` entry; default: read from ``checkpoint.json``.

    Raises:
        DataError: a file is missing or malformed, or the tensors do not match ``layout``.
    """
    ckpt_dir = Path(ckpt_dir)
    where = str(ckpt_dir)
    order = _parse_layout(layout, where)
    adapter_path = ckpt_dir / "adapter" / "adapter_model.safetensors"
    adapter, _ = _read_raw(_read_file(adapter_path), str(adapter_path))
    tensors = {f"adapter.{name}": raw for name, raw in adapter.items()}
    optimizer = ckpt_dir / "optimizer.safetensors"
    if optimizer.is_file():
        tensors.update(_read_raw(optimizer.read_bytes(), str(optimizer))[0])
    _check_tensors(order, {key: shape for key, (_, shape, _) in tensors.items()}, where)
    config_path = ckpt_dir / "adapter" / "adapter_config.json"
    config = _json_meta({"adapter_config": _read_file(config_path).decode()}, "adapter_config", dict, str(config_path))
    if entry is None:
        entry = json.loads(_read_file(ckpt_dir / "checkpoint.json"))
    return _bundle_bytes(tensors, order, config, _check_entry(entry, where), None)


def _bundle_bytes(
    tensors: Mapping[str, RawTensor],
    layout: Layout,
    config: dict[str, Any],
    entry: dict[str, Any],
    update: dict[str, Any] | None,
) -> bytes:
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "layout": json.dumps([[name, list(shape)] for name, shape in layout]),
        "adapter_config": _config_text(config),
        "checkpoint": json.dumps(entry, sort_keys=True),
    }
    if update is not None:
        metadata["update"] = json.dumps(update, sort_keys=True)
    return _write_raw(tensors, metadata)


def bundle_to_bytes(bundle: CheckpointBundle) -> bytes:
    """The canonical bytes of a bundle held as arrays (a round's global adapter, a silo's update): tensors keep
    the dtypes in ``bundle.dtypes`` (else their arrays'), and equal bundles give equal bytes.

    Raises:
        DataError: tensors that do not match the layout, a malformed entry or update, a non-float dtype.
    """
    where = "bundle"
    layout = _parse_layout(bundle.layout, where)
    groups = [("adapter", bundle.adapter), ("exp_avg", bundle.exp_avg), ("exp_avg_sq", bundle.exp_avg_sq)]
    tensors = {
        f"{prefix}.{name}": _to_raw(np.asarray(array), bundle.dtypes.get(f"{prefix}.{name}"), name)
        for prefix, arrays in groups
        for name, array in arrays.items()
    }
    _check_tensors(layout, {key: shape for key, (_, shape, _) in tensors.items()}, where)
    update = None if bundle.update is None else _check_update(bundle.update, where)
    return _bundle_bytes(tensors, layout, bundle.adapter_config, _check_entry(bundle.entry, where), update)


def _config_text(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True)  # as peft writes adapter_config.json


def checkpoint_from_bytes(data: bytes, spec: ProjectionSpec, where: str = "checkpoint") -> CheckpointBundle:
    """Parse and validate a checkpoint bundle made for the projection ``spec``.

    Raises:
        DataError: names ``where`` and the field: not safetensors, wrong format, a layout that does not hash to
            ``spec.param_hash`` or count ``spec.param_count``, adapter tensors that differ from the layout (missing
            or unexpected names, shapes), moments for some parameters only, a non-floating dtype, NaN/Inf, an
            adapter_config that is not a JSON object, a checkpoint entry without index/step/lr/lr_last/adam or with
            a negative or non-finite lr.
    """
    return read_bundle(data, spec.param_hash, spec.param_count, where)


def read_bundle(
    data: bytes, param_hash: str | None, param_count: int | None, where: str = "bundle"
) -> CheckpointBundle:
    """`checkpoint_from_bytes` against a layout hash and parameter count (None: any layout), e.g. a federated
    job's adapter layout; also checks the optional ``update`` field (round and num_samples integers ≥ 0,
    finite score_mass and train_loss).

    Raises:
        DataError: as `checkpoint_from_bytes`, or a malformed ``update``.
    """
    raw, metadata = _read_raw(data, where)
    if _meta(metadata, "format", where) != CHECKPOINT_FORMAT:
        raise DataError(f"{where}: format must be {CHECKPOINT_FORMAT!r}, got {metadata['format']!r}")
    layout = _parse_layout(_json_meta(metadata, "layout", list, where), where)
    got_hash, got_count = parameter_layout_hash(layout), sum(math.prod(shape) for _, shape in layout)
    if param_hash is not None and got_hash != param_hash:
        raise DataError(
            f"{where}: metadata field 'layout' hashes to {got_hash}, not the expected param_hash {param_hash} "
            "(a different model, LoRA targets, rank or parameter order?)"
        )
    if param_count is not None and got_count != param_count:
        raise DataError(f"{where}: metadata field 'layout' counts {got_count} parameters, not {param_count}")
    update = None
    if "update" in metadata:
        update = _check_update(_json_meta(metadata, "update", dict, where), where)
    _check_tensors(layout, {key: shape for key, (_, shape, _) in raw.items()}, where)
    arrays = {key: _to_array(tensor, key, where) for key, tensor in raw.items()}
    for key, array in arrays.items():
        if not _all_finite(array):
            raise DataError(f"{where}: tensor '{key}' contains NaN or Inf")
    adapter_config = _json_meta(metadata, "adapter_config", dict, where)
    entry = _check_entry(_json_meta(metadata, "checkpoint", dict, where), where)

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {name: arrays[f"{prefix}.{name}"] for name, _ in layout if f"{prefix}.{name}" in arrays}

    dtypes = {key: dtype for key, (dtype, _, _) in raw.items()}
    return CheckpointBundle(
        layout, group("adapter"), group("exp_avg"), group("exp_avg_sq"), adapter_config, entry, dtypes, update
    )


def write_checkpoint_dir(bundle: CheckpointBundle, dest: Path | str) -> None:
    """Write a bundle as a checkpoint directory that `scoring.training.read_run` and `scoring.steps` use: the
    adapter in peft's format (same tensor names and dtypes), ``optimizer.safetensors`` when the bundle has moments,
    and ``checkpoint.json``. Each file is written atomically."""
    dest = Path(dest)

    def encode(groups: Sequence[tuple[str, dict[str, np.ndarray]]], prefixed: bool) -> dict[str, RawTensor]:
        return {
            f"{prefix}.{name}" if prefixed else name: _to_raw(array, bundle.dtypes.get(f"{prefix}.{name}"), name)
            for prefix, tensors in groups
            for name, array in tensors.items()
        }

    adapter = encode([("adapter", bundle.adapter)], prefixed=False)
    atomic_write_bytes(dest / "adapter" / "adapter_model.safetensors", _write_raw(adapter, {"format": "pt"}))
    atomic_write_bytes(dest / "adapter" / "adapter_config.json", _config_text(bundle.adapter_config).encode())
    if bundle.has_moments:
        moments = encode([("exp_avg", bundle.exp_avg), ("exp_avg_sq", bundle.exp_avg_sq)], prefixed=True)
        atomic_write_bytes(dest / "optimizer.safetensors", _write_raw(moments))
    else:
        (dest / "optimizer.safetensors").unlink(missing_ok=True)
    atomic_write_bytes(dest / "checkpoint.json", json.dumps(bundle.run_entry(dest.name), indent=2).encode())
