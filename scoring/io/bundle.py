"""Checkpoint bundles (format ``clues.checkpoint/1``): see `scoring.io`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import deserialize

from scoring.config import AdamState, ProjectionSpec, parameter_layout_hash
from scoring.errors import ConfigError, DataError
from scoring.io._safetensors import (
    _DTYPE_CODES,
    _ENTRY_FIELDS,
    _FLOAT_DTYPES,
    _GROUPS,
    _READ_ERRORS,
    _UPDATE_FIELDS,
    CHECKPOINT_FORMAT,
    MAX_COUNT,
    Layout,
    RawTensor,
    _all_finite,
    _meta,
    _read_metadata,
    _write_raw,
)
from wire.files import atomic_write_bytes

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
        update: a silo's round update (``round``, ``num_samples``, ``score_mass``, ``train_loss``, and ``privacy``
            after a DP-SGD round); None otherwise.
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
    (finite), ``train_loss`` (finite, ≥ 0) and, after a DP-SGD round, its ``privacy`` report
    (`scoring.privacy.check_report`)."""
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
    checked = {key: update[key] for key in _UPDATE_FIELDS}
    if update.get("privacy") is not None:  # a DP-SGD round: the silo's ε ledger (scoring.privacy)
        from scoring.privacy import check_report

        checked["privacy"] = check_report(update["privacy"], f"{where}: update 'privacy'")
    return checked


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
    """Write a bundle as a checkpoint directory that `scoring.training.read_run` and `scoring.workflow` use: the
    adapter in peft's format (same tensor names and dtypes), ``optimizer.safetensors`` when the bundle has moments,
    and ``checkpoint.json``. Each file is written atomically.

    A shared-basis adapter (with ``lora_R``) is written folded, lora_B := B·R (`lora_algebra.fold_shared_basis`):
    the same model as a standard LoRA adapter that peft loads."""
    from scoring.federated.lora_algebra import fold_shared_basis

    dest = Path(dest)
    folded = fold_shared_basis(bundle.adapter)

    def encode(groups: Sequence[tuple[str, dict[str, np.ndarray]]], prefixed: bool) -> dict[str, RawTensor]:
        return {
            f"{prefix}.{name}" if prefixed else name: _to_raw(array, bundle.dtypes.get(f"{prefix}.{name}"), name)
            for prefix, tensors in groups
            for name, array in tensors.items()
        }

    adapter = encode([("adapter", folded)], prefixed=False)
    atomic_write_bytes(dest / "adapter" / "adapter_model.safetensors", _write_raw(adapter, {"format": "pt"}))
    atomic_write_bytes(dest / "adapter" / "adapter_config.json", _config_text(bundle.adapter_config).encode())
    if bundle.has_moments:
        moments = encode([("exp_avg", bundle.exp_avg), ("exp_avg_sq", bundle.exp_avg_sq)], prefixed=True)
        atomic_write_bytes(dest / "optimizer.safetensors", _write_raw(moments))
    else:
        (dest / "optimizer.safetensors").unlink(missing_ok=True)
    atomic_write_bytes(dest / "checkpoint.json", json.dumps(bundle.run_entry(dest.name), indent=2).encode())
