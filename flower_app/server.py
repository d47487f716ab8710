"""The server's side of a Flower run, without flwr: the round-0 adapter (`initial_bundle`), clues' aggregation of
one round's replies (`RoundAggregation`: `guard_round`, then the job's rule, with the server optimizer's state
carried between rounds, as the coordinator's training worker does), the held-out evaluation and the result on disk
(`save_result`: a peft adapter directory as ``clues admin train-export`` writes it, the clues bundle and the
history).

What each silo may claim is known only when the run config names a coordinator and an admin token file
(`known_from_coordinator`): counts are then capped at the silo's selection in the scoring job and score masses
clamped to what its scores allow, as in a coordinator-run job. Without one, the counts are capped at
``max_count_ratio`` × the round's median and the claimed score masses are taken as sent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flower_app.config import RunSettings
from scoring.errors import DataError
from scoring.federated.aggregation import Known, RoundGuard, SiloUpdate, apply_rule, guard_round, known_of_scores
from scoring.io import CheckpointBundle, bundle_to_bytes, read_bundle, write_checkpoint_dir
from wire.files import atomic_write_bytes

log = logging.getLogger("clues.flower")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def initial_bundle(settings: RunSettings, work_dir: Path, **model_options: Any) -> CheckpointBundle:
    """The round-0 global adapter: the run's LoRA initialised from ``lora-init-seed`` (as the coordinator's
    `workers.training.init_train` builds it, and so equal to it)."""
    from scoring.config import LoraSettings, round_entry
    from scoring.federated.local import initial_adapter

    spec = settings.spec
    data, _, _ = initial_adapter(
        spec["model"],
        LoraSettings.from_dict(spec["lora"]),
        init_seed=spec["lora_init_seed"],
        random_b=spec["random_b"],
        entry=round_entry(settings.local, 0, settings.lr(0), 0),
        work_dir=work_dir,
        **model_options,
    )
    return read_bundle(data, None, None, "the initial adapter")


def known_from_coordinator(settings: RunSettings) -> dict[str, Known] | None:
    """Per silo, what the scoring job lets it claim (`known_of_scores`), read from the coordinator with the admin
    token in ``coordinator.token-file``; None when the run config names no coordinator or no scoring job."""
    scoring_job = settings.spec["selection"].get("scoring_job")
    if settings.coordinator_url is None or settings.token_file is None or not scoring_job:
        return None
    from agent.client import AdminClient

    token = settings.token_file.read_text().strip()
    per_silo: dict[str, list[tuple[float, bool]]] = {}
    with AdminClient(settings.coordinator_url, token) as admin:
        for row in admin.scores(scoring_job)["rows"]:
            per_silo.setdefault(row["silo"], []).append((float(row["score"]), bool(row["selected"])))
    return {silo: known_of_scores(settings.spec["selection"], rows) for silo, rows in per_silo.items()}


class RoundAggregation:
    """clues' rule over one round's silo updates at a time (see the module docstring).

    Attributes:
        history: one entry per round: the silos, their claimed counts and score masses, the guard's flags and the
            clip bound.
    """

    def __init__(self, settings: RunSettings, known: Mapping[str, Known] | None):
        self.settings, self.known = settings, known
        self.guard = RoundGuard.from_dict(settings.spec["aggregation"])
        self.state = None
        self.history: list[dict[str, Any]] = []

    def aggregate(
        self, round: int, start: Mapping[str, np.ndarray], updates: Sequence[SiloUpdate], extra: Sequence[dict]
    ) -> dict[str, np.ndarray]:
        """The global adapter after 0-based round ``round``. ``extra``: what each reply said besides its update
        (kept in the history, in the updates' order).

        Raises:
            DataError: two replies name the same silo.
            ShapeMismatchError, ConfigError: an update that does not fit the adapter, or no update at all.
        """
        names = [u.silo for u in updates]
        if len(set(names)) != len(names):
            raise DataError(f"round {round}: two replies name the same silo ({sorted(names)}): check --node-config")
        order = sorted(range(len(updates)), key=lambda i: names[i])  # the coordinator's order: by silo
        updates, extra = [updates[i] for i in order], [extra[i] for i in order]
        known = self.known
        if known is None:
            known = {u.silo: Known(None, (u.score_mass, u.score_mass)) for u in updates}
        guarded, flags, figures = guard_round(start, updates, known, self.guard)
        for flag in flags:
            log.warning("round %d: %s %s: %s", round, flag.silo, flag.kind, flag.detail)
        new, self.state = apply_rule(self.settings.spec["aggregation"], start, guarded, self.state)
        self.history.append(
            {
                "round": round,
                "lr": self.settings.lr(round),
                "silos": [
                    {"silo": u.silo, "num_samples": u.num_samples, "score_mass": u.score_mass, **e}
                    for u, e in zip(updates, extra, strict=True)
                ],
                "flags": [f.to_dict() for f in flags],
                "clip_bound": figures.get("clip_bound"),
            }
        )
        return new


def save_result(
    out_dir: Path, start: CheckpointBundle, weights: Mapping[str, np.ndarray], steps: int, summary: dict[str, Any]
) -> Path:
    """Write the final adapter under ``out_dir``: ``adapter/`` (peft: adapter_config.json, adapter_model.safetensors),
    ``final.safetensors`` (the clues bundle) and ``result.json`` (``summary``). Returns the adapter directory."""
    final = CheckpointBundle(
        start.layout,
        {n: np.asarray(w).astype(start.adapter[n].dtype) for n, w in weights.items()},
        {},
        {},
        start.adapter_config,
        {**start.entry, "step": steps},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "final.safetensors", bundle_to_bytes(final))
    write_checkpoint_dir(final, out_dir)  # the peft files under out_dir/adapter/
    atomic_write_bytes(out_dir / "result.json", json.dumps(summary, indent=2).encode())
    return out_dir / "adapter"
