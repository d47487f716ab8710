"""The `StorageError` hierarchy. Messages are shown to users as they are, so each one names the thing concerned.

`app/errors.py` maps `NotFoundError` to 404, `UnknownReferenceError` to 422 and `ConflictError` to 409;
`TransientStorageError` is the only one worth retrying.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every storage error."""


class NotFoundError(StorageError):
    """A row or blob does not exist."""


class UnknownReferenceError(NotFoundError):
    """A request names rows that do not exist in one of its fields (a job's silos): bad input rather than a missing
    resource, so `app/errors.py` maps it to 422."""


class ConflictError(StorageError):
    """The request contradicts what is stored (a taken name, other bytes for an existing slot)."""


class IntegrityError(StorageError):
    """Bytes do not match their checksum: a corrupt blob, a wrong ``X-Content-SHA256`` or a mismatched index."""


class BlobTooLarge(StorageError):
    """An upload passed its size limit."""


class TransientStorageError(StorageError):
    """The database or disk is unreachable for now; retrying may help."""
