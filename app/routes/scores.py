"""A scored job's results: the sample table (filtered, sorted and paged server-side; CSV export), the summary the
dashboards chart, near-duplicates, and the owners' overrides of keep/drop decisions (an audited record each; the
decision in force is what masks and training jobs use).

The admin sees every silo's rows (ids and scores, never text: the coordinator has none); a silo sees only its own.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import Row

from app.deps import AdminDep, JobId, Principal, PrincipalDep, SessionDep, SiloDep, StateDep
from app.errors import ApiError
from app.schemas import (
    ClusterMember,
    DuplicateCluster,
    DuplicateClusters,
    DuplicatePair,
    OverrideCreate,
    OverrideInfo,
    OverrideLog,
    OverridePublic,
    OwnerSummary,
    ScoresPublic,
    ScoreSummary,
)
from app.services.jobs import job_for, visible_status
from scoring.calibration import EXPLANATIONS, fused_signals
from scoring.errors import ConfigError
from scoring.spec import JobSpec
from storage import repository as repo
from storage import scores as score_store
from storage.errors import ConflictError
from storage.models import Job, ScoreOverride
from webui import signal_columns
from wire import ANCHOR_OWNER, API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/jobs", tags=["scores"])

Silo = Annotated[str | None, Query(max_length=64, description="one silo (admin only; __anchor__: the anchor samples)")]
Kept = Annotated[bool | None, Query(description="only kept (true) or dropped (false) samples (decision in force)")]
Overridden = Annotated[bool | None, Query(description="only samples whose decision the owner overrode (or did not)")]
MinScore = Annotated[float | None, Query(allow_inf_nan=False, description="scores at or above")]
MaxScore = Annotated[float | None, Query(allow_inf_nan=False, description="scores at or below")]
Search = Annotated[str | None, Query(max_length=200, description="case-insensitive substring of the sample id")]
Sort = Annotated[
    str,
    Query(
        max_length=16,
        pattern=r"^(row|score|sample_id|silo|selected|part:\d{1,4})$",
        description="row (upload order), score, sample_id, silo, selected, or part:<t> (checkpoint t's term)",
    ),
]
Order = Annotated[Literal["asc", "desc"], Query()]
Limit = Annotated[int | None, Query(ge=1, le=1_000_000, description="page size; all rows when absent")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="rows to skip")]


def _scored(session, job_id: str, principal: Principal) -> Job:
    job = job_for(session, job_id, principal)
    if job.status != "done":
        message, _ = visible_status(job, principal, session)
        raise ConflictError(f"job {job_id} is {job.status!r} ({message}); scores exist once it is 'done'")
    return job


def _owner(principal: Principal, silo: str | None) -> str | None:
    """The owner filter a caller may use: the admin any (or none), a silo only itself."""
    if principal.is_admin:
        return silo
    if silo not in (None, principal.silo.name):
        raise ApiError(403, "a silo may read only its own scores")
    return principal.silo.name


@dataclass(frozen=True)
class ScoreFilters:
    """The sample table's filters and order as the query parameters gave them (`score_filters`)."""

    silo: str | None
    kept: bool | None
    overridden: bool | None
    min_score: float | None
    max_score: float | None
    q: str | None
    sort: str
    order: str

    def query(self, job: Job, principal: Principal) -> score_store.ScoreQuery:
        """The storage query: the caller's own rows only for a silo (`_owner`), ``part:<t>`` checked against T."""
        query = score_store.ScoreQuery(
            owner=_owner(principal, self.silo),
            selected=self.kept,
            overridden=self.overridden,
            min_score=self.min_score,
            max_score=self.max_score,
            id_contains=self.q or None,
            sort=self.sort,
            descending=self.order == "desc",
        )
        t = query.part_index()
        if t is not None and t >= len(job.checkpoints):
            T = len(job.checkpoints)
            raise ConfigError(f"sort: part:{t} names no checkpoint; job {job.id} has {T} (0..T-1)")
        return query


def score_filters(
    silo: Silo = None,
    kept: Kept = None,
    overridden: Overridden = None,
    min_score: MinScore = None,
    max_score: MaxScore = None,
    q: Search = None,
    sort: Sort = "row",
    order: Order = "asc",
) -> ScoreFilters:
    """The query parameters the JSON table and its CSV export share."""
    return ScoreFilters(silo, kept, overridden, min_score, max_score, q, sort, order)


Filters = Annotated[ScoreFilters, Depends(score_filters)]


def _cell(text: str) -> str:
    """A text cell a spreadsheet will not run as a formula (ids and reasons come from silos)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _override_info(record: ScoreOverride | None) -> OverrideInfo | None:
    if record is None:
        return None
    return OverrideInfo(
        id=record.id, decision=record.decision, reason=record.reason, actor=record.actor, created_at=record.created_at
    )


def _row_json(r: Row, overrides: dict[int, ScoreOverride]) -> str:
    """One `ScoreRow` as JSON text, with ``parts`` and ``nearest`` spliced in as stored (``raw_json`` rows): a
    50k-row page is served without decoding, validating and re-encoding 100k small JSON values. The route's
    ``response_model`` documents the shape; the tests check answers against it."""
    o = overrides.get(r.override_id) if r.override_id is not None else None
    override = "null" if o is None else _override_info(o).model_dump_json()
    return (
        f'{{"silo":{json.dumps(r.owner)},"sample_id":{json.dumps(r.sample_id)},"score":{float(r.score)!r},'
        f'"parts":{r.parts},"selected":{_JSON_BOOL[r.selected]},"auto_selected":{_JSON_BOOL[r.auto_selected]},'
        f'"override":{override},"nearest_anchors":{r.nearest or "null"},"values":{r.signal_values or "null"},'
        f'"z":{r.signal_z or "null"},"flagged_by":{json.dumps(r.flagged_by)},'
        f'"flag_reason":{json.dumps(EXPLANATIONS.get(r.flagged_by))}}}'
    )


_JSON_BOOL = {True: "true", False: "false"}


@router.get("/{job_id}/scores", operation_id="get_scores", response_model=ScoresPublic)
def get_scores(
    job_id: JobId,
    session: SessionDep,
    principal: PrincipalDep,
    filters: Filters,
    limit: Limit = None,
    offset: Offset = 0,
) -> Response:
    """Scores and masks, filtered, sorted and paged in the database: all silos' (and the anchor samples', silo
    ``__anchor__``) for the admin; a silo gets only its own. 409 until the job is ``done``."""
    job = _scored(session, job_id, principal)
    query = filters.query(job, principal)
    total, rows = score_store.query_scores(
        session, job_id=job_id, query=query, limit=limit, offset=offset, raw_json=True
    )
    overrides = score_store.overrides_by_id(session, [r.override_id for r in rows])
    head = json.dumps({"job": job_id, "status": job.status, "threshold": job.threshold_value, "total": total})
    body = f'{head[:-1]},"rows":[{",".join(_row_json(r, overrides) for r in rows)}]}}'
    return Response(body, media_type="application/json")


@router.get(
    "/{job_id}/scores.csv",
    operation_id="export_scores_csv",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "one row per sample"}},
)
def export_scores_csv(
    job_id: JobId,
    state: StateDep,
    session: SessionDep,
    principal: PrincipalDep,
    filters: Filters,
) -> StreamingResponse:
    """The rows `get_scores` would return (same filters and order, no paging) as CSV: silo, sample_id, score,
    part_0..part_{T-1}, selected, auto_selected, override (decision) and override_reason, nearest (anchor ids); then,
    for a job that keeps them, each raw value (trace, loss, and the signals the job asks for), and for a calibrated
    job each fused signal's z (``z_<signal>``), flagged_by and flag_reason (in words)."""
    job = _scored(session, job_id, principal)
    query = filters.query(job, principal)
    T = len(job.checkpoints)
    spec = JobSpec.of(job)
    values, fused = signal_columns(spec.to_dict(), fused_signals(spec.signals))

    def lines() -> Iterator[str]:
        buf = io.StringIO()
        out = csv.writer(buf)
        parts = [f"part_{t}" for t in range(T)]
        tail = ["selected", "auto_selected", "override", "override_reason", "nearest"]
        flags = ["flagged_by", "flag_reason"] if fused else []
        out.writerow(["silo", "sample_id", "score", *parts, *tail, *values, *(f"z_{s}" for s in fused), *flags])
        with state.sessions() as db:  # the request's session is closed before a streamed body is sent
            rows = score_store.iter_scores(db, job_id=job_id, query=query)
            while batch := [r for _, r in zip(range(2000), rows, strict=False)]:
                overrides = score_store.overrides_by_id(db, [r.override_id for r in batch])
                for r in batch:
                    o = overrides.get(r.override_id) if r.override_id is not None else None
                    decision, reason = (o.decision, o.reason) if o else ("", "")
                    nearest = ";".join(a["anchor_id"] for a in r.nearest or [])
                    terms = [repr(p) for p in r.parts]
                    decided = [int(r.selected), int(r.auto_selected), decision, _cell(reason), _cell(nearest)]
                    out.writerow([r.owner, _cell(r.sample_id), repr(r.score), *terms, *decided, *_signal_cells(r)])
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        if buf.tell():
            yield buf.getvalue()

    def _signal_cells(r: Row) -> list[str]:
        got, z = r.signal_values or {}, r.signal_z or {}
        cells = [repr(got[n]) if n in got else "" for n in values] + [repr(z[s]) if s in z else "" for s in fused]
        return cells + ([r.flagged_by or "", EXPLANATIONS.get(r.flagged_by, "")] if fused else [])

    name = f"clues-{job_id}-scores.csv"
    return StreamingResponse(
        lines(), media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


@router.get("/{job_id}/summary", operation_id="get_score_summary")
def get_summary(job_id: JobId, session: SessionDep, principal: PrincipalDep) -> ScoreSummary:
    """What the dashboards chart: score histograms on shared bin edges, kept counts (overrides included) and mean
    per-checkpoint terms per silo; for the admin also the anchor samples' (``__anchor__``) and their scores."""
    job = _scored(session, job_id, principal)
    summary = job.summary
    if summary is None:  # scored before summaries were kept: build it once
        summary = score_store.store_summary(session, job_id=job_id)
        session.commit()
    counts = score_store.decision_counts(session, job_id=job_id)
    own = None if principal.is_admin else principal.silo.name
    none = {"kept": 0, "auto_kept": 0, "overridden": 0}
    silos = {
        owner: OwnerSummary(**stats, **{k: v for k, v in counts.get(owner, none).items() if k != "n"})
        for owner, stats in summary["owners"].items()
        if own is None or owner == own
    }
    edges = summary["edges"]
    if own is not None and own in silos:  # its own histogram on edges from its own scores (and the threshold)
        edges, silos[own].counts = score_store.owner_histogram(session, job_id=job_id, owner=own)
    return ScoreSummary(
        job=job_id,
        threshold=job.threshold_value,
        checkpoints=summary["checkpoints"],
        edges=edges,
        silos=silos,
        anchor_scores=summary["anchor_scores"] if principal.is_admin else [],
    )


@router.get("/{job_id}/duplicates", operation_id="get_duplicates")
def get_duplicates(job_id: JobId, session: SessionDep, _: AdminDep) -> list[DuplicatePair]:
    """Near-duplicate sample pairs across silos (cosine of projected gradients ≥ 0.98), once scored."""
    repo.get_job(session, job_id=job_id)
    return [
        DuplicatePair(
            silo_a=d.owner_a, sample_a=d.sample_a, silo_b=d.owner_b, sample_b=d.sample_b, similarity=d.similarity
        )
        for d in repo.list_duplicates(session, job_id=job_id)
    ]


@router.get("/{job_id}/duplicates/clusters", operation_id="get_duplicate_clusters")
def get_duplicate_clusters(
    job_id: JobId,
    session: SessionDep,
    _: AdminDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 50,
    offset: Offset = 0,
) -> DuplicateClusters:
    """Near-duplicate pairs joined into connected groups across silos, largest first, with each member's score and
    decision."""
    repo.get_job(session, job_id=job_id)
    clusters = score_store.duplicate_clusters(session, job_id=job_id)
    return DuplicateClusters(
        total=len(clusters),
        clusters=[
            DuplicateCluster(
                members=[ClusterMember(**m) for m in c["members"]],
                silos=c["silos"],
                pairs=c["pairs"],
                max_similarity=c["max_similarity"],
            )
            for c in clusters[offset : offset + limit]
        ],
    )


def _override_public(record: ScoreOverride) -> OverridePublic:
    return OverridePublic(
        id=record.id,
        job=record.job_id,
        silo=record.owner,
        sample_id=record.sample_id,
        decision=record.decision,
        reason=record.reason,
        actor=record.actor,
        previous=record.previous,
        selected=record.selected,
        created_at=record.created_at,
    )


@router.post("/{job_id}/overrides", status_code=201, operation_id="create_override")
def create_override(job_id: JobId, body: OverrideCreate, session: SessionDep, principal: SiloDep) -> OverridePublic:
    """A silo keeps or drops one of its own samples against the threshold's decision (``auto`` undoes that), with a
    reason. Recorded in the job's audit log; the decision takes force at once for masks and for training jobs whose
    silos read their selection afterwards."""
    _scored(session, job_id, principal)
    silo = principal.silo.name
    try:
        record = score_store.override(
            session,
            job_id=job_id,
            owner=silo,
            sample_id=body.sample_id,
            decision=body.decision,
            reason=body.reason,
            actor=silo,
        )
    except ValueError as exc:
        raise ApiError(422, str(exc)) from exc
    session.commit()
    return _override_public(record)


@router.get("/{job_id}/overrides", operation_id="list_overrides")
def list_overrides(
    job_id: JobId,
    session: SessionDep,
    principal: PrincipalDep,
    silo: Silo = None,
    sample_id: Annotated[str | None, Query(max_length=500)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    offset: Offset = 0,
) -> OverrideLog:
    """The audit log of owners' overrides, newest first: every silo's for the admin, a silo's own for it."""
    job_for(session, job_id, principal)
    owner = _owner(principal, silo)
    if owner == ANCHOR_OWNER:
        raise ConfigError("silo: the anchor samples have no owner overrides")
    total, rows = score_store.list_overrides(
        session, job_id=job_id, owner=owner, sample_id=sample_id, limit=limit, offset=offset
    )
    return OverrideLog(total=total, rows=[_override_public(r) for r in rows])
