"""The silo's side of withdrawing some of its samples from a finished merge job (docs/withdrawal.md).

`withdraw_samples` asks the coordinator to withdraw the ids (or takes up the sample withdrawal the admin recorded for
this silo), then retrains this silo's adapter exactly as `agent.train` trained it in the job's one round:

- from the round's global adapter, with the round's lr, the job's seed and settings and fresh moments;
- on the job's selection among the local samples, leaving out every sample this silo has withdrawn from the job;

It then uploads the adapter, and the coordinator merges again with it. The other silos do nothing, and their
adapters are not touched. What it keeps: ``work_dir/train-<job>/withdrawal-<id>/`` with the round's global adapter
and the update sent (sent again as it is on a rerun).
"""

from __future__ import annotations

from pathlib import Path

from agent.client import SiloClient
from agent.loop import AgentError, Progress
from agent.train import (
    LocalTrainer,
    TrainOptions,
    choose_samples,
    round_adapter,
    train_dir,
    update_bundle,
)
from scoring.data import read_samples
from scoring.io import bundle_to_bytes
from wire.files import atomic_write_bytes


def _pending_sample_withdrawal(client: SiloClient, job_id: str) -> dict:
    pending = [w for w in client.withdrawals(job_id) if w["status"] == "pending" and w["sample_ids"]]
    if not pending:
        raise AgentError(f"training job {job_id}: no sample withdrawal of this silo is waiting; pass the sample ids")
    return pending[0]


def withdraw_samples(
    client: SiloClient,
    job_id: str,
    data_path: Path,
    *,
    work_dir: Path,
    sample_ids: list[str] | None = None,
    reason: str | None = None,
    options: TrainOptions | None = None,
    progress: Progress | None = None,
) -> dict:
    """Withdraw ``sample_ids`` of this silo from merge job ``job_id`` and send the adapter retrained without them
    (see the module docstring); with no ids, carry out the pending sample withdrawal the admin recorded. Returns the
    withdrawal as the coordinator then answers (``pending`` until the re-merge is done).

    Raises:
        AgentError: no pending sample withdrawal, a DP-SGD job, the selection leaves no sample, or the job's global
            adapter does not fit the model.
        agent.client.CoordinatorError: the coordinator refused the withdrawal (a kind without exact withdrawal, a
            job not done, ...).
    """
    data_path = Path(data_path)
    if not data_path.is_file():
        raise AgentError(f"{data_path}: no such data file")
    job = client.train_job(job_id)
    if job["spec"]["local"].get("dp"):
        raise AgentError(f"training job {job_id} trains with DP-SGD: retraining would spend more ε; withdraw the silo")
    if sample_ids is not None:
        row = client.withdraw(job_id, reason or "", sample_ids=sample_ids)
    else:
        row = _pending_sample_withdrawal(client, job_id)
    if row["status"] != "pending" or row["report"].get("kind") != "retrain-silo":
        return row
    mine = client.withdrawals(job_id)
    gone = {
        i for w in mine if w["sample_ids"] and (w["status"] == "done" or w["id"] == row["id"]) for i in w["sample_ids"]
    }
    samples = [s for s in read_samples(data_path) if s.id not in gone]
    where = train_dir(work_dir, job_id) / f"withdrawal-{row['id']}"
    update_path = where / "update.safetensors"
    if not update_path.is_file():
        chosen, mass = choose_samples(client, job, samples)
        first = job["history"][0]
        start = round_adapter(client, job_id, first, where / "global.safetensors")
        trainer = LocalTrainer(job["spec"], chosen, options or TrainOptions())
        result = trainer.train(start, lr=first["lr"], round=0, moments=None, progress=progress)
        atomic_write_bytes(update_path, bundle_to_bytes(update_bundle(start, result, 0, mass)))
    client.upload_withdrawal_update(job_id, row["id"], update_path.read_bytes())
    return next(w for w in client.withdrawals(job_id) if w["id"] == row["id"])
