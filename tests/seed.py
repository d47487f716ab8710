"""A scored job written straight into storage, as the workers would leave it: for dashboard tests and the dashboard
benchmark, which need many scored rows without running the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from scoring.config import DEFAULT_FUSION, DEFAULT_SIGNALS
from storage import repository as repo
from wire import ANCHOR_OWNER


@dataclass(frozen=True)
class SeededJob:
    job_id: str
    tokens: dict[str, str]  # silo name -> bearer token
    threshold: float
    sample_ids: dict[str, list[str]]  # silo name -> its sample ids, in upload order
    anchor_ids: list[str]


def _create(session: Session, name: str, silos: tuple[str, ...], options: dict, lr: list[float]):
    """A mean-anchor, preconditioned cosine job over ``silos`` with one checkpoint per learning rate."""
    return repo.create_job(
        session,
        name=name,
        model="smollm2-135m",
        lora={"rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]},
        projection={"kind": "sjlt", "dim": 8192, "seed": 0, "nnz": 4},
        similarity="cosine",
        threshold={"kind": "mean-anchor"},
        precondition=True,
        options=options,
        checkpoints=[
            {"index": t, "step": 10 * (t + 1), "lr": lr[t], "lr_last": lr[t], "adam": {}} for t in range(len(lr))
        ],
        silo_names=list(silos),
    )


def seed_scored_job(
    session: Session,
    *,
    silos: tuple[str, ...] = ("silo1", "silo2", "silo3"),
    per_silo: int | tuple[int, ...] = 50,
    anchors: int = 40,
    checkpoints: int = 2,
    noise: tuple[float, ...] = (0.1, 0.3, 0.5),
    duplicates: int = 3,
    seed: int = 0,
    name: str = "seeded",
    sample_ids: dict[str, list[str]] | None = None,
    calibrated: bool = False,
) -> SeededJob:
    """Create the silos (if missing), a ``done`` job over them and its scores: a noisy fraction of each silo scores
    low, the threshold is the mean anchor score, each sample names its 3 nearest anchors, and ``duplicates`` pairs
    of samples across the first two silos are near-duplicates. ``calibrated``: a calibrated job (the default signals
    and fusion), whose scores are `scoring.calibration.calibrate`'s fusion of the trace score with losses that are
    higher for the noisy samples, each row keeping its raw values, z and flagging signal. Commits."""
    rng = np.random.default_rng(seed)
    sizes = per_silo if isinstance(per_silo, tuple) else (per_silo,) * len(silos)
    tokens = {}
    for s in silos:
        if repo.find_silo(session, name=s) is None:
            tokens[s] = repo.create_silo(session, name=s)[1]
    lr = [1e-3 / (t + 1) for t in range(checkpoints)]
    job = _create(session, name, silos, {"max_len": 512, **(CALIBRATED if calibrated else {})}, lr)
    anchor_ids = [f"anchor-{i:04d}" for i in range(anchors)]

    def parts(clean: np.ndarray) -> np.ndarray:  # (n, T) terms η_t·cos, clean samples align with the anchors
        base = np.where(clean, 0.35, 0.05)[:, None] + 0.08 * rng.standard_normal((len(clean), checkpoints))
        return base * np.asarray(lr)[None, :] * 1e3

    anchor_parts = parts(np.ones(anchors, dtype=bool))
    threshold = float(anchor_parts.sum(1).mean())

    def row(owner: str, sample_id: str, i: int, terms: np.ndarray, **extra) -> dict:
        score = float(terms.sum())
        return {"owner": owner, "sample_id": sample_id, "row": i, "score": score, "parts": terms.tolist(),
                "selected": score >= threshold, **extra}  # fmt: skip

    rows, ids_by_silo, clean_by_silo = [], {}, []
    for s, n, rate in zip(silos, sizes, noise * len(silos), strict=False):
        ids = (sample_ids or {}).get(s) or [f"{s}-{i:06d}" for i in range(n)]
        ids_by_silo[s] = ids
        clean = rng.random(len(ids)) >= rate
        clean_by_silo.append(clean)
        p = parts(clean)
        nearest = rng.integers(0, anchors, size=(len(ids), 3))
        for i, sid in enumerate(ids):
            score = float(p[i].sum())
            near = [{"anchor_id": anchor_ids[a], "trace": score / (k + 1)} for k, a in enumerate(nearest[i])]
            rows.append(row(s, sid, i, p[i], nearest=near))
    rows += [row(ANCHOR_OWNER, aid, i, anchor_parts[i]) for i, aid in enumerate(anchor_ids)]
    if calibrated:
        threshold = _calibrate(rows, np.concatenate([*clean_by_silo, np.ones(anchors, dtype=bool)]), rng)
    for s in silos:
        m = repo.get_member(session, job_id=job.id, silo_id=repo.get_silo_by_name(session, name=s).id)
        m.status, m.num_samples = "complete", len(ids_by_silo[s])
    repo.update_job(session, job_id=job.id, status="scoring", anchor_status="done", threshold_value=threshold)
    repo.replace_scores(session, job_id=job.id, rows=rows)
    if duplicates and len(silos) > 1:
        a, b = ids_by_silo[silos[0]], ids_by_silo[silos[1]]
        repo.replace_duplicates(
            session,
            job_id=job.id,
            pairs=[
                {
                    "owner_a": silos[0],
                    "sample_a": a[i],
                    "owner_b": silos[1],
                    "sample_b": b[i],
                    "similarity": 0.99 - 0.001 * i,
                }
                for i in range(min(duplicates, len(a), len(b)))
            ],
        )
    kept = sum(r["selected"] for r in rows if r["owner"] != ANCHOR_OWNER)
    total = sum(len(v) for v in ids_by_silo.values())
    repo.update_job(
        session,
        job_id=job.id,
        status="done",
        progress=1.0,
        threshold_value=threshold,
        message=f"{kept} of {total} samples selected",
    )
    session.commit()
    return SeededJob(job.id, tokens, threshold, ids_by_silo, anchor_ids)


CALIBRATED = {"score": "calibrated", "signals": list(DEFAULT_SIGNALS), "fusion": DEFAULT_FUSION}


def _calibrate(rows: list[dict], clean: np.ndarray, rng: np.random.Generator) -> float:
    """Give ``rows`` (the silos' then the anchors') a calibrated job's columns, in place: losses that are higher
    for the noisy samples, their fused calibrated score against the anchor rows (`scoring.calibration.calibrate`),
    the threshold's decision; returns the mean-anchor threshold."""
    from scoring.calibration import calibrate, fused_signals

    n = len(rows)
    values = {
        "trace": np.array([r["score"] for r in rows]),
        "loss": np.where(clean, 1.2, 2.0) + 0.2 * rng.standard_normal(n),
        "loss_uncond": np.where(clean, 2.4, 2.1) + 0.2 * rng.standard_normal(n),
        "n_tokens": rng.integers(5, 200, n).astype(np.float64),
    }
    anchor = np.array([r["owner"] == ANCHOR_OWNER for r in rows])
    cand, anch = calibrate(
        {k: v[~anchor] for k, v in values.items()},
        {k: v[anchor] for k, v in values.items()},
        fused_signals(DEFAULT_SIGNALS),
        DEFAULT_FUSION,
    )
    threshold = float(anch.scores.mean())
    for side, cal in ((np.flatnonzero(~anchor), cand), (np.flatnonzero(anchor), anch)):
        for j, i in enumerate(side):
            rows[i]["score"] = float(cal.scores[j])
            rows[i]["selected"] = rows[i]["score"] >= threshold
            rows[i]["signal_values"] = {k: int(v[i]) if k == "n_tokens" else float(v[i]) for k, v in values.items()}
            rows[i]["signal_z"] = {s: float(z) for s, z in zip(cal.signals, cal.z[j], strict=True)}
            rows[i]["flagged_by"] = cal.flagged_by[j]
    return threshold


def seed_training_job(
    session: Session,
    *,
    scoring_job_id: str | None,
    silos: tuple[str, ...] = ("silo1", "silo2", "silo3"),
    rounds: int = 3,
    status: str = "done",
    name: str = "federated on the selection",
    kind: str = "stack",
) -> str:
    """A federated training job with ``rounds`` closed rounds (falling training loss, an evaluation per round and
    final metrics), as the workers leave one, aggregated as ``kind``: each silo's update is on record with its size
    (silo i sends 1000·(i + 1) + round bytes) and a ``stack`` round grows the global rank by 8 per silo. Commits;
    returns its id."""
    from datetime import UTC, datetime, timedelta

    settings = {
        "lora": {"rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]},
        "local": {"steps": 4, "batch_size": 4, "lr": 1e-3},
        "aggregation": {"kind": kind, "rule": "fedavg"},
        "merge": None,
        "selection": {"source": "selected", "scoring_job": scoring_job_id, "seed": 0} if scoring_job_id else None,
        "checkpoint_rounds": [],
        "evaluation": {"every": 1, "max_new_tokens": 8},
    }
    job = repo.create_train_job(
        session,
        name=name,
        mode="federated",
        model="smollm2-135m",
        settings=settings,
        rounds=rounds,
        quorum=len(silos),
        round_timeout_s=600.0,
        scoring_job_id=scoring_job_id,
        silo_names=list(silos),
    )
    now = datetime.now(UTC)
    for r in range(rounds):
        repo.open_round(
            session, job_id=job.id, round=r, lr=1e-3, start_blob=f"{r:064x}", deadline=now + timedelta(hours=1)
        )
        for i, member in enumerate(job.members):
            repo.add_update(
                session, job_id=job.id, round=r, silo_id=member.silo_id, blob_key=f"{i + 100 * r:064x}",
                size_bytes=1000 * (i + 1) + r, num_samples=30, score_mass=0.0, train_loss=2.8 - 0.25 * r,
            )  # fmt: skip
        report = {
            "kind": kind,
            **({"rank": 8 * len(silos) * (r + 1), "truncation_error": 0.0} if kind == "stack" else {}),
        }
        repo.claim_round(session, job_id=job.id, round=r)
        repo.close_round(
            session,
            job_id=job.id,
            round=r,
            result_blob=f"{r + 1:064x}",
            participants=list(silos),
            train_loss=2.8 - 0.25 * r,
            guard={  # round 2: the last silo sent an update far larger than the others
                "flags": [{"silo": silos[-1], "kind": "clipped", "detail": "update norm 1e+30 clipped to 0.3"}]
                if r == 1
                else [],
                "figures": {"clip_bound": 0.3},
                "aggregation": report,
            },
        )
        repo.set_round_metrics(
            session, job_id=job.id, round=r, metrics={"loss": 2.7 - 0.2 * r, "pubmedqa_accuracy": 0.3 + 0.1 * r}
        )
    for m in job.members:
        m.num_samples = 30
    repo.update_train_job(
        session,
        job_id=job.id,
        status=status,
        round=rounds - 1,
        progress=1.0,
        message=f"{rounds} rounds",
        metrics={"loss": 2.7 - 0.2 * (rounds - 1), "pubmedqa_accuracy": 0.5},
    )
    session.commit()
    return job.id


def seed_local_job(
    session: Session,
    *,
    silos: tuple[str, ...] = ("silo1", "silo2", "silo3"),
    per_silo: tuple[int, ...] = (40, 30, 50),
    seed: int = 5,
    name: str = "scored at the silos",
    gradients: str = "projected",
    aggregate_epsilon: float | None = None,
) -> str:
    """A ``done`` silo-local job (``scoring_mode: local``) as the silos and workers leave one: a published reference
    (its key, bin count, threshold and display edges in the options) and each silo's aggregate, no score row. Commits;
    returns its id."""
    from datetime import UTC, datetime

    rng = np.random.default_rng(seed)
    for s in silos:
        if repo.find_silo(session, name=s) is None:
            repo.create_silo(session, name=s)
    edges = np.linspace(-12.0, 0.0, 43).tolist()  # 40 inner bins + the two open ones, drawn one bin wide
    options = {
        "max_len": 512,
        **CALIBRATED,
        "scoring_mode": "local",
        "gradients": gradients,
        "aggregate_epsilon": aggregate_epsilon,
        "reference": f"{7:064x}",
        "reference_bins": 42,
        "reference_threshold": -4.0,
        "reference_edges": edges,
    }
    job = _create(session, name, silos, options, [1e-3])
    centres = np.asarray(edges[:-1]) + 0.5 * (edges[1] - edges[0])
    for s, n in zip(silos, per_silo, strict=True):
        scores = np.clip(rng.normal(-2.5, 2.0, n), edges[0] + 1e-9, edges[-1] - 1e-9)
        counts = np.histogram(scores, bins=np.asarray(edges))[0].tolist()
        kept = int((centres >= -4.0).astype(int) @ np.asarray(counts))
        silo = repo.find_silo(session, name=s)
        aggregate = {"kept": kept, "total": n, "histogram": counts}
        repo.mark_complete(session, job_id=job.id, silo_id=silo.id, num_samples=n, aggregate=aggregate)
    repo.update_job(
        session,
        job_id=job.id,
        anchor_status="done",
        status="done",
        progress=1.0,
        message="scored at the silos",
        threshold_value=-4.0,
        finished_at=datetime.now(UTC),
    )
    session.commit()
    return job.id
