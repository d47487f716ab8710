"""A scoring job's results: scores (replaced as a whole) and near-duplicate pairs."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from storage import scores
from storage.models import (
    DuplicatePair,
    Score,
    ScorePart,
)

BATCH_ROWS = 10_000
"""Score rows per INSERT batch."""


def _replace(
    session: Session, model: type[Score | ScorePart | DuplicatePair], job_id: str, rows: Iterable[dict]
) -> int:
    session.execute(delete(model).where(model.job_id == job_id))
    count, it = 0, iter(rows)
    while batch := [{**r, "job_id": job_id} for r in islice(it, BATCH_ROWS)]:
        session.execute(insert(model), batch)
        count += len(batch)
    session.flush()
    return count


def replace_scores(session: Session, *, job_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """Replace all scores of a job; rows have ``owner, sample_id, row, score, parts, selected`` and optionally
    ``nearest``, ``signal_values``, ``signal_z``, ``flagged_by`` (see `Score`). ``selected`` is the threshold's
    decision: the owners' overrides are put back in force over it, and the job's summary is rebuilt. Returns the
    count."""
    optional = {"nearest": None, "signal_values": None, "signal_z": None, "flagged_by": None}
    rows = [{**optional, **r, "auto_selected": r["selected"], "override_id": None} for r in rows]
    count = _replace(session, Score, job_id, rows)
    _replace(
        session,
        ScorePart,
        job_id,
        (
            {"owner": r["owner"], "sample_id": r["sample_id"], "t": t, "value": float(v)}
            for r in rows
            for t, v in enumerate(r["parts"])
        ),
    )
    scores.reapply_overrides(session, job_id=job_id)
    scores.store_summary(
        session, job_id=job_id, rows=((r["owner"], r["score"], r["parts"], r["auto_selected"]) for r in rows)
    )
    scores.refresh_statistics(session)
    return count


def replace_duplicates(session: Session, *, job_id: str, pairs: Iterable[dict[str, Any]]) -> int:
    """Replace a job's near-duplicate pairs (dicts as `vector_index.near_duplicates` gives them); return the count."""
    return _replace(session, DuplicatePair, job_id, pairs)


def list_duplicates(session: Session, *, job_id: str) -> list[DuplicatePair]:
    """A job's near-duplicate pairs, most similar first."""
    stmt = select(DuplicatePair).where(DuplicatePair.job_id == job_id)
    return list(session.scalars(stmt.order_by(DuplicatePair.similarity.desc(), DuplicatePair.id)))
