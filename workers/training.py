"""The coordinator's side of training jobs as plain functions (no Celery; `workers.tasks` wraps them).

- `init_train`: the initial adapter (seeded LoRA init, the same every silo would make; under ``shared-basis`` the
  seeded basis with R = 0), the job's layout, round 0.
- `aggregate_round`: once every member sent its update, or at the deadline with at least ``quorum``: the round of
  the job's aggregation kind (`scoring.federated.adapter_rounds.combine_round`: the guard, then FedAvg /
  quality-FedAvg / FedAdam / FedYogi / median / trimmed mean on the factors or on R, or the exact stack; server
  optimizer state persisted as a blob), or for a merge job peft's ``add_weighted_adapter``; then the next round
  opens or the job finishes.
- `evaluate_round`: the held-out metrics of a round's resulting adapter (and of the job, for the last round).

Every function is idempotent: a redelivered task finds its work done (a round already closed, a round already open)
or redoes it deterministically (blobs are content-addressed). Each returns what the task wrapper must schedule next
(a deadline check, an evaluation), so that scheduling stays in `workers.tasks`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from scoring.config import LocalTrainConfig, LoraSettings, round_entry, round_lr
from scoring.errors import ConfigError
from scoring.federated.adapter_rounds import combine_round, initial_global
from scoring.federated.aggregation import (
    Known,
    RoundGuard,
    SiloUpdate,
    guard_round,
    known_of_scores,
    state_from_arrays,
    state_to_arrays,
)
from scoring.io import CheckpointBundle, bundle_to_bytes, checkpoint_to_bytes, read_bundle, write_checkpoint_dir
from storage import repository as repo
from storage import scores as storage_scores
from storage.models import TrainJob, utcnow
from workers.pipeline import JobStateError, Resources

log = logging.getLogger("clues.workers")


@dataclass(frozen=True)
class RoundOpened:
    """A round that is open: the wrapper schedules its deadline check ``delay_s`` from now."""

    round: int
    deadline: datetime

    @property
    def delay_s(self) -> float:
        return max(0.0, (self.deadline - utcnow()).total_seconds())


@dataclass(frozen=True)
class Outcome:
    """What `aggregate_round` did: ``waiting`` (not all updates in, deadline not passed), ``closed`` (aggregated),
    ``already`` (closed before), ``failed`` (too few updates at the deadline). ``opened``: a round whose deadline
    check to schedule (the next round, or this one again when ``waiting``); ``evaluate``: a round whose result is
    to be evaluated."""

    status: str
    opened: RoundOpened | None = None
    evaluate: int | None = None


def _set(res: Resources, job_id: str, **fields: Any) -> None:
    with res.sessions.begin() as session:
        repo.update_train_job(session, job_id=job_id, **fields)


def _model_options(res: Resources) -> dict[str, Any]:
    s = res.settings
    return {"dtype": s.dtype, "device": s.device, "cache_dir": s.model_cache_dir}


def _entry(job: TrainJob, round: int, lr: float, steps_done: int) -> dict[str, Any]:
    return round_entry(LocalTrainConfig.from_dict(job.settings["local"]), round, lr, steps_done)


def _lr(job: TrainJob, round: int) -> float:
    return round_lr(LocalTrainConfig.from_dict(job.settings["local"]), round, job.rounds)


def _deadline(job: TrainJob) -> datetime:
    return utcnow() + timedelta(seconds=job.round_timeout_s)


def init_train(res: Resources, job_id: str) -> RoundOpened | None:
    """Build the initial adapter and open round 0 (``starting`` → ``running``); returns round 0 (also when a
    redelivered task finds it open already), None when the job is in no state to start."""
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        if job.status != "starting":
            if job.status == "running" and job.round == 0:
                row = repo.get_round(session, job_id=job_id, round=0)
                return RoundOpened(0, row.deadline) if row.status == "open" else None
            return None
        model_ref, settings = job.model, dict(job.settings)
    _set(res, job_id, message="building the initial adapter", progress=0.0)
    from scoring.federated.local import initial_adapter

    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        entry = _entry(job, 0, _lr(job, 0), 0)
    lora = LoraSettings.from_dict(settings["lora"])
    data, layout, adapter_config = initial_adapter(
        model_ref,
        lora,
        init_seed=settings["lora_init_seed"],
        random_b=settings["random_b"],
        entry=entry,
        work_dir=_work(res),
        **_model_options(res),
    )
    if settings["aggregation"].get("kind") == "shared-basis":  # the basis replaces the initial adapter (R = 0)
        initial = read_bundle(data, None, None, "initial adapter")
        start = initial_global("shared-basis", initial, lora.rank, settings["lora_init_seed"])
        data, layout = bundle_to_bytes(start), [[name, list(shape)] for name, shape in start.layout]
    ref = res.blobs.put_bytes(data)
    with res.sessions.begin() as session:
        job = repo.get_train_job(session, job_id=job_id)
        deadline = _deadline(job)
        row, _ = repo.open_round(session, job_id=job_id, round=0, lr=entry["lr"], start_blob=ref.key, deadline=deadline)
        repo.update_train_job(
            session,
            job_id=job_id,
            status="running",
            round=0,
            layout=layout,
            adapter_config=adapter_config,
            message=f"round 1 of {job.rounds} open",
        )
        return RoundOpened(0, row.deadline)


def _work(res: Resources) -> Path:
    path = res.settings.work_dir / "train"
    path.mkdir(parents=True, exist_ok=True)
    return path


def aggregate_round(res: Resources, job_id: str, round: int) -> Outcome:
    """Aggregate (or merge) round ``round`` if it is due; open the next round or finish the job.

    Due means: every member has sent its update, or the deadline has passed. At the deadline with fewer than
    ``quorum`` updates the job fails (its message names who is missing)."""
    with res.sessions.begin() as session:
        job = repo.get_train_job(session, job_id=job_id)
        row = repo.get_round(session, job_id=job_id, round=round)
        if row.status == "closed" or job.status != "running":
            return Outcome("already")
        members = [m.silo.name for m in job.members]
        if row.status == "open":
            received = len(repo.list_updates(session, job_id=job_id, round=round))
            if received < len(members) and utcnow() < row.deadline:  # early (e.g. clocks apart): check again then
                return Outcome("waiting", RoundOpened(round, row.deadline))
            repo.claim_round(session, job_id=job_id, round=round)
        # Listed after the claim: an update committed before it is aggregated, none is recorded after it.
        updates = repo.list_updates(session, job_id=job_id, round=round)
        sent = [u.silo.name for u in updates]
        if len(sent) < job.quorum:
            missing = [m for m in members if m not in sent]
            message = (
                f"round {round}: {len(sent)} of {len(members)} silos sent updates by the deadline, below the quorum "
                f"of {job.quorum} (missing: {missing})"
            )
            repo.update_train_job(
                session, job_id=job_id, status="failed", error=message, message="failed", finished_at=utcnow()
            )
            return Outcome("failed")
        silo_updates = [(u.silo.name, u.blob_key, u.num_samples, u.score_mass, u.train_loss) for u in updates]
        start_blob, lr, mode = row.start_blob, row.lr, job.mode
        settings, state_blob = dict(job.settings), job.server_state_blob
        known = known_selection(session, settings["selection"], job.scoring_job_id, sent)
        repo.update_train_job(session, job_id=job_id, message=f"aggregating round {round + 1} ({len(sent)} silos)")
    start = read_bundle(res.blobs.read_bytes(start_blob), None, None, f"round {round} start")
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        steps_done = (round + 1) * LocalTrainConfig.from_dict(settings["local"]).steps
        entry = _entry(job, round, lr, steps_done)
        model_ref = job.model
    done = _combine(res, job_id, round, mode, settings, model_ref, start, silo_updates, known, state_blob, entry)
    with res.sessions.begin() as session:
        if not repo.close_round(
            session,
            job_id=job_id,
            round=round,
            result_blob=done.result,
            participants=done.participants,
            train_loss=done.loss,
            guard=done.guard,
        ):
            return Outcome("already")  # another delivery of this task closed it first
        job = repo.get_train_job(session, job_id=job_id)
        evaluate = round if _evaluation_due(job, round) else None
        if round + 1 < job.rounds:
            deadline = _deadline(job)
            repo.open_round(
                session,
                job_id=job_id,
                round=round + 1,
                lr=_lr(job, round + 1),
                start_blob=done.result,
                deadline=deadline,
            )
            repo.update_train_job(
                session,
                job_id=job_id,
                round=round + 1,
                server_state_blob=done.state,
                progress=(round + 1) / job.rounds,
                message=f"round {round + 2} of {job.rounds} open",
            )
            return Outcome("closed", RoundOpened(round + 1, deadline), evaluate)
        final = {"final_blob": done.result, "server_state_blob": done.state, "progress": 1.0}
        if evaluate is not None:
            repo.update_train_job(session, job_id=job_id, status="evaluating", message="evaluating", **final)
        else:
            repo.update_train_job(session, job_id=job_id, status="done", message="done", finished_at=utcnow(), **final)
        return Outcome("closed", None, evaluate)


@dataclass(frozen=True)
class Combined:
    """A round's updates combined (`_combine`): the result's and the server state's blob keys, who took part, the
    sample-weighted training loss and what the guard did (``flags``, ``figures``)."""

    result: str
    state: str | None
    participants: list[str]
    loss: float
    guard: dict[str, Any]


def _combine(
    res: Resources,
    job_id: str,
    round: int,
    mode: str,
    settings: dict[str, Any],
    model_ref: str,
    start: CheckpointBundle,
    silo_updates: list[tuple[str, str, int, float, float]],
    known: dict[str, Known],
    state_blob: str | None,
    entry: dict[str, Any],
) -> Combined:
    """Bound the round's updates (``(silo, blob key, count, score mass, loss)``) with the guard, then merge them
    (mode ``merge``) or aggregate them with the job's rule from the server state in ``state_blob``; the result
    and the new state are stored as blobs. `aggregate_round` and `withdraw_silo` both combine with this."""
    bundles = [read_bundle(res.blobs.read_bytes(k), None, None, f"update of {name}") for name, k, *_ in silo_updates]
    claimed = [
        SiloUpdate(name, bundle.adapter, n, mass)
        for (name, _, n, mass, _), bundle in zip(silo_updates, bundles, strict=True)
    ]
    new_state, report = None, None
    if mode == "merge":
        guarded, flags, figures = guard_round(
            start.adapter, claimed, known, RoundGuard.from_dict(settings["aggregation"])
        )
        result = _merge(res, model_ref, settings["merge"], start, bundles, guarded, entry)
    else:
        state = state_from_arrays(load_arrays(res.blobs.read_bytes(state_blob))) if state_blob else None
        done = combine_round(
            settings["aggregation"],
            start.adapter,
            start.adapter_config,
            claimed,
            known,
            state,
            alpha=LoraSettings.from_dict(settings["lora"]).alpha,
        )
        guarded, flags, figures, report = done.updates, done.flags, done.figures, done.report
        layout = [(name, np.shape(w)) for name, w in done.weights.items()]
        result = bundle_to_bytes(CheckpointBundle(layout, done.weights, {}, {}, done.adapter_config, entry))
        new_state = save_arrays(state_to_arrays(done.state)) if done.state is not None else None
    for flag in flags:
        log.warning("training job %s round %d: %s %s: %s", job_id, round, flag.silo, flag.kind, flag.detail)
    ref = res.blobs.put_bytes(result)  # before the state, as ever
    state_key = res.blobs.put_bytes(new_state).key if new_state is not None else state_blob
    loss = float(np.average([u[4] for u in silo_updates], weights=[u.num_samples for u in guarded]))
    guard = {"flags": [f.to_dict() for f in flags], "figures": figures}
    if report is not None:
        guard["aggregation"] = report
    return Combined(ref.key, state_key, [u[0] for u in silo_updates], loss, guard)


def _evaluation_due(job: TrainJob, round: int) -> bool:
    if job.eval_blob is None:
        return False
    every = int(job.settings["evaluation"].get("every", 1))
    return round + 1 == job.rounds or (round + 1) % every == 0


def known_selection(
    session,
    selection: dict[str, Any],
    scoring_job: str | None,
    silos: list[str],
    withdrawn: dict[str, list[str]] | None = None,
) -> dict[str, Known]:
    """What the scoring job says each silo may claim (`scoring.federated.aggregation.known_of_scores`), without the
    samples ``withdrawn`` lists per silo. Nothing is known without a scoring job."""
    if scoring_job is None:
        return {}
    rows = storage_scores.owner_scores(session, job_id=scoring_job, owners=silos, exclude=withdrawn)
    return {silo: known_of_scores(selection, mine) for silo, mine in rows.items() if mine}


def merge_weights(kind: str, updates: list[SiloUpdate]) -> list[float]:
    """Merge weights, summing to 1: ∝ sample counts (``samples``), equal (``uniform``) or ∝ positive score mass."""
    if kind == "uniform":
        return [1.0 / len(updates)] * len(updates)
    values = [float(u.num_samples) if kind == "samples" else max(float(u.score_mass), 0.0) for u in updates]
    if sum(values) <= 0 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"merge.weights: {kind!r} gives no positive weight: {values}")
    return [v / sum(values) for v in values]


def _merge(
    res: Resources,
    model_ref: str,
    merge: dict[str, Any],
    start: CheckpointBundle,
    bundles: list[CheckpointBundle],
    updates: list[SiloUpdate],
    entry: dict[str, Any],
) -> bytes:
    """peft's ``add_weighted_adapter`` over the silos' adapters; the merged adapter as a bundle (its own layout:
    ``cat`` adds the ranks up)."""
    from safetensors import safe_open

    from scoring.federated.merging import merge_adapters
    from scoring.models import load_base_model

    with tempfile.TemporaryDirectory(dir=_work(res)) as tmp:
        dirs = {}
        for u, bundle in zip(updates, bundles, strict=True):  # the guarded (clipped) adapters
            adapter = {n: np.asarray(w).astype(bundle.adapter[n].dtype) for n, w in u.weights.items()}
            guarded = dataclasses.replace(bundle, adapter=adapter)
            write_checkpoint_dir(guarded, Path(tmp) / "in" / u.silo)
            dirs[u.silo] = Path(tmp) / "in" / u.silo / "adapter"
        base = load_base_model(model_ref, **_model_options(res))
        model = merge_adapters(
            base.model,
            dirs,
            merge_weights(merge.get("weights", "samples"), updates),
            kind=merge["kind"],
            density=merge.get("density"),
            svd_rank=merge.get("svd_rank"),
            name="merged",
        )
        model.save_pretrained(str(Path(tmp) / "out"), selected_adapters=["merged"])
        out = Path(tmp) / "merged"
        shutil.move(str(Path(tmp) / "out" / "merged"), str(out / "adapter"))
        with safe_open(str(out / "adapter" / "adapter_model.safetensors"), framework="np") as f:
            layout = [[name, list(f.get_slice(name).get_shape())] for name in sorted(f.keys())]
        return checkpoint_to_bytes(out, layout, entry)


def evaluate_round(res: Resources, job_id: str, round: int) -> dict[str, Any]:
    """Evaluate the adapter round ``round`` produced on the job's held-out set; store the metrics on the round
    (and on the job, finishing it, for the last round). Skipped when stored already."""
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        row = repo.get_round(session, job_id=job_id, round=round)
        if row.metrics is not None:
            return row.metrics
        if row.result_blob is None or job.eval_blob is None:
            raise JobStateError(f"training job {job_id}: round {round} has no result or the job no evaluation set")
        model_ref, settings, result_blob, eval_blob = job.model, dict(job.settings), row.result_blob, job.eval_blob
        last = round + 1 == job.rounds
    from scoring.data import read_samples
    from scoring.federated.evaluation import evaluate_adapter

    bundle = read_bundle(res.blobs.read_bytes(result_blob), None, None, f"round {round} result")
    res.blobs.verify(eval_blob)
    samples = read_samples(res.blobs.path(eval_blob))
    metrics = evaluate_adapter(
        bundle, samples, {**settings, "model": model_ref}, work_dir=_work(res), **_model_options(res)
    )
    metrics = {"round": round, **metrics}
    with res.sessions.begin() as session:
        repo.set_round_metrics(session, job_id=job_id, round=round, metrics=metrics)
        if last:
            repo.update_train_job(
                session, job_id=job_id, metrics=metrics, status="done", message="done", finished_at=utcnow()
            )
    return metrics


@dataclass(frozen=True)
class Withdrawn:
    """What `withdraw_silo` did: ``status`` (``done``; ``already``; ``waiting``: a sample withdrawal whose silo has
    not sent its retrained adapter yet), and the round to evaluate again (None: the job has no evaluation set)."""

    status: str
    evaluate: int | None = None


def withdraw_silo(res: Resources, job_id: str, withdrawal_id: int) -> Withdrawn:
    """Merge a finished merge job again after a withdrawal (docs/withdrawal.md): without the silo's adapter, or,
    when some of its samples were withdrawn, with the adapter it retrained without them (``report.update``).

    The round guard and the merge weights are computed over the updates that remain, exactly as `aggregate_round`
    would have computed them had the silo never sent its update (or never held those samples), so the result equals
    that merge. Then, in one transaction: the round's result, participants and guard and the job's final adapter
    are replaced; the silo's membership and updates are deleted (whole silo) or its update replaced (samples); the
    withdrawal is recorded done with the old and new adapters' SHA-256. The blobs nothing refers to any more (the
    silo's old update, the old merge) are deleted after the commit.
    """
    import time

    started = time.monotonic()
    with res.sessions() as session:
        job = repo.get_train_job(session, job_id=job_id)
        withdrawal = repo.get_withdrawal(session, withdrawal_id=withdrawal_id)
        if withdrawal.status != "pending":
            return Withdrawn("already")
        silo, samples, report = withdrawal.silo, withdrawal.sample_ids, dict(withdrawal.report)
        row = repo.get_round(session, job_id=job_id, round=0)
        rows = repo.list_updates(session, job_id=job_id, round=0)
        updates = [(u.silo.name, u.blob_key, u.num_samples, u.score_mass, u.train_loss) for u in rows]
        if samples is None:
            kept = [u for u in updates if u[0] != silo]
        else:
            new = report.get("update")
            if new is None:  # sent early (e.g. on start-up): the upload of the silo's adapter queues it again
                return Withdrawn("waiting")
            mine = (silo, new["sha256"], new["num_samples"], new["score_mass"], new["train_loss"])
            kept = [mine if u[0] == silo else u for u in updates]
        if not kept:
            raise ConfigError(f"withdrawal {withdrawal_id}: no other silo's adapter is left to merge")
        mine = repo.list_withdrawals(session, job_id=job_id, silo=silo)
        withdrawn = [i for w in mine if w.sample_ids and w.status in ("done", "pending") for i in w.sample_ids]
        known = known_selection(
            session, job.settings["selection"], job.scoring_job_id, [u[0] for u in kept], {silo: withdrawn}
        )
        settings, start_blob, lr, old_final = dict(job.settings), row.start_blob, row.lr, job.final_blob
        entry = _entry(job, 0, lr, LocalTrainConfig.from_dict(settings["local"]).steps)
        model_ref, has_eval = job.model, job.eval_blob is not None
    start = read_bundle(res.blobs.read_bytes(start_blob), None, None, "round 0 start")
    done = _combine(res, job_id, 0, "merge", settings, model_ref, start, kept, known, None, entry)
    with res.sessions.begin() as session:
        if repo.get_withdrawal(session, withdrawal_id=withdrawal_id).status != "pending":
            return Withdrawn("already")  # another delivery finished it first
        row = repo.get_round(session, job_id=job_id, round=0)
        row.result_blob, row.participants, row.train_loss = done.result, done.participants, done.loss
        row.guard, row.metrics = done.guard, None
        job = repo.get_train_job(session, job_id=job_id)
        silo_id = next(m.silo_id for m in job.members if m.silo.name == silo)
        if samples is None:
            gone = repo.remove_member(session, job_id=job_id, silo_id=silo_id)
        else:
            gone = [repo.replace_update(session, job_id=job_id, round=0, silo_id=silo_id, **report["update"])]
        what = f"{silo} withdrawn" if samples is None else f"{len(samples)} samples of {silo} withdrawn"
        fields: dict[str, Any] = {"final_blob": done.result, "metrics": None, "message": f"{what}: re-merged"}
        if has_eval:
            fields |= {"status": "evaluating", "message": f"{what}: evaluating the re-merge"}
        repo.update_train_job(session, job_id=job_id, **fields)
        report |= {"old_sha256": old_final, "new_sha256": done.result, "seconds": round(time.monotonic() - started, 3)}
        repo.finish_withdrawal(session, withdrawal_id=withdrawal_id, status="done", report=report)
    with res.sessions() as session:  # content-addressed: another job may hold the same bytes
        unused = [key for key in {*gone, old_final} if key and not repo.blob_in_use(session, key=key)]
    for key in unused:
        res.blobs.delete(key)
    log.info("training job %s: %s, re-merged in %.2f s", job_id, what, report["seconds"])
    return Withdrawn("done", 0 if has_eval else None)
