"""The migration, the repository and the dashboard's queries on a real PostgreSQL server (a throwaway database per
test)."""

from __future__ import annotations

import threading
import time
from datetime import UTC

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select, text

from storage import repository as repo
from storage import scores as score_store
from storage.db import make_engine, make_session_factory, ping, upgrade
from storage.errors import ConflictError
from storage.models import Base, JobCheckpoint, Score, Shard
from storage.scores import ScoreQuery
from tests.seed import seed_scored_job
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
        assert score_store.query_scores(session, job_id=job.id, query=score_store.ScoreQuery())[1][0].parts == [
            0.25,
            0.25,
        ]
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


def test_migration_0004_keeps_the_decisions_of_existing_scores(postgres_url):
    engine = make_engine(postgres_url)
    upgrade(engine, "0003_training")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, name, model, lora, projection, similarity, threshold, precondition, options,"
                " status, anchor_status, progress, message, created_at, updated_at) VALUES (:id, 'old', 'tiny:0',"
                " '{}', '{}', 'cosine', '{}', true, '{}', 'done', 'done', 1.0, '', now(), now())"
            ),
            {"id": "a" * 32},
        )
        conn.execute(
            text(
                "INSERT INTO scores (job_id, owner, sample_id, row, score, parts, selected) VALUES"
                " (:id, 'alpha', 'kept', 0, 0.9, '[0.9]', true), (:id, 'alpha', 'dropped', 1, 0.1, '[0.1]', false)"
            ),
            {"id": "a" * 32},
        )
    upgrade(engine)
    with engine.connect() as conn:
        got = conn.execute(text("SELECT sample_id, selected, auto_selected, override_id FROM scores ORDER BY row"))
        assert [tuple(r) for r in got] == [("kept", True, True, None), ("dropped", False, False, None)]
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata) == []
    engine.dispose()


def _order(rows: list[Score], sort: str, descending: bool) -> list[tuple[str, str]]:
    """The documented order, computed in Python: the key, then (owner, row) ascending."""
    base = sorted(rows, key=lambda r: (r.owner, r.row))
    if sort == "row":
        ordered = base[::-1] if descending else base
    elif sort.startswith("part:"):
        ordered = sorted(base, key=lambda r: r.parts[int(sort[5:])], reverse=descending)
    else:
        ordered = sorted(base, key=lambda r: getattr(r, {"silo": "owner"}.get(sort, sort)), reverse=descending)
    return [(r.owner, r.sample_id) for r in ordered]


def test_score_queries(pg_engine):
    """Sorting by a JSON array element (``part:<t>``), the escaped case-insensitive id search and the summary."""
    ids = [f"{p}{i:03d}" for i, p in zip(range(12), ["Doc_A", "doc%A", "DOCxA"] * 4, strict=True)]
    with make_session_factory(pg_engine)() as session:
        job = seed_scored_job(
            session, silos=("alpha", "beta"), per_silo=(12, 9), anchors=6, checkpoints=3, sample_ids={"alpha": ids}
        )
        rows = list(session.scalars(select(Score).where(Score.job_id == job.job_id)))
        for sort in ("part:0", "part:2", "score", "row", "silo", "selected"):
            for descending in (False, True):
                query = ScoreQuery(sort=sort, descending=descending)
                total, page = score_store.query_scores(session, job_id=job.job_id, query=query)
                assert total == 27
                assert [(r.owner, r.sample_id) for r in page] == _order(rows, sort, descending), (sort, descending)
                streamed = score_store.iter_scores(session, job_id=job.job_id, query=query, batch=5)
                assert [(r.owner, r.sample_id) for r in streamed] == _order(rows, sort, descending)
        for needle, prefix in (("c_a", "Doc_A"), ("%A", "doc%A"), ("cXa", "DOCxA")):
            total, page = score_store.query_scores(session, job_id=job.job_id, query=ScoreQuery(id_contains=needle))
            assert total == 4 and [r.sample_id for r in page] == [i for i in ids if i.startswith(prefix)], needle
        query = ScoreQuery(owner="alpha", selected=False, sort="part:1", descending=True)
        total, page = score_store.query_scores(session, job_id=job.job_id, query=query, limit=2, offset=1)
        want = _order([r for r in rows if r.owner == "alpha" and not r.selected], "part:1", True)
        assert total == len(want) and [(r.owner, r.sample_id) for r in page] == want[1:3]
        summary = score_store.build_summary(session, job_id=job.job_id)
        assert {o: s["n"] for o, s in summary["owners"].items()} == {"alpha": 12, "beta": 9, "__anchor__": 6}


def test_concurrent_overrides_of_one_sample_apply_in_order(pg_engine):
    """The second override waits on the first's row lock and then records the first's decision as its previous."""
    factory = make_session_factory(pg_engine)
    with factory() as session:
        job = seed_scored_job(session, silos=("alpha", "beta"), per_silo=3, anchors=2, duplicates=0)
    sid = job.sample_ids["alpha"][0]
    with factory() as session:
        was = session.get(Score, (job.job_id, "alpha", sid)).selected
    first_done, release = threading.Event(), threading.Event()
    results, errors = {}, []

    def run(name: str, decision: str) -> None:
        try:
            with factory() as session:
                if name == "second":
                    first_done.wait(30)
                record = score_store.override(
                    session, job_id=job.job_id, owner="alpha", sample_id=sid, decision=decision, reason=name,
                    actor="alpha",
                )  # fmt: skip
                results[name] = (record.id, record.previous, record.selected)
                if name == "first":
                    first_done.set()
                    release.wait(30)
                session.commit()
        except BaseException as exc:
            errors.append(exc)
            first_done.set()

    threads = [
        threading.Thread(target=run, args=("first", "drop" if was else "keep")),
        threading.Thread(target=run, args=("second", "auto")),
    ]
    for t in threads:
        t.start()
    try:
        assert first_done.wait(30)
        with pg_engine.connect() as conn:  # the second transaction is waiting on a lock, not done
            deadline = time.monotonic() + 120  # generous: a loaded 2-core CI machine took over 10 s to get there
            while True:
                waiting = conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                ).scalar()
                if waiting or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        assert waiting == 1 and "second" not in results
    finally:
        release.set()
        for t in threads:
            t.join()
    assert errors == []
    assert results["first"][1:] == (was, not was)
    assert results["second"][1:] == (not was, was)  # saw the first's committed decision, then back to the threshold
    assert results["second"][0] > results["first"][0]
    with factory() as session:
        row = session.get(Score, (job.job_id, "alpha", sid))
        assert (row.selected, row.override_id) == (was, None)
        total, log = score_store.list_overrides(session, job_id=job.job_id)
        assert total == 2 and [o.reason for o in log] == ["second", "first"]
