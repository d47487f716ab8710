"""The migration and the repository on a real PostgreSQL server (a throwaway database per test)."""

from __future__ import annotations

import threading
from datetime import UTC

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from storage import repository as repo
from storage.db import make_engine, make_session_factory, ping, upgrade
from storage.errors import ConflictError
from storage.models import Base, JobCheckpoint, Shard
from tests.storage.factories import KEY_A, KEY_B, new_job

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_engine(postgres_url: str):
    engine = make_engine(postgres_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_migration_matches_models(pg_engine):
    ping(pg_engine)
    upgrade(pg_engine)  # again: a no-op
    with pg_engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata) == []


def test_repository_round_trip(pg_engine):
    factory = make_session_factory(pg_engine)
    with factory() as session:
        job = new_job(session)
        _, token = repo.create_silo(session, name="gamma")
        repo.set_checkpoint_blob(session, job_id=job.id, index=0, blob_key=KEY_A, size_bytes=3 << 30)
        repo.add_shard(
            session, job_id=job.id, owner="alpha", checkpoint=0, part=0, role="candidate", sample_ids=["s1"],
            blob_key=KEY_A, size_bytes=10,
        )  # fmt: skip
        score = {"owner": "alpha", "sample_id": "s1", "row": 0, "score": 0.5, "parts": [0.25, 0.25], "selected": True}
        repo.replace_scores(session, job_id=job.id, rows=[score])
        session.commit()
    with factory() as session:
        got = repo.get_job(session, job_id=job.id)
        assert got.created_at.tzinfo is UTC and [m.silo.name for m in got.members] == ["alpha", "beta"]
        assert session.get(JobCheckpoint, (job.id, 0)).size_bytes == 3 << 30  # BIGINT
        assert repo.silo_by_token(session, token=token).name == "gamma"
        assert repo.list_scores(session, job_id=job.id)[0].parts == [0.25, 0.25]
        with pytest.raises(ConflictError):
            repo.create_silo(session, name="gamma")
        session.rollback()
        repo.delete_job(session, job_id=job.id)
        session.commit()
        assert session.scalar(select(func.count()).select_from(Shard)) == 0


def _shard_row(job_id: str, key: str) -> Shard:
    return Shard(
        job_id=job_id, owner="alpha", checkpoint=0, part=0, role="candidate", row_count=1, sample_ids=["s"],
        blob_key=key, size_bytes=1,
    )  # fmt: skip


def test_concurrent_add_shard_one_wins(pg_engine):
    """Both transactions check (no row yet), then both insert: the loser's unique violation stays in its SAVEPOINT."""
    factory = make_session_factory(pg_engine)
    with factory() as session:
        job_id = new_job(session).id
        session.commit()
    barrier, results, errors = threading.Barrier(2, timeout=30), [], []

    def upload(key: str) -> None:
        checked = []

        def existing() -> Shard | None:
            found = session.scalar(select(Shard).where(Shard.job_id == job_id))
            if not checked:
                checked.append(True)
                barrier.wait()  # both threads have seen no row
            return found

        with factory() as session:
            try:
                repo.create_silo(session, name=f"silo-{key[0]}")  # earlier work in the same transaction
                shard, created = repo._insert_once(session, _shard_row(job_id, key), existing)
                results.append((created, shard.blob_key))
                session.commit()
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=upload, args=(k,)) for k in (KEY_A, KEY_B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(created for created, _ in results) == [False, True]
    winner = next(key for created, key in results if created)
    assert all(key == winner for _, key in results)
    with factory() as session:
        assert {"silo-a", "silo-b"} <= {s.name for s in repo.list_silos(session)}
        assert len(repo.list_shards(session, job_id=job_id)) == 1
