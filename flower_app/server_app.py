"""The ServerApp: clues' federated LoRA training over a Flower federation (`CluesStrategy`), evaluated on the
held-out set with clues' evaluation, saved as a peft adapter (`flower_app.server.save_result`).

The run's settings are its run config (`flower_app.config.RunSettings`). The result goes to
``<out-dir>/run-<run id>/`` on the SuperLink's machine (``out-dir`` default ``~/.clues-flower``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_app.config import RunSettings
from flower_app.server import RoundAggregation, initial_bundle, known_from_coordinator, save_result
from scoring.federated.aggregation import Known, SiloUpdate

log = logging.getLogger("clues.flower")

app = ServerApp()


def to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={name: Array(np.ascontiguousarray(w)) for name, w in weights.items()})


def to_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


class CluesStrategy(FedAvg):
    """Flower's FedAvg sampling and messaging with clues' rounds: each TRAIN message carries the round's lr
    (`RunSettings.lr`, as the coordinator sets it), and `aggregate_train` runs `RoundAggregation` (the round guard,
    then fedavg by selected counts, quality-fedavg, fedadam, fedyogi, median or trimmed mean). A round with fewer
    than ``min-train-nodes`` valid replies fails the run: clues never averages a partial round it was not asked to.

    A ServerApp of your own can use it with its run config: ``CluesStrategy(RunSettings.from_run_config(
    context.run_config))`` and ``strategy.start(grid, initial_arrays, num_rounds=settings.rounds)``. ``known``: what
    each silo may claim (`flower_app.server.known_from_coordinator`; None: claims as sent).
    """

    def __init__(self, settings: RunSettings, known: Mapping[str, Known] | None = None):
        super().__init__(
            fraction_train=settings.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=settings.min_train_nodes,
            min_available_nodes=settings.min_train_nodes,
            weighted_by_key="num-examples",
        )
        self.settings, self.aggregation = settings, RoundAggregation(settings, known)
        self.sent: dict[int, dict[str, np.ndarray]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["lr"] = self.settings.lr(server_round - 1)
        self.sent = {server_round: to_weights(arrays)}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, failed = self._check_and_log_replies(list(replies), is_train=True)
        if len(valid) < self.settings.min_train_nodes:
            reasons = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed]
            raise RuntimeError(
                f"round {server_round}: {len(valid)} valid replies, below min-train-nodes "
                f"{self.settings.min_train_nodes} (failures: {reasons})"
            )
        updates, extra = [], []
        for msg in valid:
            metrics, silo = msg.content["metrics"], msg.content["silo"]
            weights = to_weights(msg.content["arrays"])
            updates.append(
                SiloUpdate(str(silo["silo"]), weights, int(metrics["num-examples"]), float(metrics["score-mass"]))
            )
            extra.append(
                {
                    "ids_sha256": str(silo["ids-sha256"]),
                    "train_loss": float(metrics["train-loss"]),
                    "steps": int(metrics["steps"]),
                }
            )
        new = self.aggregation.aggregate(server_round - 1, self.sent[server_round], updates, extra)
        counts = [u.num_samples for u in updates]
        loss = float(np.average([e["train_loss"] for e in extra], weights=counts))
        return to_record(new), MetricRecord({"train-loss": loss, "num-examples": int(sum(counts))})


@app.main()
def main(grid: Grid, context: Context) -> None:
    from scoring.data import read_samples
    from scoring.federated.evaluation import evaluate_adapter

    settings = RunSettings.from_run_config(context.run_config)
    out_dir = (settings.out_dir or Path("~/.clues-flower").expanduser()) / f"run-{context.run_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = initial_bundle(settings, out_dir)
    known = known_from_coordinator(settings)
    strategy = CluesStrategy(settings, known)
    samples = read_samples(settings.eval_path) if settings.eval_path else None
    every = int(settings.spec["evaluation"].get("every", 1))
    metrics: dict[int, dict] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        due = server_round == settings.rounds or (server_round > 0 and server_round % every == 0)
        if samples is None or not due:
            return None
        bundle = dataclasses.replace(start, adapter=to_weights(arrays))
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            result = evaluate_adapter(bundle, samples, settings.spec, work_dir=tmp)
        metrics[server_round - 1] = result
        return MetricRecord({k: v for k, v in result.items() if isinstance(v, int | float)})

    result = strategy.start(
        grid,
        initial_arrays=to_record(start.adapter),
        num_rounds=settings.rounds,
        timeout=settings.round_timeout,
        evaluate_fn=evaluate,
    )
    summary = {
        "run_id": context.run_id,
        "rounds": settings.rounds,
        "spec": settings.spec,
        "known": "coordinator" if known is not None else "claimed",
        "history": strategy.aggregation.history,
        "metrics": {str(r): m for r, m in metrics.items()},
    }
    adapter = save_result(out_dir, start, to_weights(result.arrays), settings.rounds * settings.local.steps, summary)
    log.info("clues: final adapter in %s", adapter)
