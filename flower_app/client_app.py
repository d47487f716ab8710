"""The ClientApp a silo's SuperNode runs: each TRAIN message is one round of clues' local training on the samples
the run's scoring job selected at this silo (`flower_app.silo.train_round`, the code ``clues agent train`` runs).

A message carries the global adapter (``arrays``: canonical LoRA name → array, in layout order) and its
``config`` (``server-round``, 1-based, and the round's ``lr``). The reply carries the new adapter (``arrays``), a
``metrics`` MetricRecord (``num-examples``: the samples trained on, the FedAvg weight Flower's own strategies read;
``score-mass``, ``train-loss``, ``steps``) and a ``silo`` ConfigRecord (``silo``: the silo's name; ``ids-sha256``:
the digest of the ids it trained on). Text and moments stay at the silo. The node's settings are its
``--node-config`` (`flower_app.silo.NodeSettings`); the run's are the run config (`flower_app.config`).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_app.config import RunSettings
from flower_app.silo import NodeSettings, train_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = RunSettings.from_run_config(context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    config = msg.content["config"]
    start = {name: array.numpy() for name, array in msg.content["arrays"].items()}
    report = train_round(node, settings, context.run_id, int(config["server-round"]) - 1, float(config["lr"]), start)
    content = RecordDict(
        {
            "arrays": ArrayRecord(array_dict={name: Array(w) for name, w in report.weights.items()}),
            "metrics": MetricRecord(
                {
                    "num-examples": report.num_samples,
                    "score-mass": report.score_mass,
                    "train-loss": report.train_loss,
                    "steps": report.steps,
                }
            ),
            "silo": ConfigRecord({"silo": node.silo, "ids-sha256": report.ids_sha256}),
        }
    )
    return Message(content, reply_to=msg)
