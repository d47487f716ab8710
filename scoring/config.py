"""Frozen, validated algorithm settings that round-trip through JSON.

Contains `LoraSettings` (which modules get adapters, rank, alpha), `ProjectionSpec` (how gradients are compressed;
carried with every projection), `TraceConfig` (how projections become scores), `TrainingConfig` (a warmup run),
`LocalTrainConfig` with `round_lr` (one silo's local training in a federated round) and the helper
`parameter_layout_hash`. Standard library and `annotated_types` only: the coordinator API imports this module without
torch.

Each bound on a field is written once, as ``Annotated`` metadata (``rank: Annotated[int, Gt(0), Le(4096)]``).
`_check_annotated` enforces it when a dataclass is built from Python or from JSON, and the API validates its request
bodies against these same dataclasses, so pydantic reads the same bounds into its checks and into the OpenAPI schema
(`app.schemas`). No mirror of a setting exists at the API.

Choose `ProjectionSpec(kind="sjlt")` unless you have a reason not to: it is exact-sparse (s non-zeros per input
coordinate), costs O(s·D) per gradient and needs no matrix in memory. `rademacher` and `gaussian` are dense
(TRAK-style) and regenerate their D×k matrix block by block on every call, so they are slow for large D.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin, get_type_hints

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen

from scoring.errors import ConfigError, IncompatibleArtifactError

ProjectionKind = Literal["sjlt", "rademacher", "gaussian"]
Similarity = Literal["cosine", "dot"]
Schedule = Literal["constant", "linear", "cosine"]
PROJECTION_KINDS: tuple[str, ...] = get_args(ProjectionKind)
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
MERGE_KINDS: tuple[str, ...] = (
    "cat",
    "svd",
    "linear",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
"""peft ``add_weighted_adapter`` combination types (see `scoring.federated.merging`)."""
DENSITY_MERGE_KINDS = frozenset(k for k in MERGE_KINDS if k.split("_")[0] in ("ties", "dare", "magnitude"))
"""The merge kinds that need a ``density``."""

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama-style decoder block. Measured on PubMedQA (`bench/quality.py`, SmolLM2-135M, 300
candidates, seed 0): the trace score's detection AUROC is 0.967 unprojected with adapters here, against 0.931 with
``q_proj, v_proj`` alone (exchanged answers 0.931 against 0.854), and the gradient pass took about as long (the
model's forward and backward dominate it, not the LoRA layers)."""

DEFAULT_MAX_LEN = 768
"""Tokens per sample after truncation (prompt and response together)."""
DEFAULT_TEMPLATE = "auto"
"""The prompt template: ``auto`` uses the tokenizer's chat template when it has one."""

SCORE_KINDS: tuple[str, ...] = ("calibrated", "trace")
"""How a scoring job turns what the silos send into one score per sample: ``calibrated`` (the default; the trace and
the loss signals, each standardised against the anchor samples and fused, `scoring.calibration`) or ``trace`` (the
pure CLUES trace score)."""
DEFAULT_SCORE_KIND = "calibrated"

SIGNALS: tuple[str, ...] = ("loss_uncond", "n_tokens")
"""Per-sample signals a job may ask each silo to send beside its projections and response losses
(`scoring.signals`): ``loss_uncond``, the response loss after an empty prompt, ℓ(y|∅); ``n_tokens``, the number of
response tokens. A job that asks for none is the pure CLUES protocol."""
DEFAULT_SIGNALS: tuple[str, ...] = SIGNALS

SCORING_MODES: tuple[str, ...] = ("shared", "local")
"""Where a scoring job scores: ``shared`` (the silos send projections and per-sample values, the coordinator scores
every sample) or ``local`` (the coordinator publishes a reference from its anchors, each silo scores its own samples
and sends only its kept count and a score histogram, `scoring.local_scoring`)."""
DEFAULT_SCORING_MODE = "shared"

GRADIENT_KINDS: tuple[str, ...] = ("projected", "exact")
"""What a silo-local job scores: ``projected`` gradients (the job's projection, as a shared job) or the ``exact``
unprojected LoRA gradients, streamed at the coordinator and at each silo without being stored
(`scoring.exact_scoring`). A shared job scores projections only: its silos send them."""
DEFAULT_GRADIENTS = "projected"


def check_aggregate_epsilon(scoring_mode: str, epsilon: float | None) -> None:
    """Refuse noise on aggregates outside a silo-local job, or an ε that is not a finite number > 0."""
    if epsilon is None:
        return
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, int | float)
        or not (math.isfinite(epsilon) and epsilon > 0)
    ):
        raise ConfigError(f"aggregate_epsilon: must be a finite number > 0, got {epsilon!r}")
    if scoring_mode != "local":
        raise ConfigError(
            "aggregate_epsilon: noise on the aggregates needs scoring_mode 'local' (a shared job sends none)"
        )


def check_gradients(scoring_mode: str, gradients: str) -> None:
    """Refuse exact gradients outside a silo-local job (naming the field)."""
    if gradients not in GRADIENT_KINDS:
        raise ConfigError(f"gradients: must be one of {list(GRADIENT_KINDS)}, got {gradients!r}")
    if gradients == "exact" and scoring_mode != "local":
        raise ConfigError(
            "gradients: 'exact' needs scoring_mode 'local' (a shared job's silos send projections; exact gradients "
            "are millions of values per sample and never leave a silo)"
        )


FUSIONS: tuple[str, ...] = ("fisher", "max")
"""How the calibrated score combines its one-sided signals (`scoring.calibration.fuse`)."""
DEFAULT_FUSION = "fisher"


def check_score_settings(score: str, signals: Sequence[str], fusion: str) -> None:
    """Refuse an unknown score kind, signal or fusion, or repeated signals (naming the field)."""
    if score not in SCORE_KINDS:
        raise ConfigError(f"score: must be one of {list(SCORE_KINDS)}, got {score!r}")
    unknown = [s for s in signals if s not in SIGNALS]
    if unknown:
        raise ConfigError(f"signals: unknown signal(s) {unknown}; choose from {list(SIGNALS)}")
    if len(set(signals)) != len(signals):
        raise ConfigError(f"signals: repeated signal(s) in {list(signals)}")
    if fusion not in FUSIONS:
        raise ConfigError(f"fusion: must be one of {list(FUSIONS)}, got {fusion!r}")


DEFAULT_PROJECTION_DIM = 32768
"""k of the default projection. Adam-preconditioned candidate gradients have a small spread of cosines with the
(plain) anchor direction (std ~0.004), of the order of a sketch's error at k = 8192 (~0.002): on the PubMedQA
benchmark k = 8192 drops the AUROC from 0.967 (unprojected) to 0.909, k = 32768 keeps 0.962 (seed 0; seed 1: 0.929,
0.899, 0.916). A projection costs 2k bytes per sample and checkpoint (float16)."""


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_BOUNDS: tuple[tuple[type, str, str, Any], ...] = (
    (Gt, "gt", ">", lambda v, b: v > b),
    (Ge, "ge", ">=", lambda v, b: v >= b),
    (Lt, "lt", "<", lambda v, b: v < b),
    (Le, "le", "<=", lambda v, b: v <= b),
)


@functools.cache
def _annotated_fields(cls: type) -> tuple[tuple[str, Any, tuple[Any, ...], bool], ...]:
    """``(name, base type, metadata, optional)`` of each ``Annotated`` field of the dataclass ``cls``; an optional
    field is written ``Annotated[float, Gt(0)] | None`` and its bounds hold when it is not None."""
    hints = get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint, optional = hints[f.name], False
        if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
            inner = [a for a in get_args(hint) if a is not type(None)]
            hint, optional = (inner[0], True) if len(inner) == 1 else (hint, False)
        if get_origin(hint) is Annotated:
            base, *meta = get_args(hint)
            out.append((f.name, base, tuple(meta), optional))
    return tuple(out)


def _check_annotated(obj: Any) -> None:
    """Enforce the type (``int``: an integer, not a bool; ``float``: a finite number) and the `annotated_types`
    bounds (``Gt``, ``Ge``, ``Lt``, ``Le``, ``MinLen``, ``MaxLen``) of each ``Annotated`` field of ``obj``.

    Raises:
        ConfigError: naming the field, the rule and the value.
    """
    for name, base, meta, optional in _annotated_fields(type(obj)):
        value = getattr(obj, name)
        if optional and value is None:
            continue
        rules = [f"{sign} {getattr(m, attr)}" for m in meta for kind, attr, sign, _ in _BOUNDS if isinstance(m, kind)]
        if base is int or base is float:
            what = "an integer" if base is int else "a number"
            ok = (isinstance(value, int) and not isinstance(value, bool)) if base is int else _is_real(value)
            ok = ok and all(
                test(value, getattr(m, attr)) for m in meta for kind, attr, _, test in _BOUNDS if isinstance(m, kind)
            )
            _require(ok, name, f"must be {what}{' ' + ' and '.join(rules) if rules else ''}, got {value!r}")
        for m in meta:
            if isinstance(m, MinLen):
                _require(len(value) >= m.min_length, name, f"must have length >= {m.min_length}")
            if isinstance(m, MaxLen):
                _require(len(value) <= m.max_length, name, f"must have length <= {m.max_length}")


class _JsonMixin:
    """`to_dict`/`from_dict`/`to_json`/`from_json`/`fingerprint` for flat frozen dataclasses."""

    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid", "allow_inf_nan": False}
    """How the API validates these dataclasses as request bodies (pydantic reads this attribute; nothing here
    imports pydantic): unknown fields and non-finite numbers are refused, as `from_dict` and `_check_annotated` do."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{cls.__name__}: {exc}") from exc

    def to_json(self) -> str:
        return _canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ConfigError(f"{cls.__name__}: not valid JSON ({type(exc).__name__}: {exc})") from None
        return cls.from_dict(data)

    def fingerprint(self) -> str:
        """A short, stable hash of the canonical JSON form."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LoraSettings(_JsonMixin):
    """Where LoRA adapters go and how large they are.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / r.
        target_modules: module-name suffixes that receive adapters (default `DEFAULT_LORA_TARGETS`).
        dropout: LoRA dropout during training (gradients for scoring are always taken without dropout).
    """

    rank: Annotated[int, Gt(0), Le(4096)] = 8
    alpha: Annotated[float, Gt(0)] = 16.0
    target_modules: Annotated[tuple[str, ...], MinLen(1)] = DEFAULT_LORA_TARGETS
    dropout: Annotated[float, Ge(0), Lt(1)] = 0.0

    def __post_init__(self) -> None:
        _check_annotated(self)
        _require(
            all(isinstance(m, str) and m for m in self.target_modules),
            "target_modules",
            f"must be a non-empty list of module names, got {self.target_modules!r}",
        )


def parameter_layout_hash(names_and_shapes: Iterable[tuple[str, Sequence[int]]]) -> str:
    """Hash of the ordered parameter names and shapes that a gradient vector is laid out over."""
    layout = [[name, [int(s) for s in shape]] for name, shape in names_and_shapes]
    return hashlib.sha256(_canonical_json(layout).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ProjectionSpec(_JsonMixin):
    """Everything that determines a random projection R: R^D -> R^k, bit for bit.

    Two parties with equal specs build identical matrices on any machine and device; projections made under
    different specs must never be compared (`check_compatible`).

    Attributes:
        kind: ``sjlt`` (sparse Johnson-Lindenstrauss), ``rademacher`` (dense ±1/√k) or ``gaussian`` (dense N(0,1/k)).
        dim: output dimension k.
        seed: the shared seed every party derives the matrix from.
        nnz: non-zeros per input coordinate (SJLT only; must divide ``dim``). Dense kinds require 1.
        param_hash: `parameter_layout_hash` of the ordered LoRA parameter names and shapes.
        param_count: D, the total number of gradient coordinates.
    """

    kind: ProjectionKind
    dim: Annotated[int, Gt(0), Le(1 << 20)]
    seed: Annotated[int, Ge(0), Lt(2**63)]
    param_hash: Annotated[str, MinLen(1), MaxLen(64)]
    param_count: Annotated[int, Gt(0)]
    nnz: Annotated[int, Gt(0)] = 4

    def __post_init__(self) -> None:
        _require(self.kind in PROJECTION_KINDS, "kind", f"must be one of {PROJECTION_KINDS}, got {self.kind!r}")
        _require(isinstance(self.param_hash, str), "param_hash", f"must be a string, got {self.param_hash!r}")
        _check_annotated(self)
        if self.kind == "sjlt":
            _require(self.dim % self.nnz == 0, "nnz", f"must divide dim ({self.dim}), got {self.nnz}")
        else:
            _require(self.nnz == 1, "nnz", f"dense kind {self.kind!r} requires nnz=1, got {self.nnz}")

    def check_compatible(self, other: ProjectionSpec, what: str = "projections") -> None:
        """Raise `IncompatibleArtifactError` unless ``other`` is the same spec."""
        if self != other:
            diff = {k: (v, getattr(other, k)) for k, v in self.to_dict().items() if getattr(other, k) != v}
            raise IncompatibleArtifactError(f"{what} were made under different projection specs: {diff}")


@dataclass(frozen=True)
class TraceConfig(_JsonMixin):
    """How projected gradients become scores.

    score(z) = Σ_t η_t · max_groups mean_{a in group} sim(g_t(z), a_t)

    Attributes:
        similarity: ``cosine`` (each gradient normalised; robust to length bias) or ``dot``.
        chunk_rows: rows streamed per chunk when scoring large float16 arrays.
    """

    similarity: str = "cosine"
    chunk_rows: int = 65536

    def __post_init__(self) -> None:
        _require(self.similarity in SIMILARITIES, "similarity", f"must be one of {SIMILARITIES}")
        _require(self.chunk_rows > 0, "chunk_rows", "must be positive")


@dataclass(frozen=True)
class AdamState(_JsonMixin):
    """Hyper-parameters of the Adam moments stored with a checkpoint (the moments themselves are tensors)."""

    beta1: Annotated[float, Ge(0), Lt(1)] = 0.9
    beta2: Annotated[float, Ge(0), Lt(1)] = 0.999
    eps: Annotated[float, Gt(0)] = 1e-8

    def __post_init__(self) -> None:
        _check_annotated(self)


class _WithAdam(_JsonMixin):
    """`_JsonMixin` for training settings: a learning-rate ``schedule`` and an `AdamState` nested as ``adam`` (a
    JSON object in the dict form)."""

    adam: AdamState
    schedule: str

    def __post_init__(self) -> None:
        _check_annotated(self)
        _require(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(isinstance(self.adam, AdamState), "adam", f"must be an AdamState, got {type(self.adam).__name__}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["adam"] = self.adam.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        data = dict(data) if isinstance(data, dict) else data
        if isinstance(data, dict) and isinstance(data.get("adam"), dict):
            data["adam"] = AdamState.from_dict(data["adam"])
        if isinstance(data, dict) and isinstance(data.get("dp"), dict):
            data["dp"] = DPSettings.from_dict(data["dp"])
        return super().from_dict(data)


@dataclass(frozen=True)
class TrainingConfig(_WithAdam):
    """A plain LoRA SFT run that saves ``num_checkpoints`` evenly spaced checkpoints.

    Attributes:
        epochs: passes over the data.
        batch_size: samples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        schedule: ``linear`` (warmup then linear decay to 0), ``cosine`` or ``constant``.
        warmup_ratio: fraction of steps spent warming up.
        weight_decay: AdamW weight decay.
        num_checkpoints: T, how many checkpoints to save (the last one at the end of training).
        max_steps: stop after this many optimizer steps (0 means no limit).
        seed: shuffling seed.
    """

    epochs: Annotated[float, Gt(0)] = 1.0
    batch_size: Annotated[int, Gt(0)] = 4
    grad_accum: Annotated[int, Gt(0)] = 1
    lr: Annotated[float, Gt(0)] = 2e-4
    schedule: Schedule = "linear"
    warmup_ratio: Annotated[float, Ge(0), Lt(1)] = 0.03
    weight_decay: Annotated[float, Ge(0)] = 0.0
    num_checkpoints: Annotated[int, Gt(0)] = 4
    max_steps: Annotated[int, Ge(0)] = 0
    seed: Annotated[int, Ge(0)] = 0
    adam: AdamState = field(default_factory=AdamState)


@dataclass(frozen=True)
class DPSettings(_JsonMixin):
    """DP-SGD in a silo's local training (`scoring.privacy`, `scoring.federated.dp`): each sample's gradient is
    clipped to ``clip_norm``, Gaussian noise of standard deviation ``noise_multiplier · clip_norm`` is added to the
    sum, and batches are Poisson-sampled, as the accountant assumes.

    Give exactly one of ``epsilon`` (the budget for the whole training job at one silo; σ is derived from it) and
    ``noise_multiplier`` (σ; the ε it spends is reported).

    Attributes:
        clip_norm: C, the bound on each sample's gradient norm (all LoRA parameters together).
        epsilon: target ε over every round of the job, at ``delta``.
        noise_multiplier: σ, noise standard deviation over ``clip_norm``.
        delta: δ of the (ε, δ) guarantee (default 1/N, N the silo's sample count).
    """

    clip_norm: Annotated[float, Gt(0)] = 1.0
    epsilon: Annotated[float, Gt(0), Le(1000)] | None = None
    noise_multiplier: Annotated[float, Gt(0), Le(1000)] | None = None
    delta: Annotated[float, Gt(0), Lt(1)] | None = None

    def __post_init__(self) -> None:
        _check_annotated(self)
        _require(
            (self.epsilon is None) != (self.noise_multiplier is None),
            "epsilon",
            "give exactly one of epsilon (σ is derived from it) and noise_multiplier (its ε is reported)",
        )


@dataclass(frozen=True)
class LocalTrainConfig(_WithAdam):
    """One silo's local LoRA training in a federated round (FedAvg, or FedProx with ``prox_mu > 0``).

    Attributes:
        steps: optimizer steps per round.
        batch_size: samples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        schedule: how the lr moves across rounds (constant within a round): ``constant``, ``linear`` or
            ``cosine`` (see `round_lr`).
        weight_decay: AdamW weight decay.
        prox_mu: FedProx coefficient μ of ``μ/2 · ||w - w_global||²`` (0 is plain FedAvg local training).
        max_grad_norm: clip the global gradient norm to this (0 disables clipping).
        seed: shuffling seed (each round shuffles with ``(seed, round)``).
        adam: the AdamW betas and eps.
        dp: train with DP-SGD under these settings (`DPSettings`; None: plain training).
    """

    steps: Annotated[int, Ge(1), Le(1_000_000)] = 10
    batch_size: Annotated[int, Ge(1), Le(4096)] = 4
    grad_accum: Annotated[int, Ge(1), Le(4096)] = 1
    lr: Annotated[float, Gt(0)] = 2e-4
    schedule: Schedule = "constant"
    weight_decay: Annotated[float, Ge(0)] = 0.0
    prox_mu: Annotated[float, Ge(0)] = 0.0
    max_grad_norm: Annotated[float, Ge(0)] = 1.0
    seed: Annotated[int, Ge(0)] = 0
    adam: AdamState = field(default_factory=AdamState)
    dp: DPSettings | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.dp is None or isinstance(self.dp, DPSettings),
            "dp",
            f"must be DPSettings or None, got {type(self.dp).__name__}",
        )


def round_lr(cfg: LocalTrainConfig, round: int, rounds: int) -> float:
    """The learning rate of round ``round`` (0-based) of ``rounds``: the schedule steps once per round.

    ``constant``: ``lr``; ``linear``: ``lr · (1 - r/rounds)``; ``cosine``: ``lr · (1 + cos(π r/rounds)) / 2``. The
    last round keeps a positive lr (the schedules reach 0 only at ``r = rounds``).

    Raises:
        ConfigError: ``rounds < 1`` or ``round`` outside ``[0, rounds)``.
    """
    _require(isinstance(rounds, int) and rounds >= 1, "rounds", f"must be a positive integer, got {rounds!r}")
    _require(isinstance(round, int) and 0 <= round < rounds, "round", f"must be in [0, {rounds}), got {round!r}")
    progress = round / rounds
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def round_entry(cfg: LocalTrainConfig, round: int, lr: float, steps_done: int) -> dict[str, Any]:
    """The checkpoint entry of a federated round's global adapter (index, step, lr, lr_last, adam): what the
    coordinator and the Flower ServerApp write into the adapters they build."""
    return {"index": round, "step": steps_done, "lr": lr, "lr_last": lr, "adam": cfg.adam.to_dict()}


def check_same_spec(specs: Iterable[ProjectionSpec], what: str = "projections") -> ProjectionSpec:
    """Return the one spec shared by all ``specs``; raise `IncompatibleArtifactError` otherwise."""
    specs = list(specs)
    if not specs:
        raise IncompatibleArtifactError(f"no {what} given")
    for other in specs[1:]:
        specs[0].check_compatible(other, what)
    return specs[0]
