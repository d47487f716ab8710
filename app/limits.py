"""What every request meets before any route: a request id, security headers, bounds on what a client may send,
a rate limit on failed authentication, and a JSON 500 (logged with the request id) for anything unexpected.

`RequestGuard` is plain ASGI middleware, so it acts before FastAPI reads a body:

- **Request id**: ``X-Request-ID`` on every response, in the request log line and in any 500's message.
- **Security headers** on every response (`webui.SECURITY_HEADERS`: no framing, no sniffing, a strict CSP).
- **Query strings** with a NUL byte, a lone surrogate or invalid UTF-8 are refused (422): no database can store them.
- **Bodies other than binary uploads** (JSON, forms) are capped at ``max_json_bytes``: a ``Content-Length`` above it
  is refused (413) before a byte is read, and a streamed body is counted as it arrives. A JSON body nested deeper
  than ``max_json_depth`` or holding an escaped NUL or lone surrogate is refused (422) before it is parsed. Binary
  uploads (``application/octet-stream``) are streamed to disk by `app.uploads` under their own cap.

`AuthLimiter` counts failed authentications per client address in a sliding window; past the limit the address
gets 429 with ``Retry-After`` until the window has room again, whatever token it sends.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from webui import SECURITY_HEADERS

log = logging.getLogger("clues.api")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000", re.IGNORECASE)
_HIGH = rb"\\u[dD][89abAB][0-9a-fA-F]{2}"
_LOW = rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*(?:" + _HIGH + rb"(?!" + _LOW + rb")|(?<!" + _HIGH + rb")" + _LOW + rb")"
)


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in ``body`` (JSON text), without parsing it."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRINGS.sub(b'""', body)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def json_problem(body: bytes, max_depth: int) -> str | None:
    """Why a JSON body is refused before it is parsed, or None."""
    depth = json_depth(body)
    if depth > max_depth:
        return f"the JSON body is nested {depth} levels deep; at most {max_depth} are allowed"
    for string in _STRINGS.finditer(body):
        if _NUL_ESCAPE.search(string.group()):
            return "a string in the JSON body contains NUL (\\u0000), which nothing here can store"
        if _LONE_SURROGATE.search(string.group()):
            return "a string in the JSON body contains a lone surrogate (invalid Unicode)"
    return None


def query_problem(query_string: bytes) -> str | None:
    """Why a query string is refused, or None: every value must be valid UTF-8 without NUL or lone surrogates."""
    raw = unquote_to_bytes(query_string.replace(b"+", b" "))
    if b"\x00" in raw:
        return "the query string contains a NUL byte"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "the query string is not valid UTF-8 (or holds a lone surrogate)"
    return None


class RequestGuard:
    """The ASGI middleware of the module docstring."""

    def __init__(self, app, *, max_json_bytes: int, max_json_depth: int):
        self.app, self.max_json_bytes, self.max_json_depth = app, max_json_bytes, max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        extra = [(b"x-request-id", request_id.encode())] + [
            (k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
        ]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [(k, v) for k, v in extra if k not in present]
            await send(message)

        problem = query_problem(scope.get("query_string", b""))
        if problem:
            await self._refuse(scope, send_with_headers, 422, problem)
            return
        headers = dict(scope.get("headers", []))
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["method"] not in BODY_METHODS or content_type == b"application/octet-stream":
            await self.app(scope, receive, send_with_headers)
            return
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            await self._refuse(scope, send_with_headers, 400, "Content-Length is not a number")
            return
        cap = self.max_json_bytes
        if declared > cap:
            await self._refuse(scope, send_with_headers, 413, f"the body is {declared} bytes; at most {cap} here")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await self._refuse(scope, send_with_headers, 413, f"the body exceeds {cap} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if content_type == b"application/json" or content_type.endswith(b"+json"):
            problem = json_problem(body, self.max_json_depth)
            if problem:
                await self._refuse(scope, send_with_headers, 422, problem)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnects and the like, as the server sends them
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send_with_headers)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, detail: str) -> None:
        log.info(
            "%s %s %d (refused before routing)",
            scope["method"],
            scope["path"],
            status,
            extra={"fields": {"event": "request", "method": scope["method"], "path": scope["path"],
                              "route": "unmatched", "status": status, "request_id": scope["state"]["request_id"],
                              "detail": detail}},
        )  # fmt: skip
        await JSONResponse({"detail": detail}, status_code=status)(scope, _nothing, send)


async def _nothing() -> dict:
    return {"type": "http.disconnect"}


class AuthLimiter:
    """Failed authentications per client address: at most ``limit`` in any ``window_s`` seconds (thread-safe)."""

    def __init__(self, limit: int, window_s: float = 60.0):
        self.limit, self.window_s = limit, window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _trim(self, address: str, now: float) -> deque[float]:
        failures = self._failures[address]
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        return failures

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None when it may now."""
        now = time.monotonic()
        with self._lock:
            failures = self._trim(address, now)
            if len(failures) < self.limit:
                if not failures:
                    self._failures.pop(address, None)
                return None
            return max(1, int(failures[0] + self.window_s - now) + 1)

    def failed(self, address: str) -> None:
        with self._lock:
            self._trim(address, time.monotonic()).append(time.monotonic())


def install_errors(app: FastAPI) -> None:
    """Any exception no other handler took: logged with its request id, answered as a JSON 500 naming that id and
    nothing else (no traceback, no exception text)."""

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.scope.get("state", {}).get("request_id", "-")
        log.error(
            "unexpected %s on %s %s (request %s)",
            type(exc).__name__,
            request.method,
            request.url.path,
            request_id,
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"fields": {"event": "error", "request_id": request_id}},
        )
        return JSONResponse(
            {"detail": f"internal error; the coordinator's log has it under request id {request_id}"},
            status_code=500,
            headers={"X-Request-ID": request_id},
        )

    app.add_exception_handler(Exception, unexpected)
