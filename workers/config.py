"""`ServiceSettings`: what a coordinator process (Celery worker or API) needs to reach storage and the broker.

Read from the environment with prefix ``CLUES_`` (pydantic-settings), e.g. ``CLUES_DATA_DIR``, ``CLUES_REDIS_URL``.
With no ``CLUES_REDIS_URL`` the broker and result backend are kombu's SQLAlchemy transport on SQLite files under the
data directory, so one machine runs API + worker with no server at all (the embedded default).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from storage.config import StorageSettings


class ServiceSettings(BaseSettings):
    """Storage, broker, lease and compute settings: the workers read them, and the API (`app.config.AppSettings`)
    extends them.

    Attributes:
        data_dir: SQLite database, blob store, faiss indexes, broker files and work directories live here.
        database_url: SQLAlchemy URL (default: SQLite under ``data_dir``); ``postgresql+psycopg://...`` for PostgreSQL.
        redis_url: broker and result backend; None selects the server-less SQLite transport.
        visibility_timeout: seconds before Redis hands an unacknowledged task to another worker. Recovery from a
            dead worker does not wait for it: the step leases below do that; a redelivery of a step that is
            running, done or failed is a no-op.
        heartbeat_s: how often a worker refreshes the lease of the step it runs.
        lease_timeout_s: a running step whose heartbeat is older than this is taken to be on a dead worker and is
            sent again (`workers.steps`).
        reap_every_s: how often the API's reaper looks for stale leases and lost messages.
        resend_after_s: a queued step not claimed this long after it was due is sent again (doubling per attempt,
            at most ``visibility_timeout``): its message may have been lost with a worker that had prefetched it.
        max_lost: a step whose worker died this many times is failed with a message (a step that kills its worker,
            e.g. out of memory, is not retried forever).
        device, dtype: where the anchor gradients are computed.
        cache_dir: converted model weights (default ``~/.cache/clues/models``).
        engine, batch_size: per-sample gradient engine and batch size for the anchor projections.
    """

    model_config = SettingsConfigDict(env_prefix="CLUES_", extra="ignore")

    data_dir: Path = Path("clues-data")
    database_url: str | None = None
    redis_url: str | None = None
    visibility_timeout: int = Field(3600, ge=1)
    heartbeat_s: float = Field(10.0, gt=0)
    lease_timeout_s: float = Field(45.0, gt=0)
    reap_every_s: float = Field(15.0, gt=0)
    resend_after_s: float = Field(120.0, gt=0)
    max_lost: int = Field(3, ge=1)
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: Path | None = None
    engine: str = "hooks"
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> ServiceSettings:
        if self.lease_timeout_s < 3 * self.heartbeat_s:
            raise ValueError(
                f"lease_timeout_s ({self.lease_timeout_s}) must be at least 3 × heartbeat_s ({self.heartbeat_s}): "
                "one late heartbeat must not hand a live step to a second worker"
            )
        return self

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
