"""The wire formats, numpy only: the coordinator validates uploads with them without loading torch. Projection files
live in `scoring.io.projection`, checkpoint bundles in `scoring.io.bundle`, what both share in
`scoring.io._safetensors`; this package re-exports their public names.

**Projection file** (format ``clues.projection/1``; `save_projection`, `load_projection`, `projection_from_bytes`,
`map_projection` for stored files validated before; each reader returns a `ProjectionFile`):

- tensor ``matrix``: (N, k) float16 projections.
- tensor ``ids``: uint8, the UTF-8 bytes of a JSON list of N sample ids (any characters allowed).
- tensor ``losses`` (optional): (N,) float32 mean response loss ℓ(y|x) of each sample (the perplexity signal).
- tensors ``loss_uncond`` and ``n_tokens`` (optional; the `scoring.config.SIGNALS` a job asks for, in the file of
  its signal checkpoint): (N,) float32 ℓ(y|∅) (positive) and the number of response tokens (positive integers), see
  `scoring.signals`.
- metadata: ``format``, ``spec`` (ProjectionSpec JSON), ``checkpoint``, ``lr``, ``role``, ``preconditioned``,
  ``extra`` (JSON).

**Checkpoint bundle** (format ``clues.checkpoint/1``; `checkpoint_to_bytes`, `checkpoint_from_bytes`,
`write_checkpoint_dir`): one checkpoint directory of a warmup run (see `scoring.training`) as one file.

- tensors ``adapter.<name>``: the peft adapter weights, names as peft saved them, in their saved dtype.
- tensors ``exp_avg.<name>``, ``exp_avg_sq.<name>``: the Adam moments (absent for an untrained run).
- metadata: ``format``, ``layout`` (JSON ``[[name, shape], ...]`` in `lora_layout` order, hashing to the projection
  spec's ``param_hash``), ``adapter_config`` (peft's JSON), ``checkpoint`` (the ``checkpoint.json`` entry), and
  optionally ``update`` (JSON: a silo's federated-round update: ``round``, ``num_samples``, ``score_mass``,
  ``train_loss``).

The same format carries the adapters of federated training: the global adapter of each round and each silo's
update are bundles without moments (a silo's Adam moments never leave it); `bundle_to_bytes` writes one from arrays
and `read_bundle` checks one against a layout hash instead of a projection spec.

numpy has no bfloat16, so the bundle codec reads tensors as raw bytes (`safetensors.deserialize`) and writes the
safetensors layout itself: a bfloat16 adapter (a warmup run in bfloat16) is held as float32 arrays of equal value and
written back as bfloat16.
"""

from __future__ import annotations

from scoring.io._safetensors import (
    CHECKPOINT_FORMAT,
    FORMAT,
    MAX_COUNT,
    Layout,
    RawTensor,
)
from scoring.io.bundle import (
    CheckpointBundle,
    bundle_to_bytes,
    checkpoint_from_bytes,
    checkpoint_to_bytes,
    read_bundle,
    write_checkpoint_dir,
)
from scoring.io.projection import (
    ProjectionFile,
    check_signal,
    load_projection,
    map_projection,
    projection_from_bytes,
    projection_to_bytes,
    save_projection,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT",
    "MAX_COUNT",
    "CheckpointBundle",
    "Layout",
    "ProjectionFile",
    "RawTensor",
    "bundle_to_bytes",
    "check_signal",
    "checkpoint_from_bytes",
    "checkpoint_to_bytes",
    "load_projection",
    "map_projection",
    "projection_from_bytes",
    "projection_to_bytes",
    "read_bundle",
    "save_projection",
    "write_checkpoint_dir",
]
