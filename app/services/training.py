"""The training job's lifecycle: who may see it and each round as the caller may see it (a silo sees only itself
among the received, the participants and the guard's flags), a new job's settings, its start and retry, and which
round takes updates now."""

from __future__ import annotations

from typing import Any

from app.deps import AppState, Principal
from app.metrics import TASKS
from app.schemas import RoundFlag, RoundPublic, TrainCreate, TrainMemberPublic, TrainPublic
from app.services import QueueUnavailable
from app.services.jobs import engine_check, may_see, steps_public, transition
from scoring.config import DEFAULT_MAX_LEN, DEFAULT_TEMPLATE, DENSITY_MERGE_KINDS, LoraSettings
from scoring.errors import ConfigError
from scoring.federated.adapter_rounds import check_rule
from scoring.federated.aggregation import ADAPTER_FIELDS, GUARD_FIELDS, RoundGuard, build_aggregator
from scoring.spec import JobSpec
from storage import repository as repo
from storage import steps as leases
from storage.errors import ConflictError, NotFoundError
from storage.models import TrainJob, TrainRound, utcnow
from workers import names
from workers.steps import train_waits_for


def train_for(session, job_id: str, principal: Principal) -> TrainJob:
    """The training job, if the caller may see it (404 otherwise, also for jobs of other silos)."""
    job = repo.get_train_job(session, job_id=job_id)
    if not may_see(principal, job):
        raise NotFoundError(f"training job '{job_id}' does not exist")  # as for a job that does not
    return job


def round_public(row: TrainRound, received: dict[str, int], mine: str | None) -> RoundPublic:
    """A round as ``mine`` (a silo's name; None: the admin) may see it: a silo sees itself among the received and
    the participants, and only its own guard flags and upload size; the admin sees everything, with the clip bound.
    ``received``: the bytes of each update in, by silo."""
    guard = row.guard or {}
    flags = [RoundFlag(**f) for f in guard.get("flags", []) if mine in (None, f["silo"])]
    participants = (
        row.participants if mine is None or row.participants is None else [p for p in row.participants if p == mine]
    )
    return RoundPublic(
        round=row.round,
        lr=row.lr,
        status=row.status,
        deadline=row.deadline,
        started_at=row.started_at,
        closed_at=row.closed_at,
        received=[n for n in received if mine in (None, n)],
        upload_bytes={n: size for n, size in received.items() if mine in (None, n)},
        aggregation=guard.get("aggregation"),
        participants=participants,
        flags=flags,
        clip_bound=guard.get("figures", {}).get("clip_bound") if mine is None else None,
        train_loss=row.train_loss,
        metrics=row.metrics,
        start_sha256=row.start_blob,
        result_sha256=row.result_blob,
    )


def train_public(job: TrainJob, principal: Principal, session) -> TrainPublic:
    mine = None if principal.is_admin else principal.silo.name
    history, privacy = [], {}
    for row in repo.list_rounds(session, job_id=job.id):
        updates = repo.list_updates(session, job_id=job.id, round=row.round)
        history.append(round_public(row, {u.silo.name: u.size_bytes for u in updates}, mine))
        privacy |= {u.silo.name: u.privacy for u in updates if u.privacy is not None}  # the latest round wins
    members = [m for m in job.members if mine in (None, m.silo.name)]
    return TrainPublic(
        id=job.id,
        name=job.name,
        mode=job.mode,
        status=job.status,
        round=job.round,
        rounds=job.rounds,
        progress=job.progress,
        message=job.message,
        error=job.error,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        spec=train_spec(job, mine),
        silos=[
            TrainMemberPublic(name=m.silo.name, num_samples=m.num_samples, privacy=privacy.get(m.silo.name))
            for m in members
        ],
        history=history,
        metrics=job.metrics,
        eval_samples=job.eval_num_samples,
        final_sha256=job.final_blob,
        steps=steps_public(session, job.id) if principal.is_admin else None,
    )


def train_spec(job: TrainJob, mine: str | None = None) -> dict[str, Any]:
    """What every silo trains under: the job's settings plus its mode, model, quorum and deadline length. For a
    silo (``mine``), ``aggregation.silo_ranks`` holds only its own rank (the others' would name them)."""
    settings = dict(job.settings)
    ranks = settings.get("aggregation", {}).get("silo_ranks")
    if mine is not None and ranks is not None:
        settings["aggregation"] = {
            **settings["aggregation"],
            "silo_ranks": {k: v for k, v in ranks.items() if k == mine},
        }
    return {
        "mode": job.mode,
        "model": job.model,
        **settings,
        "rounds": job.rounds,
        "quorum": job.quorum,
        "round_timeout_s": job.round_timeout_s,
    }


MAX_CHECKPOINTS = 4
"""Default number of warmup rounds that become scoring checkpoints (evenly spaced, the last round included)."""


def default_checkpoint_rounds(rounds: int, count: int = MAX_CHECKPOINTS) -> list[int]:
    """Up to ``count`` evenly spaced rounds ending with the last one."""
    count = min(count, rounds)
    return sorted({round(rounds * (i + 1) / count) - 1 for i in range(count)})


def train_settings(body: TrainCreate, session) -> tuple[str, dict[str, Any], str | None]:
    """(model, settings, scoring job id) of a new job: defaults filled in from the scoring job, every part checked
    by the engine's own config classes (`ConfigError`, 422, naming the field; `ConflictError`, 409, for a scoring
    job that is not done)."""
    selection = body.selection.model_dump() if body.selection else None
    if selection is None:
        if body.mode != "warmup":
            raise ConfigError("selection: required for federated and merge jobs (e.g. {'source': 'selected'})")
        selection = {"source": "fraction", "fraction": 0.05, "seed": 0, "scoring_job": None}
    scoring_job = selection.get("scoring_job")
    if selection["source"] in ("selected", "random") and scoring_job is None:
        raise ConfigError(f"selection.scoring_job: source {selection['source']!r} needs a finished scoring job")
    base: dict[str, Any] = {}
    if scoring_job is not None:
        scored = repo.get_job(session, job_id=scoring_job)
        if scored.status != "done":
            raise ConflictError(f"selection.scoring_job: job {scoring_job} is {scored.status!r}, not 'done'")
        members = {m.silo.name for m in scored.members}
        outside = [s for s in body.silos if s not in members]
        if outside:
            raise ConfigError(f"silos: {outside} took no part in scoring job {scoring_job}")
        run = JobSpec.of(scored).run.manifest()
        base = {k: run[k] for k in ("model", "lora", "lora_init_seed", "max_len", "template")}
    model = body.model or base.get("model")
    if model is None:
        raise ConfigError("model: required when no selection.scoring_job gives it")
    lora = body.lora.to_dict() if body.lora else base.get("lora", LoraSettings().to_dict())
    aggregation = {k: v for k, v in body.aggregation.model_dump().items() if v is not None}
    rule = aggregation.pop("rule")
    if rule == "fedprox" and body.local.prox_mu <= 0:
        raise ConfigError("aggregation.rule: 'fedprox' needs local.prox_mu > 0 (the silos' proximal term)")
    if rule == "quality-fedavg" and scoring_job is None:
        raise ConfigError("aggregation.rule: 'quality-fedavg' weighs by score mass and needs selection.scoring_job")
    options = {k: v for k, v in aggregation.items() if k not in GUARD_FIELDS and k not in ADAPTER_FIELDS}
    engine_check("aggregation", lambda: build_aggregator("fedavg" if rule == "fedprox" else rule, **options))
    engine_check("aggregation", lambda: RoundGuard.from_dict(aggregation))
    check_adapter_kind(body, rule, aggregation, LoraSettings.from_dict(lora).rank)
    merge = body.merge.model_dump()
    if body.mode == "merge":
        if body.rounds != 1:
            raise ConfigError("rounds: a merge job has exactly one round (each silo trains once)")
        if merge["kind"] in DENSITY_MERGE_KINDS and merge["density"] is None:
            raise ConfigError(f"merge.density: kind {merge['kind']!r} needs a density in (0, 1]")
    checkpoint_rounds = body.checkpoint_rounds
    if body.mode == "warmup":
        checkpoint_rounds = checkpoint_rounds or default_checkpoint_rounds(body.rounds)
        bad = [r for r in checkpoint_rounds if not 0 <= r < body.rounds]
        if bad or len(set(checkpoint_rounds)) != len(checkpoint_rounds):
            raise ConfigError(
                f"checkpoint_rounds: need distinct rounds in 0..{body.rounds - 1}, got {bad or 'repeats'}"
            )
        checkpoint_rounds = sorted(checkpoint_rounds)
    elif checkpoint_rounds is not None:
        raise ConfigError("checkpoint_rounds: only warmup jobs make scoring checkpoints")
    if body.quorum is not None and body.quorum > len(body.silos):
        raise ConfigError(f"quorum: {body.quorum} exceeds the {len(body.silos)} silos")
    settings = {
        "lora": lora,
        "lora_init_seed": body.lora_init_seed if body.lora_init_seed is not None else base.get("lora_init_seed", 0),
        "random_b": body.random_b if body.random_b is not None else body.mode == "warmup",
        "max_len": body.max_len or base.get("max_len", DEFAULT_MAX_LEN),
        "template": body.template or base.get("template", DEFAULT_TEMPLATE),
        "local": body.local.to_dict(),
        "aggregation": {"rule": rule, **aggregation},
        "merge": merge,
        "selection": selection,
        "checkpoint_rounds": checkpoint_rounds,
        "evaluation": body.evaluation.model_dump(),
    }
    return model, settings, scoring_job


def check_adapter_kind(body: TrainCreate, rule: str, aggregation: dict[str, Any], rank: int) -> None:
    """The aggregation kind fits the job (`scoring.federated.adapter_rounds`): exact kinds aggregate federated
    rounds only, ``stack`` takes only the weighted-sum rules, ``silo_ranks``, ``max_rank`` and ``stack_start``
    belong to ``stack``
    (ranks for the job's silos only), and the exact stacked rank stays within 4096 unless ``max_rank`` truncates
    it."""
    kind = aggregation["kind"]
    if kind != "fedavg" and body.mode != "federated":
        raise ConfigError(f"aggregation.kind: {kind!r} aggregates federated rounds; a {body.mode} job uses 'fedavg'")
    engine_check("aggregation", lambda: check_rule(kind, rule))
    for name in ("silo_ranks", "max_rank", "stack_start"):
        if aggregation.get(name) is not None and kind != "stack":
            raise ConfigError(f"aggregation.{name}: only kind 'stack' takes it, not {kind!r}")
    ranks = aggregation.get("silo_ranks") or {}
    outside = sorted(set(ranks) - set(body.silos))
    if outside:
        raise ConfigError(f"aggregation.silo_ranks: {outside} are not silos of the job")
    bad = {s: r for s, r in ranks.items() if not 1 <= r <= 4096}
    if bad:
        raise ConfigError(f"aggregation.silo_ranks: ranks must be in 1..4096, got {bad}")
    if kind == "stack" and aggregation.get("max_rank") is None:
        total = body.rounds * sum(ranks.get(s, rank) for s in body.silos)
        if total > 4096:
            raise ConfigError(
                f"aggregation.max_rank: the exact stack reaches rank {total} ({body.rounds} rounds of the silos' "
                "ranks), past 4096; give max_rank to truncate it by SVD"
            )


RESUMED_STATUS = {names.TRAIN_INIT: "starting", names.TRAIN_AGGREGATE: "running", names.TRAIN_EVALUATE: "evaluating"}
"""The status a failed training job goes back to when its failed step is sent again."""


def start(state: AppState, session, job: TrainJob) -> None:
    """``draft`` (or ``failed`` before its first round) → ``starting``: a worker builds the initial adapter and opens
    round 0. A job already started is left as it is."""
    if job.status == "draft" or (job.status == "failed" and job.layout is None):
        transition(
            state,
            session,
            job,
            names.TRAIN_INIT,
            update=repo.update_train_job,
            status="starting",
            message="queued",
            error=None,
        )
    elif job.status != "starting" and job.layout is None:
        raise ConflictError(f"training job {job.id} is {job.status!r}")


def retry(state: AppState, session, job: TrainJob) -> None:
    """Send the step the job waits for again (its start, its open round's aggregation at the deadline, or its
    evaluation); a ``failed`` job whose last step failed goes back to that step. A step that a live worker runs is
    left alone. `ConflictError` when there is nothing to retry (draft, done, or failed for want of a quorum)."""
    failed = [s for s in leases.for_job(session, job.id) if s.state == "failed" and s.task in RESUMED_STATUS]
    if job.status == "failed" and failed:
        step = failed[-1]
        task, args, force = step.task, step.args[1:], True
        repo.update_train_job(session, job_id=job.id, status=RESUMED_STATUS[task], error=None, message="retrying")
        session.commit()
        wait = train_waits_for(session, job) if task == names.TRAIN_AGGREGATE else None
        countdown = wait[2] if wait is not None else None  # an open round: its deadline
    elif (wait := train_waits_for(session, job)) is not None:
        (task, (_, *args), countdown), force = wait, False
    else:
        raise ConflictError(f"training job {job.id} is {job.status!r}: nothing to retry ({job.error or 'no error'})")
    try:
        state.dispatcher.enqueue(task, job.id, *args, countdown=countdown, force=force)
    except Exception as exc:
        raise QueueUnavailable(exc) from exc
    TASKS.labels(task).inc()
    session.refresh(job)


def nudge(state: AppState, task: str, *args: Any) -> None:
    """Queue a step that is safe to repeat (an aggregation whose deadline task may have been lost); an unreachable
    queue is not the caller's problem here."""
    try:
        state.dispatcher.enqueue(task, *args)
        TASKS.labels(task).inc()
    except Exception:
        pass


def round_of(session, job: TrainJob, index: int) -> TrainRound:
    """Round ``index`` of the job (`ConflictError` before round 0 opens, `NotFoundError` for one never opened)."""
    if job.layout is None:
        raise ConflictError(f"training job {job.id} is {job.status!r}: round 0 is not open yet")
    return repo.get_round(session, job_id=job.id, round=index)


def require_open_round(state: AppState, session, job: TrainJob, index: int) -> TrainRound:
    """Round ``index`` if it takes updates now: the job's current round, open and before its deadline. A round not
    opened yet, a closed one and one past its deadline are refused alike (`ConflictError`, 409); the last also
    nudges its aggregation."""
    if job.layout is not None and index > job.round:
        raise ConflictError(f"round {index} of training job {job.id} is not open (round {job.round} is the latest)")
    row = round_of(session, job, index)
    if job.status != "running" or row.status != "open" or index != job.round:
        raise ConflictError(f"round {index} of training job {job.id} is closed ({row.status}); late update refused")
    if utcnow() > row.deadline:
        nudge(state, names.TRAIN_AGGREGATE, job.id, index)
        raise ConflictError(f"round {index} of training job {job.id} passed its deadline {row.deadline.isoformat()}")
    return row
