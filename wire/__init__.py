"""What the coordinator and the silos agree on over the wire, in one place and importing only the standard library:
the API's path prefix, the upload checksum header, the owner name of the anchor samples, and how a bearer token is
hashed. The coordinator (`app`, `storage`, `workers`), the silo (`agent`) and the ML core (`scoring`) all import it;
it imports none of them.
"""

from __future__ import annotations

import hashlib

API_PREFIX = "/v1"
"""Every REST route lives under it (``/v1/jobs``, ``/v1/silos``, ``/v1/train``)."""

SHA256_HEADER = "X-Content-SHA256"
"""A binary upload's sha256 (hex): the coordinator checks it, and an upload with a held checksum is a no-op."""

ANCHOR_OWNER = "__anchor__"
"""The owner (silo) name under which the coordinator's anchor samples are projected, scored and listed; no silo may
take it."""


def hash_token(token: str) -> str:
    """The sha256 hex digest of a bearer token: what the coordinator stores and looks up, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()
