"""Withdrawals from training jobs (docs/withdrawal.md): who may ask, what each mode does, and the audit record.

A merge job is merged again without the silo by a worker (`workers.training.withdraw_silo`; the final adapter is not
served until that is done). A federated or warmup job cannot drop a silo's contribution in place: the withdrawal
makes a new draft job with the same settings and the other silos, and says that it is a full retrain. Either way the
answer says how exact the result is given what the silo's data touched upstream (`scoring.withdrawal`).
"""

from __future__ import annotations

from app.deps import AppState, Principal
from app.errors import ApiError
from app.metrics import TASKS
from app.schemas import WithdrawalCreate, WithdrawalPublic
from app.services import QueueUnavailable
from scoring.errors import ConfigError
from scoring.withdrawal import Upstream, dependency_report, withdrawal_kind
from storage import repository as repo
from storage.errors import ConflictError, NotFoundError
from storage.models import TrainJob, TrainWithdrawal
from workers import names


def withdrawal_public(row: TrainWithdrawal) -> WithdrawalPublic:
    return WithdrawalPublic.model_validate(row, from_attributes=True)


def upstream_of(session, job: TrainJob) -> Upstream:
    """The scoring job a training job trains on, its threshold, and the federated warmup its checkpoints came from."""
    if job.scoring_job_id is None:
        return Upstream()
    scored = repo.get_job(session, job_id=job.scoring_job_id)
    warmup_id = ((scored.options or {}).get("warmup") or {}).get("job")
    silos: list[str] = []
    if warmup_id is not None:
        try:
            silos = [m.silo.name for m in repo.get_train_job(session, job_id=warmup_id).members]
        except NotFoundError:
            silos = [m.silo.name for m in scored.members]  # the warmup was deleted: its silos scored
    return Upstream(scored.id, (scored.threshold or {}).get("kind"), warmup_id, silos)


def withdraw(state: AppState, session, job: TrainJob, principal: Principal, body: WithdrawalCreate) -> TrainWithdrawal:
    """Record and carry out a withdrawal (see the module docstring).

    Raises:
        ApiError: 403 for a silo naming another silo.
        ConfigError: sample-level withdrawal, or a merge kind without exact withdrawal (names the kinds that have it).
        ConflictError: the silo is not a member (or withdrew already), it is the job's only silo, a withdrawal is
            still pending, or a merge job is not done yet.
    """
    if principal.is_admin:
        if body.silo is None:
            raise ConfigError("silo: required: the admin names the silo to withdraw")
        silo = body.silo
    else:
        silo = principal.silo.name
        if body.silo not in (None, silo):
            raise ApiError(403, f"silo: a silo may withdraw only itself ({silo!r}), not {body.silo!r}")
    members = [m.silo.name for m in job.members]
    done = [w for w in repo.list_withdrawals(session, job_id=job.id, silo=silo) if w.status == "done"]
    if silo not in members:
        what = f"withdrew already (withdrawal {done[-1].id})" if done else "is not a member"
        raise ConflictError(f"silo {silo!r} {what} of training job {job.id}")
    if any(w.status == "pending" for w in repo.list_withdrawals(session, job_id=job.id)):
        raise ConflictError(f"training job {job.id}: a withdrawal is still being carried out; ask again after it")
    kind = withdrawal_kind(job.mode, (job.settings.get("merge") or {}).get("kind"), body.sample_ids is None)
    if len(members) == 1:
        raise ConflictError(f"silo {silo!r} is the only silo of training job {job.id}: delete the job instead")
    if kind == "remerge" and (job.status != "done" or job.final_blob is None):
        raise ConflictError(f"training job {job.id} is {job.status!r}; a merge job's silo withdraws once it is done")
    report = dependency_report(silo, job.id, kind, upstream_of(session, job))
    actor = "admin" if principal.is_admin else silo
    if kind == "retrain":
        others = [m for m in members if m != silo]
        new = repo.create_train_job(
            session,
            name=f"{job.name} without {silo}"[:200],
            mode=job.mode,
            model=job.model,
            settings=dict(job.settings),
            rounds=job.rounds,
            quorum=min(job.quorum, len(others)),
            round_timeout_s=job.round_timeout_s,
            scoring_job_id=job.scoring_job_id,
            silo_names=others,
        )
        report |= {"new_job": new.id, "message": report["message"] + f"; draft job {new.id} is that retrain"}
        row = repo.add_withdrawal(
            session, job_id=job.id, silo=silo, sample_ids=None, actor=actor, reason=body.reason, status="done",
            report=report,
        )  # fmt: skip
        session.commit()
        return row
    row = repo.add_withdrawal(
        session, job_id=job.id, silo=silo, sample_ids=None, actor=actor, reason=body.reason, status="pending",
        report=report,
    )  # fmt: skip
    session.commit()
    try:
        state.dispatcher.enqueue(names.TRAIN_WITHDRAW, job.id, row.id)
    except Exception as exc:  # nothing half-done: the record says it failed, the job is untouched
        repo.finish_withdrawal(session, withdrawal_id=row.id, status="failed", report=report, error=str(exc))
        session.commit()
        raise QueueUnavailable(exc) from exc
    TASKS.labels(names.TRAIN_WITHDRAW).inc()
    session.refresh(row)
    return row
