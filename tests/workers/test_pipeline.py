"""`workers.pipeline` called directly (no Celery): scoring matches the engine and is idempotent, near-duplicates
across silos are found, the anchor index answers nearest-anchor queries, and corrupt or missing inputs fail cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scoring.calibration import fused_signals
from scoring.config import DEFAULT_FUSION, DEFAULT_SIGNALS
from scoring.data import Sample
from scoring.errors import ConfigError
from scoring.io import load_projection, projection_to_bytes
from scoring.types import ProjectedGrads
from scoring.workflow import ProjectOptions, checkpoint_bundles, project_samples
from storage import repository as repo
from storage.errors import IntegrityError
from storage.scores import ScoreQuery, query_scores
from storage.vector_index import VectorIndex
from tests.conftest import SILOS, TinyData, expected_calibration, expected_scores
from wire import ANCHOR_OWNER
from workers import names, pipeline
from workers.config import ServiceSettings
from workers.steps import fail_owner


def _job(
    res: pipeline.Resources,
    data: TinyData,
    silo_samples: dict[str, list[Sample]],
    root: Path,
    score: dict | None = None,
) -> str:
    """A job in ``scoring`` whose silos uploaded their shards (parts of 4 rows), as agents would. ``score``: the job's
    score options (`app.schemas.ScoreFields.score_options`); none: a job stored before they existed (pure trace)."""
    manifest = json.loads((data.run_dir / "run.json").read_text())
    with res.sessions.begin() as session:
        for silo in silo_samples:
            if not any(s.name == silo for s in repo.list_silos(session)):
                repo.create_silo(session, name=silo)
        job = repo.create_job(
            session,
            name="t",
            model=manifest["model"],
            lora=manifest["lora"],
            projection=manifest["projection"],
            similarity="cosine",
            threshold={"kind": "mean-anchor"},
            precondition=True,
            options={**{k: manifest[k] for k in ("lora_init_seed", "max_len", "template")}, **(score or {})},
            checkpoints=[
                {k: e[k] for k in ("index", "step", "lr", "lr_last", "adam")} for e in manifest["checkpoints"]
            ],
            silo_names=list(silo_samples),
        )
        job_id = job.id
        for index, bundle in enumerate(checkpoint_bundles(data.run_dir)):
            ref = res.blobs.put_bytes(bundle)
            repo.set_checkpoint_blob(session, job_id=job_id, index=index, blob_key=ref.key, size_bytes=ref.size)
        ref = res.blobs.put_bytes(data.anchors_file.read_bytes())
        ids = [s.id for s in data.samples["anchors"]]
        repo.set_anchor_set(session, job_id=job_id, blob_key=ref.key, size_bytes=ref.size, sample_ids=ids)
    for silo, samples in silo_samples.items():
        out = root / f"proj-{silo}-{job_id}"
        out.mkdir()
        signals = tuple((score or {}).get("signals", ()))
        at = (score or {}).get("signal_checkpoint")
        opts = ProjectOptions(batch_size=8, precondition=True, signals=signals, signal_checkpoint=at)
        project_samples(data.run_dir, samples, out, opts=opts)
        with res.sessions.begin() as session:
            silo_id = repo.get_silo_by_name(session, name=silo).id
            for path in sorted(out.glob("ckpt-*.candidate.safetensors")):
                proj, losses, signals = load_projection(path)
                for part, start in enumerate(range(0, len(proj), 4)):
                    rows = slice(start, start + 4)
                    piece = ProjectedGrads(
                        ids=proj.ids[rows],
                        matrix=proj.matrix[rows],
                        spec=proj.spec,
                        checkpoint=proj.checkpoint,
                        lr=proj.lr,
                        preconditioned=proj.preconditioned,
                    )
                    part_signals = {name: v[rows] for name, v in signals.items()}
                    ref = res.blobs.put_bytes(projection_to_bytes(piece, losses[rows], part_signals))
                    repo.add_shard(
                        session,
                        job_id=job_id,
                        owner=silo,
                        checkpoint=proj.checkpoint,
                        part=part,
                        role="candidate",
                        sample_ids=list(piece.ids),
                        blob_key=ref.key,
                        size_bytes=ref.size,
                    )
            repo.mark_complete(session, job_id=job_id, silo_id=silo_id, num_samples=len(samples))
    with res.sessions.begin() as session:
        repo.update_job(session, job_id=job_id, status="scoring")
    return job_id


@pytest.fixture
def res(tmp_path) -> pipeline.Resources:
    from storage.db import upgrade

    resources = pipeline.Resources.from_settings(ServiceSettings(data_dir=tmp_path / "coord"))
    upgrade(resources.sessions.kw["bind"])
    return resources


def _rows(res, job_id):
    with res.sessions() as session:
        return [
            (r.owner, r.sample_id, r.row, r.score, r.parts, r.selected)
            for r in query_scores(session, job_id=job_id, query=ScoreQuery())[1]
        ]


def test_scores_match_the_engine_and_a_second_run_changes_nothing(res, tiny_data, tmp_path):
    job_id = _job(res, tiny_data, {s: tiny_data.samples[s] for s in SILOS}, tmp_path)
    messages: list[str] = []
    table = pipeline.score_job(res, job_id, lambda fraction, message: messages.append(message))
    expected = expected_scores(tiny_data)
    assert table.ids == expected.ids
    assert np.allclose(table.scores, expected.scores, rtol=1e-6, atol=1e-12)
    assert (table.selected == expected.selected).all() and table.threshold == pytest.approx(expected.threshold)
    first = _rows(res, job_id)
    assert len(first) == len(expected.ids) + len(tiny_data.samples["anchors"])
    assert any(m.startswith("scored 6/6") for m in messages)  # 2 silos x 3 parts of 4, 4, 1 rows
    with res.sessions() as session:
        job = repo.get_job(session, job_id=job_id)
        assert (job.status, job.anchor_status, job.progress) == ("done", "done", 1.0)
        assert job.threshold_value == pytest.approx(expected.threshold)
    pipeline.score_job(res, job_id)  # a redelivered task
    assert _rows(res, job_id) == first


CALIBRATED = {"score": "calibrated", "signals": list(DEFAULT_SIGNALS), "fusion": DEFAULT_FUSION, "signal_checkpoint": 1}


def _stored(res, job_id) -> dict[tuple[str, str], object]:
    with res.sessions() as session:
        return {(r.owner, r.sample_id): r for r in query_scores(session, job_id=job_id, query=ScoreQuery())[1]}


def test_a_calibrated_job_scores_with_the_fused_signals_and_keeps_each_sample_s_values(res, tiny_data, tmp_path):
    """End to end on the tiny model: the stored scores are the engine's calibrated fusion of the trace score with
    ℓ(y|x) and ℓ(y|∅) against the anchor samples (theirs leave-one-out), the mean-anchor threshold is the mean of the
    anchors' fused scores, and every row keeps its raw values, calibrated z and the signal that flagged it."""
    job_id = _job(res, tiny_data, {s: tiny_data.samples[s] for s in SILOS}, tmp_path, CALIBRATED)
    table = pipeline.score_job(res, job_id)
    expected, cand, anch = expected_calibration(tiny_data, score=CALIBRATED)
    trace = expected_scores(tiny_data)  # the same samples' trace scores, and their order
    assert table.ids == expected.ids == trace.ids
    assert np.allclose(table.scores, expected.scores, rtol=1e-6, atol=1e-9)
    assert (table.selected == expected.selected).all() and table.threshold == pytest.approx(expected.threshold)
    assert table.threshold == pytest.approx(float(np.mean(anch.scores)))
    assert np.allclose(table.parts, trace.parts, rtol=1e-6, atol=1e-12)  # the parts stay the trace's terms
    stored = _stored(res, job_id)
    fused = list(fused_signals(CALIBRATED["signals"]))
    assert cand.signals == tuple(fused) == ("trace", "perplexity", "ifd", "pmi")
    for i, (silo, sid) in enumerate(zip(table.silos, table.ids, strict=True)):
        row = stored[(silo, sid)]
        assert row.score == pytest.approx(expected.scores[i], rel=1e-6, abs=1e-9)
        assert sorted(row.signal_values) == ["loss", "loss_uncond", "n_tokens", "trace"]
        assert row.signal_values["trace"] == pytest.approx(trace.scores[i], rel=1e-6, abs=1e-12)
        assert isinstance(row.signal_values["n_tokens"], int) and row.signal_values["n_tokens"] >= 1
        assert list(row.signal_z) == fused
        assert [row.signal_z[s] for s in fused] == pytest.approx(list(cand.z[i]), rel=1e-6, abs=1e-6)
        assert row.flagged_by == cand.flagged_by[i]
        assert row.signal_values["loss"] == pytest.approx(cand.raw[i, fused.index("perplexity")], rel=1e-6)
    anchor_rows = [r for (owner, _), r in stored.items() if owner == ANCHOR_OWNER]
    assert len(anchor_rows) == len(tiny_data.samples["anchors"])
    assert sorted(r.score for r in anchor_rows) == pytest.approx(sorted(anch.scores), rel=1e-6, abs=1e-9)
    assert all(r.signal_z is not None and r.flagged_by in fused for r in anchor_rows)
    with res.sessions() as session:  # the coordinator's anchor shards carry the signals at the signal checkpoint
        shards = repo.list_shards(session, job_id=job_id, owner=ANCHOR_OWNER)
    with_signals = {(s.role, s.checkpoint) for s in shards if pipeline.load_shard(res, s).signals}
    assert with_signals == {("candidate", 1), ("anchor", 1)}
    assert 0 < table.selected.sum() < len(table.ids)


def test_a_trace_job_gives_the_scores_of_before(res, tiny_data, tmp_path):
    """The trace score kind is the computation from before the calibrated score, whether its silos send signals or
    not: the same scores, parts, threshold and masks, bit for bit; only a job that asks for signals keeps the raw
    values (no z, nothing flagged)."""
    samples = {s: tiny_data.samples[s] for s in SILOS}
    old = _job(res, tiny_data, samples, tmp_path)  # stored as before: no score options
    pure = _job(res, tiny_data, samples, tmp_path, {"score": "trace", "signals": [], "signal_checkpoint": 1})
    asks = {"score": "trace", "signals": ["loss_uncond"], "fusion": DEFAULT_FUSION, "signal_checkpoint": 0}
    with_signals = _job(res, tiny_data, samples, tmp_path, asks)
    tables = [pipeline.score_job(res, job_id) for job_id in (old, pure, with_signals)]
    expected = expected_scores(tiny_data)
    assert np.allclose(tables[0].scores, expected.scores, rtol=1e-6, atol=1e-12)
    assert (tables[0].selected == expected.selected).all()
    for table in tables[1:]:
        assert table.ids == tables[0].ids and np.array_equal(table.scores, tables[0].scores)
        assert np.array_equal(table.parts, tables[0].parts) and np.array_equal(table.selected, tables[0].selected)
        assert table.threshold == tables[0].threshold
    rows = [_stored(res, job_id) for job_id in (old, pure, with_signals)]
    assert [(r.score, r.parts, r.selected) for r in rows[0].values()] == [
        (r.score, r.parts, r.selected) for r in rows[2].values()
    ]
    assert all((r.signal_values, r.signal_z, r.flagged_by) == (None, None, None) for r in rows[1].values())
    for r in rows[2].values():
        assert sorted(r.signal_values) == ["loss", "loss_uncond", "trace"] and r.signal_values["trace"] == r.score
        assert (r.signal_z, r.flagged_by) == (None, None)


def test_a_calibrated_score_needs_the_anchor_samples_scored_like_the_candidates(res, tiny_data, tmp_path, monkeypatch):
    """The worker checks again what job creation refuses: preconditioned silos against plain anchor samples."""
    monkeypatch.setattr(pipeline, "anchor_precondition", lambda run_dir, precondition: False)
    job_id = _job(res, tiny_data, {s: tiny_data.samples[s] for s in SILOS}, tmp_path, CALIBRATED)
    with res.sessions.begin() as session:
        repo.update_job(session, job_id=job_id, threshold={"kind": "top", "fraction": 0.5})
    with pytest.raises(ConfigError, match="score: 'calibrated' compares the trace scores of Adam-preconditioned"):
        pipeline.score_job(res, job_id)
    assert _rows(res, job_id) == []


def test_near_duplicates_across_silos_and_nearest_anchors(res, tiny_data, tmp_path):
    a, b = tiny_data.samples["a"], tiny_data.samples["b"]
    copy = Sample("copy-of-a0", a[0].prompt, a[0].response)  # the same text under another id, in silo b
    job_id = _job(res, tiny_data, {"a": a, "b": [*b, copy]}, tmp_path)
    pipeline.score_job(res, job_id)
    assert pipeline.find_near_duplicates(res, job_id) >= 1
    with res.sessions() as session:
        pairs = [(d.owner_a, d.sample_a, d.owner_b, d.sample_b) for d in repo.list_duplicates(session, job_id=job_id)]
    assert ("a", a[0].id, "b", "copy-of-a0") in pairs
    assert all(p[0] != p[2] for p in pairs)  # across silos only
    index = VectorIndex.load(pipeline.anchor_index_path(res, job_id))
    anchors = load_projection(next((tmp_path).glob(f"proj-a-{job_id}")) / "ckpt-001.candidate.safetensors").proj
    ids, sims = index.search(anchors.matrix.astype(np.float32)[:3], k=2)
    assert len(ids) == 3 and all(len(row) == 2 for row in ids) and (sims <= 1.0 + 1e-5).all()
    assert set(index.ids) == {s.id for s in tiny_data.samples["anchors"]}


def test_a_corrupt_shard_blob_is_an_integrity_error_and_the_job_can_be_failed(res, tiny_data, tmp_path):
    job_id = _job(res, tiny_data, {s: tiny_data.samples[s] for s in SILOS}, tmp_path)
    with res.sessions() as session:
        shard = repo.list_shards(session, job_id=job_id, owner="a")[0]
    path = res.blobs.path(shard.blob_key)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(IntegrityError):
        pipeline.score_job(res, job_id)
    with res.sessions.begin() as session:
        fail_owner(session, names.SCORE_JOB, job_id, "shard a/0 is corrupt")
    with res.sessions() as session:
        job = repo.get_job(session, job_id=job_id)
        assert (job.status, job.error) == ("failed", "shard a/0 is corrupt")
        assert query_scores(session, job_id=job_id, query=ScoreQuery(), limit=0)[0] == 0  # nothing half-written


def test_a_mean_anchor_threshold_needs_the_anchor_samples_scored_like_the_candidates(
    res, tiny_data, tmp_path, monkeypatch
):
    """Silos that precondition with moments the coordinator lacks (a federated warmup's): the anchor samples are
    scored plain, so a mean-anchor threshold is refused with nothing stored; a top-fraction threshold works."""
    monkeypatch.setattr(pipeline, "anchor_precondition", lambda run_dir, precondition: False)
    job_id = _job(res, tiny_data, {s: tiny_data.samples[s] for s in SILOS}, tmp_path)
    with pytest.raises(ConfigError, match="'mean-anchor' compares Adam-preconditioned candidate gradients with plain"):
        pipeline.score_job(res, job_id)
    assert _rows(res, job_id) == []
    with res.sessions.begin() as session:
        repo.update_job(session, job_id=job_id, threshold={"kind": "top", "fraction": 0.5})
    table = pipeline.score_job(res, job_id)
    assert int(table.selected.sum()) == round(0.5 * len(table.ids))


def test_scoring_needs_the_scoring_state_and_every_silo_complete(res, tiny_data, tmp_path):
    job_id = _job(res, tiny_data, {"a": tiny_data.samples["a"]}, tmp_path)
    with res.sessions.begin() as session:
        repo.update_job(session, job_id=job_id, status="open")
    with pytest.raises(pipeline.JobStateError, match="not 'scoring'"):
        pipeline.score_job(res, job_id)
