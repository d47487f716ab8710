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
from storage import scores as storage_scores
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

    A whole-silo withdrawal supersedes that silo's own sample withdrawal still waiting for its retrained adapter
    (marked failed, superseded), so a silo that never retrains cannot hold the job's withdrawals up.

    Raises:
        ApiError: 403 for a silo naming another silo.
        ConfigError: no silo named by the admin, sample ids of a federated or warmup job or not the silo's in the
            scoring job, or a merge kind without exact withdrawal (names the kinds that have it).
        ConflictError: the silo is not a member (or withdrew already), it is the job's only silo, another
            withdrawal is still being carried out, or a merge job is not done yet.
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
    ids = None if body.sample_ids is None else list(dict.fromkeys(body.sample_ids))
    if silo not in members:
        what = f"withdrew already (withdrawal {done[-1].id})" if done else "is not a member"
        raise ConflictError(f"silo {silo!r} {what} of training job {job.id}")
    pending = [w for w in repo.list_withdrawals(session, job_id=job.id) if w.status == "pending"]
    if pending and pending[0].silo == silo and pending[0].sample_ids == ids:
        return pending[0]  # the same request again (an agent run again): the one in progress
    waiting = (
        pending[0] if pending and pending[0].sample_ids is not None and "update" not in pending[0].report else None
    )
    if waiting is not None and waiting.silo == silo and ids is None:
        repo.finish_withdrawal(
            session, withdrawal_id=waiting.id, status="failed", report=waiting.report,
            error="superseded by the withdrawal of the whole silo",
        )  # fmt: skip
        pending = []
    if pending:
        raise ConflictError(
            f"training job {job.id}: withdrawal {pending[0].id} ({pending[0].silo}) is still being carried out; ask "
            "again after it"
        )
    kind = withdrawal_kind(job.mode, (job.settings.get("merge") or {}).get("kind"), ids is None)
    if ids is None and len(members) == 1:
        raise ConflictError(f"silo {silo!r} is the only silo of training job {job.id}: delete the job instead")
    if kind != "retrain" and (job.status != "done" or job.final_blob is None):
        raise ConflictError(f"training job {job.id} is {job.status!r}; a merge job's silo withdraws once it is done")
    if ids is not None and job.scoring_job_id is not None:
        known = storage_scores.owner_sample_ids(session, job_id=job.scoring_job_id, owner=silo)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(
                f"sample_ids: {len(unknown)} are not {silo}'s samples in scoring job {job.scoring_job_id} "
                f"(e.g. {unknown[:3]})"
            )
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
    if kind == "retrain-silo":
        report["awaiting"] = f"{silo}'s adapter retrained without the samples (clues agent withdraw --data ...)"
    row = repo.add_withdrawal(
        session, job_id=job.id, silo=silo, sample_ids=ids, actor=actor, reason=body.reason, status="pending",
        report=report,
    )  # fmt: skip
    session.commit()
    if kind == "retrain-silo":
        return row  # the re-merge is queued when the silo's retrained adapter arrives (`accept_update`)
    queue_remerge(state, session, job.id, row.id)
    session.refresh(row)
    return row


def queue_remerge(state: AppState, session, job_id: str, withdrawal_id: int) -> None:
    """Queue the re-merge of a committed pending withdrawal. An unreachable queue fails the withdrawal (503): the
    job is untouched and a new request can be made."""
    try:
        state.dispatcher.enqueue(names.TRAIN_WITHDRAW, job_id, withdrawal_id)
    except Exception as exc:
        row = repo.get_withdrawal(session, withdrawal_id=withdrawal_id)
        repo.finish_withdrawal(session, withdrawal_id=withdrawal_id, status="failed", report=row.report, error=str(exc))
        session.commit()
        raise QueueUnavailable(exc) from exc
    TASKS.labels(names.TRAIN_WITHDRAW).inc()


def accept_update(session, withdrawal_id: int, sha256: str, size: int, update: dict) -> None:
    """Keep a silo's retrained adapter (its blob ``sha256``) on its pending sample withdrawal, for the re-merge.

    Raises:
        ConflictError: the withdrawal is no longer pending, or holds other bytes already.
    """
    row = repo.get_withdrawal(session, withdrawal_id=withdrawal_id)
    held = (row.report.get("update") or {}).get("sha256")
    if row.status != "pending" or held not in (None, sha256):
        raise ConflictError(f"withdrawal {withdrawal_id} is {row.status!r} and holds another adapter already")
    fields = {"sha256": sha256, "size_bytes": size, "num_samples": int(update["num_samples"])}
    fields |= {"score_mass": float(update["score_mass"]), "train_loss": float(update["train_loss"])}
    row.report = {**row.report, "update": fields}
    session.flush()
