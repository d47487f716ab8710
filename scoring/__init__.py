"""clues scoring engine: per-sample LoRA gradients, shared random projections, influence traces and selection, and
the math of federated training on the selection.

Modules (import the one you need; this package imports nothing eagerly so that the torch-free modules stay
torch-free: `config`, `spec`, `errors`, `types`, `data`, `noise`, `io`, `selection`, `calibration`, `traces`,
`local_scoring`, `privacy` and `federated.aggregation` load no torch, and the API imports only from these):

- `config`       frozen, JSON-round-tripping settings (`LoraSettings`, `ProjectionSpec`, `TraceConfig`, ...).
- `spec`         the typed job spec (`JobSpec`, `RunSpec`, `CheckpointEntry`): one wire form, one home per default.
- `errors`       the `ScoringError` hierarchy.
- `types`        small typed numpy containers passed between the steps.
- `models`       load a base causal LM (HF dir, GGUF, bundled SmolLM2, tiny test config) and attach LoRA.
- `data`         read Alpaca/chat JSON(L), PubMedQA and GSM8K; `noise`: seeded, labelled corruption of responses.
- `batching`     tokenise with response-only labels and batch with right padding.
- `gradients`    exact per-sample LoRA gradients (torch.func vmap engine and a hooks engine), Adam preconditioning.
- `signals`      the per-sample signals a silo sends beside its gradients (losses with and without the question).
- `projection`   SJLT / Rademacher / Gaussian projections reproducible bit for bit from a `ProjectionSpec`.
- `traces`       influence-trace scores sum_t eta_t * sim(g_t(z), mean anchor gradient), streamed in chunks.
- `calibration`  anchor-calibrated signals and their fusion (the ``calibrated`` score kind).
- `local_scoring` silo-local scoring: the reference a coordinator publishes, a silo's own scores, the aggregate.
- `privacy`      DP-SGD accounting (`dp-accounting`'s RDP accountant) and the silo's ε ledger per training job.
- `selection`    thresholds, masks per silo, and baselines (random, perplexity, keep-all).
- `training`     a plain LoRA SFT loop that saves checkpoints with learning rates and Adam moments.
- `io`           projection files, checkpoint bundles and the silo-local scoring reference (safetensors).
- `workflow`     the method as plain functions (warmup, project) for the CLI, the agent and the workers.
- `federated`    federated training on the selection: `local` (a silo's round), `aggregation` (the server's rules
  and the round guard), `merging` (peft's weighted merge), `evaluation` (held-out metrics of an adapter), `dp`
  (a DP-SGD round).

The `clues` command lives in the top-level `clues` package.
"""
