"""Engine settings, the migration against the models, ping, and StorageSettings."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select, text

from storage import repository as repo
from storage.config import StorageSettings
from storage.db import make_engine, make_session_factory, ping, upgrade
from storage.errors import StorageError, TransientStorageError
from storage.models import Base, Silo


def test_settings_under(tmp_path: Path):
    s = StorageSettings.under(tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path}/clues.db"
    assert (s.blob_dir, s.index_dir) == (tmp_path / "blobs", tmp_path / "indexes")
    assert StorageSettings.under(tmp_path, "postgresql+psycopg://x/y").database_url == "postgresql+psycopg://x/y"


def test_sqlite_engine_pragmas_and_parent_dir(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path}/deep/er/clues.db")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert (tmp_path / "deep" / "er" / "clues.db").is_file()
    ping(engine)
    engine.dispose()


def test_migration_matches_models_and_is_idempotent(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path}/clues.db")
    upgrade(engine)
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0011_withdrawals"
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    engine.dispose()


def test_concurrent_upgrades_wait_for_each_other(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path}/clues.db")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            upgrade(engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine.dispose()


def test_sqlite_savepoint_outside_a_transaction_stays_nested(tmp_path: Path):
    """Without the BEGIN hook, a first SAVEPOINT would be the transaction and its RELEASE would commit."""
    engine = make_engine(f"sqlite:///{tmp_path}/clues.db")
    Base.metadata.create_all(engine)
    factory = make_session_factory(engine)
    with factory() as session:
        with session.begin_nested():
            repo.create_silo(session, name="alpha")
        session.rollback()
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Silo)) == 0
    engine.dispose()


def test_in_memory_sqlite_is_shared_across_threads():
    engine = make_engine("sqlite://")
    Base.metadata.create_all(engine)
    factory = make_session_factory(engine)

    def create() -> None:
        with factory() as session:
            repo.create_silo(session, name="alpha")
            session.commit()

    t = threading.Thread(target=create)
    t.start()
    t.join()
    with factory() as session:
        assert [s.name for s in repo.list_silos(session)] == ["alpha"]


def test_ping_unreachable_raises_storage_error():
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(TransientStorageError, match="unreachable") as info:
        ping(engine)
    assert isinstance(info.value, StorageError)
