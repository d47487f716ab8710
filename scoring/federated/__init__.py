"""Federated training on the selection: the math of each side, no I/O beyond the directories it is given.

- `local`        one silo's side of a round: load the global adapter, train locally, return the new weights.
- `aggregation`  the server's rules (fedavg, quality-fedavg, fedadam, fedyogi, median, trimmed mean) and the round
  guard that bounds each update first (torch-free: the API validates aggregation settings with it).
- `merging`      peft's weighted adapter merge ("merged" training mode).
- `lora_algebra` exact aggregation of LoRA updates: stacking (FLoRA), SVD truncation with its error, a shared
  basis (Fed-SB), and the layouts each kind sends; numpy only.
- `adapter_rounds` one round of each aggregation kind (fedavg, stack, shared-basis): the guard over the right
  space, then the rule (numpy only; what the coordinator's worker runs).
- `adapters`     a silo's model under each kind: a shared basis with R trainable, the stack's global adapter in the
  base weights with a fresh adapter on top.
- `evaluation`   held-out metrics of an adapter.

This package imports nothing eagerly, so that `aggregation` stays torch-free.
"""
