"""Random projections R^D -> R^k of per-sample LoRA gradients, reproducible bit for bit from their spec.

Contents:

- `Projector` (Protocol), `build_projector(spec)` and the two implementations `SJLTProjector` (sparse) and
  `DenseProjector` (``rademacher`` / ``gaussian``).
- `make_spec(kind, dim, seed, layout)`: a `ProjectionSpec` for an ordered parameter layout.
- Pure generators every party shares: `parameter_key`, `counter_hash`, `sjlt_indices`, `dense_matrix_block`,
  `normal_table`; and the test oracle `reference_matrix` (materialises the full D×k matrix; tiny D only).

Which kind: ``sjlt`` (the default) costs O(s·D) per gradient and caches only D·s bucket indices and signs.
``rademacher`` and ``gaussian`` are dense (TRAK-style) and regenerate their D×k matrix block by block on every
call: use them only for small D or to cross-check SJLT.

Reproducibility. No RNG stream (torch or numpy) is ever used. Every random entry is a pure function of
(spec, parameter name, counter):

- key  = little-endian int of blake2b(``"clues.projection.v1|{kind}|{dim}|{nnz}|{seed}|{name}"``, 8 bytes);
- hash = splitmix64 finaliser of (key + counter · 0x9E3779B97F4A7C15) mod 2^64, numpy uint64 (wrapping), CPU.

Bits are extracted with shifts and masks, never by viewing memory, so nothing depends on endianness. Gaussian
entries come from a committed table of 65536 normal quantiles (`normal_table`) indexed by 16-bit chunks of the
hashes, because ``np.log``/``np.cos`` differ across CPUs by an ulp. The table is standardised: mean exactly 0,
second moment 1 up to float32 rounding (a discrete approximation of N(0, 1), truncated at ±4.33σ).

Floating-point sums are not reproducible bit for bit across devices (CUDA ``index_add_`` uses atomics),
but the matrix is: equal specs give identical indices, signs and blocks everywhere, and projections agree
to float32 rounding.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from scoring.config import ProjectionSpec, parameter_layout_hash
from scoring.errors import ConfigError, IncompatibleArtifactError, ShapeMismatchError

Layout = Sequence[tuple[str, tuple[int, ...]]]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_KEY_DOMAIN = "clues.projection.v1"

NORMAL_TABLE_PATH = Path(__file__).with_name("assets") / "normal_quantiles_u16.npy"
# SHA-256 of the table's little-endian float32 data (not of the .npy header). The file is the source of truth.
NORMAL_TABLE_SHA256 = "8babbcaf96568f10165a1eab530c0e5c92d04de96761b6dbb3dadfa94baba37f"

SJLT_CPU_CHUNK = 1 << 16
"""Coordinates per SJLT ``index_add_`` on CPU (keeps the working set in cache)."""

DENSE_BLOCK_ENTRIES = 1 << 23
"""Upper bound on the entries of one generated dense block (rows × k); 8M float32 = 32 MiB."""


# ------------------------------------------------------------------------------------------------------------
# Pure generators (shared by every party; the projectors and the tests are built on these alone)


def parameter_key(spec: ProjectionSpec, name: str) -> int:
    """The 64-bit key of one parameter's random stream under ``spec``.

    Every spec field that changes the matrix (kind, dim, nnz, seed) enters the key, so different specs give
    independent, not merely rearranged, matrices.
    """
    material = f"{_KEY_DOMAIN}|{spec.kind}|{spec.dim}|{spec.nnz}|{spec.seed}|{name}".encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "little")


def counter_hash(key: int, counters: np.ndarray) -> np.ndarray:
    """Counter-based hash: splitmix64 finaliser of key + counter · golden (all mod 2^64).

    Args:
        key: 64-bit stream key (`parameter_key`).
        counters: (N,) uint64 counters.

    Returns:
        (N,) uint64 hashes.
    """
    x = np.uint64(key) + counters.astype(np.uint64, copy=False) * _GOLDEN  # uint64 arrays wrap silently
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


@functools.cache
def normal_table() -> np.ndarray:
    """The committed table of 65536 standardised N(0, 1) quantiles, checksum-verified.

    Returns:
        (65536,) float32, read-only.

    Raises:
        IncompatibleArtifactError: the asset's data does not match `NORMAL_TABLE_SHA256`.
    """
    table = np.load(NORMAL_TABLE_PATH).astype("<f4")
    digest = hashlib.sha256(table.tobytes()).hexdigest()
    if table.shape != (1 << 16,) or digest != NORMAL_TABLE_SHA256:
        raise IncompatibleArtifactError(
            f"{NORMAL_TABLE_PATH} is not the committed Gaussian table (sha256 {digest}, "
            f"shape {table.shape}); restore the file from version control"
        )
    table = table.astype(np.float32)
    table.setflags(write=False)
    return table


def sjlt_indices(spec: ProjectionSpec, name: str, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Buckets and signs of one parameter's coordinates under a sparse JL (Kane–Nelson block) spec.

    The output rows [0, k) are cut into s = ``spec.nnz`` blocks of k/s rows. Coordinate i gets, in block c,
    row c·(k/s) + offset(i, c) and sign ±1/√s, both from hash(counter = i·s + c): offset = the high 32 bits
    scaled to [0, k/s) by a multiply-shift, sign = the lowest bit (1 -> minus).

    Args:
        spec: an ``sjlt`` spec.
        name: the parameter name.
        numel: number of elements of the parameter (one sample).

    Returns:
        buckets: (numel, s) int64 output rows.
        signs: (numel, s) float32, each ±1/√s.
    """
    if spec.kind != "sjlt":
        raise ConfigError(f"kind: sjlt_indices needs an sjlt spec, got {spec.kind!r}")
    s, block = spec.nnz, spec.dim // spec.nnz
    h = counter_hash(parameter_key(spec, name), np.arange(numel * s, dtype=np.uint64)).reshape(numel, s)
    offsets = ((h >> np.uint64(32)) * np.uint64(block)) >> np.uint64(32)  # (numel, s) in [0, block)
    buckets = offsets.astype(np.int64) + np.arange(s, dtype=np.int64) * block
    scale = np.float32(1.0 / math.sqrt(s))
    signs = np.where((h & np.uint64(1)) == 1, -scale, scale).astype(np.float32)
    return buckets, signs


def _stream_chunks(key: int, start: int, stop: int, bits: int) -> np.ndarray:
    """Entries [start, stop) of the stream of ``bits``-bit chunks, 64/bits chunks per hash, lowest bits first.

    Returns:
        (stop - start,) uint64 chunk values.
    """
    per_hash = 64 // bits
    first, last = start // per_hash, -(-stop // per_hash)
    h = counter_hash(key, np.arange(first, last, dtype=np.uint64))
    shifts = np.arange(per_hash, dtype=np.uint64) * np.uint64(bits)
    chunks = (h[:, None] >> shifts) & np.uint64((1 << bits) - 1)  # (n_hash, per_hash)
    skip = start - first * per_hash
    return chunks.reshape(-1)[skip : skip + stop - start]


def dense_matrix_block(spec: ProjectionSpec, name: str, row_start: int, row_stop: int) -> np.ndarray:
    """Rows [row_start, row_stop) of one parameter's slice of a dense projection matrix.

    Row r is the parameter's r-th flattened coordinate; entry (r, j) is element e = r·k + j of the parameter's
    stream: ``rademacher`` takes bit e mod 64 of hash(e // 64) (1 -> -1/√k, 0 -> +1/√k); ``gaussian`` takes
    16-bit chunk e mod 4 of hash(e // 4) as an index into `normal_table`, times 1/√k. Blocks therefore tile
    seamlessly: any split of the rows yields the same matrix.

    Args:
        spec: a ``rademacher`` or ``gaussian`` spec.
        name: the parameter name.
        row_start: first row (inclusive).
        row_stop: last row (exclusive).

    Returns:
        (row_stop - row_start, k) float32.
    """
    if spec.kind not in ("rademacher", "gaussian"):
        raise ConfigError(f"kind: dense_matrix_block needs a dense spec, got {spec.kind!r}")
    if not 0 <= row_start <= row_stop:
        raise ShapeMismatchError(f"bad row range [{row_start}, {row_stop})")
    k, key = spec.dim, parameter_key(spec, name)
    scale = np.float32(1.0 / math.sqrt(k))
    start, stop = row_start * k, row_stop * k
    if spec.kind == "rademacher":
        bits = _stream_chunks(key, start, stop, bits=1)
        values = np.where(bits == 1, -scale, scale).astype(np.float32)
    else:
        values = normal_table()[_stream_chunks(key, start, stop, bits=16).astype(np.intp)] * scale
    return values.reshape(row_stop - row_start, k)  # (rows, k)


def reference_matrix(spec: ProjectionSpec, layout: Layout) -> np.ndarray:
    """The full D×k matrix, built naively from the public generators (a test oracle; tiny D only).

    ``flat_grads @ reference_matrix(spec, layout)`` equals the projection of the same gradients.

    Returns:
        (D, k) float32.
    """
    check_layout(spec, layout)
    parts = []
    for name, shape in layout:
        numel = math.prod(shape)
        if spec.kind == "sjlt":
            part = np.zeros((numel, spec.dim), dtype=np.float32)
            buckets, signs = sjlt_indices(spec, name, numel)
            for c in range(spec.nnz):  # buckets of different blocks never collide
                part[np.arange(numel), buckets[:, c]] = signs[:, c]
        else:
            part = dense_matrix_block(spec, name, 0, numel)
        parts.append(part)
    return np.concatenate(parts, axis=0)


# ------------------------------------------------------------------------------------------------------------
# Specs and layouts


def make_spec(kind: str, dim: int, seed: int, layout: Layout, nnz: int = 4) -> ProjectionSpec:
    """A `ProjectionSpec` for gradients laid out over ``layout`` (ordered ``(name, shape)`` pairs).

    ``nnz`` is forced to 1 for the dense kinds.
    """
    layout = [(name, tuple(int(d) for d in shape)) for name, shape in layout]
    if not layout:
        raise ConfigError("layout: must name at least one parameter")
    return ProjectionSpec(
        kind=kind,
        dim=dim,
        seed=seed,
        param_hash=parameter_layout_hash(layout),
        param_count=sum(math.prod(shape) for _, shape in layout),
        nnz=nnz if kind == "sjlt" else 1,
    )


def layout_of(grads: Mapping[str, Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """The ordered ``(name, per-sample shape)`` layout of a batch of gradients ``name -> (B, *shape)``."""
    return [(name, tuple(int(d) for d in g.shape[1:])) for name, g in grads.items()]


def check_layout(spec: ProjectionSpec, layout: Layout) -> None:
    """Raise `IncompatibleArtifactError` unless ``layout`` is the one ``spec`` was made for."""
    got_hash = parameter_layout_hash(layout)
    got_count = sum(math.prod(shape) for _, shape in layout)
    if got_hash != spec.param_hash or got_count != spec.param_count:
        names = [name for name, _ in layout]
        shown = names[:3] + (["..."] if len(names) > 3 else [])
        raise IncompatibleArtifactError(
            "gradient layout does not match the projection spec: "
            f"expected param_hash={spec.param_hash} and param_count={spec.param_count}, "
            f"got param_hash={got_hash} and param_count={got_count} over {len(names)} parameters {shown} "
            "(different LoRA targets, rank, model, or parameter order?)"
        )


def batch_size(grads: Mapping[str, Tensor]) -> int:
    """The common leading dimension B of ``name -> (B, *shape)`` gradients; `ShapeMismatchError` if none."""
    if not grads:
        raise ShapeMismatchError("no gradients given")
    batch = {int(g.shape[0]) if g.dim() > 0 else -1 for g in grads.values()}
    if len(batch) != 1 or -1 in batch:
        raise ShapeMismatchError(f"all gradients need the same leading batch dimension, got {sorted(batch)}")
    return batch.pop()


def flatten_grads(grads: Mapping[str, Tensor]) -> Tensor:
    """Concatenate per-sample gradients in layout order.

    Args:
        grads: ordered ``name -> (B, *shape)``, any float dtype, all on one device.

    Returns:
        (B, D) float32.
    """
    b = batch_size(grads)
    return torch.cat([g.reshape(b, -1).to(torch.float32) for g in grads.values()], dim=1)  # (B, D)


def check_flat(spec: ProjectionSpec, flat: Tensor) -> Tensor:
    """Check that ``flat`` is (B, D) with D = ``spec.param_count``; return it as float32."""
    if flat.dim() != 2 or flat.shape[1] != spec.param_count:
        raise ShapeMismatchError(f"expected (B, {spec.param_count}) flat gradients, got {tuple(flat.shape)}")
    return flat.to(torch.float32)


# ------------------------------------------------------------------------------------------------------------
# Projectors


@runtime_checkable
class Projector(Protocol):
    """Projects batches of per-sample gradients with one fixed `ProjectionSpec`."""

    spec: ProjectionSpec

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        """Project ``name -> (B, *shape)`` gradients (layout = dict order) to (B, k) float32."""
        ...


class SJLTProjector:
    """Sparse JL projection; bucket indices and signs are generated once per device and cached."""

    def __init__(self, spec: ProjectionSpec) -> None:
        if spec.kind != "sjlt":
            raise ConfigError(f"kind: SJLTProjector needs an sjlt spec, got {spec.kind!r}")
        self.spec = spec
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        """Project ``name -> (B, *shape)`` gradients; returns (B, k) float32 on their device."""
        flat = flatten_grads(grads)  # (B, D); checks the batch dimensions first
        layout = layout_of(grads)
        check_layout(self.spec, layout)
        return self._apply(flat, layout)

    def project_flat(self, flat: Tensor, layout: Layout) -> Tensor:
        """Project (B, D) flat gradients laid out over ``layout``; returns (B, k) float32."""
        check_layout(self.spec, layout)
        return self._apply(check_flat(self.spec, flat), layout)

    def indices(self, device: torch.device, layout: Layout) -> tuple[Tensor, Tensor]:
        """Global buckets (s, D) int64 and signs (s, D) float32 on ``device``, one row per SJLT block.

        Cached per device only, since the spec pins the layout (``layout`` is checked against it).
        """
        check_layout(self.spec, layout)
        if device not in self._cache:
            parts = [sjlt_indices(self.spec, name, math.prod(shape)) for name, shape in layout]
            buckets = np.concatenate([p[0] for p in parts]).T.copy()  # (D, s) -> (s, D)
            signs = np.concatenate([p[1] for p in parts]).T.copy()  # (D, s) -> (s, D)
            self._cache[device] = (torch.from_numpy(buckets).to(device), torch.from_numpy(signs).to(device))
        return self._cache[device]

    def _apply(self, flat: Tensor, layout: Layout) -> Tensor:
        b, d = flat.shape  # (B, D)
        buckets, signs = self.indices(flat.device, layout)  # (s, D) each
        out = torch.zeros(b, self.spec.dim, dtype=torch.float32, device=flat.device)
        # One index_add_ per (SJLT block, coordinate chunk). Measured on CPU (B=8, D=460800, k=8192): ~2x faster
        # than one index_add_ over the (B, D·s) signed copy, and chunks of 2^16 coordinates (cache-sized) are
        # another ~1.5x. Accelerators take the whole D at once: s kernel launches.
        chunk = SJLT_CPU_CHUNK if flat.device.type == "cpu" else d
        for start in range(0, d, chunk):
            x = flat[:, start : start + chunk]  # (B, chunk)
            for c in range(self.spec.nnz):
                out.index_add_(1, buckets[c, start : start + chunk], x * signs[c, start : start + chunk])
        return out  # (B, k)


class DenseProjector:
    """Dense Rademacher or Gaussian projection, regenerated block by block on every call (nothing cached).

    Blocks are generated on CPU and multiplied on the gradients' device with ``addmm_`` in float32 (on CUDA this
    is true float32 unless the caller has enabled TF32 matmuls globally).
    """

    def __init__(self, spec: ProjectionSpec, block_entries: int = DENSE_BLOCK_ENTRIES) -> None:
        if spec.kind not in ("rademacher", "gaussian"):
            raise ConfigError(f"kind: DenseProjector needs a dense spec, got {spec.kind!r}")
        self.spec = spec
        self.rows_per_block = max(1, block_entries // spec.dim)

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        """Project ``name -> (B, *shape)`` gradients; returns (B, k) float32 on their device."""
        b = batch_size(grads)
        check_layout(self.spec, layout_of(grads))
        device = next(iter(grads.values())).device
        out = torch.zeros(b, self.spec.dim, dtype=torch.float32, device=device)
        for name, g in grads.items():
            self._accumulate(out, name, g.reshape(b, -1).to(torch.float32))
        return out

    def project_flat(self, flat: Tensor, layout: Layout) -> Tensor:
        """Project (B, D) flat gradients laid out over ``layout``; returns (B, k) float32."""
        check_layout(self.spec, layout)
        flat = check_flat(self.spec, flat)  # (B, D)
        out = torch.zeros(flat.shape[0], self.spec.dim, dtype=torch.float32, device=flat.device)
        offset = 0
        for name, shape in layout:
            numel = math.prod(shape)
            self._accumulate(out, name, flat[:, offset : offset + numel])
            offset += numel
        return out

    def _accumulate(self, out: Tensor, name: str, g: Tensor) -> None:
        """Add one parameter's contribution g @ R_p to ``out`` (B, k); g is (B, n) float32."""
        n = g.shape[1]
        for start in range(0, n, self.rows_per_block):
            stop = min(n, start + self.rows_per_block)
            block = dense_matrix_block(self.spec, name, start, stop)  # (rows, k)
            out.addmm_(g[:, start:stop], torch.from_numpy(block).to(g.device))


def build_projector(spec: ProjectionSpec) -> Projector:
    """The projector for ``spec`` (`SJLTProjector` or `DenseProjector`)."""
    if spec.kind == "sjlt":
        return SJLTProjector(spec)
    return DenseProjector(spec)


def project_flat(spec: ProjectionSpec, flat: Tensor, layout: Layout) -> Tensor:
    """Project (B, D) flat gradients laid out over ``layout`` (builds a fresh projector; prefer reusing one).

    Returns:
        (B, k) float32 on ``flat``'s device.
    """
    projector = SJLTProjector(spec) if spec.kind == "sjlt" else DenseProjector(spec)
    return projector.project_flat(flat, layout)
