"""clues inside a Flower federation (docs/flower.md): a ServerApp and a ClientApp on Flower's Deployment Runtime
that run clues' federated LoRA training on the samples a clues scoring job selected.

- `config`      the run config (``[tool.flwr.app.config]``) as a clues training job's settings.
- `silo`        the silo's side: its data and mask (node config), one round of clues' local update.
- `server`      the server's side: the initial adapter, clues' aggregation of a round, the saved result.
- `client_app`, `server_app`: the Flower components (the only modules that import ``flwr``).

``project/pyproject.toml`` is the Flower App project ``flwr run`` takes; its components name the modules above, so
the SuperLink's and SuperNodes' environment needs ``pip install clues[flower]`` (the FAB carries only the config).
This package imports nothing eagerly.
"""
