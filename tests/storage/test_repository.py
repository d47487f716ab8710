"""Repository functions on SQLite: idempotent uploads, conflicts, token hashing, cascades, scores."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage import repository as repo
from storage.errors import ConflictError, NotFoundError
from storage.models import AnchorSet, JobCheckpoint, JobMember, Score, Shard, Silo
from storage.scores import ScoreQuery, query_scores
from tests.storage.factories import KEY_A, KEY_B, new_job
from wire import hash_token


def test_silo_token_is_hashed_never_stored(session: Session, tmp_path: Path):
    silo, token = repo.create_silo(session, name="alpha")
    session.commit()
    assert token.startswith("clues_") and len(token) > 40
    assert silo.token_hash == hash_token(token) != token
    assert repo.silo_by_token(session, token=token).id == silo.id
    assert repo.silo_by_token(session, token=token + "x") is None
    raw = b"".join(p.read_bytes() for p in (tmp_path / "db").iterdir())
    assert token.encode() not in raw


def test_silo_names_are_unique(session: Session):
    repo.create_silo(session, name="alpha")
    with pytest.raises(ConflictError, match="'alpha' is already taken"):
        repo.create_silo(session, name="alpha")
    assert [s.name for s in repo.list_silos(session)] == ["alpha"]
    assert repo.get_silo_by_name(session, name="alpha").name == "alpha"
    with pytest.raises(NotFoundError, match="'nope'"):
        repo.get_silo_by_name(session, name="nope")


def test_create_job_round_trip(session: Session):
    job = new_job(session)
    session.commit()
    session.expunge_all()
    got = repo.get_job(session, job_id=job.id)
    assert len(got.id) == 32 and got.status == "draft" and got.anchor_status == "pending"
    assert got.progress == 0.0 and got.message == "" and got.error is None
    assert got.created_at.tzinfo is UTC and got.updated_at.tzinfo is UTC
    assert got.projection == {"kind": "sjlt", "dim": 64, "seed": 0} and got.threshold["value"] == 0.5
    assert [c.index for c in got.checkpoints] == [0, 1] and got.checkpoints[1].step == 6
    assert [m.silo.name for m in got.members] == ["alpha", "beta"]
    assert {m.status for m in got.members} == {"pending"}


def test_create_job_names_unknown_silos(session: Session):
    repo.create_silo(session, name="alpha")
    with pytest.raises(NotFoundError, match="'ghost', 'zed'"):
        repo.create_job(
            session, name="j", model="m", lora={}, projection={}, similarity="cosine", threshold=0.5,
            precondition=False, options={}, checkpoints=[], silo_names=["alpha", "ghost", "zed"],
        )  # fmt: skip


def test_get_job_and_member_not_found(session: Session):
    job = new_job(session, silo_names=("alpha",))
    other, _ = repo.create_silo(session, name="outsider")
    with pytest.raises(NotFoundError, match="'nope'"):
        repo.get_job(session, job_id="nope")
    with pytest.raises(NotFoundError, match="not a member"):
        repo.get_member(session, job_id=job.id, silo_id=other.id)


def test_list_jobs_per_silo(session: Session):
    first = new_job(session, silo_names=("alpha", "beta"))
    second = new_job(session, silo_names=("gamma",))
    alpha = repo.get_silo_by_name(session, name="alpha")
    assert [j.id for j in repo.list_jobs(session)] == [first.id, second.id]
    assert [j.id for j in repo.list_jobs(session, silo_id=alpha.id)] == [first.id]


def test_checkpoint_blob_idempotent_and_conflicting(session: Session):
    job = new_job(session)
    assert repo.set_checkpoint_blob(session, job_id=job.id, index=0, blob_key=KEY_A, size_bytes=10) is True
    assert repo.set_checkpoint_blob(session, job_id=job.id, index=0, blob_key=KEY_A, size_bytes=10) is False
    with pytest.raises(ConflictError, match="checkpoint 0 of job"):
        repo.set_checkpoint_blob(session, job_id=job.id, index=0, blob_key=KEY_B, size_bytes=10)
    with pytest.raises(NotFoundError, match="no checkpoint 7"):
        repo.set_checkpoint_blob(session, job_id=job.id, index=7, blob_key=KEY_A, size_bytes=10)
    session.commit()
    ckpt = session.get(JobCheckpoint, (job.id, 0), populate_existing=True)
    assert (ckpt.blob_key, ckpt.size_bytes) == (KEY_A, 10)


def test_anchor_set_idempotent_and_conflicting(session: Session):
    job = new_job(session)
    assert repo.set_anchor_set(session, job_id=job.id, blob_key=KEY_A, size_bytes=5, sample_ids=["x", "y"])
    assert not repo.set_anchor_set(session, job_id=job.id, blob_key=KEY_A, size_bytes=5, sample_ids=["x", "y"])
    with pytest.raises(ConflictError, match="anchor set"):
        repo.set_anchor_set(session, job_id=job.id, blob_key=KEY_B, size_bytes=5, sample_ids=["x"])
    anchors = repo.get_anchor_set(session, job_id=job.id)
    assert anchors.num_samples == 2 and anchors.sample_ids == ["x", "y"]
    with pytest.raises(NotFoundError):
        repo.set_anchor_set(session, job_id="nope", blob_key=KEY_A, size_bytes=5, sample_ids=[])


def _shard(session: Session, job_id: str, key: str = KEY_A, checkpoint: int = 0, part: int = 0, owner: str = "alpha"):
    return repo.add_shard(
        session, job_id=job_id, owner=owner, checkpoint=checkpoint, part=part, role="candidate",
        sample_ids=[f"p{part}-s{i}" for i in range(3)], blob_key=key, size_bytes=99,
    )  # fmt: skip


def test_add_shard_idempotent_and_conflicting(session: Session):
    job = new_job(session)
    shard, created = _shard(session, job.id)
    assert created and shard.row_count == 3
    again, created = _shard(session, job.id)
    assert not created and again.id == shard.id
    with pytest.raises(ConflictError, match=r"checkpoint 0, part 0\) of 'alpha'"):
        _shard(session, job.id, key=KEY_B)
    with pytest.raises(NotFoundError):
        _shard(session, "nope")
    session.commit()
    assert session.scalar(select(func.count()).select_from(Shard)) == 1


def test_add_shard_race_uses_a_savepoint(session: Session, engine):
    """Another writer inserts the row between our check and our insert: we get its row, our transaction lives on."""
    job = new_job(session)
    session.commit()
    from storage.db import make_session_factory

    with make_session_factory(engine)() as other:
        _shard(other, job.id)
        other.commit()
    repo.update_job(session, job_id=job.id, message="before the race")  # pending work that must survive
    row = Shard(
        job_id=job.id, owner="alpha", checkpoint=0, part=0, role="candidate", row_count=3,
        sample_ids=["s1", "s2", "s3"], blob_key=KEY_A, size_bytes=99,
    )  # fmt: skip
    calls = []

    def existing():
        calls.append(1)
        if len(calls) == 1:
            return None  # the check ran before the other writer committed
        return session.scalar(select(Shard).where(Shard.job_id == job.id))

    shard, created = repo._insert_once(session, row, existing)
    assert not created and shard is not row and shard.blob_key == KEY_A
    session.commit()
    assert repo.get_job(session, job_id=job.id).message == "before the race"
    assert len(repo.list_shards(session, job_id=job.id)) == 1


def test_an_id_may_be_in_one_part_only_and_lookups_find_its_part(session: Session):
    job = new_job(session)
    _shard(session, job.id, part=0)
    _shard(session, job.id, part=0, checkpoint=1)  # the same part at another checkpoint: fine
    assert repo.parts_of_samples(session, job_id=job.id, owner="alpha", sample_ids=["p0-s1", "zz"]) == {"p0-s1": 0}
    assert repo.part_sample_ids(session, job_id=job.id, owner="alpha", part=0) == (0, ["p0-s0", "p0-s1", "p0-s2"])
    with pytest.raises(ConflictError, match="already in other parts"):
        repo.add_shard(
            session, job_id=job.id, owner="alpha", checkpoint=0, part=1, role="candidate",
            sample_ids=["new", "p0-s2"], blob_key=KEY_B, size_bytes=9,
        )  # fmt: skip
    assert repo.parts_of_samples(session, job_id=job.id, owner="beta", sample_ids=["p0-s1"]) == {}  # per owner


def test_list_shards_order_and_filters(session: Session):
    job = new_job(session)
    for owner in ("beta", "alpha"):
        for part in (1, 0):
            for checkpoint in (1, 0):
                _shard(session, job.id, key=KEY_A, checkpoint=checkpoint, part=part, owner=owner)
    repo.add_shard(
        session, job_id=job.id, owner="__anchor__", checkpoint=0, part=0, role="anchor", sample_ids=["a"],
        blob_key=KEY_B, size_bytes=1,
    )  # fmt: skip
    shards = repo.list_shards(session, job_id=job.id, role="candidate")
    assert [(s.owner, s.part, s.checkpoint) for s in shards][:4] == [
        ("alpha", 0, 0), ("alpha", 0, 1), ("alpha", 1, 0), ("alpha", 1, 1),
    ]  # fmt: skip
    assert len(repo.list_shards(session, job_id=job.id, owner="beta")) == 4
    assert [s.role for s in repo.list_shards(session, job_id=job.id, owner="__anchor__")] == ["anchor"]


def test_mark_complete(session: Session):
    job = new_job(session)
    alpha = repo.get_silo_by_name(session, name="alpha")
    member = repo.mark_complete(session, job_id=job.id, silo_id=alpha.id, num_samples=12)
    first = member.completed_at
    assert member.status == "complete" and member.num_samples == 12 and first.tzinfo is UTC
    member = repo.mark_complete(session, job_id=job.id, silo_id=alpha.id, num_samples=12)
    assert member.completed_at == first


def test_update_job(session: Session):
    job = new_job(session)
    before = job.updated_at
    job = repo.update_job(session, job_id=job.id, status="open", progress=0.5, message="projecting anchors")
    assert (job.status, job.progress, job.message) == ("open", 0.5, "projecting anchors")
    assert job.updated_at >= before
    with pytest.raises(TypeError, match="'id'"):
        repo.update_job(session, job_id=job.id, id="x")
    with pytest.raises(NotFoundError):
        repo.update_job(session, job_id="nope", status="open")


def test_scores_replace_list_count(session: Session):
    job = new_job(session)
    rows = [
        {
            "owner": owner,
            "sample_id": f"{owner}-{i}",
            "row": i,
            "score": float(i),
            "parts": [i, -i],
            "selected": i % 2 == 0,
        }
        for owner in ("beta", "alpha")
        for i in range(5)
    ]
    assert repo.replace_scores(session, job_id=job.id, rows=iter(rows)) == 10
    assert repo.replace_scores(session, job_id=job.id, rows=rows) == 10  # idempotent
    session.commit()
    got = query_scores(session, job_id=job.id, query=ScoreQuery())[1]
    assert [(s.owner, s.row) for s in got][:2] == [("alpha", 0), ("alpha", 1)] and len(got) == 10
    assert got[3].parts == [3.0, -3.0] and got[3].selected is False
    page = query_scores(session, job_id=job.id, query=ScoreQuery(owner="beta"), limit=2, offset=1)[1]
    assert [s.sample_id for s in page] == ["beta-1", "beta-2"]
    assert query_scores(session, job_id=job.id, query=ScoreQuery(), limit=0)[0] == 10
    assert query_scores(session, job_id=job.id, query=ScoreQuery(owner="alpha"), limit=0)[0] == 5
    assert "owner" in rows[0] and "job_id" not in rows[0]  # the caller's dicts are not modified


def test_scores_batches(session: Session, monkeypatch):
    monkeypatch.setattr(repo.results, "BATCH_ROWS", 3)
    job = new_job(session)
    rows = [
        {"owner": "a", "sample_id": str(i), "row": i, "score": 0.0, "parts": [], "selected": False} for i in range(8)
    ]
    assert repo.replace_scores(session, job_id=job.id, rows=rows) == 8
    assert query_scores(session, job_id=job.id, query=ScoreQuery(), limit=0)[0] == 8


def test_duplicates_replace_and_list(session: Session):
    job = new_job(session)
    pairs = [
        {"owner_a": "alpha", "sample_a": "x", "owner_b": "beta", "sample_b": "y", "similarity": 0.99},
        {"owner_a": "alpha", "sample_a": "z", "owner_b": "beta", "sample_b": "w", "similarity": 0.999},
    ]
    repo.replace_duplicates(session, job_id=job.id, pairs=pairs)
    assert repo.replace_duplicates(session, job_id=job.id, pairs=pairs) == 2
    assert [d.sample_a for d in repo.list_duplicates(session, job_id=job.id)] == ["z", "x"]


def test_delete_job_cascades(session: Session):
    job = new_job(session)
    _shard(session, job.id)
    repo.set_anchor_set(session, job_id=job.id, blob_key=KEY_A, size_bytes=5, sample_ids=["x"])
    repo.replace_scores(
        session, job_id=job.id,
        rows=[{"owner": "alpha", "sample_id": "s", "row": 0, "score": 1.0, "parts": [1.0], "selected": True}],
    )  # fmt: skip
    session.commit()
    session.expunge_all()
    repo.delete_job(session, job_id=job.id)
    session.commit()
    for model in (JobCheckpoint, JobMember, AnchorSet, Shard, Score):
        assert session.scalar(select(func.count()).select_from(model)) == 0, model.__name__
    assert session.scalar(select(func.count()).select_from(Silo)) == 2  # silos outlive their jobs
