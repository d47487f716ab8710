"""The one place where domain errors become HTTP responses: ``{"detail": "<message>"}`` with a 4xx code (request
validation errors included: the same shape, one message naming each field)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from app.services import QueueUnavailable
from scoring.errors import ConfigError, DataError, IncompatibleArtifactError, ScoringError
from storage.blobs import BlobTooLarge
from storage.errors import ConflictError, IntegrityError, NotFoundError, StorageError, UnknownReferenceError


class ApiError(Exception):
    """An error with an HTTP status, raised by routes and dependencies."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def _status(exc: Exception) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, QueueUnavailable):
        return 503
    if isinstance(exc, UnknownReferenceError):
        return 422
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, BlobTooLarge):
        return 413
    if isinstance(exc, IntegrityError):
        return 400
    if isinstance(exc, ConfigError | DataError | IncompatibleArtifactError | ScoringError):
        return 422
    return 503  # storage unreachable or another server-side storage problem


PageErrors = tuple[Callable[[Request], bool], Callable[[Request, int, str], Response]]


def install(app: FastAPI, pages: PageErrors | None = None) -> None:
    """Register the handlers on ``app``; ``pages``: (is this request for a page?, render the error as a page)."""

    async def handle(request: Request, exc: Exception) -> Response:
        status = _status(exc)
        if pages is not None and pages[0](request):
            return pages[1](request, status, str(exc))
        headers = exc.headers if isinstance(exc, ApiError) else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        detail = validation_message(exc.errors())
        if pages is not None and pages[0](request):
            return pages[1](request, 422, detail)
        return JSONResponse({"detail": detail}, status_code=422)

    for kind in (ApiError, StorageError, ScoringError, QueueUnavailable):
        app.add_exception_handler(kind, handle)
    app.add_exception_handler(RequestValidationError, invalid)


def validation_message(errors: Sequence[Mapping]) -> str:
    """FastAPI's request validation errors as one message naming each field (``query.offset: ...; body.name: ...``):
    the same ``{"detail": "<message>"}`` shape as every other error."""
    parts = []
    for error in errors[:10]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more
