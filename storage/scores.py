"""What the dashboards read about a scored job, and the owners' overrides of its decisions.

- `ScoreQuery` + `query_scores` / `iter_scores`: the sample table, filtered, sorted and paged in SQL (an index on
  ``(job_id, score)`` and ``(job_id, owner, score)`` keeps a page of a 100k-row job fast), streamed for CSV export.
- `build_summary`: score histograms per silo and for the anchors on shared bin edges, and the mean per-checkpoint
  terms; stored on the job (``jobs.summary``) once the job is scored. `decision_counts` gives the live kept counts
  (overrides change them; the histograms do not).
- `override`: an owner keeps or drops one of its samples (or returns it to the threshold's decision), recorded as an
  append-only `ScoreOverride`; `reapply_overrides` keeps the decisions in force when scores are replaced.
- `duplicate_clusters`: near-duplicate pairs joined into connected groups.

Like `storage.repository`, functions take the session first, flush, and never commit.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Row, Select, Text, and_, case, cast, func, select, text, update
from sqlalchemy.orm import Session

from storage.errors import NotFoundError
from storage.models import DECISIONS, DuplicatePair, Job, Score, ScoreOverride, ScorePart
from wire import ANCHOR_OWNER

SORT_COLUMNS = ("row", "score", "sample_id", "silo", "selected")
"""Sort keys of the sample table besides ``part:<t>`` (the term of checkpoint t)."""
HIST_BINS = 40
ANCHOR_SCORES_KEPT = 2000  # raw anchor scores kept in the summary for the distribution plot
MAX_REASON = 500


@dataclass(frozen=True)
class ScoreQuery:
    """Filters and order of the sample table.

    Attributes:
        owner: one silo (or `ANCHOR_OWNER`); None: every owner.
        selected: only kept (True) or dropped (False) samples, by the decision in force.
        overridden: only samples whose decision an owner overrode (True) or did not (False).
        min_score, max_score: inclusive score bounds.
        id_contains: case-insensitive substring of the sample id.
        sort: one of `SORT_COLUMNS` or ``part:<t>``; ties break by owner then upload order.
        descending: reverse the order.
    """

    owner: str | None = None
    selected: bool | None = None
    overridden: bool | None = None
    min_score: float | None = None
    max_score: float | None = None
    id_contains: str | None = None
    sort: str = "row"
    descending: bool = False

    def part_index(self) -> int | None:
        """t of a ``part:<t>`` sort, else None. Raises ValueError on an unknown sort key."""
        if self.sort in SORT_COLUMNS:
            return None
        name, _, t = self.sort.partition(":")
        if name != "part" or not t.isdigit():
            raise ValueError(f"sort: {self.sort!r} is not one of {', '.join(SORT_COLUMNS)} or part:<t>")
        return int(t)


def _filtered(stmt: Select, job_id: str, q: ScoreQuery) -> Select:
    stmt = stmt.where(Score.job_id == job_id)
    if q.owner is not None:
        stmt = stmt.where(Score.owner == q.owner)
    if q.selected is not None:
        stmt = stmt.where(Score.selected.is_(q.selected))
    if q.overridden is not None:
        stmt = stmt.where(Score.override_id.is_not(None) if q.overridden else Score.override_id.is_(None))
    if q.min_score is not None:
        stmt = stmt.where(Score.score >= q.min_score)
    if q.max_score is not None:
        stmt = stmt.where(Score.score <= q.max_score)
    if q.id_contains:
        stmt = stmt.where(func.lower(Score.sample_id).contains(q.id_contains.lower(), autoescape=True))
    return stmt


def _ordered(stmt: Select, q: ScoreQuery) -> Select:
    t = q.part_index()
    columns = {"score": Score.score, "sample_id": Score.sample_id, "silo": Score.owner, "selected": Score.selected}
    key = columns.get(q.sort)
    if t is not None:  # walk the (job, t, value) index of the terms' own table: no JSON decoded per row
        part = ScorePart.__table__.alias("part")
        on = [part.c.job_id == Score.job_id, part.c.owner == Score.owner, part.c.sample_id == Score.sample_id]
        stmt, key = stmt.join(part, and_(*on, part.c.t == t)), part.c.value
    ties = [Score.owner, Score.row]
    if key is None:
        return stmt.order_by(*(c.desc() for c in ties) if q.descending else ties)
    return stmt.order_by(key.desc() if q.descending else key.asc(), *ties)


def _columns(raw_json: bool) -> tuple:
    json_columns = (Score.parts, Score.nearest, Score.signal_values, Score.signal_z)
    parts, nearest, values, z = (cast(c, Text).label(c.key) for c in json_columns) if raw_json else json_columns
    return (Score.owner, Score.sample_id, Score.row, Score.score, parts, Score.selected, Score.auto_selected,
            Score.override_id, nearest, values, z, Score.flagged_by)  # fmt: skip


def query_scores(
    session: Session,
    *,
    job_id: str,
    query: ScoreQuery,
    limit: int | None = None,
    offset: int = 0,
    raw_json: bool = False,
) -> tuple[int, list[Row]]:
    """``(total rows matching, the page)`` of a job's scores under ``query``.

    Rows are plain column tuples read like a `Score` (``.owner``, ``.sample_id``, ``.score``, ``.parts``...), not
    tracked objects. ``raw_json``: ``parts``, ``nearest``, ``signal_values`` and ``signal_z`` come as the stored JSON
    text, undecoded (a server that passes them on verbatim skips decoding and re-encoding them: most of the cost of
    a 50k-row page).
    """
    total = session.scalar(_filtered(select(func.count()).select_from(Score), job_id, query)) or 0
    stmt = _ordered(_filtered(select(*_columns(raw_json)), job_id, query), query).offset(offset).limit(limit)
    return total, list(session.execute(stmt))


def iter_scores(session: Session, *, job_id: str, query: ScoreQuery, batch: int = 5000) -> Iterator[Row]:
    """Every score matching ``query`` in its order (rows as `query_scores` gives them), fetched ``batch`` rows at a
    time (for exports)."""
    stmt = _ordered(_filtered(select(*_columns(False)), job_id, query), query).execution_options(yield_per=batch)
    yield from session.execute(stmt)


def owner_scores(
    session: Session, *, job_id: str, owners: Sequence[str], exclude: Mapping[str, Collection[str]] | None = None
) -> dict[str, list[tuple[float, bool]]]:
    """Per owner, ``(score, selected)`` of every one of its samples in the job (what it may train on, and the score
    mass that can have: `workers.training.known_selection`), leaving out the sample ids ``exclude`` lists for it
    (samples withdrawn from a training job)."""
    out: dict[str, list[tuple[float, bool]]] = {o: [] for o in owners}
    gone = exclude or {}
    stmt = select(Score.owner, Score.sample_id, Score.score, Score.selected).where(
        Score.job_id == job_id, Score.owner.in_(owners)
    )
    for owner, sample_id, score, selected in session.execute(stmt):
        if sample_id not in gone.get(owner, ()):
            out[owner].append((float(score), bool(selected)))
    return out


def owner_sample_ids(session: Session, *, job_id: str, owner: str) -> set[str]:
    """The sample ids of one owner in a job."""
    return set(session.scalars(select(Score.sample_id).where(Score.job_id == job_id, Score.owner == owner)))


def decision_counts(session: Session, *, job_id: str) -> dict[str, dict[str, int]]:
    """Per owner: ``n``, ``kept`` (decision in force), ``auto_kept`` (threshold's decision) and ``overridden``."""
    stmt = (
        select(
            Score.owner,
            func.count(),
            func.sum(case((Score.selected, 1), else_=0)),
            func.sum(case((Score.auto_selected, 1), else_=0)),
            func.count(Score.override_id),
        )
        .where(Score.job_id == job_id)
        .group_by(Score.owner)
    )
    return {
        owner: {"n": n, "kept": int(kept or 0), "auto_kept": int(auto or 0), "overridden": int(over or 0)}
        for owner, n, kept, auto, over in session.execute(stmt)
    }


def histogram_edges(scores: np.ndarray, threshold: float | None, bins: int = HIST_BINS) -> np.ndarray:
    """``bins + 1`` edges spanning ``scores`` and the threshold (a unit interval around a single value)."""
    lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
    if threshold is not None and math.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def owner_histogram(session: Session, *, job_id: str, owner: str, bins: int = HIST_BINS) -> tuple[list, list]:
    """``(edges, counts)`` of one owner's scores on edges spanning only its scores and the threshold: what a silo
    may see (the shared edges of the summary would give away the range of every other silo's scores)."""
    threshold = session.scalar(select(Job.threshold_value).where(Job.id == job_id))
    scores = np.array(
        session.scalars(select(Score.score).where(Score.job_id == job_id, Score.owner == owner)).all(), dtype=np.float64
    )
    edges = histogram_edges(scores, threshold, bins)
    return edges.tolist(), np.histogram(scores, bins=edges)[0].tolist()


SummaryRow = tuple[str, float, Sequence[float], bool]
"""(owner, score, per-checkpoint terms, the threshold's decision) of one sample."""


def build_summary(
    session: Session, *, job_id: str, bins: int = HIST_BINS, rows: Iterable[SummaryRow] | None = None
) -> dict[str, Any]:
    """Histograms and per-checkpoint means of a job's scores (see the module docstring): of ``rows`` when the caller
    holds them (it just wrote them), else read from the database.

    Returns:
        ``{"edges": [bins+1 floats], "threshold", "checkpoints": T, "owners": {owner: {"n", "counts", "mean",
        "median", "part_means", "part_means_kept", "part_means_dropped"}}, "anchor_scores": [...]}``; the anchor
        samples are owner `ANCHOR_OWNER`. Kept/dropped use the threshold's own decision.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"job '{job_id}' does not exist")
    by_owner: dict[str, tuple[list[float], list[Sequence[float]], list[bool]]] = {}
    if rows is None:
        stmt = select(Score.owner, Score.score, Score.parts, Score.auto_selected).where(Score.job_id == job_id)
        # each owner's rows in upload order, as writers hand them over: the same sums to the last bit either way
        rows = session.execute(stmt.order_by(Score.owner, Score.row).execution_options(yield_per=10_000))
    for owner, score, parts, kept in rows:
        scores, terms, flags = by_owner.setdefault(owner, ([], [], []))
        scores.append(score)
        terms.append(parts)
        flags.append(kept)
    everything = np.array([s for scores, _, _ in by_owner.values() for s in scores], dtype=np.float64)
    edges = histogram_edges(everything, job.threshold_value, bins)
    T = len(job.checkpoints)
    owners: dict[str, Any] = {}
    for owner, (scores, terms, flags) in sorted(by_owner.items()):
        s = np.asarray(scores, dtype=np.float64)
        parts = np.asarray(terms, dtype=np.float64).reshape(len(scores), -1)  # (n, T)
        kept = np.asarray(flags, dtype=bool)

        def means(mask: np.ndarray, parts: np.ndarray = parts) -> list[float] | None:
            return parts[mask].mean(axis=0).tolist() if mask.any() else None

        owners[owner] = {
            "n": len(s),
            "counts": np.histogram(s, bins=edges)[0].tolist(),
            "mean": float(s.mean()),
            "median": float(np.median(s)),
            "part_means": means(np.ones(len(s), dtype=bool)),
            "part_means_kept": means(kept),
            "part_means_dropped": means(~kept),
        }
    anchor = by_owner.get(ANCHOR_OWNER, ([], [], []))[0]
    return {
        "edges": edges.tolist(),
        "threshold": job.threshold_value,
        "checkpoints": T,
        "owners": owners,
        "anchor_scores": sorted(anchor)[:: max(1, math.ceil(len(anchor) / ANCHOR_SCORES_KEPT))],
    }


def refresh_statistics(session: Session) -> None:
    """Give PostgreSQL's planner fresh statistics on the score tables after a job's scores were bulk-written.

    Without them (autovacuum has not run yet, or is off) PostgreSQL plans the ``part:<t>`` sort of a fresh 100k-row
    job as a nested loop that did not answer within a minute, instead of walking the ``(job, t, value)`` index
    (`bench/dashboard.py`). SQLite is left alone: with no statistics it already walks the indexes, and with them it
    chooses a slower scan-and-sort for that query.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ANALYZE scores, score_parts"))


def store_summary(session: Session, *, job_id: str, rows: Iterable[SummaryRow] | None = None) -> dict[str, Any]:
    """Build the job's summary (of ``rows``, else of its stored scores) and keep it on the job row."""
    summary = build_summary(session, job_id=job_id, rows=rows)
    job = session.get(Job, job_id)
    assert job is not None  # build_summary raised otherwise
    job.summary = summary
    session.flush()
    return summary


# --- overrides -----------------------------------------------------------------------------------------------------


def override(
    session: Session, *, job_id: str, owner: str, sample_id: str, decision: str, reason: str, actor: str
) -> ScoreOverride:
    """Record an owner's decision about one sample and put it in force.

    ``keep``/``drop`` set the decision; ``auto`` returns to the threshold's own. The score row is locked while the
    record is written, so two concurrent overrides of one sample apply in the order they are recorded.

    Raises:
        ValueError: unknown decision, or an empty or over-long reason.
        NotFoundError: the job holds no score for (owner, sample_id).
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision: {decision!r} is not one of {', '.join(DECISIONS)}")
    reason = reason.strip()
    if not reason or len(reason) > MAX_REASON:
        raise ValueError(f"reason: must be 1 to {MAX_REASON} characters, got {len(reason)}")
    # populate_existing: a row this session read earlier is re-read under the lock, not served stale from its cache
    score = session.get(Score, (job_id, owner, sample_id), with_for_update=True, populate_existing=True)
    if score is None:
        raise NotFoundError(f"job '{job_id}' has no score for sample '{sample_id}' of {owner}")
    selected = score.auto_selected if decision == "auto" else decision == "keep"
    record = ScoreOverride(
        job_id=job_id,
        owner=owner,
        sample_id=sample_id,
        decision=decision,
        reason=reason,
        actor=actor,
        previous=score.selected,
        selected=selected,
    )
    session.add(record)
    session.flush()
    score.selected = selected
    score.override_id = None if decision == "auto" else record.id
    session.flush()
    return record


def list_overrides(
    session: Session,
    *,
    job_id: str,
    owner: str | None = None,
    sample_id: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> tuple[int, list[ScoreOverride]]:
    """``(total, page)`` of a job's override records, newest first."""
    conds = [ScoreOverride.job_id == job_id]
    if owner is not None:
        conds.append(ScoreOverride.owner == owner)
    if sample_id is not None:
        conds.append(ScoreOverride.sample_id == sample_id)
    total = session.scalar(select(func.count()).select_from(ScoreOverride).where(*conds)) or 0
    stmt = select(ScoreOverride).where(*conds).order_by(ScoreOverride.id.desc()).offset(offset).limit(limit)
    return total, list(session.scalars(stmt))


def overrides_by_id(session: Session, ids: Sequence[int]) -> dict[int, ScoreOverride]:
    """The override records named by ``ids`` (e.g. a page of scores' ``override_id``)."""
    wanted = sorted({i for i in ids if i is not None})
    if not wanted:
        return {}
    return {o.id: o for o in session.scalars(select(ScoreOverride).where(ScoreOverride.id.in_(wanted)))}


def reapply_overrides(session: Session, *, job_id: str) -> int:
    """Put each sample's latest override back in force after its job's scores were replaced (a rescore resets
    ``selected`` to the threshold's decision). Returns how many decisions were overridden."""
    latest: dict[tuple[str, str], ScoreOverride] = {}
    for record in session.scalars(
        select(ScoreOverride).where(ScoreOverride.job_id == job_id).order_by(ScoreOverride.id)
    ):
        latest[(record.owner, record.sample_id)] = record
    applied = 0
    for r in (r for r in latest.values() if r.decision != "auto"):
        applied += session.execute(
            update(Score)
            .where(and_(Score.job_id == job_id, Score.owner == r.owner, Score.sample_id == r.sample_id))
            .values(selected=r.decision == "keep", override_id=r.id)
        ).rowcount  # type: ignore[attr-defined]  # 0 when the sample is no longer scored
    session.flush()
    return applied


# --- near-duplicate clusters ---------------------------------------------------------------------------------------


def duplicate_clusters(session: Session, *, job_id: str) -> list[dict[str, Any]]:
    """Near-duplicate pairs joined into connected groups, largest first.

    Returns:
        ``[{"members": [{"silo", "sample_id", "score", "selected"}], "silos": [...], "pairs": n,
        "max_similarity": s}]``; a member's score/selected are None when the job holds no score for it.
    """
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(x: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    pairs = list(session.scalars(select(DuplicatePair).where(DuplicatePair.job_id == job_id)))
    for p in pairs:
        a, b = find((p.owner_a, p.sample_a)), find((p.owner_b, p.sample_b))
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for member in parent:
        groups.setdefault(find(member), []).append(member)
    stats: dict[tuple[str, str], list[float]] = {}
    for p in pairs:
        stats.setdefault(find((p.owner_a, p.sample_a)), []).append(p.similarity)
    members = [m for group in groups.values() for m in group]
    scored = _scores_of(session, job_id, members)
    clusters = [
        {
            "members": [
                {"silo": o, "sample_id": s, **scored.get((o, s), {"score": None, "selected": None})}
                for o, s in sorted(group)
            ],
            "silos": sorted({o for o, _ in group}),
            "pairs": len(stats[root]),
            "max_similarity": max(stats[root]),
        }
        for root, group in groups.items()
    ]
    clusters.sort(key=lambda c: (-len(c["members"]), -c["max_similarity"], c["members"][0]["sample_id"]))
    return clusters


def _scores_of(session: Session, job_id: str, members: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """Score and decision of each (owner, sample id): per owner, ``sample_id IN (...)`` in chunks of 500 — primary
    key lookups whatever the planner knows (an OR of pairs made both databases scan the job's rows)."""
    by_owner: dict[str, list[str]] = {}
    for owner, sid in members:
        by_owner.setdefault(owner, []).append(sid)
    out: dict[tuple[str, str], dict] = {}
    for owner, ids in by_owner.items():
        for start in range(0, len(ids), 500):
            stmt = select(Score.sample_id, Score.score, Score.selected).where(
                Score.job_id == job_id, Score.owner == owner, Score.sample_id.in_(ids[start : start + 500])
            )
            for sid, score, selected in session.execute(stmt):
                out[(owner, sid)] = {"score": score, "selected": selected}
    return out
