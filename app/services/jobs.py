"""The scoring job's lifecycle as the routes and the admin's pages use it: who may see a job and what of it, its
state transitions (commit, then queue the step, undone if the queue is unreachable), and validation with the
scoring engine's own classes. Errors are typed (`storage.errors.NotFoundError` 404, `ConflictError` 409,
`scoring.errors.ConfigError` 422, `QueueUnavailable` 503) and mapped to HTTP in one place (`app.errors`).
"""

from __future__ import annotations

from app.deps import AppState, Principal
from app.metrics import TASKS
from app.schemas import JobPublic, MemberPublic, StepPublic
from app.services import QueueUnavailable
from scoring.errors import ConfigError
from scoring.spec import JobSpec
from storage import repository as repo
from storage import scores as score_store
from storage import steps as leases
from storage.errors import ConflictError, NotFoundError
from storage.models import Job, TrainJob, utcnow
from workers import names


def job_public(job: Job, principal: Principal, session) -> JobPublic:
    anchors = repo.get_anchor_set(session, job_id=job.id) if principal.is_admin else None
    members = [
        MemberPublic(name=m.silo.name, status=m.status, num_samples=m.num_samples, aggregate=m.aggregate)
        for m in job.members
        if principal.is_admin or m.silo_id == principal.silo.id
    ]
    message, error = visible_status(job, principal, session)
    return JobPublic(
        id=job.id,
        name=job.name,
        status=job.status,
        anchor_status=job.anchor_status,
        progress=job.progress,
        message=message,
        error=error,
        threshold_value=job.threshold_value,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        spec=JobSpec.of(job).to_dict(),
        silos=members,
        checkpoints_uploaded=[c.index for c in job.checkpoints if c.blob_key is not None],
        anchors=anchors.num_samples if anchors else None,
        steps=steps_public(session, job.id) if principal.is_admin else None,
    )


SILO_MESSAGES = {
    "draft": "being set up by the coordinator",
    "open": "waiting for silo uploads",
    "scoring": "scoring",
    "failed": "failed: the coordinator's admin has the details",
}


def visible_status(job: Job, principal: Principal, session) -> tuple[str, str | None]:
    """``(message, error)`` as the caller may see them. The admin sees the job's own; a silo sees nothing computed
    from other silos' rows (no total count, no part count, no other silo's name in an error): a message per status,
    and once scored, its own counts."""
    if principal.is_admin:
        return job.message, job.error
    if job.status == "done":
        mine = score_store.decision_counts(session, job_id=job.id).get(principal.silo.name, {"n": 0, "kept": 0})
        return f"{mine['kept']} of your {mine['n']} samples selected", None
    return SILO_MESSAGES.get(job.status, job.status), None


def steps_public(session, job_id: str) -> list[StepPublic]:
    """A job's task steps and their leases, for the admin."""
    now = utcnow()
    return [
        StepPublic(
            task=s.task,
            args=s.args,
            state=s.state,
            attempt=s.attempt,
            lost=s.lost,
            holder=s.holder,
            heartbeat_age_s=(now - s.heartbeat_at).total_seconds() if s.state == "running" and s.heartbeat_at else None,
            error=s.error,
        )
        for s in leases.for_job(session, job_id)
    ]


def may_see(principal: Principal, job: Job | TrainJob) -> bool:
    """The admin sees every job, scoring or training; a silo only those it is a member of."""
    return principal.is_admin or any(m.silo_id == principal.silo.id for m in job.members)


def job_for(session, job_id: str, principal: Principal) -> Job:
    """The job, if the caller may see it (404 otherwise, also for jobs of other silos)."""
    job = repo.get_job(session, job_id=job_id)
    if not may_see(principal, job):
        raise NotFoundError(f"job '{job_id}' does not exist")  # the same words as for a job that does not
    return job


def require_status(job: Job, *allowed: str) -> None:
    if job.status not in allowed:
        raise ConflictError(f"job {job.id} is {job.status!r}; this needs it to be {' or '.join(map(repr, allowed))}")


def checkpoint_of(job: Job, index: int):
    for c in job.checkpoints:
        if c.index == index:
            return c
    raise NotFoundError(f"job {job.id} has checkpoints 0..{len(job.checkpoints) - 1}, not {index}")


def transition(state: AppState, session, job, task: str, update=repo.update_job, **fields) -> None:
    """Commit the job's new state (with ``update``: `repo.update_job`, or `repo.update_train_job` for a training
    job), then queue ``task``; if the queue is unreachable, put the old state back and answer 503 (the task is never
    lost behind a state that claims it was queued)."""
    before = {key: getattr(job, key) for key in fields}
    update(session, job_id=job.id, **fields)
    session.commit()
    try:
        state.dispatcher.enqueue(task, job.id)
    except Exception as exc:  # its queued step must not run behind the restored state
        state.dispatcher.cancel(task, job.id, error="not sent: the task queue was unreachable")
        update(session, job_id=job.id, **before)
        session.commit()
        raise QueueUnavailable(exc) from exc
    TASKS.labels(task).inc()


def open_job(state: AppState, session, job: Job) -> None:
    """``draft`` → ``open`` once every checkpoint and the anchor set are uploaded; queues the anchor projection.
    An ``open`` job is left as it is."""
    if job.status == "open":
        return
    require_status(job, "draft")
    missing = [c.index for c in job.checkpoints if c.blob_key is None]
    if missing:
        raise ConflictError(f"job {job.id}: upload checkpoints {missing} first")
    if repo.get_anchor_set(session, job_id=job.id) is None:
        raise ConflictError(f"job {job.id}: upload the anchor set first")
    transition(state, session, job, names.PROJECT_ANCHORS, status="open", message="waiting for silo uploads")


def is_local(job: Job) -> bool:
    """Whether the job scores at the silos (``scoring_mode`` ``local``, `app.services.local_scoring`)."""
    return (job.options or {}).get("scoring_mode") == "local"


def refuse_if_local(job: Job, what: str) -> None:
    """`ConflictError` for a step of the shared protocol on a silo-local job."""
    if is_local(job):
        raise ConflictError(
            f"job {job.id} scores at the silos (scoring_mode 'local'): {what}; each silo downloads the reference "
            "(GET /v1/jobs/{id}/reference) and sends only its aggregate (PUT /v1/jobs/{id}/aggregate)"
        )


def start_scoring(state: AppState, session, job: Job) -> None:
    """``open`` or ``failed`` → ``scoring`` once every silo has completed its upload; on a job that is ``scoring``
    already it is `retry`."""
    if is_local(job):
        if job.status == "failed":
            return retry(state, session, job)  # the anchor step and the reference
        refuse_if_local(job, "the coordinator scores nothing")
    if job.status == "scoring":
        return retry(state, session, job)
    require_status(job, "open", "failed")
    pending = [m.silo.name for m in job.members if m.status != "complete"]
    if pending:
        raise ConflictError(f"job {job.id}: silos {pending} have not completed their uploads")
    _queue_scoring(state, session, job)


def _queue_scoring(state: AppState, session, job: Job) -> None:
    transition(state, session, job, names.SCORE_JOB, status="scoring", progress=0.0, message="queued", error=None)


def retry(state: AppState, session, job: Job) -> None:
    """Send the step the job waits for again: scoring (``scoring``, or ``failed`` with every upload complete), or
    the anchor projection (``open`` with the projection pending, running or failed). A step that a live worker runs
    is left alone (`workers.steps.Dispatcher.enqueue`). `ConflictError` when the job waits for nothing."""
    if is_local(job) and job.status in ("open", "failed") and not job.options.get("reference"):
        task, fields = names.PROJECT_ANCHORS, {"status": "open", "anchor_status": "pending", "error": None}
    elif is_local(job):
        raise ConflictError(f"job {job.id} is {job.status!r} with its reference published: nothing to retry")
    elif job.status == "failed":
        return start_scoring(state, session, job)
    elif job.status == "scoring":
        task, fields = names.SCORE_JOB, {"error": None}
    elif job.status == "open" and job.anchor_status != "done":
        task, fields = names.PROJECT_ANCHORS, {"anchor_status": "pending", "error": None}
    else:
        raise ConflictError(f"job {job.id} is {job.status!r} (anchors {job.anchor_status!r}): nothing to retry")
    try:
        sent = state.dispatcher.enqueue(task, job.id)
    except Exception as exc:
        raise QueueUnavailable(exc) from exc
    if sent:
        repo.update_job(session, job_id=job.id, **fields)
        session.commit()
        TASKS.labels(task).inc()
    session.refresh(job)


def complete_upload(state: AppState, session, job: Job, silo) -> None:
    """Mark ``silo``'s upload complete (every checkpoint must hold the same parts); starts scoring when the job says
    ``auto_score`` and this was the last silo. Completing twice changes nothing."""
    member = repo.get_member(session, job_id=job.id, silo_id=silo.id)
    if member.status == "complete":
        return
    refuse_if_local(job, "there is no upload to complete")
    require_status(job, "open")
    shards = repo.list_shards(session, job_id=job.id, owner=silo.name)
    parts_at = {t: {s.part for s in shards if s.checkpoint == t} for t in range(len(job.checkpoints))}
    parts = set().union(*parts_at.values())
    if not parts:
        raise ConflictError(f"silo {silo.name} has uploaded no shards for job {job.id}")
    lacking = {t: sorted(parts - have) for t, have in parts_at.items() if parts - have}
    if lacking:
        raise ConflictError(f"missing shards (checkpoint: parts): {lacking}")
    rows = sum(s.row_count for s in shards if s.checkpoint == 0)
    repo.mark_complete(session, job_id=job.id, silo_id=silo.id, num_samples=rows)
    session.commit()
    session.refresh(job)
    if job.options.get("auto_score", True) and all(m.status == "complete" for m in job.members):
        _queue_scoring(state, session, job)


def engine_check(field: str, build):
    """Validate with the scoring engine's own config classes; their errors become 422s naming ``field``.

    Returns what ``build`` returns."""
    try:
        return build()
    except ConfigError as exc:
        raise ConfigError(f"{field}: {exc}") from exc
