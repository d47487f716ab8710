"""clues storage: SQLAlchemy metadata, blob store for projection shards and adapters, faiss indexes (issue #3)."""
