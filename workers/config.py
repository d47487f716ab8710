"""`WorkerSettings`: what a coordinator process (Celery worker or API) needs to reach storage and the broker.

Read from the environment with prefix ``CLUES_`` (pydantic-settings), e.g. ``CLUES_DATA_DIR``, ``CLUES_REDIS_URL``.
With no ``CLUES_REDIS_URL`` the broker and result backend are kombu's SQLAlchemy transport on SQLite files under the
data directory, so one machine runs API + worker with no server at all (the embedded default).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from storage.config import StorageSettings


class WorkerSettings(BaseSettings):
    """Storage, broker and compute settings shared by the API and the workers.

    Attributes:
        data_dir: SQLite database, blob store, faiss indexes, broker files and work directories live here.
        database_url: SQLAlchemy URL (default: SQLite under ``data_dir``); ``postgresql+psycopg://...`` for PostgreSQL.
        redis_url: broker and result backend; None selects the server-less SQLite transport.
        visibility_timeout: seconds before Redis hands an unacknowledged task to another worker (a worker died).
        device, dtype: where the anchor gradients are computed.
        cache_dir: converted model weights (default ``~/.cache/clues/models``).
        engine, batch_size: per-sample gradient engine and batch size for the anchor projections.
    """

    model_config = SettingsConfigDict(env_prefix="CLUES_", extra="ignore")

    data_dir: Path = Path("clues-data")
    database_url: str | None = None
    redis_url: str | None = None
    visibility_timeout: int = Field(3600, ge=1)
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: Path | None = None
    engine: str = "hooks"
    batch_size: int = Field(8, ge=1)

    @property
    def storage(self) -> StorageSettings:
        return StorageSettings.under(self.data_dir, self.database_url)

    @property
    def broker_url(self) -> str:
        return self.redis_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def result_backend(self) -> str:
        return self.redis_url or f"db+sqlite:///{(self.data_dir / 'results.sqlite').resolve()}"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    @property
    def model_cache_dir(self) -> Path | None:
        return self.cache_dir / "models" if self.cache_dir else None
