"""A silo-local scoring job at the coordinator (`scoring.local_scoring`): the reference silos download, and the
aggregates they send instead of projections. When every member silo has sent its aggregate, the job is ``done``:
its threshold is the reference's, and the coordinator holds no per-sample value of any silo.
"""

from __future__ import annotations

from datetime import UTC, datetime

from app.schemas import LocalAggregate
from app.services.jobs import is_local, require_status
from scoring.errors import ConfigError
from storage import repository as repo
from storage.errors import ConflictError
from storage.models import Job


def reference_key(job: Job) -> str:
    """The blob key of the job's published reference (`ConflictError` for a shared job, or before the anchor step
    has published it)."""
    if not is_local(job):
        raise ConflictError(f"job {job.id} is scored at the coordinator (scoring_mode 'shared'): it has no reference")
    key = job.options.get("reference")
    if key is None:
        raise ConflictError(
            f"job {job.id}: the reference is not published yet (anchors {job.anchor_status!r}); try again later"
        )
    return key


def record_aggregate(session, job: Job, silo, aggregate: LocalAggregate) -> bool:
    """Store ``silo``'s aggregate and complete its membership (committed), then finish the job when every member
    has sent one. True when new, False when the same aggregate was sent before.

    Raises:
        ConflictError: a shared job, no reference yet, a job not open, or another aggregate already recorded.
        scoring.errors.ConfigError: the aggregate does not fit the reference (bin count, counts that do not add up).
    """
    reference_key(job)
    sent = aggregate.model_dump()
    member = repo.get_member(session, job_id=job.id, silo_id=silo.id)
    if member.status == "complete":
        if member.aggregate == sent:
            return False
        raise ConflictError(f"silo {silo.name} already sent another aggregate for job {job.id}")
    require_status(job, "open")
    bins = int(job.options["reference_bins"])
    if len(aggregate.histogram) != bins:
        raise ConfigError(f"histogram: the reference has {bins} bins, got {len(aggregate.histogram)} counts")
    if sum(aggregate.histogram) != aggregate.total:
        raise ConfigError(f"histogram: counts sum to {sum(aggregate.histogram)}, not total {aggregate.total}")
    if aggregate.kept > aggregate.total:
        raise ConfigError(f"kept: {aggregate.kept} exceeds total {aggregate.total}")
    repo.mark_complete(session, job_id=job.id, silo_id=silo.id, num_samples=aggregate.total, aggregate=sent)
    session.commit()  # first, so that of two silos sending their last aggregates at once, the later one sees both
    session.refresh(job)
    if all(m.status == "complete" for m in job.members):  # both may see it: the same update, twice
        kept = sum(m.aggregate["kept"] for m in job.members)
        total = sum(m.aggregate["total"] for m in job.members)
        repo.update_job(
            session,
            job_id=job.id,
            status="done",
            progress=1.0,
            message=f"{kept} of {total} samples selected (scored at the silos{_noise(job)})",
            error=None,
            threshold_value=float(job.options["reference_threshold"]),
            finished_at=datetime.now(UTC),
        )
    session.commit()
    return True


def _noise(job: Job) -> str:
    """How the aggregates were released, for the job's message: nothing when counted, else their ε."""
    epsilon = (job.options or {}).get("aggregate_epsilon")
    return "" if epsilon is None else f"; each silo's counts are noisy, an ε = {epsilon:g} release"
