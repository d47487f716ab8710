"""The silo's side of a Flower run, without flwr: where its data and mask are (`NodeSettings`, from the SuperNode's
``--node-config``), which samples it trains on (`load_selection`) and one round of clues' local training
(`train_round`, the code `clues agent train` runs).

Node config keys:

- ``silo``: this silo's name (the coordinator's name for it; replies carry it, as Flower's node ids are random).
- ``data-path``: the silo's data file (the one it scored with).
- ``scores-path``: ``clues agent run``'s ``<stem>.scores.jsonl`` for the run's scoring job; or else
- ``coordinator`` and ``token-file``: ask the coordinator for this silo's scores with its own token.
- ``work-dir``: where the silo keeps its AdamW moments and a record of each round (default ``~/.clues-flower``).
- ``device``, ``dtype``, ``cache-dir``: where and in which precision the model runs.

What the silo keeps under ``work-dir/train-flower-<run id>/round-NNNN/``: ``moments.safetensors`` (its AdamW state,
read by its next round, never sent) and ``trained.json`` (the ids it trained on, their score mass, the round's lr).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.train import (
    DTYPES,
    LocalTrainer,
    TrainOptions,
    local_moments_path,
    previous_moments,
    round_dir,
    scores_by_id,
    select_samples,
)
from flower_app.config import RunSettings
from scoring.data import Sample, read_samples
from scoring.errors import ConfigError, DataError
from scoring.io import CheckpointBundle
from wire.files import atomic_write_bytes

NODE_CONFIG = (
    "silo",
    "data-path",
    "scores-path",
    "coordinator",
    "token-file",
    "work-dir",
    "device",
    "dtype",
    "cache-dir",
)
DEFAULT_WORK_DIR = "~/.clues-flower"


@dataclass(frozen=True)
class NodeSettings:
    """One SuperNode's silo (see the module docstring for the keys)."""

    silo: str
    data_path: Path
    scores_path: Path | None = None
    coordinator: str | None = None
    token_file: Path | None = None
    work_dir: Path = Path(DEFAULT_WORK_DIR)
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        """Raises:
        ConfigError: an unknown or missing key, or a bad value (the message names the key)."""
        unknown = sorted(set(node_config) - set(NODE_CONFIG))
        if unknown:
            raise ConfigError(f"node config: unknown key(s) {unknown} (known: {list(NODE_CONFIG)})")
        given = {k: str(v) for k, v in node_config.items() if str(v) != ""}
        for key in ("silo", "data-path"):
            if key not in given:
                raise ConfigError(f"node config: {key!r} is required (flower-supernode --node-config '{key}=...')")
        if ("coordinator" in given) != ("token-file" in given):
            raise ConfigError("node config: give both 'coordinator' and 'token-file', or neither")
        if given.get("dtype", "float32") not in DTYPES:
            raise ConfigError(f"node config: 'dtype' must be one of {list(DTYPES)}, got {given['dtype']!r}")

        def path(key: str) -> Path | None:
            return Path(given[key]).expanduser() if key in given else None

        return cls(
            silo=given["silo"],
            data_path=path("data-path"),  # type: ignore[arg-type]
            scores_path=path("scores-path"),
            coordinator=given.get("coordinator"),
            token_file=path("token-file"),
            work_dir=path("work-dir") or Path(DEFAULT_WORK_DIR).expanduser(),
            device=given.get("device", "cpu"),
            dtype=given.get("dtype", "float32"),
            cache_dir=path("cache-dir"),
        )


def _score_rows(node: NodeSettings, scoring_job: str) -> tuple[list[dict], str]:
    """This silo's score rows of ``scoring_job``: from ``scores-path``, else from the coordinator."""
    if node.scores_path is not None:
        try:
            lines = node.scores_path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()], f"scores file {node.scores_path}"
        except (OSError, ValueError) as exc:
            raise DataError(f"node config 'scores-path': cannot read {node.scores_path}: {exc}") from exc
    if node.coordinator is None or node.token_file is None:
        raise ConfigError(
            f"node config: scoring job {scoring_job} selects the samples; give 'scores-path' (clues agent run's "
            "<stem>.scores.jsonl) or 'coordinator' and 'token-file'"
        )
    from agent.client import SiloClient

    token = node.token_file.read_text().strip()
    with SiloClient(node.coordinator, token) as client:
        return client.scores(scoring_job)["rows"], f"scoring job {scoring_job}"


def load_selection(node: NodeSettings, settings: RunSettings) -> tuple[list[Sample], float]:
    """The silo's samples the run's selection keeps (`agent.train.select_samples`) and their score mass."""
    samples = read_samples(node.data_path)
    selection = settings.spec["selection"]
    scoring_job = selection.get("scoring_job")
    scores = None
    if scoring_job:
        rows, where = _score_rows(node, scoring_job)
        scores = scores_by_id(rows, samples, where)
    key = f"flower:{scoring_job or ''}"
    return select_samples(selection, samples, scores, f"Flower run (silo {node.silo!r})", key=key)


def ids_digest(samples: list[Sample]) -> str:
    """SHA-256 of the sorted sample ids, one per line: what a reply says it trained on, without the ids."""
    return hashlib.sha256("\n".join(sorted(s.id for s in samples)).encode()).hexdigest()


@dataclass(frozen=True)
class RoundReport:
    """What `train_round` returns: the new LoRA weights and the four numbers a reply carries."""

    weights: dict[str, np.ndarray]
    num_samples: int
    score_mass: float
    train_loss: float
    steps: int
    ids_sha256: str


def train_round(
    node: NodeSettings, settings: RunSettings, run_id: int, round: int, lr: float, start: Mapping[str, np.ndarray]
) -> RoundReport:
    """Train the silo's selection for 0-based round ``round`` from the global adapter ``start`` (canonical name →
    array, in layout order) with ``lr``, continuing from the moments of its last round; keep the new moments and
    the round's record (see the module docstring).

    Raises:
        AgentError: the global adapter is not the run's model's LoRA layout.
        ConfigError, DataError: the node's data, scores or settings.
    """
    from scoring.federated.local import save_moments

    chosen, mass = load_selection(node, settings)
    job = f"flower-{run_id}"
    options = TrainOptions(device=node.device, dtype=node.dtype, cache_dir=node.cache_dir)
    trainer = LocalTrainer(settings.spec, chosen, options)
    bundle = CheckpointBundle(
        layout=tuple((name, tuple(np.shape(a))) for name, a in start.items()),
        adapter=dict(start),
        exp_avg={},
        exp_avg_sq={},
        adapter_config={},
        entry={"step": 0},
    )
    moments = previous_moments(node.work_dir, job, round)
    result = trainer.train(bundle, lr=lr, round=round, moments=moments, progress=None)
    save_moments(local_moments_path(node.work_dir, job, round), result.moments)
    record = {
        "silo": node.silo,
        "round": round,
        "lr": lr,
        "ids": [s.id for s in chosen],
        "score_mass": mass,
        "train_loss": result.mean_loss,
    }
    atomic_write_bytes(round_dir(node.work_dir, job, round) / "trained.json", json.dumps(record).encode())
    return RoundReport(result.weights, result.num_samples, mass, result.mean_loss, result.steps, ids_digest(chosen))
