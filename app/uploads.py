"""Binary request bodies streamed to the blob store's temp area, checksummed, capped and validated before they are
committed: a refused or half-received body leaves nothing behind."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from app.deps import AppState
from app.errors import ApiError
from app.metrics import UPLOAD_BYTES
from storage.blobs import BlobRef

SHA256_HEADER = "X-Content-SHA256"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

T = TypeVar("T")


def expected_sha256(request: Request) -> str:
    value = request.headers.get(SHA256_HEADER, "").strip().lower()
    if not _HEX64.match(value):
        raise ApiError(400, f"header {SHA256_HEADER} must be the body's SHA-256 as 64 hex digits")
    return value


def already_held(held_key: str | None, sha: str, what: str) -> bool:
    """True when ``what`` is held with these very bytes (an idempotent re-upload: answer 200 without reading the
    body); 409 when it is held with other bytes."""
    if held_key is None:
        return False
    if held_key != sha:
        raise ApiError(409, f"{what} is already held with other content (sha256 {held_key}); it cannot be replaced")
    return True


def _check_length(request: Request, cap: int) -> None:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "Content-Length must be a non-negative integer")
        if int(length) > cap:
            raise ApiError(413, f"body of {int(length)} bytes is over the {cap}-byte limit")
        if int(length) == 0:
            raise ApiError(400, "empty body")


async def receive(
    request: Request, state: AppState, kind: str, sha: str, validate: Callable[[Path], T]
) -> tuple[BlobRef, T]:
    """Stream the body into a blob writer, check size and SHA-256, ``validate(path)`` it, then commit it.

    Args:
        kind: names the upload in metrics.
        sha: the body's announced SHA-256 (`expected_sha256`).
        validate: called with the temp file's path before anything is committed; raises to refuse.

    Returns:
        The committed blob and what ``validate`` returned.
    """
    cap = state.settings.max_upload_bytes
    _check_length(request, cap)
    with state.blobs.writer(expected_sha256=sha, max_bytes=cap) as writer:
        async for chunk in request.stream():
            writer.write(chunk)
        if writer.size == 0:
            raise ApiError(400, "empty body")
        if writer.sha256 != sha:
            raise ApiError(400, f"body SHA-256 {writer.sha256} does not match {SHA256_HEADER} {sha}")
        result = await run_in_threadpool(validate, writer.path)  # parsing and checks: off the event loop
        ref = await run_in_threadpool(writer.commit)
    UPLOAD_BYTES.labels(kind).inc(ref.size)
    return ref, result
