"""The silo's side of a scoring job as plain functions (no argparse): fetch the spec and checkpoints, project the
local samples, upload the projection shards, mark the upload complete, wait for the scores, write this silo's mask.

Only projections leave the silo (sample ids, (N, k) float16 rows and per-sample losses ℓ(y|x); for a job that asks
for them, also ℓ(y|∅) and the response token count at one checkpoint); the text and token ids never do.

`run_agent` is the whole workflow; it can be killed at any point and run again. What it keeps under
``work_dir/<job>/``:

- ``ckpt-NNN.safetensors`` (+ ``.sha256``): the downloaded checkpoint bundles, reused when their checksum holds.
- ``run/``: the run directory rebuilt from them (`scoring.workflow.write_run_dir`), built aside and renamed into place;
  for a job made from a federated warmup that preconditions, with this silo's own Adam moments of that warmup
  (`add_warmup_moments`).
- ``proj-<fingerprint>/``: the projections of one data file (fingerprint: the data file's SHA-256 and the job id),
  built aside and renamed into place, so a rerun after a crash never recomputes a finished projection.

Shards the coordinator already holds with the same SHA-256 are not sent again, so an interrupted upload resumes
where it stopped and rerunning a finished agent uploads nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from agent.client import SiloClient
from scoring.config import ProjectionSpec
from scoring.data import Sample, read_samples, write_samples
from scoring.io import checkpoint_from_bytes, load_projection, projection_to_bytes
from scoring.spec import JobSpec
from wire.files import atomic_dir, atomic_write_bytes

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: ``checkpoints``, ``gradients``, ``shards``, ``scoring`` (percent)."""

"""The job spec fields a run directory's ``run.json`` is rebuilt from."""


class AgentError(Exception):
    """The silo cannot go on (the job's state, the local data, or a mismatch with what the coordinator holds)."""


@dataclass(frozen=True)
class AgentOptions:
    """How the agent computes, uploads and waits.

    Attributes:
        rows_per_shard: samples per uploaded shard (part p holds rows [p*R, (p+1)*R) at every checkpoint).
        engine: per-sample gradient engine (``hooks``, ``vmap`` or ``loop``).
        batch_size: samples per gradient batch.
        device, dtype: where and in which precision the model runs.
        cache_dir: converted model weights (None: the default cache).
        poll_interval: seconds between status polls while waiting for the scores.
        timeout: give up waiting after this many seconds (None: wait for ever).
        wait: wait for the scores and write the mask; False: stop once the upload is complete.
        out_dir: where the mask files go (None: next to the data file, which may then be read-only elsewhere).
        max_epsilon: the most ε this silo's noisy aggregates (silo-local jobs that ask for them) may spend in all,
            by its release ledger (`scoring.privacy.ReleaseLedger`); None: no limit of its own.
    """

    rows_per_shard: int = 4096
    engine: str = "hooks"
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: Path | None = None
    poll_interval: float = 2.0
    timeout: float | None = None
    wait: bool = True
    out_dir: Path | None = None
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        for name in ("rows_per_shard", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AgentError(f"{name}: must be an integer of at least 1, got {value!r}")
        if not self.poll_interval > 0:
            raise AgentError(f"poll_interval: must be positive, got {self.poll_interval!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise AgentError(f"timeout: must be positive or None, got {self.timeout!r}")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise AgentError(f"max_epsilon: must be positive or None, got {self.max_epsilon!r}")


@dataclass(frozen=True)
class AgentResult:
    """What one run of the agent did.

    Attributes:
        job_id, status: the job and its status when the agent stopped.
        samples: local samples.
        uploaded, skipped: shards sent, and shards the coordinator already held (not sent again).
        selected: local samples selected (None when the scores were not read).
        threshold: the job's score threshold (None when the scores were not read).
        scores_path, selected_path: the files written (None when the scores were not read).
    """

    job_id: str
    status: str
    samples: int
    uploaded: int
    skipped: int
    selected: int | None = None
    threshold: float | None = None
    scores_path: Path | None = None
    selected_path: Path | None = None


def output_paths(data_path: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """``<stem>.scores.jsonl`` and ``<stem>.selected.jsonl`` in ``out_dir``, by default next to the data file."""
    data_path = Path(data_path)
    folder = Path(out_dir) if out_dir is not None else data_path.parent
    return folder / f"{data_path.stem}.scores.jsonl", folder / f"{data_path.stem}.selected.jsonl"


def run_agent(
    client: SiloClient,
    job_id: str,
    data_path: Path,
    *,
    work_dir: Path,
    options: AgentOptions = AgentOptions(),
    progress: Progress | None = None,
) -> AgentResult:
    """The silo workflow: spec and checkpoints down, projections up, mask back (see the module docstring).

    Raises:
        AgentError: the job is not open (and this silo has not completed it), the coordinator holds shards of this
            silo that differ from what the local data gives, or it scored none for some local samples.
        scoring.errors.DataError: the data file is malformed (names the file and line).
        agent.client.CoordinatorError: the coordinator refused a request, could not be reached, or the job failed.
    """
    data_path = Path(data_path)
    if not data_path.is_file():
        raise AgentError(f"{data_path}: no such data file")
    samples = read_samples(data_path)
    job = client.job(job_id)
    complete = check_job(job)
    job_dir = Path(work_dir) / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    proj_dir = job_dir / f"proj-{data_fingerprint(data_path, job_id)}"
    if job["spec"].get("scoring_mode") == "local":  # scored here: nothing per-sample is uploaded (agent.local)
        from agent.local import run_local

        return run_local(client, job, samples, data_path, proj_dir, options, progress)
    uploaded, skipped = sync_shards(client, job, samples, proj_dir, options, complete=complete, progress=progress)
    if not complete:
        job = client.complete(job_id)
    result = AgentResult(job_id, job["status"], len(samples), uploaded, skipped)
    if options.wait and job["status"] != "done":
        job = client.wait(job_id, poll=options.poll_interval, timeout=options.timeout, on_progress=_on_job(progress))
    if job["status"] != "done":
        return replace(result, status=job["status"])
    answer = client.scores(job_id)
    scores_path, selected_path, selected = write_outputs(data_path, samples, answer["rows"], job_id, options.out_dir)
    return replace(
        result,
        status="done",
        selected=selected,
        threshold=answer["threshold"],
        scores_path=scores_path,
        selected_path=selected_path,
    )


def sync_shards(
    client: SiloClient,
    job: dict,
    samples: list[Sample],
    proj_dir: Path,
    options: AgentOptions,
    *,
    complete: bool = False,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Project into ``proj_dir`` (``work_dir/<job>/proj-<fingerprint>``; skipped when it holds them) and upload
    what the coordinator lacks; returns (uploaded, skipped). A silo that completed its upload only checks its
    projections against the held shards, and only when they are on disk (it never recomputes them for that)."""
    spec = job["spec"]
    indices = [int(c["index"]) for c in spec["checkpoints"]]
    ready = projection_ready(proj_dir, indices)
    if complete and not ready:
        return 0, 0
    if not ready:
        run_dir = prepare_run(client, job["id"], spec, proj_dir.parent, progress)
        project_local(run_dir, samples, proj_dir, spec, options, progress)
    held = {(s["checkpoint"], s["part"]): s["sha256"] for s in client.held_shards(job["id"])}
    shards = iter_shards(proj_dir, indices, [s.id for s in samples], options.rows_per_shard)
    total = len(indices) * math.ceil(len(samples) / options.rows_per_shard)
    return upload_shards(client, job["id"], shards, held, total=total, complete=complete, progress=progress)


def _on_job(progress: Progress | None) -> Callable[[dict], None] | None:
    """Show the scoring progress while waiting (other statuses carry other stages' progress, e.g. the anchors')."""
    if progress is None:
        return None

    def show(job: dict) -> None:
        if job["status"] in ("scoring", "done"):
            progress("scoring", round(100 * job["progress"]) if job["status"] == "scoring" else 100, 100)

    return show


def check_job(job: dict) -> bool:
    """Whether this silo has already completed its upload; raises unless the job takes uploads or that is so."""
    complete = any(m["status"] == "complete" for m in job.get("silos", []))
    if job["status"] == "draft":
        raise AgentError(
            f"the coordinator has not opened job {job['id']} yet (status 'draft'); ask its admin to upload the "
            "checkpoints and anchors and open it"
        )
    if job["status"] != "open" and not complete:
        raise AgentError(
            f"job {job['id']} is {job['status']!r} and this silo never completed its upload; it takes no more uploads"
        )
    return complete


def data_fingerprint(data_path: Path, job_id: str) -> str:
    """16 hex digits naming the projections of one data file (its SHA-256) under one job."""
    digest = hashlib.sha256()
    with open(data_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return hashlib.sha256(f"{job_id}\0{digest.hexdigest()}".encode()).hexdigest()[:16]


def projection_ready(proj_dir: Path, indices: list[int]) -> bool:
    return all((proj_dir / f"ckpt-{t:03d}.candidate.safetensors").is_file() for t in indices)


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_bundle(client: SiloClient, job_id: str, index: int, job_dir: Path, expected: str | None = None) -> bytes:
    """Checkpoint bundle ``index``: from ``job_dir`` when its SHA-256 holds, else downloaded (and kept).

    ``expected`` is the SHA-256 the job spec lists for it; without one, the checksum recorded at download (from
    ``X-Content-SHA256``) is the reference.

    Raises:
        AgentError: the downloaded bundle is not the one the job spec lists.
    """
    path = job_dir / f"ckpt-{index:03d}.safetensors"
    sidecar = path.with_name(path.name + ".sha256")
    reference = expected or (sidecar.read_text().strip() if sidecar.is_file() else None)
    if path.is_file() and reference:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == reference:
            return data
    sha = client.download_checkpoint(job_id, index, path)
    if expected and sha != expected:
        raise AgentError(f"checkpoint {index} of job {job_id}: downloaded SHA-256 {sha}, the job spec lists {expected}")
    atomic_write_bytes(sidecar, (sha + "\n").encode())
    return path.read_bytes()


def prepare_run(client: SiloClient, job_id: str, spec: dict, job_dir: Path, progress: Progress | None = None) -> Path:
    """The job's run directory under ``job_dir/run``, rebuilt from its checkpoint bundles (reused when present)."""
    from scoring.workflow import rebuild_run  # torch: loaded only when a run must be rebuilt

    dest = job_dir / "run"
    if (dest / "run.json").is_file():
        return dest
    projection = ProjectionSpec.from_dict(spec["projection"])
    indices = [int(c["index"]) for c in spec["checkpoints"]]
    bundles = []
    for done, index in enumerate(indices, 1):
        data = download_bundle(client, job_id, index, job_dir, spec["checkpoints"][done - 1].get("sha256"))
        bundles.append(checkpoint_from_bytes(data, projection, f"checkpoint {index} of job {job_id}"))
        if progress:
            progress("checkpoints", done, len(indices))
    # a directory without run.json is unfinished: it is replaced
    return rebuild_run(
        JobSpec.from_dict(spec), bundles, dest, finish=lambda tmp: add_warmup_moments(tmp, spec, job_dir.parent)
    )


def add_warmup_moments(run_dir: Path, spec: dict, work_dir: Path) -> None:
    """For a job made from a federated warmup (``spec.warmup``) that preconditions: copy this silo's own Adam
    moments after each checkpoint round (kept by `agent.train` under ``work_dir``) into the run directory as each
    checkpoint's ``optimizer.safetensors`` and mark them in ``run.json``. The bundles carry none: moments never
    leave a silo.

    Raises:
        AgentError: this silo holds no moments for a checkpoint round under ``work_dir``.
    """
    warmup = spec.get("warmup")
    if not warmup or not spec["precondition"]:
        return
    from agent.train import local_moments_path  # agent.train imports this module

    manifest = json.loads((run_dir / "run.json").read_text())
    for entry in manifest["checkpoints"]:
        round = warmup["rounds"][entry["index"]]
        moments = local_moments_path(work_dir, warmup["job"], round)
        if not moments.is_file():
            raise AgentError(
                f"preconditioning needs this silo's Adam moments of round {round} of warmup job {warmup['job']} "
                f"({moments} is missing): the silo must have taken part in warmup job {warmup['job']} with the same "
                "--work-dir"
            )
        shutil.copyfile(moments, run_dir / entry["dir"] / "optimizer.safetensors")
        entry["has_moments"] = True
    atomic_write_bytes(run_dir / "run.json", json.dumps(manifest, indent=2).encode())


def project_local(
    run_dir: Path,
    samples: list[Sample],
    proj_dir: Path,
    spec: dict,
    options: AgentOptions,
    progress: Progress | None = None,
) -> Path:
    """Project ``samples`` at every checkpoint into ``proj_dir`` (built aside, then renamed into place), with the
    signals the job asks for (``spec.signals``) in the files of its signal checkpoint."""
    from scoring.workflow import ModelOptions, ProjectOptions, project_samples

    # a coordinator that predates the signals asks for none (JobSpec.from_dict)
    opts = ProjectOptions.for_job(JobSpec.from_dict(spec), options.engine, options.batch_size)
    with atomic_dir(proj_dir) as tmp:
        project_samples(
            run_dir,
            samples,
            tmp,
            anchor=False,
            opts=opts,
            model_opts=ModelOptions(device=options.device, dtype=options.dtype, cache_dir=options.cache_dir),
            progress=(lambda done, total: progress("gradients", done, total)) if progress else None,
        )
    return proj_dir


def iter_shards(
    proj_dir: Path, indices: list[int], ids: list[str], rows_per_shard: int
) -> Iterator[tuple[int, int, bytes]]:
    """``(checkpoint, part, shard bytes)`` in checkpoint order: part p holds rows [p*R, (p+1)*R) at every checkpoint.

    One checkpoint's projections are in memory at a time."""
    n_parts = math.ceil(len(ids) / rows_per_shard)
    for t in indices:
        proj, losses, signals = load_projection(proj_dir / f"ckpt-{t:03d}.candidate.safetensors")
        if list(proj.ids) != ids:
            raise AgentError(f"{proj_dir}: the projections' ids differ from the data file's (delete the directory)")
        for p in range(n_parts):
            rows = slice(p * rows_per_shard, (p + 1) * rows_per_shard)
            part = replace(proj, ids=proj.ids[rows], matrix=proj.matrix[rows])  # (R, k), the last part shorter
            part_losses = None if losses is None else losses[rows]
            yield t, p, projection_to_bytes(part, part_losses, {name: v[rows] for name, v in signals.items()})


def upload_shards(
    client: SiloClient,
    job_id: str,
    shards: Iterator[tuple[int, int, bytes]],
    held: dict[tuple[int, int], str],
    *,
    total: int = 0,
    complete: bool = False,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Send the shards the coordinator does not hold yet; returns (uploaded, skipped).

    Args:
        held: (checkpoint, part) -> SHA-256 of the shards it holds (`SiloClient.held_shards`).
        total: the number of shards (for ``progress`` only).
        complete: this silo has completed its upload: nothing may be sent, every shard must be held already.

    Raises:
        AgentError: a shard is held with other content, or held shards are not among those the data gives (the data
            file or ``rows_per_shard`` changed since they were uploaded), or one is missing after completion.
    """
    uploaded = skipped = 0
    made: set[tuple[int, int]] = set()
    for t, p, data in shards:
        made.add((t, p))
        sha = hashlib.sha256(data).hexdigest()
        have = held.get((t, p))
        if have == sha:
            skipped += 1
        elif have is not None or complete:
            raise AgentError(
                f"job {job_id}: the coordinator holds shard (checkpoint {t}, part {p}) "
                + ("with other content" if have else "not at all, though this silo completed its upload")
                + ": the data file or --rows-per-shard changed since the upload; use the original data file"
            )
        else:
            client.upload_shard(job_id, t, p, data)
            uploaded += 1
        if progress:
            progress("shards", uploaded + skipped, total)
    extra = sorted(set(held) - made)
    if extra:
        raise AgentError(
            f"job {job_id}: the coordinator holds shards (checkpoint, part) {extra[:5]} that this data file does not "
            "give: the data file or --rows-per-shard changed since the upload; use the original ones"
        )
    return uploaded, skipped


def write_outputs(
    data_path: Path, samples: list[Sample], rows: list[dict], job_id: str, out_dir: Path | None = None
) -> tuple[Path, Path, int]:
    """Write ``<stem>.scores.jsonl`` (id, score, parts, selected; local order) and ``<stem>.selected.jsonl`` (the
    selected samples' records), each atomically, in ``out_dir`` (default: next to the data file, `output_paths`).
    Returns both paths and the number selected."""
    by_id = {r["sample_id"]: r for r in rows}
    missing = [s.id for s in samples if s.id not in by_id]
    if missing:
        raise AgentError(
            f"job {job_id}: the coordinator has no scores for {len(missing)} of the {len(samples)} local samples "
            f"(e.g. {missing[:3]}): this data file is not the one this silo uploaded"
        )
    scores_path, selected_path = output_paths(data_path, out_dir)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    fields = ("score", "parts", "selected")
    lines = [json.dumps({"id": s.id, **{k: by_id[s.id][k] for k in fields}}) for s in samples]
    atomic_write_bytes(scores_path, ("\n".join(lines) + "\n").encode())
    chosen = [s for s in samples if by_id[s.id]["selected"]]
    write_samples(selected_path, chosen)
    return scores_path, selected_path, len(chosen)
