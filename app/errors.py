"""The one place where domain errors become HTTP responses: ``{"detail": "<message>"}`` with a 4xx code."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from scoring.errors import ConfigError, DataError, IncompatibleArtifactError, ScoringError
from storage.blobs import BlobTooLarge
from storage.errors import ConflictError, IntegrityError, NotFoundError, StorageError


class ApiError(Exception):
    """An error with an HTTP status, raised by routes and dependencies."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def _status(exc: Exception) -> int:
    if isinstance(exc, ApiError):
        return exc.status
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

    for kind in (ApiError, StorageError, ScoringError):
        app.add_exception_handler(kind, handle)
