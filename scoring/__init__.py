"""clues scoring engine: per-sample LoRA gradients, shared random projections, influence traces and selection.

Modules (import the one you need; this package imports nothing eagerly so that `scoring.config` stays torch-free):

- `config`      frozen, JSON-round-tripping settings (`LoraSettings`, `ProjectionSpec`, `TraceConfig`, ...).
- `errors`      the `ScoringError` hierarchy.
- `models`      load a base causal LM (HF dir, GGUF, bundled SmolLM2, tiny test config) and attach LoRA.
- `data`        read Alpaca/chat JSON(L), PubMedQA and GSM8K (`batching`: tokenise, batch; `noise`: injection).
- `gradients`   exact per-sample LoRA gradients (torch.func vmap engine and a hooks engine), Adam preconditioning.
- `projection`  SJLT / Rademacher / Gaussian projections reproducible bit for bit from a `ProjectionSpec`.
- `traces`      influence-trace scores sum_t eta_t * sim(g_t(z), mean anchor gradient), streamed in chunks.
- `selection`   thresholds, masks per silo, and baselines (random, perplexity, keep-all).
- `training`    a plain LoRA SFT loop that saves checkpoints with learning rates and Adam moments.
- `io`          projection files (safetensors: ids + fp16 matrix + spec in the metadata).
- `steps`       the method as plain functions (warmup, project, score) for the CLI, agent and workers.

The `clues` command lives in the top-level `clues` package.
"""
