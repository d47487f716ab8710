"""`StorageSettings`: where the database, the blob store and the faiss indexes live. Standard library only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StorageSettings:
    """Storage locations.

    Attributes:
        database_url: SQLAlchemy URL, ``sqlite:///...`` or ``postgresql+psycopg://...``.
        blob_dir: root of the content-addressed blob store.
        index_dir: directory of saved faiss indexes.
    """

    database_url: str
    blob_dir: Path
    index_dir: Path

    @classmethod
    def under(cls, data_dir: Path, database_url: str | None = None) -> StorageSettings:
        """Everything under ``data_dir``: ``clues.db`` (unless ``database_url`` is given), ``blobs/``, ``indexes/``."""
        data_dir = Path(data_dir)
        return cls(
            database_url=database_url or f"sqlite:///{data_dir}/clues.db",
            blob_dir=data_dir / "blobs",
            index_dir=data_dir / "indexes",
        )
