"""The silo's side of a training job (docs/training.md, "Silo protocol") as plain functions (no argparse): choose
the local samples, then for every round this silo has not sent yet download the global adapter, train locally
from it, upload the new adapter, and poll until the next round opens; at the end download the final adapter.

Only adapters leave the silo (the weights and four numbers: round, sample count, score mass, loss); the text and
this silo's Adam moments never do. When the job trains with DP-SGD (``local.dp``), each round runs
`scoring.federated.dp.dp_local_update`, is charged to this silo's ε ledger before its update leaves, and the update
carries the ledger's figures instead of the training loss (sent as 0: an un-noised mean loss is not covered by ε).
A round that would take the silo past the job's budget, or past its own ``max_epsilon``, is refused.

`run_training` is the whole workflow; it can be killed at any point and run again. What it keeps under
``work_dir/train-<job>/``:

- ``round-NNNN/global.safetensors``: the round's global adapter, reused when its SHA-256 is the round's
  ``start_sha256``.
- ``round-NNNN/moments.safetensors``: this silo's AdamW moments after its training in that round
  (`scoring.federated.local.save_moments`); the next round it trains continues from them, and a scoring job made from
  a warmup with ``precondition`` uses them (`local_moments_path`, read by `agent.loop`).
- ``round-NNNN/update.safetensors``: the update sent for that round. When present it is sent again as it is,
  never retrained, so a silo that crashed after training re-sends the same bytes (the coordinator answers 200).
- ``privacy-ledger.json``: with DP-SGD, this silo's ε ledger for the job (`scoring.privacy.PrivacyLedger`).
- ``final.safetensors``: the final adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.client import CoordinatorError, SiloClient
from agent.loop import AgentError, Progress
from scoring.config import LocalTrainConfig, LoraSettings
from scoring.data import Sample, read_samples
from scoring.federated.adapter_rounds import silo_rank
from scoring.federated.lora_algebra import moments_carry_over
from scoring.io import CheckpointBundle, bundle_to_bytes, read_bundle
from wire.files import atomic_write_bytes

DTYPES = ("float32", "bfloat16", "float16")
FINISHED = ("done", "evaluating")
"""Statuses in which the final adapter exists (``evaluating``: only the held-out metrics are still to come)."""


@dataclass(frozen=True)
class TrainOptions:
    """Where the silo trains and how it waits.

    Attributes:
        device, dtype: where and in which precision the model runs.
        cache_dir: converted model weights (None: the default cache).
        poll_interval: seconds between status polls while waiting for a round to open.
        timeout: give up after this many seconds in all (None: wait for ever).
        max_epsilon: with DP-SGD, the most ε this silo spends on the job, whatever the job's budget (None: the
            job's budget).
    """

    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: Path | None = None
    poll_interval: float = 2.0
    timeout: float | None = None
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise AgentError(f"device: must be a torch device name such as 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in DTYPES:
            raise AgentError(f"dtype: must be one of {list(DTYPES)}, got {self.dtype!r}")
        if not self.poll_interval > 0:
            raise AgentError(f"poll_interval: must be positive, got {self.poll_interval!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise AgentError(f"timeout: must be positive or None, got {self.timeout!r}")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise AgentError(f"max_epsilon: must be positive or None, got {self.max_epsilon!r}")


@dataclass(frozen=True)
class TrainResult:
    """What one run of `run_training` did.

    Attributes:
        job_id, status: the job and its status when the silo stopped (``done`` or ``evaluating``).
        rounds_trained: rounds whose update this run sent (trained now, or re-sent from the work directory).
        late_rounds: rounds whose update the coordinator refused as late (409: closed or past its deadline).
        num_samples: local samples trained on.
        final_path: the downloaded final adapter bundle.
    """

    job_id: str
    status: str
    rounds_trained: list[int]
    late_rounds: list[int]
    num_samples: int
    final_path: Path


def train_dir(work_dir: Path, job_id: str) -> Path:
    return Path(work_dir) / f"train-{job_id}"


def round_dir(work_dir: Path, job_id: str, round: int) -> Path:
    return train_dir(work_dir, job_id) / f"round-{round:04d}"


def local_moments_path(work_dir: Path, job_id: str, round: int) -> Path:
    """This silo's AdamW moments after its local training in ``round`` of training job ``job_id``."""
    return round_dir(work_dir, job_id, round) / "moments.safetensors"


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _held(path: Path, sha256: str | None) -> bool:
    return sha256 is not None and path.is_file() and _sha256_file(path) == sha256


def seeded_subset(samples: list[Sample], k: int, seed: int, job_id: str) -> list[Sample]:
    """``k`` samples drawn with a seed derived from ``seed``, the job id and the local sample ids (so the same
    every round and every rerun, whatever the file's order), kept in file order."""
    ids = sorted(s.id for s in samples)
    data = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    keep = set(random.Random(f"clues-train:{seed}:{job_id}:{data}").sample(ids, min(k, len(ids))))
    return [s for s in samples if s.id in keep]


def scores_by_id(rows: list[dict], samples: list[Sample], where: str) -> dict[str, dict]:
    """Score rows (``sample_id`` or ``id``, ``score``, ``selected``) by sample id; every local sample must have one.

    Raises:
        AgentError: a local sample has no row (``where`` names the scores' source).
    """
    by_id = {row.get("sample_id", row.get("id")): row for row in rows}
    missing = [s.id for s in samples if s.id not in by_id]
    if missing:
        raise AgentError(
            f"{where} has no scores for {len(missing)} of the {len(samples)} local samples "
            f"(e.g. {missing[:3]}): use the data file this silo scored with"
        )
    return by_id


def choose_samples(client: SiloClient, job: dict, samples: list[Sample]) -> tuple[list[Sample], float]:
    """The local samples to train on under the training job's ``spec.selection`` and their score mass, with the
    scoring job's scores read from the coordinator (`select_samples`).

    Raises:
        AgentError: the selection leaves no sample, or the scoring job lacks scores for local samples.
    """
    selection = job["spec"]["selection"]
    scoring_job = selection.get("scoring_job")
    scores = None
    if scoring_job:
        scores = scores_by_id(client.scores(scoring_job)["rows"], samples, f"scoring job {scoring_job}")
    return select_samples(selection, samples, scores, f"training job {job['id']}", key=job["id"])


def select_samples(
    selection: dict, samples: list[Sample], scores: dict[str, dict] | None, what: str, *, key: str
) -> tuple[list[Sample], float]:
    """The samples a selection keeps and their score mass (the sum of their scores when ``scores`` gives them,
    else 0). ``scores``: score rows (``score``, ``selected``) by sample id, one for every sample, or None.

    ``fraction``: a seeded random ``max(1, round(fraction·n))``; ``selected``: those the scoring job selected;
    ``random``: as many seeded random ones as ``selected`` gives (the control); ``all``: every one. The random
    draws are seeded with ``selection["seed"]`` and ``key`` (`seeded_subset`).

    Raises:
        AgentError: the selection leaves no sample, or needs scores that are not given (``what`` names the job).
    """
    source, scoring_job = selection["source"], selection.get("scoring_job")
    if source in ("selected", "random") and scores is None:
        raise AgentError(f"{what}: selection {source!r} names no scoring job")
    if source == "all":
        chosen = list(samples)
    elif source == "fraction":
        k = max(1, round(selection["fraction"] * len(samples)))
        chosen = seeded_subset(samples, k, selection["seed"], key)
    elif source == "selected":
        chosen = [s for s in samples if scores[s.id]["selected"]]
    elif source == "random":
        k = sum(1 for s in samples if scores[s.id]["selected"])
        chosen = seeded_subset(samples, k, selection["seed"], key)
    else:
        raise AgentError(f"{what}: unknown selection source {source!r} (a newer coordinator?)")
    if not chosen:
        why = f"scoring job {scoring_job} selected none of them" if scores is not None else "the data file is empty"
        raise AgentError(
            f"{what}: selection {source!r} leaves none of the {len(samples)} local samples to train on ({why})"
        )
    mass = float(sum(scores[s.id]["score"] for s in chosen)) if scores is not None else 0.0
    return chosen, mass


class LocalTrainer:
    """The job's model with its LoRA adapter and the tokenised training samples, loaded on first use (a silo
    rerun on a finished job loads nothing). Under the aggregation ``kind`` of the job
    (`scoring.federated.adapters.SiloAdapter`): the whole adapter (``fedavg``), a fresh adapter of this silo's
    ``rank`` on top of the global model each round (``stack``), or R between the shared basis (``shared-basis``).
    """

    def __init__(self, spec: dict, samples: list[Sample], options: TrainOptions, silo: str | None = None):
        self.spec, self.samples, self.options = spec, samples, options
        self.cfg = LocalTrainConfig.from_dict(spec["local"])
        self.kind = (spec.get("aggregation") or {}).get("kind", "fedavg")
        self.rank = silo_rank(spec, silo)
        self.carries_moments = moments_carry_over(self.kind)
        self.model: Any = None
        self._plan: Any = None

    def ledger(self, work_dir: Path, job_id: str):
        """This silo's ε ledger for the job (None when the job trains without DP-SGD): N is the samples chosen,
        the expected batch ``batch_size · grad_accum``, the planned steps every round's."""
        if self.cfg.dp is None:
            return None
        from scoring.privacy import PrivacyLedger, PrivacyPlan

        if self._plan is None:  # σ is calibrated once per run (a root search over the accountant)
            self._plan = PrivacyPlan.of(
                self.cfg.dp,
                num_samples=len(self.samples),
                expected_batch=self.cfg.batch_size * self.cfg.grad_accum,
                planned_steps=int(self.spec["rounds"]) * self.cfg.steps,
            )
        return PrivacyLedger.open(train_dir(work_dir, job_id) / "privacy-ledger.json", job_id, self._plan)

    def _load(self) -> None:
        from scoring.batching import tokenize_samples
        from scoring.federated.adapters import SiloAdapter
        from scoring.models import attach_lora, load_base_model

        spec, opts = self.spec, self.options
        base = load_base_model(spec["model"], dtype=opts.dtype, device=opts.device, cache_dir=opts.cache_dir)
        lora = dataclasses.replace(LoraSettings.from_dict(spec["lora"]), rank=self.rank)
        self.model = attach_lora(base.model, lora, init_seed=spec["lora_init_seed"], random_b=spec["random_b"])
        warm = (spec.get("aggregation") or {}).get("stack_start") == "warm"
        self.adapter = SiloAdapter(self.kind, self.model, spec["lora_init_seed"], warm)
        self.data = tokenize_samples(self.samples, base.tokenizer, spec["max_len"], spec["template"])
        self.pad_id = base.tokenizer.pad_token_id

    def train(
        self, start: CheckpointBundle, *, lr: float, round: int, moments: Any, progress: Progress | None, plan=None
    ):
        """`scoring.federated.local.local_update` from the round's global adapter ``start`` (with a privacy
        ``plan``: `scoring.federated.dp.dp_local_update`).

        Raises:
            AgentError: the global adapter does not fit this model's LoRA layers.
        """
        from scoring.errors import ShapeMismatchError
        from scoring.federated.local import local_update
        from scoring.models import lora_layout

        if self.model is None:
            self._load()
        mine = tuple(lora_layout(self.model))
        misfit = f"round {round}: the global adapter does not fit this model's LoRA layers"
        if self.kind == "fedavg" and start.layout != mine:
            raise AgentError(
                f"{misfit} (its layout has {len(start.layout)} tensors, the model's {len(mine)}): a different model "
                "or LoRA settings than the job's spec"
            )
        try:
            weights = self.adapter.begin(start.adapter, start.adapter_config, round)
        except ShapeMismatchError as exc:
            raise AgentError(f"{misfit}: {exc}") from None
        report = (lambda step, total, _loss: progress("training", step, total)) if progress else None
        if plan is not None:
            from scoring.federated.dp import dp_local_update

            return dp_local_update(
                self.model,
                self.data,
                self.cfg,
                plan,
                pad_id=self.pad_id,
                global_weights=weights,
                lr=lr,
                moments=moments,
                progress=report,
            )
        return local_update(
            self.model,
            self.data,
            self.cfg,
            pad_id=self.pad_id,
            global_weights=weights,
            lr=lr,
            moments=moments,
            round=round,
            progress=report,
        )


def previous_moments(work_dir: Path, job_id: str, round: int):
    """The moments this silo kept from the last round before ``round`` it trained in (None: it trained none)."""
    from scoring.federated.local import load_moments

    rounds = [
        int(p.parent.name.removeprefix("round-"))
        for p in train_dir(work_dir, job_id).glob("round-*/moments.safetensors")
    ]
    earlier = [r for r in rounds if r < round]
    return load_moments(local_moments_path(work_dir, job_id, max(earlier))) if earlier else None


def round_adapter(client: SiloClient, job_id: str, row: dict, path: Path) -> CheckpointBundle:
    """Round ``row``'s global adapter (a ``history`` entry), kept at ``path``: downloaded unless held with the
    round's ``start_sha256``, and checked against it.

    Raises:
        AgentError: the downloaded bytes are not the ones the job lists.
    """
    index = row["round"]
    if not _held(path, row["start_sha256"]):
        sha = client.download_round_adapter(job_id, index, path)
        if sha != row["start_sha256"]:
            raise AgentError(
                f"round {index} of job {job_id}: downloaded SHA-256 {sha}, the job lists {row['start_sha256']}"
            )
    return read_bundle(path.read_bytes(), None, None, f"round {index} adapter of training job {job_id}")


def train_round(
    client: SiloClient,
    job: dict,
    row: dict,
    trainer: LocalTrainer,
    score_mass: float,
    work_dir: Path,
    progress: Progress | None = None,
) -> Path:
    """Train this silo's update for round ``row`` (a ``history`` entry) and write it (with the moments after it)
    under ``round-NNNN/``; returns the update's path. An update already written is returned as it is."""
    from scoring.federated.local import save_moments

    index, job_id = row["round"], job["id"]
    where = round_dir(work_dir, job_id, index)
    update_path = where / "update.safetensors"
    if update_path.is_file():
        return update_path
    start = round_adapter(client, job_id, row, where / "global.safetensors")
    moments = previous_moments(work_dir, job_id, index) if trainer.carries_moments else None
    ledger = trainer.ledger(work_dir, job_id)
    limit = trainer.options.max_epsilon
    if ledger is not None:
        _within_budget(lambda: ledger.check(index, trainer.cfg.steps, limit))  # refused before any training
    plan = ledger.plan if ledger is not None else None
    result = trainer.train(start, lr=row["lr"], round=index, moments=moments, progress=progress, plan=plan)
    save_moments(local_moments_path(work_dir, job_id, index), result.moments)
    privacy = None
    if ledger is not None:
        _within_budget(lambda: ledger.charge(index, result.steps, limit))  # before the update can leave
        privacy = ledger.summary()
    update = update_bundle(
        start, result, index, score_mass, privacy, trainer.adapter.update_config(start.adapter_config)
    )
    atomic_write_bytes(update_path, bundle_to_bytes(update))  # last: its presence means the round is trained
    return update_path


def update_bundle(
    start: CheckpointBundle,
    result,
    index: int,
    score_mass: float,
    privacy: dict | None = None,
    adapter_config: dict | None = None,
):
    """What a silo sends for round ``index``: what it trained from ``start`` (a
    `scoring.federated.local.LocalResult`: the whole adapter, its own ``stack`` adapter, or a shared basis's R),
    under its own layout and ``adapter_config`` (default ``start``'s), no moments, and the four numbers (the loss
    is 0 under DP-SGD)."""
    return CheckpointBundle(
        layout=[(name, tuple(np.shape(w))) for name, w in result.weights.items()],
        adapter=result.weights,
        exp_avg={},
        exp_avg_sq={},
        adapter_config=adapter_config if adapter_config is not None else start.adapter_config,
        entry={**start.entry, "step": start.entry["step"] + result.steps},
        update={
            "round": index,
            "num_samples": result.num_samples,
            "score_mass": score_mass,
            "train_loss": result.mean_loss if privacy is None else 0.0,
            **({"privacy": privacy} if privacy is not None else {}),
        },
    )


def _within_budget(spend) -> None:
    """Run a ledger check or charge; a round past the budget becomes an `AgentError` (the agent stops: it takes
    no further part in the job)."""
    from scoring.privacy import BudgetExceededError

    try:
        spend()
    except BudgetExceededError as exc:
        raise AgentError(f"refused: {exc}") from None


def _due_round(job: dict) -> dict | None:
    """The open round this silo has not sent an update for (its ``received`` lists only itself), if any."""
    if job["status"] != "running":
        return None
    row = next((h for h in job["history"] if h["round"] == job["round"]), None)
    return row if row is not None and row["status"] == "open" and not row["received"] else None


def fetch_final(client: SiloClient, job: dict, work_dir: Path) -> Path:
    """``final.safetensors``: the job's final adapter, downloaded unless held with the job's SHA-256."""
    path = train_dir(work_dir, job["id"]) / "final.safetensors"
    if not _held(path, job["final_sha256"]):
        sha = client.download_final_adapter(job["id"], path)
        if job["final_sha256"] is not None and sha != job["final_sha256"]:
            raise AgentError(
                f"training job {job['id']}: final adapter SHA-256 {sha}, the job lists {job['final_sha256']}"
            )
    return path


def run_training(
    client: SiloClient,
    job_id: str,
    data_path: Path,
    *,
    work_dir: Path,
    options: TrainOptions = TrainOptions(),
    progress: Progress | None = None,
) -> TrainResult:
    """The silo's training workflow (see the module docstring): every open round it has not sent yet is trained
    and uploaded; it returns once the job is ``done`` or ``evaluating``, with the final adapter downloaded.

    Raises:
        AgentError: the job is still a draft, the selection leaves no local sample, or the global adapter does not
            fit the model.
        scoring.errors.DataError: the data file is malformed (names the file and line).
        agent.client.CoordinatorError: the coordinator refused a request, the job failed (its error), or
            ``options.timeout`` passed.
    """
    started = time.monotonic()
    data_path = Path(data_path)
    if not data_path.is_file():
        raise AgentError(f"{data_path}: no such data file")
    samples = read_samples(data_path)
    job = client.train_job(job_id)
    if job["status"] == "draft":
        raise AgentError(
            f"the coordinator has not started training job {job_id} yet (status 'draft'); ask its admin to start it"
        )
    chosen, score_mass = choose_samples(client, job, samples)
    mine = job["silos"][0]["name"] if len(job["silos"]) == 1 else None  # a silo sees only itself
    trainer = LocalTrainer(job["spec"], chosen, options, mine)
    trained: list[int] = []
    late: list[int] = []
    while True:
        if job["status"] in FINISHED:
            final = fetch_final(client, job, work_dir)
            return TrainResult(job_id, job["status"], trained, late, len(chosen), final)
        if job["status"] == "failed":
            raise CoordinatorError(None, f"training job {job_id} failed: {job['error']}")
        row = _due_round(job)
        if row is not None and row["round"] not in trained + late:
            update = train_round(client, job, row, trainer, score_mass, work_dir, progress)
            try:
                client.upload_round_update(job_id, row["round"], update.read_bytes())
                trained.append(row["round"])
            except CoordinatorError as exc:
                if exc.status != 409:
                    raise
                late.append(row["round"])  # closed or past its deadline: the job goes on without it
        elif options.timeout is not None and time.monotonic() - started > options.timeout:
            raise CoordinatorError(
                None,
                f"training job {job_id} still {job['status']!r} (round {job['round']}) after {options.timeout:.0f} s",
            )
        else:
            time.sleep(options.poll_interval)
        job = client.train_job(job_id)
