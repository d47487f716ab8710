"""The OpenAPI document as the app really answers: every status code an operation can return, each error with the
one body the app sends (``Error``: ``{"detail": "<message>"}``).

FastAPI documents only the success code and a 422 with its own validation-error list. Every request here also goes
through `app.limits.RequestGuard` (413 for oversized bodies, 422 for bad query strings and JSON), the bearer/cookie
authentication (401, 403 for the wrong role or a cross-site cookie request, 429 after too many failures) and the
storage layer (503 when the database or the broker is unreachable); operations on a resource by id may answer 404
and 409 (its state forbids the request), uploads 400 (a missing or wrong checksum header). `document_errors` adds
these to each operation by what it has (security, path parameters, a body), so schemathesis can hold the app to it.
"""

from __future__ import annotations

import copy
from typing import Any

ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "properties": {"detail": {"type": "string", "title": "Detail"}},
    "required": ["detail"],
    "description": "Every error: a message for a person, naming the field or the state at fault.",
}
REASONS = {
    "400": "Malformed request (e.g. a missing or wrong X-Content-SHA256 header)",
    "401": "Missing or unknown token",
    "403": "Not allowed for this caller (the other role's route, another silo's data, a cross-site cookie request)",
    "404": "No such resource (or not one this caller may see: the same answer)",
    "409": "The resource's state forbids this now (e.g. a job not open, an upload already held with other bytes)",
    "413": "The body is over the size limit",
    "422": "Invalid input: a field, a query parameter, the body's content",
    "429": "Too many failed authentications from this address; see Retry-After",
    "503": "The database or the task queue is unreachable; try again",
}
METHODS = ("get", "put", "post", "delete", "patch")


def codes_for(path: str, method: str, operation: dict[str, Any]) -> set[str]:
    """The error statuses ``method path`` can answer (see the module docstring)."""
    codes = {"422", "503"}
    if operation.get("security"):
        codes |= {"401", "403", "429"}
    if "{" in path:
        codes |= {"404", "409"}
    if "requestBody" in operation or method in ("post", "put", "patch", "delete"):
        codes |= {"400", "409", "413"}
    return codes


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with the `Error` model and every operation's error statuses; FastAPI's validation-error models,
    which the app never sends, are removed."""
    out = copy.deepcopy(schema)
    components = out.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/Error"}
    for path, item in out.get("paths", {}).items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            for code in sorted(codes_for(path, method, operation)):
                responses[code] = {"description": REASONS[code], "content": {"application/json": {"schema": ref}}}
    return out


BINARY = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}, "required": True}
"""``openapi_extra={"requestBody": BINARY}``: a route that reads a raw binary body (uploads)."""
