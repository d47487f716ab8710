"""`AppSettings`: the coordinator API's settings (environment prefix ``CLUES_``), read once per process."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, field_validator

from workers.config import ServiceSettings

MIN_ADMIN_TOKEN = 32
"""The shortest admin token the coordinator starts with."""


class AppSettings(ServiceSettings):
    """`ServiceSettings` plus what only the API needs.

    Attributes:
        admin_token: bearer token of the administrator, at least `MIN_ADMIN_TOKEN` characters; unset: every admin
            route answers 403.
        max_upload_bytes: cap on any request body (shards, checkpoint bundles, anchor sets).
        log_json: one JSON object per log line (structured logs); False for plain text.
        session_secret: key that signs dashboard session cookies; unset: a random key kept in
            ``<data_dir>/session.key`` (created on first start).
        secure_cookies: mark the session cookie ``Secure`` (serve the dashboard over HTTPS, e.g. behind a proxy).
        max_json_bytes: cap on any body that is not a binary upload (JSON, forms), enforced before it is read.
        max_json_depth: deepest nesting a JSON body may have (checked before it is parsed).
        auth_failures_per_minute: failed authentications one client address may make in any 60 s before it gets
            429 with Retry-After.
        shutdown_timeout_s: on SIGTERM, how long requests in flight (a stalled upload included) may take before the
            server closes them.
    """

    admin_token: str | None = None
    max_upload_bytes: int = Field(1 << 30, ge=1024)
    log_json: bool = True
    session_secret: str | None = None
    secure_cookies: bool = False
    max_json_bytes: int = Field(1 << 20, ge=1024)
    max_json_depth: int = Field(32, ge=4, le=1000)
    auth_failures_per_minute: int = Field(20, ge=1)
    shutdown_timeout_s: float = Field(15.0, gt=0)

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, token: str | None) -> str | None:
        if token is not None and len(token) < MIN_ADMIN_TOKEN:
            raise ValueError(
                f"CLUES_ADMIN_TOKEN is {len(token)} characters; use at least {MIN_ADMIN_TOKEN} random ones "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return token


@lru_cache
def get_settings() -> AppSettings:
    return AppSettings()
