"""Influence-trace scores: score(z) = Σ_t η_t · sim_t(z), streamed over float16 projections in chunks.

For checkpoints t = 0..T-1 with learning rates η_t, a candidate z has a projected gradient g_t(z) ∈ R^k and
the anchor (trusted) set has projections a_{t,j}. The per-checkpoint similarity is the mean over anchors,

- ``cosine``: sim_t(z) = mean_j cos(g_t, a_{t,j}) = (g_t / |g_t|) · ḡ_t with ḡ_t = mean_j a_{t,j} / |a_{t,j}|;
- ``dot``:    sim_t(z) = mean_j g_t · a_{t,j}   = g_t · ḡ_t           with ḡ_t = mean_j a_{t,j};

so ḡ_t (the *anchor direction*, `anchor_direction`) is computed once and the candidates are streamed against
it. Note that ḡ_t is not re-normalised: the cosine score is exactly the mean of the per-anchor cosines.

With anchor groups (LESS), one direction ḡ_{t,g} per group and per checkpoint; a sample's score is the maximum
over groups of Σ_t η_t · sim(g_t, ḡ_{t,g}) (the maximum is taken after summing over t), and its parts are the
per-checkpoint terms of that best group (`best_group`).

Contents:

- `anchor_direction`, `group_directions`: the anchor mean directions ḡ.
- `similarity_block`: similarities of one in-memory block of rows (pure maths).
- `trace_parts`: the (N, T, G) array of η_t · sim, streamed in chunks of ``chunk_rows`` rows. Each chunk is
  cast to float32 into one reused buffer and multiplied in float32 (float16 values are exact in float32; the
  error is about 1e-7·√k of |g|·|ḡ|, so results agree across chunk sizes up to that rounding); the results are
  stored and summed in float64. Memory beyond the output is O(chunk_rows · k), so memory-mapped float16 files
  of millions of rows can be scored. Non-finite chunk results are re-checked in float64, which names NaN/Inf
  rows and repairs float32 overflow.
- `best_group`: the max-over-groups reduction to (scores, parts).
- `AnchorDirections`, `build_anchor_directions`, `trace_block`: the checked streaming path — build ḡ once, then
  score any number of blocks (silos, or uploaded shard parts) one at a time; the coordinator's workers use it.
- `score_projections`: the checked, high-level entry point over silos → `ScoreTable`.
- `score_anchor_samples`: the same path on the anchor set's own samples (silo ``__anchor__``), whose mean
  score is the CLUES threshold (see `scoring.selection.MeanAnchorScore`).

One module, at about 550 lines, on purpose: the streamed engine, its input checks and the leave-one-out scoring of
the anchor samples share the chunking and the direction algebra above, and the reference-oracle tests check them
as one unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from scoring.config import SIMILARITIES, ProjectionSpec, TraceConfig, check_same_spec
from scoring.errors import ConfigError, DataError, IncompatibleArtifactError, ShapeMismatchError
from scoring.types import ProjectedGrads, ScoreTable
from wire import ANCHOR_OWNER

VECDOT_MAX_GROUPS = 8
"""Up to this many groups, dot products use numpy's single-threaded ``vecdot``: per chunk it is as fast as a BLAS
matmul for few directions and avoids BLAS thread start-up, which dominated on a busy 2-core host (0.6 ms vs
8 ms per 4096×1024 chunk). More groups use the BLAS matmul."""

LR_REL_TOL = 1e-6
"""Relative tolerance when comparing a checkpoint's learning rate between parties (float32 round trips)."""


def _check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ConfigError(f"similarity: must be one of {SIMILARITIES}, got {similarity!r}")


def anchor_direction(anchors: np.ndarray, similarity: str) -> np.ndarray:
    """The mean anchor direction ḡ of one checkpoint.

    Args:
        anchors: (M, k) anchor projections (any float dtype), M ≥ 1.
        similarity: ``cosine`` (mean of the unit-normalised rows) or ``dot`` (plain mean of the rows).

    Returns:
        (k,) float64 direction ḡ such that mean_j sim(g, a_j) = ĝ · ḡ (ĝ = g/|g| for cosine, g for dot).

    Raises:
        ShapeMismatchError: ``anchors`` is not a non-empty 2-D array.
        DataError: an anchor holds NaN/Inf, or (cosine) an anchor row has zero norm.
    """
    _check_similarity(similarity)
    rows = np.asarray(anchors, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ShapeMismatchError(f"anchors must be a non-empty (M, k) array, got shape {rows.shape}")
    if not np.isfinite(rows).all():
        bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
        raise DataError(f"anchor rows {bad[:5].tolist()} hold NaN or Inf")
    if similarity == "dot":
        return rows.mean(axis=0)
    norms = np.linalg.norm(rows, axis=1)  # (M,)
    if (norms == 0).any():
        zero = np.flatnonzero(norms == 0)
        raise DataError(f"anchor rows {zero[:5].tolist()} have zero norm; cosine similarity is undefined for them")
    return (rows / norms[:, None]).mean(axis=0)


def group_directions(
    anchors: np.ndarray, labels: Sequence[str] | None, similarity: str
) -> tuple[tuple[str, ...], np.ndarray]:
    """One anchor direction per group (LESS-style anchor groups).

    Args:
        anchors: (M, k) anchor projections.
        labels: (M,) group label of each anchor row, or None for a single group of all anchors.
        similarity: ``cosine`` or ``dot``.

    Returns:
        ``(names, directions)``: the G group names (sorted; ``("all",)`` without labels) and the (G, k)
        float64 directions, row g belonging to ``names[g]``.

    Raises:
        ShapeMismatchError: ``labels`` does not have one entry per anchor row.
    """
    if labels is None:
        return ("all",), anchor_direction(anchors, similarity)[None, :]
    labels = [str(label) for label in labels]
    if len(labels) != len(anchors):
        raise ShapeMismatchError(f"anchor_groups has {len(labels)} labels for {len(anchors)} anchor rows")
    names = tuple(sorted(set(labels)))
    label_arr = np.asarray(labels)
    rows = np.asarray(anchors)
    dirs = [anchor_direction(rows[label_arr == name], similarity) for name in names]
    return names, np.stack(dirs)  # (G, k)


def similarity_block(block: np.ndarray, directions: np.ndarray, similarity: str) -> np.ndarray:
    """Similarities of one in-memory block of rows against G directions.

    The arithmetic runs in ``block``'s dtype (float32 on the fast path, float64 on the exact re-check).

    Args:
        block: (n, k) float32 or float64 rows.
        directions: (G, k) directions, same dtype as ``block``.
        similarity: ``cosine`` (rows normalised; zero rows give 0) or ``dot``.

    Returns:
        (n, G) float64 similarities; non-finite in every column of a row that holds NaN/Inf or overflows.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are flagged, not warned about
        if directions.shape[0] <= VECDOT_MAX_GROUPS:
            dots = np.vecdot(block[:, None, :], directions[None, :, :])  # (n, 1, k)·(1, G, k) -> (n, G)
        else:
            dots = block @ directions.T  # (n, G)
        if similarity == "dot":
            return dots.astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block).astype(np.float64))  # (n,)
        sims = np.zeros(dots.shape, dtype=np.float64)
        np.divide(dots, norms[:, None], out=sims, where=norms[:, None] > 0)
    sims[~np.isfinite(norms)] = np.nan  # inf/NaN inputs or an overflowing norm: flag for the caller
    return sims


def _exact_block(rows: np.ndarray, directions: np.ndarray, similarity: str, where: str, start: int) -> np.ndarray:
    """Float64 re-check of a block whose float32 result was not finite: name bad rows, or fix an overflow."""
    block = np.asarray(rows, dtype=np.float64)  # (n, k)
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
    if bad.size:
        raise DataError(f"{where}: rows {(bad[:5] + start).tolist()} hold NaN or Inf")
    sims = similarity_block(block, directions, similarity)  # (n, G)
    if not np.isfinite(sims).all():
        raise DataError(f"{where}: similarities overflow float64 in rows {start}..{start + len(block) - 1}")
    return sims


def _check_trace_inputs(
    candidates_per_ckpt: Sequence[np.ndarray], directions: Sequence[np.ndarray], lrs: Sequence[float]
) -> tuple[int, int, int]:
    """Validate the arguments of `trace_parts`; return (N, k, G)."""
    n_ckpt = len(candidates_per_ckpt)
    if n_ckpt == 0:
        raise ShapeMismatchError("need at least one checkpoint")
    if len(directions) != n_ckpt or len(lrs) != n_ckpt:
        raise ShapeMismatchError(
            f"{n_ckpt} candidate matrices but {len(directions)} direction arrays and {len(lrs)} learning rates"
        )
    first = candidates_per_ckpt[0]
    if first.ndim != 2 or np.ndim(directions[0]) != 2:
        raise ShapeMismatchError(f"candidates must be (N, k) and directions (G, k), got {first.shape}")
    (n, k), g = first.shape, np.shape(directions[0])[0]
    for t, (cand, dirs, lr) in enumerate(zip(candidates_per_ckpt, directions, lrs, strict=True)):
        if cand.shape != (n, k) or np.shape(dirs) != (g, k):
            raise ShapeMismatchError(
                f"checkpoint {t}: candidates {cand.shape} / directions {np.shape(dirs)}, "
                f"expected ({n}, {k}) / ({g}, {k})"
            )
        if not np.issubdtype(cand.dtype, np.floating):
            raise DataError(f"checkpoint {t}: candidates must be floating point, got {cand.dtype}")
        if not np.isfinite(dirs).all():
            raise DataError(f"checkpoint {t}: anchor directions hold NaN or Inf")
        if not (math.isfinite(lr) and lr >= 0):
            raise DataError(f"checkpoint {t}: learning rate must be finite and >= 0, got {lr!r}")
    return n, k, g


def trace_parts(
    candidates_per_ckpt: Sequence[np.ndarray],
    directions: Sequence[np.ndarray],
    lrs: Sequence[float],
    similarity: str,
    chunk_rows: int,
) -> np.ndarray:
    """Per-checkpoint, per-group trace terms η_t · sim(g_t(z), ḡ_{t,g}), streamed in chunks.

    Args:
        candidates_per_ckpt: T arrays (N, k), float16 or float32, possibly `np.memmap`; row i of each is
            sample i.
        directions: T arrays (G, k) of anchor directions (`group_directions`).
        lrs: T learning rates η_t (finite, >= 0).
        similarity: ``cosine`` (zero-norm candidate rows get 0) or ``dot``.
        chunk_rows: rows converted and multiplied at a time; memory beyond the output is O(chunk_rows · k).

    Returns:
        (N, T, G) float64 array of η_t · sim.

    Raises:
        ShapeMismatchError: the shapes disagree across checkpoints or with the directions.
        DataError: a candidate row, direction or learning rate holds NaN/Inf (the message names checkpoint
            and row).
    """
    _check_similarity(similarity)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int | np.integer) or chunk_rows <= 0:
        raise ConfigError(f"chunk_rows: must be a positive integer, got {chunk_rows!r}")
    chunk_rows = int(chunk_rows)
    n, k, g = _check_trace_inputs(candidates_per_ckpt, directions, lrs)
    out = np.empty((n, len(candidates_per_ckpt), g), dtype=np.float64)  # (N, T, G)
    buf = np.empty((min(chunk_rows, n), k), dtype=np.float32)  # one reused conversion buffer
    for t, (cand, dirs, lr) in enumerate(zip(candidates_per_ckpt, directions, lrs, strict=True)):
        dirs64 = np.ascontiguousarray(dirs, dtype=np.float64)  # (G, k)
        dirs32 = dirs64.astype(np.float32)  # (G, k)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            block = buf[: stop - start]
            np.copyto(block, cand[start:stop], casting="same_kind")  # float16 -> float32, this chunk only
            sims = similarity_block(block, dirs32, similarity)  # (n_chunk, G)
            if not np.isfinite(sims).all():
                sims = _exact_block(cand[start:stop], dirs64, similarity, f"checkpoint {t}", start)
            out[start:stop, t, :] = float(lr) * sims
    return out


def best_group(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduce per-group trace terms to the best group per sample (max after summing over checkpoints).

    Args:
        parts: (N, T, G) trace terms from `trace_parts`.

    Returns:
        ``(scores, best_parts, group)``: (N,) float64 scores, (N, T) float64 parts of the best group with
        ``best_parts.sum(1) == scores``, and the (N,) index of the best group (the first one on ties).
    """
    totals = parts.sum(axis=1)  # (N, G)
    group = np.argmax(totals, axis=1) if parts.shape[0] else np.zeros(0, dtype=np.intp)  # (N,)
    best_parts = np.take_along_axis(parts, group[:, None, None], axis=2)[:, :, 0]  # (N, T)
    return best_parts.sum(axis=1), best_parts, group


def self_similarity(rows: np.ndarray, anchors: np.ndarray, similarity: str) -> np.ndarray:
    """Row-wise sim(rows[i], anchors[i]) in float64: (M, k), (M, k) -> (M,). Zero-norm rows give 0 (cosine)."""
    x, a = np.asarray(rows, dtype=np.float64), np.asarray(anchors, dtype=np.float64)
    dots = np.einsum("ij,ij->i", x, a)  # (M,)
    if similarity == "dot":
        return dots
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(a, axis=1)  # (M,)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def leave_one_out(
    parts: np.ndarray,
    rows_per_ckpt: Sequence[np.ndarray],
    anchors_per_ckpt: Sequence[np.ndarray],
    lrs: Sequence[float],
    group: np.ndarray,
    similarity: str,
    sizes: np.ndarray | None = None,
) -> np.ndarray:
    """Re-score anchor samples against the mean of the *other* anchors of their group.

    Scoring anchor i against a mean that includes anchor i adds a self term sim(g_i, a_i)/M — near 1/M, far above
    typical cross-sample similarities — and would inflate the mean-anchor threshold. Since the group mean is
    linear, mean_{j≠i} sim(g, a_j) = (M_g · mean_j sim(g, a_j) − sim(g, a_i)) / (M_g − 1).

    Args:
        parts: (M, T, G) trace terms of the anchor samples against the full group means (`trace_parts`).
        rows_per_ckpt: T (M, k) anchor samples as candidates; row i is anchor i.
        anchors_per_ckpt: T (M, k) anchor projections, same rows.
        lrs: T learning rates.
        group: (M,) group index of each anchor (column of ``parts``).
        similarity: ``cosine`` or ``dot``.
        sizes: (G,) anchors per group, when the rows given are a batch of the anchors (default: counted from
            ``group``).

    Returns:
        (M, T, G) corrected terms (columns of other groups unchanged).

    Raises:
        ShapeMismatchError: a group has fewer than two anchors.
    """
    if sizes is None:
        sizes = np.bincount(group, minlength=parts.shape[2])  # (G,)
    if (sizes[group] < 2).any():
        raise ShapeMismatchError("leave-one-out anchor scores need at least two anchors in every group")
    out = parts.copy()
    rows = np.arange(len(group))
    m = sizes[group].astype(np.float64)  # (M,)
    for t, (x, a, lr) in enumerate(zip(rows_per_ckpt, anchors_per_ckpt, lrs, strict=True)):
        own = float(lr) * self_similarity(x, a, similarity)  # (M,)
        out[rows, t, group] = (m * parts[rows, t, group] - own) / (m - 1)
    return out


def _check_anchors(anchors: Sequence[ProjectedGrads]) -> None:
    if len(anchors) == 0:
        raise IncompatibleArtifactError("no anchor projections given")
    for t, anc in enumerate(anchors):
        if anc.role != "anchor":
            raise IncompatibleArtifactError(f"anchor projections at position {t} have role {anc.role!r}")
        if anc.checkpoint != t:
            raise IncompatibleArtifactError(f"anchor projections at position {t} are for checkpoint {anc.checkpoint}")
        if anc.ids != anchors[0].ids:
            raise IncompatibleArtifactError(f"anchor ids at checkpoint {t} differ from checkpoint 0 (ids or order)")
        if len(anc) == 0:
            raise IncompatibleArtifactError(f"anchor projections at checkpoint {t} are empty")


def _check_silo(name: str, seq: Sequence[ProjectedGrads], lrs: Sequence[float], roles: tuple[str, ...]) -> None:
    if len(seq) != len(lrs):
        raise IncompatibleArtifactError(f"silo {name!r}: {len(seq)} checkpoints, anchors have {len(lrs)}")
    for t, (cand, lr) in enumerate(zip(seq, lrs, strict=True)):
        if cand.role not in roles:
            raise IncompatibleArtifactError(f"silo {name!r}: role {cand.role!r} at checkpoint {t}, need {roles}")
        if cand.checkpoint != t:
            raise IncompatibleArtifactError(f"silo {name!r}: position {t} holds checkpoint {cand.checkpoint}")
        if not math.isclose(cand.lr, lr, rel_tol=LR_REL_TOL, abs_tol=0.0):
            raise IncompatibleArtifactError(
                f"silo {name!r}: learning rate {cand.lr!r} at checkpoint {t} differs from the anchors' {lr!r}"
            )
        if cand.ids != seq[0].ids:
            raise IncompatibleArtifactError(f"silo {name!r}: ids at checkpoint {t} differ from checkpoint 0")
        if cand.preconditioned != seq[0].preconditioned:
            raise IncompatibleArtifactError(f"silo {name!r}: preconditioning differs between checkpoints")


@dataclass(frozen=True)
class AnchorDirections:
    """The anchor directions ḡ_{t,g} of every checkpoint t and group g, built once and streamed against.

    Attributes:
        groups: the G group names (``("all",)`` without groups).
        directions: T arrays (G, k) float64.
        lrs: the T learning rates η_t (the anchors').
        spec: the projection spec every candidate must share.
        similarity: ``cosine`` or ``dot``.
    """

    groups: tuple[str, ...]
    directions: tuple[np.ndarray, ...]
    lrs: tuple[float, ...]
    spec: ProjectionSpec
    similarity: str

    def group_index(self, labels: Sequence[str] | None, n: int) -> np.ndarray:
        """(n,) column of each anchor's group (all 0 without labels)."""
        if labels is None:
            return np.zeros(n, dtype=np.intp)
        return np.array([self.groups.index(str(label)) for label in labels], dtype=np.intp)


def build_anchor_directions(
    anchors: Sequence[ProjectedGrads], config: TraceConfig, anchor_groups: Sequence[str] | None = None
) -> AnchorDirections:
    """Check the T anchor projections (role ``anchor``, checkpoints 0..T-1, same ids) and build ḡ_{t,g}.

    Raises:
        IncompatibleArtifactError: see `score_projections`.
        DataError: NaN/Inf, or a zero-norm anchor under cosine similarity.
    """
    _check_anchors(anchors)
    spec = check_same_spec([a.spec for a in anchors], "anchor projections")
    grouped = [group_directions(a.matrix, anchor_groups, config.similarity) for a in anchors]
    return AnchorDirections(
        groups=grouped[0][0],
        directions=tuple(dirs for _, dirs in grouped),
        lrs=tuple(a.lr for a in anchors),
        spec=spec,
        similarity=config.similarity,
    )


def trace_block(
    anchors: AnchorDirections,
    seq: Sequence[ProjectedGrads],
    config: TraceConfig,
    name: str = "candidates",
    roles: tuple[str, ...] = ("candidate",),
) -> np.ndarray:
    """Trace terms of one block of samples (e.g. one silo, or one uploaded shard part) at every checkpoint.

    Args:
        anchors: from `build_anchor_directions`.
        seq: T projections of the same samples (same ids, in order), position t holding checkpoint t.
        config: similarity (must match ``anchors``) and chunk size.
        name: names the block in error messages.
        roles: accepted roles.

    Returns:
        (N, T, G) float64 terms η_t · sim(g_t(z), ḡ_{t,g}); `best_group` reduces them to scores.

    Raises:
        IncompatibleArtifactError, DataError: as `score_projections`, naming ``name``.
    """
    if config.similarity != anchors.similarity:
        raise ConfigError(f"similarity: {config.similarity!r} differs from the anchors' {anchors.similarity!r}")
    _check_silo(name, seq, anchors.lrs, roles)
    check_same_spec([anchors.spec] + [c.spec for c in seq], f"silo {name!r} and anchor projections")
    try:
        return trace_parts(
            [c.matrix for c in seq], list(anchors.directions), list(anchors.lrs), config.similarity, config.chunk_rows
        )
    except DataError as exc:
        raise DataError(f"silo {name!r}: {exc}") from exc


def per_anchor_directions(anchors: Sequence[ProjectedGrads], config: TraceConfig) -> AnchorDirections:
    """One "group" per anchor sample (named by its id): the directions `nearest_anchors` scores against."""
    return build_anchor_directions(anchors, config, anchor_groups=list(anchors[0].ids) if anchors else None)


def nearest_anchors(
    per_anchor: AnchorDirections, seq: Sequence[ProjectedGrads], config: TraceConfig, k: int = 3, rows: int = 2048
) -> tuple[list[list[str]], np.ndarray]:
    """Each sample's k most related anchor samples by the pairwise trace Σ_t η_t·sim(g_t(z), g_t(a)) (TracIn between
    the sample and one anchor), what the silo dashboard shows beside a sample's score.

    Args:
        per_anchor: from `per_anchor_directions`.
        seq: T projections of the same samples, checked as by `trace_block`.
        config: similarity (must match) and chunk size.
        k: anchors per sample (at most the number of anchors).
        rows: samples scored at a time; memory is O(rows · T · anchors).

    Returns:
        ``(ids, values)``: per sample the k anchor ids, most related first, and the (N, k) float64 traces.
    """
    if config.similarity != per_anchor.similarity:
        raise ConfigError(f"similarity: {config.similarity!r} differs from the anchors' {per_anchor.similarity!r}")
    n = len(seq[0]) if seq else 0
    k = max(0, min(k, len(per_anchor.groups)))
    idx, values = np.zeros((n, k), dtype=np.intp), np.zeros((n, k), dtype=np.float64)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        totals = trace_parts(
            [c.matrix[start:stop] for c in seq],
            list(per_anchor.directions),
            list(per_anchor.lrs),
            config.similarity,
            config.chunk_rows,
        ).sum(axis=1)  # (rows, A)
        top = np.argsort(-totals, axis=1, kind="stable")[:, :k]
        idx[start:stop], values[start:stop] = top, np.take_along_axis(totals, top, axis=1)
    return [[per_anchor.groups[j] for j in row] for row in idx.tolist()], values


def _score(
    candidates: Mapping[str, Sequence[ProjectedGrads]],
    anchors: Sequence[ProjectedGrads],
    config: TraceConfig,
    anchor_groups: Sequence[str] | None,
    roles: tuple[str, ...],
    exclude_self: bool = False,
) -> ScoreTable:
    """The one checked scoring path behind `score_projections` and `score_anchor_samples` (``exclude_self``)."""
    directions = build_anchor_directions(anchors, config, anchor_groups)
    if len({seq[0].preconditioned for seq in candidates.values() if seq}) > 1:
        raise IncompatibleArtifactError("some silos sent Adam-preconditioned gradients and others did not")
    ids: list[str] = []
    silos: list[str] = []
    chunks = [np.empty((0, len(anchors), len(directions.groups)))]  # (N_silo, T, G) per silo
    for name, seq in candidates.items():
        parts = trace_block(directions, seq, config, name, roles)
        if exclude_self:
            if seq[0].ids != anchors[0].ids:
                raise IncompatibleArtifactError("anchor samples as candidates must have the anchors' ids, in order")
            group = directions.group_index(anchor_groups, len(parts))
            parts = leave_one_out(
                parts, [c.matrix for c in seq], [a.matrix for a in anchors], directions.lrs, group, config.similarity
            )
        chunks.append(parts)
        ids.extend(seq[0].ids)
        silos.extend([name] * len(seq[0]))
    scores, parts, _ = best_group(np.concatenate(chunks))
    return ScoreTable(ids=tuple(ids), silos=tuple(silos), scores=scores, parts=parts)


def score_projections(
    candidates: Mapping[str, Sequence[ProjectedGrads]],
    anchors: Sequence[ProjectedGrads],
    config: TraceConfig,
    anchor_groups: Sequence[str] | None = None,
) -> ScoreTable:
    """Trace scores of every silo's candidates against the anchor set.

    Args:
        candidates: silo name -> T projections (role ``candidate``), position t holding checkpoint t; a silo's
            ids must be identical and in the same order at every checkpoint.
        anchors: T anchor projections (role ``anchor``, plain gradients), same ids and order at every
            checkpoint. Their learning rates are the η_t.
        config: similarity and chunk size.
        anchor_groups: optional (M,) group label per anchor row; the score is then the max over groups.

    Returns:
        A `ScoreTable` over all silos in mapping order (parts (N, T); no selection yet).

    Raises:
        IncompatibleArtifactError: specs differ, T differs, checkpoint indices are not 0..T-1 in order,
            learning rates differ from the anchors', a silo's ids change between checkpoints, roles are wrong,
            or silos differ in Adam preconditioning.
        ConfigError: a silo is named ``__anchor__`` (reserved).
        DataError: NaN/Inf in any projection, or a zero-norm anchor under cosine similarity.
    """
    if ANCHOR_OWNER in candidates:
        raise ConfigError(f"candidates: silo name {ANCHOR_OWNER!r} is reserved for the anchor samples")
    return _score(candidates, anchors, config, anchor_groups, roles=("candidate",))


def score_anchor_samples(
    anchors_as_candidates: Sequence[ProjectedGrads],
    anchors: Sequence[ProjectedGrads],
    config: TraceConfig,
    anchor_groups: Sequence[str] | None = None,
) -> ScoreTable:
    """Trace scores of the anchor set's own samples, reported under silo ``__anchor__``.

    Their mean is the CLUES threshold. Pass the anchors' projections prepared exactly as the silos prepared
    their candidates (e.g. Adam-preconditioned, role ``candidate``) so that the scores are comparable; the
    plain anchor projections (role ``anchor``) are accepted too. Each anchor is scored leave-one-out, against
    the mean of the other anchors of its group (`leave_one_out`): otherwise its own gradient would count in
    the direction it is compared with.

    Args:
        anchors_as_candidates: T projections of the anchor samples, as candidates.
        anchors: T anchor projections (role ``anchor``).
        config: similarity and chunk size.
        anchor_groups: optional (M,) group label per anchor row.

    Returns:
        A `ScoreTable` whose silos are all ``__anchor__``.

    Raises:
        The same errors as `score_projections`.
    """
    return _score(
        {ANCHOR_OWNER: anchors_as_candidates},
        anchors,
        config,
        anchor_groups,
        ("candidate", "anchor"),
        exclude_self=True,
    )
