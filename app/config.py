"""`AppSettings`: the coordinator API's settings (environment prefix ``CLUES_``), read once per process."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from workers.config import WorkerSettings


class AppSettings(WorkerSettings):
    """`WorkerSettings` plus what only the API needs.

    Attributes:
        admin_token: bearer token of the administrator; unset: every admin route answers 403.
        max_upload_bytes: cap on any request body (shards, checkpoint bundles, anchor sets).
        log_json: one JSON object per log line (structured logs); False for plain text.
        session_secret: key that signs dashboard session cookies; unset: a random key kept in
            ``<data_dir>/session.key`` (created on first start).
        secure_cookies: mark the session cookie ``Secure`` (serve the dashboard over HTTPS, e.g. behind a proxy).
    """

    admin_token: str | None = None
    max_upload_bytes: int = Field(1 << 30, ge=1024)
    log_json: bool = True
    session_secret: str | None = None
    secure_cookies: bool = False


@lru_cache
def get_settings() -> AppSettings:
    return AppSettings()
