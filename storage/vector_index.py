"""Cosine-similarity search over projection rows with faiss, and near-duplicate detection across silos.

Contains `normalize_rows`, `VectorIndex` (an exact ``faiss.IndexFlatIP`` over unit rows, serialised together with its
ids and metadata, which are checked on load) and `near_duplicates`. Exact search is the right choice here: the
indexes hold at most a few hundred thousand rows and are built once per scoring run.

Serialised layout (``clues.vindex/1``): the magic line, an 8-byte little-endian length, that many bytes of JSON
metadata (``dim``, ``metric``, ``fingerprint``, ``ids``), then the bytes of ``faiss.serialize_index``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from storage.errors import IntegrityError, NotFoundError
from wire.files import atomic_write_bytes

MAGIC = b"clues.vindex/1\n"
METRIC = "cosine"
CHUNK_ROWS = 4096  # query rows per faiss call: bounds the float32 copies made while normalising


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Unit-L2 rows as contiguous float32.

    Args:
        matrix: (n, d) numbers, any float dtype.

    Returns:
        (n, d) float32; all-zero rows stay zero (and so have similarity 0 with everything).
    """
    m = np.asarray(matrix, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D (rows, dim) matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("matrix contains NaN or Inf")
    norms = np.linalg.norm(m, axis=1, keepdims=True)  # (n, 1)
    return np.ascontiguousarray(np.divide(m, norms, out=np.zeros_like(m), where=norms > 0))


def _chunks(matrix: np.ndarray, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(start, normalised rows start:start+rows) over ``matrix``."""
    for start in range(0, matrix.shape[0], rows):
        yield start, normalize_rows(matrix[start : start + rows])


def _flat_index(matrix: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(matrix.shape[1])
    for _, chunk in _chunks(matrix):
        index.add(chunk)
    return index


class VectorIndex:
    """Exact cosine search over rows identified by string ids, tagged with the fingerprint of their projection."""

    def __init__(self, index: faiss.Index, ids: Sequence[str], fingerprint: str) -> None:
        if index.ntotal != len(ids):
            raise IntegrityError(f"vector index holds {index.ntotal} rows but {len(ids)} ids")
        self._index = index
        self.ids = list(ids)
        self.fingerprint = fingerprint

    @classmethod
    def build(cls, ids: Sequence[str], matrix: np.ndarray, *, fingerprint: str) -> VectorIndex:
        """Index (n, d) ``matrix``; row i is ``ids[i]``."""
        if np.ndim(matrix) != 2 or len(ids) != np.shape(matrix)[0]:
            raise ValueError(f"{len(ids)} ids for a matrix of shape {np.shape(matrix)}")
        return cls(_flat_index(np.asarray(matrix)), ids, fingerprint)

    @property
    def dim(self) -> int:
        """Row dimension d."""
        return int(self._index.d)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """The ``k`` most similar rows of each query (k clipped to the index size).

        Args:
            queries: (n, d); zero rows get similarity 0 to everything.
            k: neighbours per query.

        Returns:
            ids (n lists of k ids, most similar first) and sims (n, k) float32 cosine similarities.
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        k = max(0, min(k, len(self)))
        sims = np.zeros((queries.shape[0], k), dtype=np.float32)  # (n, k)
        labels = np.zeros((queries.shape[0], k), dtype=np.int64)  # (n, k)
        if k:
            for start, chunk in _chunks(queries):
                sims[start : start + len(chunk)], labels[start : start + len(chunk)] = self._index.search(chunk, k)
        return [[self.ids[j] for j in row] for row in labels], sims

    def to_bytes(self) -> bytes:
        """Serialise the index with its ids and metadata (layout in the module docstring)."""
        meta = {"dim": self.dim, "metric": METRIC, "fingerprint": self.fingerprint, "ids": self.ids}
        meta_bytes = json.dumps(meta).encode()
        body = faiss.serialize_index(self._index).tobytes()
        return MAGIC + struct.pack("<Q", len(meta_bytes)) + meta_bytes + body

    @classmethod
    def from_bytes(
        cls, data: bytes, *, expected_fingerprint: str | None = None, expected_dim: int | None = None
    ) -> VectorIndex:
        """Load `to_bytes` output, refusing an index built for another projection or dimension.

        Raises:
            IntegrityError: malformed data, or the fingerprint, dimension or metric differ from what is expected.
        """
        meta, body = _split(data)
        if meta["metric"] != METRIC:
            raise IntegrityError(f"vector index uses metric {meta['metric']!r}, expected {METRIC!r}")
        if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
            raise IntegrityError(
                f"vector index was built for projection {meta['fingerprint']!r}, not {expected_fingerprint!r}"
            )
        if expected_dim is not None and meta["dim"] != expected_dim:
            raise IntegrityError(f"vector index has dimension {meta['dim']}, expected {expected_dim}")
        try:
            index = faiss.deserialize_index(np.frombuffer(body, dtype=np.uint8))
        except RuntimeError as exc:
            raise IntegrityError(f"vector index data is corrupt ({exc})") from exc
        if index.d != meta["dim"]:
            raise IntegrityError(f"vector index metadata says dimension {meta['dim']}, the index has {index.d}")
        return cls(index, meta["ids"], meta["fingerprint"])

    def save(self, path: Path) -> None:
        """Write atomically (a temp file in the same directory, fsynced, then renamed)."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(
        cls, path: Path, *, expected_fingerprint: str | None = None, expected_dim: int | None = None
    ) -> VectorIndex:
        """Read a `save`d index; raises `NotFoundError` when absent, `IntegrityError` as `from_bytes` does."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"vector index {path} does not exist") from exc
        return cls.from_bytes(data, expected_fingerprint=expected_fingerprint, expected_dim=expected_dim)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(metadata, faiss bytes) of serialised data; `IntegrityError` when malformed."""
    head = len(MAGIC) + 8
    if data[: len(MAGIC)] != MAGIC or len(data) < head:
        raise IntegrityError("not a clues vector index (bad magic bytes)")
    (size,) = struct.unpack("<Q", data[len(MAGIC) : head])
    try:
        meta = json.loads(data[head : head + size])
        ok = isinstance(meta, dict) and {"dim", "metric", "fingerprint", "ids"} <= set(meta)
    except (UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise IntegrityError("vector index metadata is malformed")
    return meta, data[head + size :]


def near_duplicates(
    groups: Mapping[str, tuple[Sequence[str], np.ndarray]],
    *,
    threshold: float = 0.98,
    k: int = 8,
    cross_owner_only: bool = True,
) -> list[dict[str, Any]]:
    """Pairs of rows whose cosine similarity is at least ``threshold``.

    Each owner's rows are indexed once and the rows of every later owner (and its own, unless ``cross_owner_only``)
    query it in chunks, keeping the ``k`` nearest per query row: a row reports at most ``k`` duplicates per other owner.

    Args:
        groups: owner → (ids, (n_owner, d) matrix); all matrices share d.
        threshold: minimum cosine similarity.
        k: neighbours examined per query row and owner.
        cross_owner_only: skip pairs within one owner.

    Returns:
        Dicts ``owner_a, sample_a, owner_b, sample_b, similarity``, one per unordered pair with (owner_a, sample_a)
        the lexicographically smaller side, most similar first.
    """
    owners = sorted(groups)
    dims = {np.shape(groups[o][1])[1] for o in owners if np.ndim(groups[o][1]) == 2}
    if len(dims) > 1:
        raise ValueError(f"all matrices must share one dimension, got {sorted(dims)}")
    for owner in owners:
        ids, matrix = groups[owner]
        if np.ndim(matrix) != 2 or len(ids) != np.shape(matrix)[0]:
            raise ValueError(f"owner {owner!r}: {len(ids)} ids for a matrix of shape {np.shape(matrix)}")
    found: dict[tuple[str, str, str, str], float] = {}
    for i, a in enumerate(owners):
        ids_a, matrix_a = groups[a]
        if len(ids_a) == 0:
            continue
        index = _flat_index(np.asarray(matrix_a))
        for b in owners[i + 1 :] if cross_owner_only else owners[i:]:
            ids_b, matrix_b = groups[b]
            kk = min(k + (a == b), len(ids_a))  # one more within an owner: a row finds itself
            for start, chunk in _chunks(np.asarray(matrix_b)):
                sims, labels = index.search(chunk, kk)  # (rows, kk) each
                for r, c in zip(*np.nonzero(sims >= threshold), strict=True):
                    qb, ja = start + int(r), int(labels[r, c])
                    if ja < 0:  # faiss pads with -1 when there are fewer than kk rows
                        continue
                    pair = sorted([(a, ids_a[ja]), (b, ids_b[qb])])
                    if pair[0] == pair[1]:  # a row and itself
                        continue
                    key = (*pair[0], *pair[1])
                    found[key] = max(found.get(key, -1.0), min(float(sims[r, c]), 1.0))
    out = [
        {"owner_a": oa, "sample_a": sa, "owner_b": ob, "sample_b": sb, "similarity": sim}
        for (oa, sa, ob, sb), sim in found.items()
    ]
    out.sort(key=lambda d: (-d["similarity"], d["owner_a"], d["sample_a"], d["owner_b"], d["sample_b"]))
    return out
