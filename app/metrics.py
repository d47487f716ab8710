"""Prometheus metrics (``GET /metrics``) and one structured log line per request."""

from __future__ import annotations

import json
import logging
import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from app.deps import AdminDep

log = logging.getLogger("clues.api")

REQUESTS = Counter("clues_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("clues_http_request_seconds", "HTTP request latency", ["method", "route"])
UPLOAD_BYTES = Counter("clues_upload_bytes_total", "accepted upload bytes", ["kind"])
TASKS = Counter("clues_tasks_enqueued_total", "tasks handed to the workers", ["task"])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields given as ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def install(app: FastAPI) -> None:
    """Time and count every request by route template (not raw path: ids would explode the label space)."""

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(request.scope.get("route"), "path", "unmatched")
            REQUESTS.labels(request.method, route, str(status)).inc()
            LATENCY.labels(request.method, route).observe(elapsed)
            log.info(
                "%s %s %d",
                request.method,
                request.url.path,
                status,
                extra={
                    "fields": {
                        "event": "request",
                        "method": request.method,
                        "path": request.url.path,
                        "route": route,
                        "status": status,
                        "ms": round(elapsed * 1000, 2),
                        "request_id": request.scope.get("state", {}).get("request_id"),
                    }
                },
            )

    @app.get("/metrics", include_in_schema=False)
    def metrics(_: AdminDep) -> Response:
        """Prometheus text format, for the admin token only (scrape with ``authorization: {credentials: ...}``):
        route names, task counts and upload volumes are the coordinator's business, not the silos'."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
