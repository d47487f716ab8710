"""Binary request bodies streamed to the blob store's temp area, checksummed, capped and validated before they are
committed: a refused or half-received body leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.deps import AppState
from app.errors import ApiError
from app.metrics import UPLOAD_BYTES
from app.schemas import UploadResult
from storage.blobs import BlobRef, BlobWriter
from wire import SHA256_HEADER

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
WRITE_BLOCK = 8 << 20
"""Bytes of the body gathered before they are hashed and written in a worker thread (double-buffered)."""

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
    request: Request,
    state: AppState,
    kind: str,
    sha: str,
    validate: Callable[[Path], T],
    record: Callable[[T, int], bool] | None = None,
) -> tuple[BlobRef, T, bool]:
    """Stream the body into a blob writer, check size and SHA-256, ``validate(path)`` it, ``record`` it, then
    commit the blob.

    Args:
        kind: names the upload in metrics.
        sha: the body's announced SHA-256 (`expected_sha256`).
        validate: called with the temp file's path before anything is committed; raises to refuse.
        record: ``record(validated, size)`` adds the upload's database rows (flushed, not committed) before the blob
            is committed, so that a constraint the database enforces (an id already in another part) refuses the
            upload while nothing is stored yet, and returns whether it created them (False: a concurrent upload of
            the same bytes got there first); the caller commits the session after this returns.

    Returns:
        The committed blob, what ``validate`` returned, and whether this upload created the record (True when
        there is no ``record``).
    """
    cap = state.settings.max_upload_bytes
    _check_length(request, cap)
    with state.blobs.writer(expected_sha256=sha, max_bytes=cap) as writer:
        await _stream_into(request, writer)
        if writer.size == 0:
            raise ApiError(400, "empty body")
        if writer.sha256 != sha:
            raise ApiError(400, f"body SHA-256 {writer.sha256} does not match {SHA256_HEADER} {sha}")
        path = writer.path
        # Start the disk flush now, beside the validation: commit's own fsync then finds nothing left to write.
        flush = asyncio.ensure_future(run_in_threadpool(_flush_to_disk, path))
        try:
            result = await run_in_threadpool(validate, path)  # parsing and checks: off the event loop
        finally:
            await asyncio.wait([flush])
        created = True
        if record is not None:
            created = await run_in_threadpool(record, result, writer.size)
        ref = await run_in_threadpool(writer.commit)
    UPLOAD_BYTES.labels(kind).inc(ref.size)
    return ref, result, created


async def _stream_into(request: Request, writer: BlobWriter) -> None:
    """Feed the body to ``writer`` in `WRITE_BLOCK` pieces, each hashed and written in a worker thread while the
    event loop receives the next one (hashlib and file writes release the GIL), so the SHA-256 runs beside the
    HTTP parsing instead of after it. At most one block is in flight, and it has finished when this returns or
    raises, so the writer is never used by two threads at once nor closed under a write."""
    pending: asyncio.Future | None = None
    block = bytearray()
    try:
        async for chunk in request.stream():
            block += chunk
            if len(block) >= WRITE_BLOCK:
                if pending is not None:
                    await pending  # raises what the write raised (e.g. BlobTooLarge)
                pending = asyncio.ensure_future(run_in_threadpool(writer.write, block))
                block = bytearray()
        if pending is not None:
            await pending
        if block:
            writer.write(block)
    finally:
        if pending is not None and not pending.done():
            await asyncio.wait([pending])
        if pending is not None and pending.done() and not pending.cancelled():
            pending.exception()  # retrieved: the error that matters is already propagating


def _flush_to_disk(path: Path) -> None:
    """fsync ``path`` through a file descriptor of its own; best effort (`BlobWriter.commit` fsyncs again)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def upload_answer(sha: str, size: int | None, created: bool) -> JSONResponse:
    """201 with the stored blob's checksum and size when this upload stored it; 200 when it was held already."""
    body = UploadResult(sha256=sha, size=size or 0, created=created)
    return JSONResponse(body.model_dump(), status_code=201 if created else 200)
