"""The API's request and response models, kept apart from the tables (`storage.models`).

The algorithm settings inside a job (LoRA, projection, Adam, local training) are the scoring engine's own frozen
dataclasses (`scoring.config`): pydantic validates a request body against them directly, reading the bounds written
once on their fields, so the API accepts exactly what the engine accepts and mirrors none of them. One module
(about 500 lines) so that the OpenAPI components are defined in one place, in the order the REST reference reads.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scoring.config import (
    DEFAULT_FUSION,
    DEFAULT_GRADIENTS,
    DEFAULT_MAX_LEN,
    DEFAULT_PROJECTION_DIM,
    DEFAULT_SCORE_KIND,
    DEFAULT_SCORING_MODE,
    DEFAULT_SIGNALS,
    FUSIONS,
    MERGE_KINDS,
    SCORE_KINDS,
    SIGNALS,
    AdamState,
    LocalTrainConfig,
    LoraSettings,
    ProjectionSpec,
    check_aggregate_epsilon,
    check_gradients,
    check_score_settings,
)
from scoring.errors import ConfigError
from storage.models import AnchorStatus, JobStatus, MemberStatus, RoundStatus, TrainStatus

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiloCreate(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '_', '.', '-'; at most 64 characters")


class SiloPublic(BaseModel):
    id: int
    name: str
    created_at: datetime


class SiloCreated(SiloPublic):
    token: str = Field(description="the silo's bearer token; shown once, stored only as a hash")


class CheckpointSpec(_Strict):
    index: int = Field(ge=0)
    step: int = Field(ge=0)
    lr: float = Field(ge=0, allow_inf_nan=False)
    lr_last: float = Field(ge=0, allow_inf_nan=False)
    adam: AdamState


class ScoreFields(_Strict):
    """How a scoring job turns what the silos send into one score per sample (`JobCreate`, `ScoringFromWarmup`)."""

    score: str = Field(
        DEFAULT_SCORE_KIND,
        description=f"one of {list(SCORE_KINDS)}: 'calibrated' fuses the trace score with the loss signals, each "
        "standardised against the anchor samples; 'trace' is the pure CLUES trace score",
    )
    signals: list[str] | None = Field(
        None,
        description=f"extra per-sample signals each silo sends, among {list(SIGNALS)} (default: "
        f"{list(DEFAULT_SIGNALS)} for a calibrated job, none for a trace job; [] with score 'trace' is the pure "
        "CLUES protocol)",
    )
    fusion: str = Field(DEFAULT_FUSION, description=f"how the calibrated signals are fused, one of {list(FUSIONS)}")
    signal_checkpoint: int | None = Field(
        None, ge=0, description="the checkpoint index at which silos compute the signals (default: the last)"
    )
    scoring_mode: Literal["shared", "local"] = Field(
        DEFAULT_SCORING_MODE,
        description="'shared': silos send projections and per-sample values and the coordinator scores every "
        "sample; 'local': the coordinator publishes a reference from its anchors, each silo scores its own samples "
        "and sends only its kept count and a score histogram (threshold 'mean-anchor' or 'fixed')",
    )
    gradients: Literal["projected", "exact"] = Field(
        DEFAULT_GRADIENTS,
        description="what a silo-local job scores: 'projected' gradients (the job's projection) or the 'exact' "
        "unprojected LoRA gradients, streamed at the coordinator and at each silo and never stored; the reference "
        "then holds the full anchor direction of each checkpoint (4 bytes per LoRA parameter). 'exact' needs "
        "scoring_mode 'local'",
    )
    aggregate_epsilon: float | None = Field(
        None,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="a silo-local job's optional noise on the aggregates: each silo adds discrete Laplace noise to "
        "its kept count and each histogram bin, an ε-DP release at this ε about its samples, and records it in its "
        "privacy ledger (default none: the aggregates are sent as counted). Needs scoring_mode 'local'",
    )

    def score_options(self, checkpoints: int) -> dict[str, Any]:
        """The job options ``score``, ``signals`` (defaults filled in), ``fusion`` and ``signal_checkpoint``
        (resolved against the job's ``checkpoints``).

        Raises:
            scoring.errors.ConfigError: naming the field (`scoring.config.check_score_settings`, or a signal
                checkpoint the job does not have).
        """
        default = list(DEFAULT_SIGNALS) if self.score == "calibrated" else []
        signals = default if self.signals is None else list(self.signals)
        check_score_settings(self.score, signals, self.fusion)
        check_gradients(self.scoring_mode, self.gradients)
        check_aggregate_epsilon(self.scoring_mode, self.aggregate_epsilon)
        t = checkpoints - 1 if self.signal_checkpoint is None else self.signal_checkpoint
        if not 0 <= t < checkpoints:
            raise ConfigError(f"signal_checkpoint: the job has checkpoints 0..{checkpoints - 1}, not {t}")
        return {
            "score": self.score,
            "signals": signals,
            "fusion": self.fusion,
            "signal_checkpoint": t,
            "scoring_mode": self.scoring_mode,
            "gradients": self.gradients,
            "aggregate_epsilon": self.aggregate_epsilon,
        }


class JobCreate(ScoreFields):
    """A scoring job: what every party needs to compute comparable projections, and how to select."""

    name: str = Field(min_length=1, max_length=200)
    silos: list[str] = Field(min_length=1, description="names of the registered silos taking part")
    model: str = Field(min_length=1, max_length=500, description="model reference, e.g. 'smollm2' or 'tiny:0'")
    lora: LoraSettings
    lora_init_seed: int = Field(0, ge=0)
    max_len: int = Field(DEFAULT_MAX_LEN, ge=8, le=32768)
    template: str = Field("auto", min_length=1, max_length=32)
    projection: ProjectionSpec
    checkpoints: list[CheckpointSpec] = Field(min_length=1, max_length=1000)
    precondition: bool = Field(True, description="silos Adam-precondition candidate gradients (LESS/CLUES)")
    similarity: Literal["cosine", "dot"] = "cosine"
    threshold: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "mean-anchor"},
        description="{'kind': 'mean-anchor'} (CLUES) | {'kind': 'top', 'fraction': q} | {'kind': 'fixed', 'value': v}",
    )
    auto_score: bool = Field(True, description="start scoring as soon as the last silo completes its upload")

    @field_validator("silos")
    @classmethod
    def _unique(cls, silos: list[str]) -> list[str]:
        if len(set(silos)) != len(silos):
            raise ValueError("silo names must be unique")
        return silos

    @field_validator("checkpoints")
    @classmethod
    def _indexed(cls, checkpoints: list[CheckpointSpec]) -> list[CheckpointSpec]:
        if [c.index for c in checkpoints] != list(range(len(checkpoints))):
            raise ValueError("checkpoint indices must be 0, 1, ..., T-1 in order")
        return checkpoints


MAX_SAMPLES = 1_000_000_000
MAX_BINS = 1000


class LocalAggregate(_Strict):
    """What a silo sends in a silo-local job, and all it sends: how many of its samples it keeps, of how many, and the
    histogram of its scores on the bins of the job's reference (``GET /v1/jobs/{id}/reference``)."""

    kept: int = Field(ge=0, le=MAX_SAMPLES)
    total: int = Field(ge=1, le=MAX_SAMPLES)
    histogram: list[int] = Field(min_length=1, max_length=MAX_BINS, description="counts per bin, summing to total")

    @field_validator("histogram")
    @classmethod
    def _counts(cls, histogram: list[int]) -> list[int]:
        if any(c < 0 for c in histogram):
            raise ValueError("histogram counts must be >= 0")
        return histogram


class MemberPublic(BaseModel):
    name: str
    status: MemberStatus
    num_samples: int | None
    aggregate: LocalAggregate | None = Field(None, description="a silo-local job: what the silo sent")


class StepPublic(BaseModel):
    """One step of a job's task graph and its lease (admin only): see `workers.steps`."""

    task: str = Field(description="e.g. clues.score_job, clues.train_aggregate")
    args: list[Any] = Field(description="the job id, and the round for training steps")
    state: Literal["queued", "running", "done", "failed"]
    attempt: int = Field(description="times sent")
    lost: int = Field(description="times its worker died while running it")
    holder: str | None = Field(description="host:pid:delivery running it")
    heartbeat_age_s: float | None = Field(description="seconds since its worker last showed it was alive")
    error: str | None


class JobPublic(BaseModel):
    id: str
    name: str
    status: JobStatus
    anchor_status: AnchorStatus
    progress: float
    message: str
    error: str | None
    threshold_value: float | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    spec: dict[str, Any] = Field(description="model, LoRA, projection, checkpoints, similarity, threshold, ...")
    silos: list[MemberPublic] = Field(description="all members for the admin; only itself for a silo")
    checkpoints_uploaded: list[int]
    anchors: int | None = Field(description="number of anchor samples uploaded (admin only)")
    steps: list[StepPublic] | None = Field(None, description="the job's task steps and their leases (admin only)")


class UploadResult(BaseModel):
    sha256: str
    size: int
    created: bool = Field(description="false when the same bytes were already held (idempotent re-upload)")


class ShardPublic(BaseModel):
    checkpoint: int
    part: int
    rows: int
    sha256: str


class OverrideInfo(BaseModel):
    id: int
    decision: Literal["keep", "drop", "auto"]
    reason: str
    actor: str
    created_at: datetime


class NearestAnchor(BaseModel):
    anchor_id: str
    trace: float = Field(description="Σ_t η_t·sim(g_t(sample), g_t(anchor)): the pairwise trace (TracIn) term")


class ScoreRow(BaseModel):
    silo: str
    sample_id: str
    score: float = Field(
        description="the job's score: the trace score, or the fused calibrated score (higher = better)"
    )
    parts: list[float] = Field(description="η_t·sim at each checkpoint t; they sum to the trace score")
    selected: bool = Field(description="the decision in force: the threshold's, unless the owner overrode it")
    auto_selected: bool = Field(description="the threshold's own decision")
    override: OverrideInfo | None = Field(description="the owner's override in force, if any")
    nearest_anchors: list[NearestAnchor] | None = Field(description="the anchor samples with the largest traces")
    values: dict[str, float] | None = Field(
        description="the sample's raw values: trace (the trace score), loss (ℓ(y|x)), loss_uncond (ℓ(y|∅)), n_tokens "
        "(response tokens), those the job has; null for a pure trace job"
    )
    z: dict[str, float] | None = Field(
        description="calibrated z of each fused signal (trace, perplexity, ifd, pmi): robust standard deviations "
        "worse than a typical anchor sample (positive = worse); null unless the job is calibrated"
    )
    flagged_by: str | None = Field(description="the fused signal with the largest z: what argues most against it")
    flag_reason: str | None = Field(description="what flagged_by means, in words")


class ScoresPublic(BaseModel):
    job: str
    status: str
    threshold: float | None
    total: int = Field(description="rows matching, before limit/offset")
    rows: list[ScoreRow]


class DuplicatePair(BaseModel):
    silo_a: str
    sample_a: str
    silo_b: str
    sample_b: str
    similarity: float


class ClusterMember(BaseModel):
    silo: str
    sample_id: str
    score: float | None
    selected: bool | None


class DuplicateCluster(BaseModel):
    members: list[ClusterMember]
    silos: list[str]
    pairs: int
    max_similarity: float


class DuplicateClusters(BaseModel):
    total: int = Field(description="clusters in all, before limit/offset")
    clusters: list[DuplicateCluster]


class OwnerSummary(BaseModel):
    n: int
    kept: int = Field(description="samples kept by the decision in force (overrides included)")
    auto_kept: int = Field(description="samples the threshold kept")
    overridden: int
    counts: list[int] = Field(description="histogram counts on the summary's shared bin edges")
    mean: float
    median: float
    part_means: list[float] | None = Field(description="mean η_t·sim per checkpoint")
    part_means_kept: list[float] | None
    part_means_dropped: list[float] | None


class ScoreSummary(BaseModel):
    job: str
    threshold: float | None
    checkpoints: int
    edges: list[float] = Field(description="histogram bin edges shared by every owner")
    silos: dict[str, OwnerSummary] = Field(description="per silo; the admin also gets __anchor__")
    anchor_scores: list[float] = Field(description="anchor samples' scores, sorted (admin only; empty for a silo)")


class OverrideCreate(_Strict):
    sample_id: str = Field(min_length=1, max_length=500)
    decision: Literal["keep", "drop", "auto"] = Field(description="auto: back to the threshold's decision")
    reason: str = Field(min_length=1, max_length=500, description="why; kept in the audit log")


class OverridePublic(BaseModel):
    id: int
    job: str
    silo: str
    sample_id: str
    decision: Literal["keep", "drop", "auto"]
    reason: str
    actor: str
    previous: bool = Field(description="the decision in force before this override")
    selected: bool = Field(description="the decision in force after it")
    created_at: datetime


class OverrideLog(BaseModel):
    total: int
    rows: list[OverridePublic]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: str
    broker: str


# --- training ----------------------------------------------------------------------------------------------------

TrainMode = Literal["warmup", "federated", "merge"]


class AggregationSpec(_Strict):
    """How a round combines the silos' adapters (docs/aggregation.md).

    ``kind`` (federated jobs): ``fedavg`` averages lora_A and lora_B separately (inexact: mean(B)·mean(A) ≠
    mean(B·A)); ``stack`` (FLoRA) adds the silos' weighted changes to the global adapter exactly, each silo
    training an adapter of its own rank (``silo_ranks``) every round, started fresh (``stack_start``, the default)
    or from the global adapter's leading components (warm); the global adapter grows by their ranks and is
    truncated by SVD past ``max_rank`` (the error is reported); ``shared-basis`` (Fed-SB) fixes A and B, shared
    from the seed, and the silos train and upload only R (r × r), averaged exactly.

    The server rule: fedavg (by sample count), quality-fedavg (by selected score mass), fedadam, fedyogi, and the
    robust median and trimmed-mean (coordinate-wise, unweighted); fedprox is fedavg on the server with the silos'
    proximal term (``local.prox_mu`` > 0). ``stack`` takes fedavg, quality-fedavg and fedprox only.

    Before any rule, each update is bounded (`scoring.federated.aggregation.guard_round`): its sample count is
    capped at the silo's selection in the scoring job, its score mass clamped to what its scores allow, and its
    delta from the global adapter clipped (``clip``). Each intervention is flagged in the round's history."""

    kind: Literal["fedavg", "stack", "shared-basis"] = Field("fedavg", description="how adapters combine (federated)")
    silo_ranks: dict[str, int] | None = Field(
        None, description="stack: a LoRA rank per silo (default: lora.rank for each); a silo sees only its own"
    )
    max_rank: int | None = Field(
        None, ge=1, le=4096, description="stack: truncate the global adapter to this rank by SVD (default: exact)"
    )
    stack_start: Literal["warm", "fresh"] | None = Field(
        None,
        description="stack: a silo starts each round from a fresh adapter (fresh, the default: FLoRA's restart) or "
        "from the global adapter's leading components (warm)",
    )
    rule: Literal["fedavg", "quality-fedavg", "fedadam", "fedyogi", "fedprox", "median", "trimmed-mean"] = "fedavg"
    eta: float | None = Field(None, gt=0, allow_inf_nan=False, description="server learning rate (fedadam/fedyogi)")
    beta1: float | None = Field(None, ge=0, lt=1)
    beta2: float | None = Field(None, ge=0, lt=1)
    tau: float | None = Field(None, gt=0, allow_inf_nan=False, description="adaptivity (fedadam/fedyogi)")
    trim: float | None = Field(None, ge=0, lt=0.5, description="share cut at each end (trimmed-mean; default 0.2)")
    clip: Literal["median", "absolute", "none"] = Field(
        "median", description="bound on each update's delta norm: clip_factor × the round's lower median, or clip_norm"
    )
    clip_factor: float = Field(3.0, ge=1, allow_inf_nan=False)
    clip_norm: float | None = Field(None, gt=0, allow_inf_nan=False, description="the bound for clip 'absolute'")
    max_count_ratio: float = Field(
        10.0, ge=1, allow_inf_nan=False, description="with no scoring job: a count's cap as a multiple of the median"
    )


class MergeSpec(_Strict):
    """How the silos' adapters are merged (mode ``merge``), with peft's ``add_weighted_adapter``."""

    kind: Literal[MERGE_KINDS] = Field("cat", description="peft combination type")  # type: ignore[valid-type]
    density: float | None = Field(None, gt=0, le=1, description="required by the ties/dare/magnitude kinds")
    svd_rank: int | None = Field(None, ge=1, le=4096)
    weights: Literal["samples", "uniform", "score_mass"] = Field("samples", description="merge weights ∝ this")


class SelectionSpec(_Strict):
    """Which local samples each silo trains on.

    ``fraction``: a seeded random ``fraction`` of its data (warmup); ``selected``: the samples the scoring job
    selected; ``random``: as many random samples as ``selected`` would give (the control); ``all``: everything."""

    source: Literal["fraction", "selected", "random", "all"]
    scoring_job: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    fraction: float = Field(0.05, gt=0, le=1)
    seed: int = Field(0, ge=0)


class EvalSpec(_Strict):
    """Coordinator-side evaluation of the global adapter on the uploaded held-out set."""

    tasks: list[Literal["loss", "pubmedqa", "gsm8k"]] | None = Field(
        None, description="default: loss, plus pubmedqa/gsm8k when every sample carries their label"
    )
    every: int = Field(1, ge=1, description="evaluate after every N-th round (and always after the last)")
    batch_size: int = Field(8, ge=1, le=1024)
    max_new_tokens: int = Field(256, ge=1, le=4096)
    pubmedqa_method: Literal["loglik", "generate"] = "loglik"


class TrainCreate(_Strict):
    """A training job. ``model``, ``lora``, ``lora_init_seed``, ``max_len`` and ``template`` default to the scoring
    job's when ``selection.scoring_job`` is given."""

    name: str = Field(min_length=1, max_length=200)
    mode: TrainMode
    silos: list[str] = Field(min_length=1)
    model: str | None = Field(None, min_length=1, max_length=500)
    lora: LoraSettings | None = None
    lora_init_seed: int | None = Field(None, ge=0)
    random_b: bool | None = Field(None, description="random lora_B at init (default: true for warmup, else false)")
    max_len: int | None = Field(None, ge=8, le=32768)
    template: str | None = Field(None, min_length=1, max_length=32)
    rounds: int = Field(1, ge=1, le=10_000, description="federated rounds (merge: 1)")
    quorum: int | None = Field(None, ge=1, description="fewest updates a round needs at its deadline (default: all)")
    round_timeout_s: float = Field(3600.0, gt=0, le=30 * 86400, allow_inf_nan=False)
    local: LocalTrainConfig = Field(default_factory=LocalTrainConfig)
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    selection: SelectionSpec | None = Field(None, description="default: fraction 0.05 for warmup, else required")
    checkpoint_rounds: list[int] | None = Field(
        None, description="warmup: rounds whose global adapter becomes a scoring checkpoint (default: up to 4)"
    )
    evaluation: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("silos")
    @classmethod
    def _unique(cls, silos: list[str]) -> list[str]:
        if len(set(silos)) != len(silos):
            raise ValueError("silo names must be unique")
        return silos


class WithdrawalCreate(_Strict):
    """Withdraw a silo from a training job (docs/withdrawal.md). The admin names the silo; a silo may withdraw only
    itself (``silo`` left out or its own name)."""

    silo: str | None = Field(None, pattern=NAME_PATTERN, description="the silo to withdraw (admin; a silo: itself)")
    sample_ids: list[str] | None = Field(
        None, min_length=1, max_length=100_000, description="some of its samples only (not available yet: 422)"
    )
    reason: str = Field(min_length=1, max_length=2000, description="why, for the audit record")


class WithdrawalPublic(BaseModel):
    """A withdrawal and what the coordinator did about it: ``report.exact`` is ``exact``, ``exact for the merge``
    (upstream work used the silo's data; ``report.upstream`` says what and ``report.commands`` how to re-run it) or
    ``full retrain`` (a federated job: ``report.new_job`` is the draft job without the silo)."""

    id: int
    job_id: str
    silo: str
    sample_ids: list[str] | None
    actor: str = Field(description="'admin', or the silo that withdrew itself")
    reason: str
    status: Literal["pending", "done", "failed"]
    report: dict[str, Any]
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class PrivacyReport(BaseModel):
    """A silo's DP-SGD ledger for the job, as it reported it with its last update (`scoring.privacy`)."""

    epsilon_spent: float = Field(description="ε spent so far at this silo, at delta")
    epsilon_budget: float = Field(description="the most ε the job may spend at this silo")
    delta: float
    noise_multiplier: float = Field(description="σ: noise standard deviation over the clip norm")
    clip_norm: float
    sampling_rate: float = Field(description="q: the Poisson rate of each step")
    steps: int = Field(description="DP-SGD steps taken so far")


class TrainMemberPublic(BaseModel):
    name: str
    num_samples: int | None = Field(description="samples it last reported training on")
    privacy: PrivacyReport | None = Field(None, description="its ε ledger, when the job trains with DP-SGD")


class RoundFlag(BaseModel):
    """What the aggregation's guard did to one silo's update in a round."""

    silo: str
    kind: Literal["count_capped", "mass_clamped", "clipped"]
    detail: str


class RoundPublic(BaseModel):
    round: int
    lr: float
    status: RoundStatus
    deadline: datetime
    started_at: datetime
    closed_at: datetime | None
    received: list[str] = Field(description="silos whose update is in (a silo sees only itself)")
    upload_bytes: dict[str, int] = Field(
        default_factory=dict, description="bytes of each silo's update this round (a silo sees only its own)"
    )
    aggregation: dict[str, Any] | None = Field(
        None, description="what the round's aggregation did: kind; for stack the new rank and truncation_error"
    )
    participants: list[str] | None = Field(description="silos aggregated, once closed (a silo sees only itself)")
    flags: list[RoundFlag] = Field(
        default_factory=list, description="updates the guard capped, clamped or clipped (a silo sees only its own)"
    )
    clip_bound: float | None = Field(None, description="the delta norm bound of the round (admin only)")
    train_loss: float | None = Field(description="sample-weighted mean of the silos' local training loss")
    metrics: dict[str, Any] | None = Field(description="evaluation of the round's resulting adapter")
    start_sha256: str
    result_sha256: str | None


class TrainPublic(BaseModel):
    id: str
    name: str
    mode: TrainMode
    status: TrainStatus
    round: int = Field(description="the round in progress, or the last one")
    rounds: int
    progress: float
    message: str
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    spec: dict[str, Any] = Field(description="model, LoRA, local training, aggregation, merge, selection, ...")
    silos: list[TrainMemberPublic]
    history: list[RoundPublic]
    metrics: dict[str, Any] | None = Field(description="evaluation of the final adapter")
    eval_samples: int | None
    final_sha256: str | None
    steps: list[StepPublic] | None = Field(None, description="the job's task steps and their leases (admin only)")


class ScoringFromWarmup(ScoreFields):
    """A scoring job whose checkpoints are the warmup job's checkpoint rounds (global adapter + learning rate)."""

    name: str = Field(min_length=1, max_length=200)
    silos: list[str] | None = Field(None, description="default: the warmup job's silos")
    projection: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "sjlt", "dim": DEFAULT_PROJECTION_DIM, "seed": 0, "nnz": 4},
        description="kind, dim, seed, nnz (param_hash/param_count come from the warmup adapter)",
    )
    precondition: bool = Field(
        False,
        description="silos precondition with the Adam moments of their own warmup training (kept locally); needs "
        "score 'trace' and a 'top' or 'fixed' threshold, as the coordinator scores its anchor samples with plain "
        "gradients",
    )
    similarity: Literal["cosine", "dot"] = "cosine"
    threshold: dict[str, Any] = Field(default_factory=lambda: {"kind": "mean-anchor"})
    auto_score: bool = True
