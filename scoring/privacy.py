"""Privacy accounting for DP-SGD at a silo: how much ε a silo's local training spends, and a ledger that refuses to
spend more than the job's budget.

The mechanism (`scoring.federated.dp`) is the sampled Gaussian mechanism of DP-SGD: each optimizer step
Poisson-samples the silo's N samples at rate q, clips each sampled gradient to norm C and adds N(0, σ²C²) noise to
their sum. Every release the coordinator sees (the adapters a silo uploads) is post-processing of those noisy sums,
so the guarantee for a silo's samples is that of ``steps`` compositions of the sampled Gaussian, counted across every
round of the job. The accounting is Google's `dp-accounting` (its RDP accountant, with its tight conversion from
RDP to (ε, δ)), not hand-written: `dp_sgd_epsilon` composes the events, `dp_sgd_noise` calibrates σ to a target ε.

`PrivacyLedger` is the silo's record of one training job (a JSON file kept beside the silo's moments, written
atomically): the plan (q, σ, δ, the ε budget), and each round charged with its step count and the ε spent after it.
It survives a restart (charging the same round again changes nothing) and refuses, with the figures, a round that
would take the job past its budget. Torch-free: the coordinator reads ledgers' figures without torch.

A silo-local scoring job may ask for noise on the aggregate a silo sends (``aggregate_epsilon``): `noisy_aggregate`
draws it (discrete Laplace, pure ε-DP), and `ReleaseLedger`, one per silo, records every such release and sums their
ε. The mask itself never leaves the silo; a sample's own score decides whether it is kept (the threshold comes from
the anchors), so DP-SGD on the selected samples keeps its guarantee towards the whole local set.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scoring.config import DPSettings, check_aggregate_epsilon
from scoring.errors import ConfigError, DataError, ScoringError
from wire.files import atomic_write_bytes

LEDGER_FORMAT = "clues.privacy-ledger/1"
_SLACK = 1e-9
"""Relative slack when comparing a spend to the budget (σ is calibrated to the budget to solver tolerance)."""


RDP_ORDERS: tuple[float, ...] = (*range(2, 64), 128, 256, 512)
"""The Rényi orders the accountant evaluates: `dp-accounting`'s defaults without the fractional ones below 5, whose
series fails to converge at small σ (the accountant then drops them with a warning); integer orders are exact."""


def _accountant():
    from dp_accounting import rdp

    return rdp.RdpAccountant(list(RDP_ORDERS))


class BudgetExceededError(ScoringError):
    """A round would take a silo's ε past the training job's budget."""


def _sampled_gaussian(noise_multiplier: float, sampling_rate: float, steps: int):
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _check_plan(sampling_rate: float, steps: int, delta: float) -> None:
    if not 0 < sampling_rate <= 1:
        raise ConfigError(f"sampling_rate: must be in (0, 1], got {sampling_rate!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps: must be an integer >= 0, got {steps!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta: must be in (0, 1), got {delta!r}")


def dp_sgd_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` DP-SGD steps (Poisson rate ``sampling_rate``, noise σ = ``noise_multiplier``) at ``delta``,
    by `dp-accounting`'s RDP accountant. Zero steps spend nothing."""
    _check_plan(sampling_rate, steps, delta)
    if steps == 0:
        return 0.0
    accountant = _accountant()
    accountant.compose(_sampled_gaussian(noise_multiplier, sampling_rate, steps))
    return float(accountant.get_epsilon(delta))


def dp_sgd_noise(target_epsilon: float, sampling_rate: float, steps: int, delta: float) -> float:
    """The smallest σ whose ``steps`` DP-SGD steps spend at most ``target_epsilon`` at ``delta``
    (`dp_accounting.calibrate_dp_mechanism` over the RDP accountant)."""
    _check_plan(sampling_rate, steps, delta)
    if not target_epsilon > 0:
        raise ConfigError(f"epsilon: must be positive, got {target_epsilon!r}")
    import dp_accounting

    sigma = dp_accounting.calibrate_dp_mechanism(
        _accountant,
        lambda s: _sampled_gaussian(s, sampling_rate, max(steps, 1)),
        target_epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-6,
    )
    return float(sigma)


@dataclass(frozen=True)
class PrivacyPlan:
    """What one silo's DP-SGD in one training job runs under.

    Attributes:
        clip_norm: C.
        noise_multiplier: σ.
        sampling_rate: q, the Poisson rate of each step (expected batch / N).
        delta: δ.
        epsilon_budget: the most ε the job may spend at this silo (the target, or what σ spends over the planned
            steps).
        planned_steps: the optimizer steps of every round together.
    """

    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    delta: float
    epsilon_budget: float
    planned_steps: int

    @classmethod
    def of(cls, settings: DPSettings, *, num_samples: int, expected_batch: int, planned_steps: int) -> PrivacyPlan:
        """The plan of a silo holding ``num_samples`` samples, drawing ``expected_batch`` of them per step on
        average, for ``planned_steps`` steps: σ from the target ε, or the ε of the given σ; δ defaults to 1/N."""
        if num_samples < 1:
            raise ConfigError(f"num_samples: DP-SGD needs at least one sample, got {num_samples}")
        rate = min(1.0, expected_batch / num_samples)
        delta = settings.delta if settings.delta is not None else 1.0 / num_samples
        if settings.epsilon is not None:
            sigma = dp_sgd_noise(settings.epsilon, rate, planned_steps, delta)
            budget = settings.epsilon
        else:
            sigma = float(settings.noise_multiplier)
            budget = dp_sgd_epsilon(sigma, rate, planned_steps, delta)
        return cls(settings.clip_norm, sigma, rate, delta, budget, planned_steps)

    def epsilon_after(self, steps: int) -> float:
        return dp_sgd_epsilon(self.noise_multiplier, self.sampling_rate, steps, self.delta)


@dataclass
class PrivacyLedger:
    """A silo's ε ledger for one training job (see the module docstring). Open it with `PrivacyLedger.open`."""

    path: Path
    job_id: str
    plan: PrivacyPlan
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps_spent(self) -> int:
        return sum(int(r["steps"]) for r in self.rounds)

    @property
    def epsilon_spent(self) -> float:
        return float(self.rounds[-1]["epsilon"]) if self.rounds else 0.0

    @classmethod
    def open(cls, path: Path | str, job_id: str, plan: PrivacyPlan) -> PrivacyLedger:
        """The ledger at ``path``: read back if it exists (it must be this job's, under the same plan), else a new
        empty one, written at once so that a restart finds it."""
        path = Path(path)
        if path.exists():
            try:
                data = json.loads(path.read_text())
                stored = PrivacyPlan(**data["plan"])
                job, rounds = str(data["job"]), list(data["rounds"])
                if data.get("format") != LEDGER_FORMAT:
                    raise ValueError(f"format {data.get('format')!r}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}: not a privacy ledger ({type(exc).__name__}: {exc})") from exc
            if job != job_id:
                raise DataError(f"{path}: the ledger of training job {job}, not {job_id}")
            if stored != plan:
                raise DataError(f"{path}: the ledger was planned as {stored}, the job now asks for {plan}")
            return cls(path, job_id, plan, rounds)
        ledger = cls(path, job_id, plan)
        ledger._write()
        return ledger

    def check(self, round: int, steps: int, limit: float | None = None) -> float:
        """The ε spent once round ``round`` of ``steps`` steps is charged; `BudgetExceededError` if that is past the
        job's budget, or past ``limit`` (a cap the silo sets for itself). A round already charged costs nothing
        more."""
        if any(r["round"] == round for r in self.rounds):
            return self.epsilon_spent
        after = self.plan.epsilon_after(self.steps_spent + steps)
        budget, whose = self.plan.epsilon_budget, "the job's budget"
        if limit is not None and limit < budget:
            budget, whose = limit, "this silo's own limit"
        if after > budget * (1 + _SLACK):
            raise BudgetExceededError(
                f"round {round} of training job {self.job_id}: {steps} more DP-SGD step(s) would spend ε = "
                f"{after:.4g} at δ = {self.plan.delta:.3g}, past {whose} ε = {budget:.4g} "
                f"({self.epsilon_spent:.4g} spent in {self.steps_spent} step(s))"
            )
        return after

    def charge(self, round: int, steps: int, limit: float | None = None) -> float:
        """Record round ``round`` (``steps`` steps) before its update leaves the silo; returns the ε spent after it.
        Idempotent per round; `BudgetExceededError` (nothing recorded) past the budget or ``limit``."""
        if any(r["round"] == round for r in self.rounds):
            return self.epsilon_spent
        after = self.check(round, steps, limit)
        self.rounds.append({"round": round, "steps": steps, "epsilon": after})
        self._write()
        return after

    def summary(self) -> dict[str, Any]:
        """What a silo reports to the coordinator: the plan's figures and the ε spent so far."""
        return {
            "epsilon_spent": self.epsilon_spent,
            "epsilon_budget": self.plan.epsilon_budget,
            "delta": self.plan.delta,
            "noise_multiplier": self.plan.noise_multiplier,
            "clip_norm": self.plan.clip_norm,
            "sampling_rate": self.plan.sampling_rate,
            "steps": self.steps_spent,
        }

    def _write(self) -> None:
        data = {"format": LEDGER_FORMAT, "job": self.job_id, "plan": asdict(self.plan), "rounds": self.rounds}
        atomic_write_bytes(self.path, (json.dumps(data, indent=1) + "\n").encode())


def expected_noise_std(plan: PrivacyPlan) -> float:
    """σ·C, the standard deviation of the noise on each coordinate of a step's clipped sum."""
    return plan.noise_multiplier * plan.clip_norm


REPORT_FIELDS: tuple[str, ...] = (
    "epsilon_spent",
    "epsilon_budget",
    "delta",
    "noise_multiplier",
    "clip_norm",
    "sampling_rate",
    "steps",
)
"""What a silo reports of its ledger with each update (`PrivacyLedger.summary`)."""


def check_report(report: object, where: str) -> dict[str, Any]:
    """A privacy report (`PrivacyLedger.summary`) as it arrives in an update: every field of `REPORT_FIELDS`, finite
    and >= 0 (``steps`` an integer, ``delta`` and ``sampling_rate`` in (0, 1]).

    Raises:
        DataError: naming the field.
    """
    if not isinstance(report, dict):
        raise DataError(f"{where}: the privacy report must be a JSON object")
    missing = [key for key in REPORT_FIELDS if key not in report]
    if missing:
        raise DataError(f"{where}: the privacy report lacks {missing}")
    for key in REPORT_FIELDS:
        value = report[key]
        integer = isinstance(value, int) and not isinstance(value, bool)
        ok = integer if key == "steps" else (integer or isinstance(value, float)) and math.isfinite(value)
        if not ok or value < 0 or (key in ("delta", "sampling_rate") and not 0 < value <= 1):
            raise DataError(f"{where}: privacy report '{key}' must be a finite number in range, got {value!r}")
    return {key: report[key] for key in REPORT_FIELDS}


# --- noise on a silo-local job's aggregate ---------------------------------------------------------------------

AGGREGATE_SENSITIVITY = 3
"""L1 sensitivity of a silo-local aggregate (kept, total, histogram) to adding or removing one sample: the total
moves by 1, one histogram bin by 1 and the kept count by at most 1."""


def discrete_laplace(n: int, epsilon: float, rng: np.random.Generator, sensitivity: float = AGGREGATE_SENSITIVITY):
    """(n,) integers of the discrete Laplace distribution, P(k) ∝ exp(−ε|k|/Δ): the difference of two geometric
    draws (the two-sided geometric mechanism; ε-DP for an integer query of L1 sensitivity Δ)."""
    p = -math.expm1(-epsilon / sensitivity)  # 1 − exp(−ε/Δ)
    return rng.geometric(p, n) - rng.geometric(p, n)


def noisy_aggregate(
    kept: int, histogram: Sequence[int], epsilon: float, rng: np.random.Generator | None = None
) -> tuple[int, int, tuple[int, ...]]:
    """An ε-DP release of a silo-local aggregate (`scoring.local_scoring.LocalAggregate`): ``(kept, total,
    histogram)``, each value with `discrete_laplace` noise at Δ = `AGGREGATE_SENSITIVITY`, then post-processed (no
    further privacy cost) into an aggregate the coordinator accepts: the total clipped at 1 (a silo that takes part
    holds a sample, and the coordinator refuses an empty aggregate); the histogram projected
    onto the integer vectors >= 0 that sum to it (`_integer_simplex`: clipping each bin at 0 instead would add ~0.9
    per empty bin at ε = 1, a total several times the truth for a small silo); the kept count clipped to [0, total].
    Integer noise, so none of the floating-point Laplace's leaks (Mironov, CCS 2012). ``rng`` defaults to a
    generator seeded from the OS's entropy (a silo's noise must be secret; tests pass a seeded one)."""
    check_aggregate_epsilon("local", epsilon)
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    counts = np.asarray(histogram, dtype=np.int64)
    noise = discrete_laplace(len(counts) + 2, epsilon, rng)
    total = max(int(counts.sum()) + int(noise[0]), 1)
    bins = _integer_simplex((counts + noise[2:]).astype(np.float64), total)
    return int(min(max(int(kept) + int(noise[1]), 0), total)), total, tuple(int(b) for b in bins)


def _integer_simplex(values: np.ndarray, total: int) -> np.ndarray:
    """The integer vector >= 0 summing to ``total`` nearest ``values``: the Euclidean projection onto the simplex
    {x >= 0, Σx = total} (Held et al.; Duchi et al. 2008), then rounded by largest remainders."""
    if total == 0 or values.size == 0:
        return np.zeros(values.size, dtype=np.int64)
    u = np.sort(values)[::-1]
    cumulative = np.cumsum(u) - total
    rho = np.flatnonzero(u - cumulative / np.arange(1, u.size + 1) > 0)[-1]
    projected = np.maximum(values - cumulative[rho] / (rho + 1), 0.0)
    floor = np.floor(projected).astype(np.int64)
    short = total - int(floor.sum())
    floor[np.argsort(floor - projected, kind="stable")[:short]] += 1  # the largest remainders
    return floor


def discrete_laplace_variance(epsilon: float, sensitivity: float = AGGREGATE_SENSITIVITY) -> float:
    """The variance of `discrete_laplace`'s noise: 2e^(−a)/(1 − e^(−a))², a = ε/Δ."""
    a = epsilon / sensitivity
    return 2.0 * math.exp(-a) / (-math.expm1(-a)) ** 2


RELEASE_LEDGER = "privacy-ledger.json"
"""The silo-wide ledger of noisy aggregate releases, under the agent's ``--work-dir``."""
RELEASE_LEDGER_FORMAT = "clues.release-ledger/1"


@dataclass
class ReleaseLedger:
    """A silo's record of the ε-DP aggregates it has released (one per silo-local job that asks for noise), kept in
    ``work_dir/privacy-ledger.json``. The releases are pure ε-DP about the same samples, so they compose by
    summing ε (basic composition): `epsilon_spent` is the silo's total. Charging a job again costs nothing (its
    release is drawn once and kept); `BudgetExceededError` past the silo's own ``limit``."""

    path: Path
    releases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def epsilon_spent(self) -> float:
        return float(sum(float(r["epsilon"]) for r in self.releases))

    @classmethod
    def open(cls, path: Path | str) -> ReleaseLedger:
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != RELEASE_LEDGER_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            releases = [dict(r) for r in data["releases"]]
            if not all(isinstance(r["job"], str) and float(r["epsilon"]) > 0 for r in releases):
                raise ValueError("a release without a job or a positive epsilon")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path}: not a release ledger ({type(exc).__name__}: {exc})") from exc
        return cls(path, releases)

    def charge(self, job_id: str, epsilon: float, limit: float | None = None) -> float:
        """Record job ``job_id``'s noisy aggregate at ``epsilon`` before it is drawn; returns the total ε spent."""
        if any(r["job"] == job_id for r in self.releases):
            return self.epsilon_spent
        after = self.epsilon_spent + float(epsilon)
        if limit is not None and after > limit * (1 + _SLACK):
            raise BudgetExceededError(
                f"job {job_id}: its noisy aggregate (ε = {epsilon:.4g}) would take this silo's releases to ε = "
                f"{after:.4g}, past its own limit ε = {limit:.4g} ({self.epsilon_spent:.4g} spent in "
                f"{len(self.releases)} release(s))"
            )
        self.releases.append({"job": job_id, "kind": "aggregate", "mechanism": "discrete-laplace", "epsilon": epsilon})
        data = {"format": RELEASE_LEDGER_FORMAT, "releases": self.releases}
        atomic_write_bytes(self.path, (json.dumps(data, indent=1) + "\n").encode())
        return after
