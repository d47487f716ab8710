"""Naive reference implementations used as test oracles (plain Python loops, float64).

Deliberately slow and obvious: every sample × checkpoint × anchor similarity is computed one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _dot(x: Sequence[float], y: Sequence[float]) -> float:
    return math.fsum(float(a) * float(b) for a, b in zip(x, y, strict=True))


def naive_similarity(x: Sequence[float], y: Sequence[float], similarity: str) -> float:
    """cos(x, y) (0 when x is the zero vector) or x · y, in float64."""
    if similarity == "dot":
        return _dot(x, y)
    nx, ny = math.sqrt(_dot(x, x)), math.sqrt(_dot(y, y))
    return 0.0 if nx == 0 else _dot(x, y) / (nx * ny)


def naive_trace_scores(
    candidates: Sequence[Sequence[Sequence[float]]],
    anchors: Sequence[Sequence[Sequence[float]]],
    lrs: Sequence[float],
    similarity: str,
    groups: Sequence[str] | None = None,
    leave_one_out: bool = False,
) -> tuple[list[float], list[list[float]]]:
    """Scores and per-checkpoint parts by brute force.

    Args:
        candidates: [t][i] -> k values of sample i at checkpoint t.
        anchors: [t][j] -> k values of anchor j at checkpoint t.
        lrs: [t] learning rates.
        similarity: ``cosine`` or ``dot``.
        groups: [j] group label of anchor j, or None for one group.
        leave_one_out: candidate i is anchor i; leave anchor i out of the mean it is compared with.

    Returns:
        (scores [i], parts [i][t]) where the group maximising Σ_t is chosen (first in sorted order on ties).
    """
    n_anchor = len(anchors[0])
    labels = list(groups) if groups is not None else ["all"] * n_anchor
    scores, parts = [], []
    for i in range(len(candidates[0])):
        best_total, best_parts = -math.inf, None
        for group in sorted(set(labels)):
            members = [j for j in range(n_anchor) if labels[j] == group and not (leave_one_out and j == i)]
            group_parts = []
            for t in range(len(candidates)):
                sims = [naive_similarity(candidates[t][i], anchors[t][j], similarity) for j in members]
                group_parts.append(lrs[t] * (sum(sims) / len(sims)))
            if sum(group_parts) > best_total:
                best_total, best_parts = sum(group_parts), group_parts
        scores.append(sum(best_parts))
        parts.append(best_parts)
    return scores, parts


def naive_auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Pairwise count: P(pos > neg) + 0.5 · P(pos == neg) over all positive/negative pairs."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))
