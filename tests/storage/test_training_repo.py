"""Training-job repository functions on SQLite and PostgreSQL (migrated schema): members, idempotent round opening,
idempotent / conflicting updates, exactly-once claim and close (also under a race), ordering of rounds and updates."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage import repository as repo
from storage.db import make_engine, make_session_factory, upgrade
from storage.errors import ConflictError, NotFoundError
from storage.models import TrainJob, utcnow
from tests.storage.factories import KEY_A, KEY_B

KEY_C = "c" * 64


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def factory(request, tmp_path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a freshly migrated database (the 0003 migration included)."""
    url = f"sqlite:///{tmp_path}/db/clues.db"
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _job(session: Session, silos=("alpha", "beta", "gamma"), **over) -> TrainJob:
    for name in silos:
        repo.create_silo(session, name=name)
    fields = {
        "name": "warm",
        "mode": "warmup",
        "model": "tiny:0",
        "settings": {"lora": {"rank": 4}, "checkpoint_rounds": [0, 1]},
        "rounds": 2,
        "quorum": 2,
        "round_timeout_s": 60.0,
        "scoring_job_id": None,
        "silo_names": list(silos),
    }
    return repo.create_train_job(session, **{**fields, **over})


def _update(session: Session, job_id: str, round: int, silo_id: int, key: str, n: int = 5) -> bool:
    return repo.add_update(
        session, job_id=job_id, round=round, silo_id=silo_id, blob_key=key, size_bytes=123, num_samples=n,
        score_mass=0.5, train_loss=1.25,
    )  # fmt: skip


def _open(session: Session, job_id: str, round: int, key: str = KEY_A):
    return repo.open_round(session, job_id=job_id, round=round, lr=1e-3, start_blob=key, deadline=utcnow())


def test_create_train_job_with_members(factory):
    with factory() as session:
        job = _job(session)
        session.commit()
        job_id = job.id
    with factory() as session:
        got = repo.get_train_job(session, job_id=job_id)
        assert len(got.id) == 32 and (got.status, got.round, got.progress, got.message) == ("draft", 0, 0.0, "")
        assert got.layout is None and got.final_blob is None and got.settings["checkpoint_rounds"] == [0, 1]
        assert [m.silo.name for m in got.members] == ["alpha", "beta", "gamma"]
        assert all(m.num_samples is None for m in got.members)
        assert got.created_at.tzinfo is not None
        alpha = got.members[0].silo_id
        assert repo.get_train_member(session, job_id=job_id, silo_id=alpha).silo.name == "alpha"
        assert [j.id for j in repo.list_train_jobs(session, silo_id=alpha)] == [job_id]
        assert repo.list_train_jobs(session, status="running") == []
        with pytest.raises(NotFoundError):
            repo.get_train_job(session, job_id="0" * 32)
        with pytest.raises(TypeError, match="not updatable"):
            repo.update_train_job(session, job_id=job_id, id="x")


def test_create_train_job_names_every_unknown_silo(factory):
    with factory() as session:
        repo.create_silo(session, name="alpha")
        with pytest.raises(NotFoundError, match="'ghost', 'zed'"):
            _job(session, silos=(), silo_names=["alpha", "ghost", "zed"])


def test_open_round_is_idempotent(factory):
    with factory() as session:
        job_id = _job(session).id
        row, created = _open(session, job_id, 0, KEY_A)
        session.commit()
        assert created and row.status == "open" and row.deadline.tzinfo is not None
    with factory() as session:
        again, created = _open(session, job_id, 0, KEY_B)  # a redelivered task: the first round stands
        assert not created and again.start_blob == KEY_A
        session.commit()
        assert [r.round for r in repo.list_rounds(session, job_id=job_id)] == [0]
        with pytest.raises(NotFoundError, match="no round 1"):
            repo.get_round(session, job_id=job_id, round=1)


def test_add_update_is_idempotent_and_refuses_other_bytes(factory):
    with factory() as session:
        job = _job(session)
        job_id, alpha = job.id, job.members[0].silo_id
        _open(session, job_id, 0)
        assert _update(session, job_id, 0, alpha, KEY_A, n=7) is True
        session.commit()
    with factory() as session:
        assert _update(session, job_id, 0, alpha, KEY_A, n=7) is False  # the same bytes again
        with pytest.raises(ConflictError, match="already holds another update"):
            _update(session, job_id, 0, alpha, KEY_B)
        session.commit()  # the conflict left the transaction usable
        held = repo.get_update(session, job_id=job_id, round=0, silo_id=alpha)
        assert held.blob_key == KEY_A and held.num_samples == 7
        assert repo.get_train_member(session, job_id=job_id, silo_id=alpha).num_samples == 7
        assert repo.get_update(session, job_id=job_id, round=0, silo_id=job.members[1].silo_id) is None


def test_claim_and_close_happen_exactly_once(factory):
    with factory() as session:
        job_id = _job(session).id
        _open(session, job_id, 0)
        session.commit()
    with factory() as session:
        assert not repo.close_round(session, job_id=job_id, round=0, result_blob=KEY_B, participants=[], train_loss=0)
        assert repo.claim_round(session, job_id=job_id, round=0) is True
        session.commit()
    with factory() as session:
        assert repo.claim_round(session, job_id=job_id, round=0) is False
        closed = repo.close_round(
            session, job_id=job_id, round=0, result_blob=KEY_B, participants=["beta", "alpha"], train_loss=0.5
        )
        assert closed is True
        session.commit()
    with factory() as session:
        again = repo.close_round(session, job_id=job_id, round=0, result_blob=KEY_C, participants=[], train_loss=9)
        assert again is False
        assert repo.claim_round(session, job_id=job_id, round=0) is False
        row = repo.get_round(session, job_id=job_id, round=0)
        assert (row.status, row.result_blob, row.participants, row.train_loss) == (
            "closed", KEY_B, ["beta", "alpha"], 0.5,
        )  # fmt: skip
        assert row.closed_at is not None and row.closed_at >= row.started_at - timedelta(seconds=1)


def _race(factory, job_id: str, action, n: int = 6) -> list[bool]:
    """``action(session)`` in ``n`` threads at once, each in its own committed transaction."""
    barrier, results = threading.Barrier(n), []

    def run() -> None:
        with factory() as session:
            barrier.wait()
            results.append(action(session))
            session.commit()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_claim_and_close_race_has_one_winner(factory):
    with factory() as session:
        job_id = _job(session).id
        _open(session, job_id, 0)
        session.commit()
    claims = _race(factory, job_id, lambda s: repo.claim_round(s, job_id=job_id, round=0))
    assert sorted(claims) == [False] * 5 + [True]
    closes = _race(
        factory,
        job_id,
        lambda s: repo.close_round(s, job_id=job_id, round=0, result_blob=KEY_B, participants=["a"], train_loss=1),
    )
    assert sorted(closes) == [False] * 5 + [True]


def test_rounds_and_updates_are_listed_in_order(factory):
    with factory() as session:
        job = _job(session)
        job_id, ids = job.id, [m.silo_id for m in job.members]
        for r in (2, 0, 1):
            _open(session, job_id, r)
        for silo_id in reversed(ids):
            _update(session, job_id, 1, silo_id, KEY_A)
        _update(session, job_id, 0, ids[1], KEY_B)
        session.commit()
    with factory() as session:
        assert [r.round for r in repo.list_rounds(session, job_id=job_id)] == [0, 1, 2]
        assert [u.silo.name for u in repo.list_updates(session, job_id=job_id, round=1)] == ["alpha", "beta", "gamma"]
        assert [u.silo.name for u in repo.list_updates(session, job_id=job_id, round=0)] == ["beta"]
        assert repo.list_updates(session, job_id=job_id, round=2) == []
        repo.set_round_metrics(session, job_id=job_id, round=1, metrics={"loss": 1.5})
        session.commit()
        assert repo.get_round(session, job_id=job_id, round=1, refresh=True).metrics == {"loss": 1.5}


def test_deleting_a_train_job_cascades(factory):
    with factory() as session:
        job = _job(session)
        job_id = job.id
        _open(session, job_id, 0)
        _update(session, job_id, 0, job.members[0].silo_id, KEY_A)
        session.commit()
    with factory() as session:
        session.delete(repo.get_train_job(session, job_id=job_id))
        session.commit()
    with factory() as session:
        assert repo.list_rounds(session, job_id=job_id) == []
        assert repo.list_updates(session, job_id=job_id, round=0) == []


def test_lock_open_round_only_holds_an_open_round(factory):
    with factory() as session:
        job_id = _job(session).id
        _open(session, job_id, 0)
        session.commit()
    with factory() as session:
        assert repo.lock_open_round(session, job_id=job_id, round=0) is True
        assert repo.lock_open_round(session, job_id=job_id, round=1) is False  # never opened
        session.commit()
        assert repo.get_round(session, job_id=job_id, round=0, refresh=True).status == "open"
        repo.claim_round(session, job_id=job_id, round=0)
        session.commit()
        assert repo.lock_open_round(session, job_id=job_id, round=0) is False


def test_a_claim_waits_for_an_upload_holding_the_round_and_then_sees_its_update(factory):
    """The upload route records under `lock_open_round`: a worker claiming meanwhile must wait, so the update it
    then lists includes the upload's (no update is stored for a round aggregated without it)."""
    with factory() as session:
        job = _job(session)
        job_id, alpha = job.id, job.members[0].silo_id
        _open(session, job_id, 0)
        session.commit()
    seen: list = []

    def worker() -> None:
        with factory() as s:
            seen.append(repo.claim_round(s, job_id=job_id, round=0))
            seen.append([u.silo.name for u in repo.list_updates(s, job_id=job_id, round=0)])
            s.commit()

    with factory() as upload:
        assert repo.lock_open_round(upload, job_id=job_id, round=0)
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and seen == []  # the claim waits for the upload's transaction
        _update(upload, job_id, 0, alpha, KEY_A)
        upload.commit()
    thread.join(30)
    assert seen == [True, ["alpha"]]
    with factory() as late:
        assert repo.lock_open_round(late, job_id=job_id, round=0) is False  # a later upload is refused
