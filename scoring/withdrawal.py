"""Exact withdrawal from a training job (docs/withdrawal.md): what withdrawing a silo can do in each training mode,
and how far the result is exact given what the silo's data touched upstream. Torch-free: the API plans a withdrawal
with it and the worker's report repeats it.

- **merge** jobs (each silo trained once, the coordinator merged the adapters): the coordinator merges again
  without the silo's adapter, with the weights and the round guard recomputed over the silos that remain
  (`workers.training.withdraw_silo`). For `EXACT_MERGE_KINDS` the merge is a deterministic function of the adapters
  it includes, so the result equals a merge job that never had the silo. No silo retrains. For some of a silo's
  samples, that silo alone retrains its adapter on the rest (same seed and settings; `agent.withdraw`) and the
  coordinator merges again with it: the others' adapters are untouched.
- **federated** and **warmup** jobs: every round after the silo's first update depends on it, so exact withdrawal
  is a full retrain. The coordinator makes a new draft job with the same settings and the silos that remain.

Upstream, the silo's data may have shaped what the job was built on (`dependency_report`):

- the scoring checkpoints, when they came from a federated warmup the silo took part in;
- the other silos' selections, when the scoring job's threshold is a global top fraction (the silo's scores moved
  the cut-off).

The mean-anchor and fixed thresholds and the calibrated score's standardisation use the anchors alone, so they do
not depend on the silo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scoring.errors import ConfigError

EXACT_MERGE_KINDS = ("cat", "linear")
"""Merge kinds whose re-merge without a silo is tested to equal a merge that never included it."""


@dataclass(frozen=True)
class Upstream:
    """What a training job was built on, as far as a withdrawal cares.

    Attributes:
        scoring_job: the scoring job whose selection it trains on (None: no scoring job).
        threshold_kind: that job's threshold kind (``mean-anchor``, ``top``, ``fixed``).
        warmup_job: the federated warmup job whose rounds became that scoring job's checkpoints (None: the
            checkpoints were uploaded, e.g. a public warmup).
        warmup_silos: the silos that trained in that warmup.
    """

    scoring_job: str | None = None
    threshold_kind: str | None = None
    warmup_job: str | None = None
    warmup_silos: Sequence[str] = ()


def withdrawal_kind(mode: str, merge_kind: str | None, whole_silo: bool) -> str:
    """``remerge`` (a merge job, whole silo: merge again without it), ``retrain-silo`` (a merge job, some samples:
    the silo retrains its adapter without them, then the coordinator merges again) or ``retrain`` (a federated or
    warmup job, whole silo: a new job without it).

    Raises:
        ConfigError: some samples of a federated or warmup job (no exact way but a new job on the reduced data), or
            a merge kind outside `EXACT_MERGE_KINDS` (the message names the kinds that support exact withdrawal).
    """
    if mode != "merge":
        if not whole_silo:
            raise ConfigError(
                "sample_ids: a federated or warmup job cannot drop some samples in place; remove them from the "
                "silo's data file and train a new job, or withdraw the whole silo (a draft job without it is made)"
            )
        return "retrain"
    if merge_kind not in EXACT_MERGE_KINDS:
        raise ConfigError(
            f"merge.kind: exact withdrawal re-merges without the silo's contribution and is supported for kinds "
            f"{list(EXACT_MERGE_KINDS)}; kind {merge_kind!r} prunes or elects signs with statistics across the "
            "silos' adapters (dare at random), so clues does not promise its re-merge equals a merge that never "
            "included it. Train a new merge job without it instead."
        )
    return "remerge" if whole_silo else "retrain-silo"


def dependency_report(silo: str, job_id: str, kind: str, upstream: Upstream) -> dict:
    """Whether withdrawing ``silo`` from training job ``job_id`` (``kind`` from `withdrawal_kind`) is exact, what
    upstream the silo's data touched, and the commands for a strictly exact re-run.

    Returns:
        ``exact``: ``"exact"`` (nothing upstream depends on the silo), ``"exact for the merge"`` or ``"full
        retrain"`` (a federated or warmup job); ``upstream``: one sentence per dependency; ``commands``: what to
        run for strict exactness; ``message``: all of it in words.
    """
    upstream_notes: list[str] = []
    commands: list[str] = []
    if upstream.warmup_job is not None and silo in upstream.warmup_silos:
        upstream_notes.append(
            f"the scoring checkpoints were trained with this silo's data (warmup job {upstream.warmup_job})"
        )
        others = ",".join(s for s in upstream.warmup_silos if s != silo)
        commands += [
            f"clues train --mode warmup --silos {others} ...   # the warmup again, without {silo}",
            "clues admin job-from-warmup NEW_WARMUP_ID --name ... --anchors ANCHORS --open   # a new scoring job",
            "clues agent run --job NEW_SCORING_ID ...   # at each remaining silo",
            f"clues train --mode ... --scoring-job NEW_SCORING_ID --silos {others} ...   # the training again",
        ]
    if upstream.scoring_job is not None and upstream.threshold_kind == "top":
        upstream_notes.append(
            f"scoring job {upstream.scoring_job} selects a global top fraction, so this silo's scores moved the "
            "other silos' cut-off"
        )
        if not commands:
            others = "<the other silos>"
            commands += [
                f"clues admin job-create ... --silos {others}   # a scoring job without {silo}, then its agents",
                "clues train --mode ... --scoring-job NEW_SCORING_ID ...   # the training again",
            ]
    if kind == "retrain":
        exact = "full retrain"
        message = (
            f"a {kind}: every round of a federated job after {silo}'s first update depends on it, so the exact "
            "withdrawal is a new job without it, trained from the start"
        )
    elif kind == "retrain-silo":
        exact = "exact for the merge" if upstream_notes else "exact"
        message = (
            f"{silo} retrains its adapter on its remaining samples with the job's seed and settings (the other "
            "silos' adapters are untouched), then the merge is computed again; it equals a merge in which those "
            "samples were never in its data"
        )
    else:
        exact = "exact for the merge" if upstream_notes else "exact"
        message = f"the merge is computed again without {silo}'s adapter; it equals a merge that never included it"
    if upstream_notes:
        message += "; upstream, " + "; ".join(upstream_notes) + ", so a full re-run from there is needed for strict "
        message += "exactness"
    return {"exact": exact, "kind": kind, "upstream": upstream_notes, "commands": commands, "message": message}
