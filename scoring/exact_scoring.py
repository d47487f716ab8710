"""Silo-local scoring on exact gradients: the trace against the unprojected anchor directions, streamed batch by
batch so that no party ever holds its samples' gradients.

With every linear layer of SmolLM2 adapted at r = 8, a sample's LoRA gradient has D ≈ 2.4 M values: 9.7 MB in
float32, so a pool of 10 000 samples is 97 GB per checkpoint. In a shared job that is why silos send projections.
In a silo-local job (`scoring.local_scoring`) nothing per-sample is sent, and exact cosines are affordable:

- the coordinator streams its anchors twice per checkpoint (`exact_anchor_values`): the first pass sums the anchor
  rows into the direction ḡ_t (``scoring.traces.anchor_direction``'s: the mean of the unit rows for cosine), the
  second scores each anchor against it, leaving itself out (`scoring.traces.leave_one_out`); it keeps ḡ_t (D
  float64 values per checkpoint) and M scores, never the M × D rows;
- each silo streams its samples once per checkpoint against the published ḡ_t (`exact_local_scores`), keeping only
  the (N, T) trace terms.

Both sides run the coordinator's own arithmetic on each batch (`scoring.traces.trace_parts`, the same float32 path
as a projected job), so a silo's exact scores equal the coordinator-side scores of the same gradients to float
rounding; only the published directions are rounded to float32 on the wire (`scoring.io.reference`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scoring.data import Sample
from scoring.errors import IncompatibleArtifactError, ShapeMismatchError
from scoring.local_scoring import LocalScores, ScoringReference, score_parts
from scoring.projection import flatten_grads
from scoring.traces import LR_REL_TOL, AnchorDirections, anchor_direction, best_group, leave_one_out, trace_parts
from scoring.workflow import GradientPass, ModelOptions, Progress, ProjectOptions, release_memory

CHUNK_ROWS = 64
"""Rows multiplied at a time: a batch of exact rows is already 9.7 MB per sample (SmolLM2, r = 8)."""


def exact_anchor_values(
    run_dir: Path,
    anchors: Sequence[Sample],
    similarity: str,
    opts: ProjectOptions | None = None,
    model_opts: ModelOptions | None = None,
    progress: Progress | None = None,
) -> tuple[AnchorDirections, dict[str, np.ndarray]]:
    """The exact anchor directions of every checkpoint and the anchor samples' raw values, in two streamed passes
    per checkpoint (see the module docstring).

    Returns:
        ``(directions, values)``: ḡ_t as (1, D) float64 arrays; ``values`` holds each anchor's leave-one-out
        ``trace`` (as candidate: preconditioned when ``opts.precondition``), and ``loss`` and ``opts.signals`` at
        the signal checkpoint, each (M,) in the order of ``anchors``.

    Raises:
        ShapeMismatchError: fewer than two anchors (leave-one-out needs two).
        scoring.errors.DataError: an anchor gradient holds NaN/Inf or (cosine) is zero.
        scoring.errors.ConfigError: as `scoring.workflow.GradientPass`.
    """
    m = len(anchors)
    if m < 2:
        raise ShapeMismatchError(f"leave-one-out anchor scores need at least two anchors, got {m}")
    try:
        with GradientPass(run_dir, anchors, opts or ProjectOptions(), model_opts or ModelOptions(), progress, 2) as g:
            return _anchor_passes(g, m, similarity)
    finally:
        release_memory()  # the model's freed buffers back to the OS (several GiB for SmolLM2)


def _anchor_passes(grads: GradientPass, m: int, similarity: str) -> tuple[AnchorDirections, dict[str, np.ndarray]]:
    directions, parts, values = [], np.zeros((m, len(grads.run_checkpoints), 1)), {}
    for t, ckpt in enumerate(grads.checkpoints()):
        total: np.ndarray | float = 0.0
        for batch in grads.batches(ckpt):
            rows = flatten_grads(batch.grads).cpu().numpy()
            total = total + len(batch.rows) * anchor_direction(rows, similarity)  # sum of (unit) rows, float64
        direction = (np.asarray(total) / m)[None, :]  # (1, D)
        directions.append(direction)
        loss = np.zeros(m)
        for batch in grads.batches(ckpt):
            x = flatten_grads(batch.candidate).cpu().numpy()
            a = flatten_grads(batch.grads).cpu().numpy()
            terms = trace_parts([x], [direction], [ckpt.lr], similarity, CHUNK_ROWS)  # (B, 1, 1)
            group = np.zeros(len(batch.rows), dtype=np.intp)
            terms = leave_one_out(terms, [x], [a], [ckpt.lr], group, similarity, sizes=np.array([m]))
            parts[batch.rows, t] = terms[:, 0]
            loss[batch.rows] = batch.losses.cpu().numpy()
        if ckpt.index == grads.signal_at:
            values = {"loss": loss, **(grads.signals(ckpt) or {})}
    trace, _, _ = best_group(parts)
    anchor = AnchorDirections(
        groups=("all",),
        directions=tuple(directions),
        lrs=tuple(float(c.lr) for c in grads.run_checkpoints),
        spec=grads.spec,
        similarity=similarity,
    )
    return anchor, {"trace": trace, **{k: np.asarray(v, dtype=np.float64) for k, v in values.items()}}


def exact_local_scores(
    run_dir: Path,
    samples: Sequence[Sample],
    reference: ScoringReference,
    opts: ProjectOptions | None = None,
    model_opts: ModelOptions | None = None,
    progress: Progress | None = None,
) -> tuple[LocalScores, dict[str, np.ndarray]]:
    """Score a silo's samples on their exact gradients against an exact reference, streamed (see the module
    docstring); also returns the raw values of the signal checkpoint (``loss`` and ``opts.signals``).

    Raises:
        ShapeMismatchError: the reference's checkpoints or gradient length are not the run's.
        IncompatibleArtifactError: a checkpoint's learning rate differs from the reference's.
        scoring.errors.DataError: a gradient holds NaN/Inf.
    """
    try:
        with GradientPass(run_dir, samples, opts or ProjectOptions(), model_opts or ModelOptions(), progress) as g:
            return _silo_pass(g, reference, len(samples))
    finally:
        release_memory()


def _silo_pass(grads: GradientPass, reference: ScoringReference, n: int) -> tuple[LocalScores, dict[str, np.ndarray]]:
    n_params = sum(math.prod(shape) for _, shape in grads.manifest["layout"])
    if reference.dim != n_params:
        raise ShapeMismatchError(
            f"the reference's directions have {reference.dim} values; this run's exact gradients {n_params} "
            "(a projected job's reference is scored on projections)"
        )
    if len(reference.lrs) != len(grads.run_checkpoints):
        raise ShapeMismatchError(
            f"the reference has {len(reference.lrs)} checkpoint(s); the run {len(grads.run_checkpoints)}"
        )
    parts = np.zeros((n, len(reference.lrs), len(reference.groups)))
    values: dict[str, np.ndarray] = {}
    for t, ckpt in enumerate(grads.checkpoints()):
        lr = reference.lrs[t]
        if not math.isclose(ckpt.lr, lr, rel_tol=LR_REL_TOL, abs_tol=0.0):
            raise IncompatibleArtifactError(f"checkpoint {t}: learning rate {ckpt.lr!r}, the reference's {lr!r}")
        loss = np.zeros(n)
        for batch in grads.batches(ckpt):
            x = flatten_grads(batch.candidate).cpu().numpy()
            parts[batch.rows, t] = trace_parts([x], [reference.directions[t]], [lr], reference.similarity, CHUNK_ROWS)[
                :, 0
            ]
            loss[batch.rows] = batch.losses.cpu().numpy()
        if ckpt.index == grads.signal_at:
            values = {"loss": loss, **(grads.signals(ckpt) or {})}
    values = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    return score_parts(reference, parts, values), values
