"""A Flower run config (flat keys, as ``[tool.flwr.app.config]`` and ``flwr run --run-config`` give it) turned into
the settings of a clues training job, checked by the same classes the coordinator checks a job with.

Keys are a clues training job's fields (docs/training.md) with Flower's spelling: hyphens for underscores, nested
settings as dotted keys (``local.batch-size``, ``aggregation.rule``, ``lora.rank``), lists as comma-separated
strings (``lora.target-modules``, ``evaluation.tasks``) and ``""`` for "not set". `RUN_CONFIG` lists them with
their defaults; flower_app/project/pyproject.toml ships the same table. This module imports neither flwr nor torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scoring.config import DEFAULT_MAX_LEN, DEFAULT_TEMPLATE, LocalTrainConfig, LoraSettings, round_lr
from scoring.errors import ConfigError
from scoring.federated.aggregation import ADAPTER_FIELDS, GUARD_FIELDS, RoundGuard, build_aggregator

RUN_CONFIG: dict[str, Any] = {
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "min-train-nodes": 2,
    "round-timeout": 3600.0,
    "model": "smollm2",
    "max-len": DEFAULT_MAX_LEN,
    "template": DEFAULT_TEMPLATE,
    "lora-init-seed": 0,
    "random-b": False,
    "lora.rank": 8,
    "lora.alpha": 16.0,
    "lora.dropout": 0.0,
    "lora.target-modules": "",
    "local.steps": 10,
    "local.batch-size": 4,
    "local.grad-accum": 1,
    "local.lr": 2e-4,
    "local.schedule": "constant",
    "local.weight-decay": 0.0,
    "local.prox-mu": 0.0,
    "local.max-grad-norm": 1.0,
    "local.seed": 0,
    "local.adam.beta1": 0.9,
    "local.adam.beta2": 0.999,
    "local.adam.eps": 1e-8,
    "aggregation.rule": "fedavg",
    "aggregation.eta": "",
    "aggregation.beta1": "",
    "aggregation.beta2": "",
    "aggregation.tau": "",
    "aggregation.trim": "",
    "aggregation.clip": "median",
    "aggregation.clip-factor": 3.0,
    "aggregation.clip-norm": "",
    "aggregation.max-count-ratio": 10.0,
    "selection.source": "selected",
    "selection.scoring-job": "",
    "selection.fraction": 0.05,
    "selection.seed": 0,
    "coordinator.url": "",
    "coordinator.token-file": "",
    "evaluation.path": "",
    "evaluation.tasks": "",
    "evaluation.every": 1,
    "evaluation.batch-size": 8,
    "evaluation.max-new-tokens": 256,
    "evaluation.pubmedqa-method": "loglik",
    "out-dir": "",
}
"""Every run-config key the app reads, with its default (``""``: not set)."""

SOURCES = ("selected", "random", "all", "fraction")
RULES = ("fedavg", "quality-fedavg", "fedadam", "fedyogi", "fedprox", "median", "trimmed-mean")


def _fields(flat: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The keys under ``prefix.`` as a nested dict with underscores (``local.adam.beta1`` → ``{"adam": {...}}``),
    leaving out the unset ones."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if not key.startswith(prefix + ".") or value == "":
            continue
        *path, last = key.removeprefix(prefix + ".").replace("-", "_").split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _listed(value: Any) -> list[str] | None:
    return [v.strip() for v in str(value).split(",") if v.strip()] or None


@dataclass(frozen=True)
class RunSettings:
    """One Flower run of clues' federated training.

    Attributes:
        spec: the training job's spec as `agent.train.LocalTrainer` and the coordinator read it (``model``,
            ``lora``, ``lora_init_seed``, ``random_b``, ``max_len``, ``template``, ``rounds``, ``local``,
            ``aggregation``, ``selection``, ``evaluation``).
        fraction_train, min_train_nodes, round_timeout: Flower's sampling, the quorum a round needs (fewer valid
            replies fail the run) and how long a round waits for replies.
        coordinator_url, token_file: where the silo (ClientApp) or the admin (ServerApp) asks the clues coordinator
            for scores; the token is read from the file, never from the run config.
        eval_path: the held-out set on the ServerApp's machine (None: no evaluation).
        out_dir: where the ServerApp writes the result (None: ``~/.clues-flower``).
    """

    spec: dict[str, Any]
    fraction_train: float
    min_train_nodes: int
    round_timeout: float
    coordinator_url: str | None
    token_file: Path | None
    eval_path: Path | None
    out_dir: Path | None

    @property
    def rounds(self) -> int:
        return int(self.spec["rounds"])

    @property
    def local(self) -> LocalTrainConfig:
        return LocalTrainConfig.from_dict(self.spec["local"])

    def lr(self, round: int) -> float:
        """The learning rate of 0-based round ``round`` (`scoring.config.round_lr`, as the coordinator sets it)."""
        return round_lr(self.local, round, self.rounds)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Check and convert a Flower run config.

        Raises:
            ConfigError: an unknown key, or a value a clues training job would refuse (the message names the key).
        """
        unknown = sorted(set(run_config) - set(RUN_CONFIG))
        if unknown:
            raise ConfigError(f"run config: unknown key(s) {unknown} (known: {sorted(RUN_CONFIG)})")
        flat = {**RUN_CONFIG, **run_config}
        if not flat["model"]:
            raise ConfigError("run config: 'model' is required (a clues model reference, e.g. the scoring job's)")
        for key in ("num-server-rounds", "min-train-nodes", "max-len", "lora-init-seed"):
            if isinstance(flat[key], bool) or not isinstance(flat[key], int) or flat[key] < (0 if "seed" in key else 1):
                raise ConfigError(f"run config: {key!r} must be a positive integer, got {flat[key]!r}")
        if not 0 < float(flat["fraction-train"]) <= 1:
            raise ConfigError(f"run config: 'fraction-train' must be in (0, 1], got {flat['fraction-train']!r}")
        if not float(flat["round-timeout"]) > 0:
            raise ConfigError(f"run config: 'round-timeout' must be positive, got {flat['round-timeout']!r}")
        lora = _fields(flat, "lora")
        if "target_modules" in lora:
            lora["target_modules"] = tuple(_listed(lora["target_modules"]) or ())
        local = _fields(flat, "local")
        aggregation = _fields(flat, "aggregation")
        selection = _fields(flat, "selection")
        evaluation = _fields(flat, "evaluation")
        evaluation.pop("path", None)
        if "tasks" in evaluation:
            evaluation["tasks"] = _listed(evaluation["tasks"])
        for what, check in (
            ("lora", lambda: LoraSettings.from_dict(lora)),
            ("local", lambda: LocalTrainConfig.from_dict(local)),
        ):
            try:
                check()
            except (ConfigError, TypeError, ValueError) as exc:
                raise ConfigError(f"run config: {what}.*: {exc}") from exc
        rule = aggregation.get("rule")
        if rule not in RULES:
            raise ConfigError(f"run config: 'aggregation.rule' must be one of {list(RULES)}, got {rule!r}")
        if rule == "fedprox" and not local.get("prox_mu", 0) > 0:
            raise ConfigError("run config: 'aggregation.rule' fedprox needs 'local.prox-mu' > 0")
        options = {k: v for k, v in aggregation.items() if k != "rule" and k not in GUARD_FIELDS}
        try:
            build_aggregator("fedavg" if rule == "fedprox" else rule, **options)
            RoundGuard.from_dict(aggregation)
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"run config: aggregation.*: {exc}") from exc
        source = selection.get("source")
        if source not in SOURCES:
            raise ConfigError(f"run config: 'selection.source' must be one of {list(SOURCES)}, got {source!r}")
        if source in ("selected", "random") and not selection.get("scoring_job"):
            raise ConfigError(f"run config: 'selection.source' {source!r} needs 'selection.scoring-job'")
        if rule == "quality-fedavg" and not selection.get("scoring_job"):
            raise ConfigError(
                "run config: 'aggregation.rule' quality-fedavg weighs by score mass: set 'selection.scoring-job'"
            )
        coordinator = _fields(flat, "coordinator")
        if bool(coordinator.get("url")) != bool(coordinator.get("token_file")):
            raise ConfigError("run config: give both 'coordinator.url' and 'coordinator.token-file', or neither")
        spec = {
            "model": str(flat["model"]),
            "lora": LoraSettings.from_dict(lora).to_dict(),
            "lora_init_seed": int(flat["lora-init-seed"]),
            "random_b": bool(flat["random-b"]),
            "max_len": int(flat["max-len"]),
            "template": str(flat["template"]),
            "rounds": int(flat["num-server-rounds"]),
            "local": LocalTrainConfig.from_dict(local).to_dict(),
            "aggregation": aggregation,
            "selection": {"scoring_job": None, **selection},
            "evaluation": evaluation,
        }
        return cls(
            spec=spec,
            fraction_train=float(flat["fraction-train"]),
            min_train_nodes=int(flat["min-train-nodes"]),
            round_timeout=float(flat["round-timeout"]),
            coordinator_url=coordinator.get("url"),
            token_file=Path(coordinator["token_file"]).expanduser() if coordinator.get("token_file") else None,
            eval_path=Path(flat["evaluation.path"]).expanduser() if flat["evaluation.path"] else None,
            out_dir=Path(flat["out-dir"]).expanduser() if flat["out-dir"] else None,
        )


def run_config_from_spec(spec: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The run config that gives a Flower run the settings of a clues training job (``GET /v1/train/{id}``'s
    ``spec``): model, LoRA, rounds, local training, aggregation and selection; ``extra`` adds or overrides keys in
    Flower's spelling (``out-dir``, ``evaluation.path``, ...). DP-SGD settings have no run-config key yet.

    Raises:
        ConfigError: the job trains with DP-SGD (``local.dp``) or aggregates with an exact kind (``stack``,
            ``shared-basis``: the Flower App averages whole adapters).
    """
    if (spec.get("local") or {}).get("dp"):
        raise ConfigError("local.dp: DP-SGD is not available in the Flower App yet; run it as a clues training job")
    aggregation = dict(spec["aggregation"])
    kind = aggregation.pop("kind", "fedavg")
    if kind != "fedavg":
        raise ConfigError(
            f"aggregation.kind: {kind!r} is not available in the Flower App yet (it averages whole adapters); run it "
            "as a clues training job"
        )
    out: dict[str, Any] = {
        "model": spec["model"],
        "max-len": spec["max_len"],
        "template": spec["template"],
        "lora-init-seed": spec["lora_init_seed"],
        "random-b": spec["random_b"],
        "num-server-rounds": spec["rounds"],
    }

    def put(prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            name = f"{prefix}.{key.replace('_', '-')}"
            if isinstance(value, Mapping):
                put(name, value)
            elif value is None:
                continue
            elif isinstance(value, list | tuple):
                out[name] = ",".join(map(str, value))
            else:
                out[name] = value

    put("lora", spec["lora"])
    put("local", {k: v for k, v in spec["local"].items() if k != "dp"})
    put("aggregation", {k: v for k, v in aggregation.items() if k not in ADAPTER_FIELDS})
    put("selection", spec["selection"])
    put("evaluation", spec.get("evaluation") or {})
    unknown = sorted(set(out) - set(RUN_CONFIG))
    if unknown:
        raise ConfigError(f"spec: {unknown} have no run-config key (a newer coordinator?)")
    return out | extra


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def project_toml(run_config: Mapping[str, Any] | None = None) -> str:
    """The Flower App project's pyproject.toml (flower_app/project/) with ``run_config`` over `RUN_CONFIG` as its
    ``[tool.flwr.app.config]``.

    Raises:
        ConfigError: a key the app does not read.
    """
    unknown = sorted(set(run_config or {}) - set(RUN_CONFIG))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {unknown}")
    config = {**RUN_CONFIG, **(run_config or {})}
    shipped = (Path(__file__).parent / "project" / "pyproject.toml").read_text(encoding="utf-8")
    head = shipped[: shipped.index("[tool.flwr.app.config]")]
    return head + "[tool.flwr.app.config]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in config.items())
