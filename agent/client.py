"""httpx clients of the coordinator API (docs/coordinator.md): `AdminClient` for the admin CLI, `SiloClient` for
a silo's agent, both on `Client` (transport, retries, the reads both roles make). Answers are the API's JSON as
dicts, shaped as the OpenAPI schemas (`openapi/openapi.json`) say.

Retries: connection errors, timeouts and 429/502/503/504 are retried with exponential backoff; every call it
retries is idempotent on the server (PUT uploads are keyed and checksummed, POST open/score/complete/start are no-ops
when already done); an override is sent once, never retried (each one is an audit record). Any other 4xx/5xx
raises `CoordinatorError` carrying the server's ``detail`` message.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import httpx

from wire import API_PREFIX, SHA256_HEADER
from wire.files import atomic_file

RETRY_STATUS = frozenset({429, 502, 503, 504})


class CoordinatorError(Exception):
    """The coordinator refused a request (``status``, ``detail``) or could not be reached after retries."""

    def __init__(self, status: int | None, detail: str):
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status, self.detail = status, detail


class Client:
    """One coordinator, one bearer token: the transport, retries and the reads both roles make. Use `AdminClient`
    with the admin token and `SiloClient` with a silo's; this base serves where the role is not known yet (`me`).

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        token: bearer token.
        retries: attempts after the first for retryable failures.
        backoff: first retry delay in seconds (doubles each time, capped at 30 s).
        transport: an httpx transport (tests).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        event_hooks: dict[str, list[Callable]] | None = None,
    ):
        self.retries, self.backoff = retries, backoff
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
            event_hooks=event_hooks,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------------------------

    def _with_retries(self, what: str, attempt: Callable[[], Any]) -> Any:
        """Run ``attempt`` until it returns, retrying transport errors and `RETRY_STATUS` answers with backoff."""
        delay = self.backoff
        for n in range(self.retries + 1):
            last = n == self.retries
            try:
                return attempt()
            except httpx.TransportError as exc:
                if last:
                    raise CoordinatorError(None, f"{what}: coordinator unreachable ({exc})") from exc
            except CoordinatorError as exc:
                if exc.status not in RETRY_STATUS or last:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send with retries; return the response of a 2xx answer, else raise `CoordinatorError`."""

        def once() -> httpx.Response:
            response = self.http.request(method, path, **kwargs)
            if response.status_code >= 400:
                raise CoordinatorError(response.status_code, _detail(response))
            return response

        return self._with_retries(f"{method} {path}", once)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def _upload(self, path: str, data: bytes) -> dict:
        headers = {SHA256_HEADER: hashlib.sha256(data).hexdigest(), "Content-Type": "application/octet-stream"}
        return self._json("PUT", path, content=data, headers=headers)

    def _download(self, path: str, dest: Path, what: str) -> str:
        """Stream ``GET path`` to ``dest``: a temp file beside it, SHA-256 checked against ``X-Content-SHA256``,
        fsync, rename (a reader never sees a partial file). Returns the SHA-256."""

        def once() -> str:
            digest = hashlib.sha256()
            with atomic_file(dest) as fh, self.http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise CoordinatorError(response.status_code, _detail(response))
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    fh.write(chunk)
                announced = response.headers.get(SHA256_HEADER)
                if announced != digest.hexdigest():  # raised inside: the temp file goes, dest is untouched
                    raise CoordinatorError(
                        None, f"{what}: received SHA-256 {digest.hexdigest()}, announced {announced}"
                    )
            return digest.hexdigest()

        return self._with_retries(f"GET {path}", once)

    # -- reads both roles make ------------------------------------------------------------------------------

    def jobs(self) -> list[dict]:
        return self._json("GET", f"{API_PREFIX}/jobs")

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"{API_PREFIX}/jobs/{job_id}")

    def scores(self, job_id: str, silo: str | None = None, page: int = 50_000) -> dict:
        """All score rows visible to this token (paged through), with the threshold."""
        rows: list[dict] = []
        while True:
            params: dict[str, Any] = {"limit": page, "offset": len(rows)}
            if silo:
                params["silo"] = silo
            answer = self._json("GET", f"{API_PREFIX}/jobs/{job_id}/scores", params=params)
            rows.extend(answer["rows"])
            if len(rows) >= answer["total"] or not answer["rows"]:
                return {**answer, "rows": rows}

    def scores_page(self, job_id: str, **params: Any) -> dict:
        """One page of score rows (`ScoresPublic`): the coordinator's filters, sort and paging, e.g. ``kept=True,
        sort="score", order="desc", limit=50``; None values are left out."""
        query = {k: _param(v) for k, v in params.items() if v is not None}
        return self._json("GET", f"{API_PREFIX}/jobs/{job_id}/scores", params=query)

    def summary(self, job_id: str) -> dict:
        """What the dashboards chart (`ScoreSummary`): histogram edges and counts, kept and overridden counts."""
        return self._json("GET", f"{API_PREFIX}/jobs/{job_id}/summary")

    def overrides(self, job_id: str, **params: Any) -> dict:
        """The override audit log (`OverrideLog`), newest first; ``limit``, ``offset``, ``sample_id``."""
        query = {k: v for k, v in params.items() if v is not None}
        return self._json("GET", f"{API_PREFIX}/jobs/{job_id}/overrides", params=query)

    def create_override(self, job_id: str, sample_id: str, decision: str, reason: str) -> dict:
        """Keep or drop one of this silo's samples against the threshold (``auto`` undoes that); the new audit
        record. Sent once, never retried: a retry after a lost answer would log the decision twice."""
        body = {"sample_id": sample_id, "decision": decision, "reason": reason}
        path = f"{API_PREFIX}/jobs/{job_id}/overrides"
        try:
            response = self.http.post(path, json=body)
        except httpx.TransportError as exc:
            raise CoordinatorError(None, f"POST {path}: coordinator unreachable ({exc})") from exc
        if response.status_code >= 400:
            raise CoordinatorError(response.status_code, _detail(response))
        return response.json()

    def wait(
        self,
        job_id: str,
        *,
        poll: float = 2.0,
        timeout: float | None = None,
        on_progress: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll the scoring job until it is ``done`` (returned) or ``failed`` (raises `CoordinatorError` with its
        error)."""
        return self._wait(self.job, f"job {job_id}", job_id, poll, timeout, on_progress)

    def wait_train(
        self,
        job_id: str,
        *,
        poll: float = 2.0,
        timeout: float | None = None,
        on_progress: Callable[[dict], None] | None = None,
    ) -> dict:
        """`wait` for a training job (``evaluating`` is not done yet: the final metrics are still to come)."""
        return self._wait(self.train_job, f"training job {job_id}", job_id, poll, timeout, on_progress)

    def _wait(
        self,
        fetch: Callable[[str], dict],
        what: str,
        job_id: str,
        poll: float,
        timeout: float | None,
        on_progress: Callable[[dict], None] | None,
    ) -> dict:
        start = time.monotonic()
        while True:
            job = fetch(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] == "done":
                return job
            if job["status"] == "failed":
                raise CoordinatorError(None, f"{what} failed: {job['error']}")
            if timeout is not None and time.monotonic() - start > timeout:
                raise CoordinatorError(None, f"{what} still {job['status']!r} after {timeout:.0f} s")
            time.sleep(poll)

    def train_jobs(self) -> list[dict]:
        return self._json("GET", f"{API_PREFIX}/train")

    def train_job(self, job_id: str) -> dict:
        return self._json("GET", f"{API_PREFIX}/train/{job_id}")

    def withdraw(self, job_id: str, reason: str, silo: str | None = None, sample_ids: list[str] | None = None) -> dict:
        """Withdraw a silo, or some of its samples, from training job ``job_id`` (the admin names the silo; a silo
        withdraws itself)."""
        body = {"reason": reason, **({"silo": silo} if silo else {})}
        if sample_ids is not None:
            body["sample_ids"] = sample_ids
        return self._json("POST", f"{API_PREFIX}/train/{job_id}/withdrawals", json=body)

    def withdrawals(self, job_id: str | None = None) -> list[dict]:
        """The withdrawals this token may see, oldest first: from one training job, or from all of them."""
        if job_id is None:
            return self._json("GET", f"{API_PREFIX}/train/withdrawals")
        return self._json("GET", f"{API_PREFIX}/train/{job_id}/withdrawals")

    def wait_withdrawal(self, job_id: str, withdrawal_id: int, poll: float = 1.0, timeout: float | None = 600) -> dict:
        """Poll until withdrawal ``withdrawal_id`` is no longer ``pending``; returns it.

        Raises:
            CoordinatorError: still pending after ``timeout`` seconds.
        """
        start = time.monotonic()
        while True:
            row = next(w for w in self.withdrawals(job_id) if w["id"] == withdrawal_id)
            if row["status"] != "pending":
                return row
            if timeout is not None and time.monotonic() - start > timeout:
                raise CoordinatorError(None, f"withdrawal {withdrawal_id} still pending after {timeout:.0f} s")
            time.sleep(poll)

    def download_round_adapter(self, job_id: str, round: int, dest: Path) -> str:
        """Stream the global adapter round ``round`` starts from to ``dest`` (see `_download`); returns its SHA-256."""
        return self._download(f"{API_PREFIX}/train/{job_id}/rounds/{round}/adapter", dest, f"round {round} adapter")

    def download_final_adapter(self, job_id: str, dest: Path) -> str:
        """Stream the training job's final adapter to ``dest`` (see `_download`); returns its SHA-256."""
        return self._download(f"{API_PREFIX}/train/{job_id}/adapter", dest, "final adapter")

    def me(self) -> dict:
        """The silo this token belongs to (`SiloPublic`: ``id``, ``name``, ``created_at``); the admin token gets a
        403 `CoordinatorError`, an unknown one a 401."""
        return self._json("GET", f"{API_PREFIX}/silos/me")


class AdminClient(Client):
    """The admin's calls: silos, scoring and training jobs, their uploads, starts and retries."""

    def register_silo(self, name: str) -> dict:
        return self._json("POST", f"{API_PREFIX}/silos", json={"name": name})

    def list_silos(self) -> list[dict]:
        return self._json("GET", f"{API_PREFIX}/silos")

    def create_job(self, spec: dict) -> dict:
        return self._json("POST", f"{API_PREFIX}/jobs", json=spec)

    def upload_checkpoint(self, job_id: str, index: int, data: bytes) -> dict:
        return self._upload(f"{API_PREFIX}/jobs/{job_id}/checkpoints/{index}", data)

    def upload_anchors(self, job_id: str, data: bytes) -> dict:
        return self._upload(f"{API_PREFIX}/jobs/{job_id}/anchors", data)

    def open_job(self, job_id: str) -> dict:
        return self._json("POST", f"{API_PREFIX}/jobs/{job_id}/open")

    def start_scoring(self, job_id: str) -> dict:
        return self._json("POST", f"{API_PREFIX}/jobs/{job_id}/score")

    def retry_job(self, job_id: str) -> dict:
        """Send the step a scoring job waits for again (no-op while a live worker runs it)."""
        return self._json("POST", f"{API_PREFIX}/jobs/{job_id}/retry")

    def retry_train_job(self, job_id: str) -> dict:
        """Send the step a training job waits for again (no-op while a live worker runs it)."""
        return self._json("POST", f"{API_PREFIX}/train/{job_id}/retry")

    def duplicates(self, job_id: str) -> list[dict]:
        return self._json("GET", f"{API_PREFIX}/jobs/{job_id}/duplicates")

    def create_train_job(self, spec: dict) -> dict:
        return self._json("POST", f"{API_PREFIX}/train", json=spec)

    def upload_eval_set(self, job_id: str, data: bytes) -> dict:
        return self._upload(f"{API_PREFIX}/train/{job_id}/eval", data)

    def start_train_job(self, job_id: str) -> dict:
        return self._json("POST", f"{API_PREFIX}/train/{job_id}/start")

    def scoring_job_from_warmup(self, train_id: str, body: dict) -> dict:
        """A scoring job (``draft``, checkpoints uploaded) from a finished warmup job (`ScoringFromWarmup` body)."""
        return self._json("POST", f"{API_PREFIX}/train/{train_id}/scoring-job", json=body)


class SiloClient(Client):
    """A silo's calls: its job's checkpoints down, its projection shards and round updates up."""

    def download_checkpoint(self, job_id: str, index: int, dest: Path) -> str:
        """Stream checkpoint bundle ``index`` of a scoring job to ``dest`` (see `_download`); returns its SHA-256."""
        return self._download(f"{API_PREFIX}/jobs/{job_id}/checkpoints/{index}", dest, f"checkpoint {index}")

    def held_shards(self, job_id: str) -> list[dict]:
        return self._json("GET", f"{API_PREFIX}/jobs/{job_id}/shards")

    def upload_shard(self, job_id: str, checkpoint: int, part: int, data: bytes) -> dict:
        return self._upload(f"{API_PREFIX}/jobs/{job_id}/shards/{checkpoint}/{part}", data)

    def complete(self, job_id: str) -> dict:
        return self._json("POST", f"{API_PREFIX}/jobs/{job_id}/complete")

    def download_reference(self, job_id: str, dest: Path) -> str:
        """Stream a silo-local job's reference to ``dest``; returns its SHA-256 (`CoordinatorError` 409 until the
        coordinator has published it)."""
        return self._download(f"{API_PREFIX}/jobs/{job_id}/reference", dest, "reference")

    def send_aggregate(self, job_id: str, aggregate: dict) -> dict:
        """A silo-local job's aggregate (``kept``, ``total``, ``histogram``): all this silo sends. Idempotent."""
        return self._json("PUT", f"{API_PREFIX}/jobs/{job_id}/aggregate", json=aggregate)

    def upload_round_update(self, job_id: str, round: int, data: bytes) -> dict:
        """This silo's adapter bundle after local training in ``round`` (201 new, 200 held; 409 late or closed)."""
        return self._upload(f"{API_PREFIX}/train/{job_id}/rounds/{round}/update", data)

    def upload_withdrawal_update(self, job_id: str, withdrawal_id: int, data: bytes) -> dict:
        """This silo's adapter retrained without the samples of its pending withdrawal (201 new, 200 held)."""
        return self._upload(f"{API_PREFIX}/train/{job_id}/withdrawals/{withdrawal_id}/update", data)


def _param(value: Any) -> Any:
    """A query value as the coordinator parses it (booleans as ``true``/``false``)."""
    return str(value).lower() if isinstance(value, bool) else value


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI's request validation errors
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return str(detail or response.text[:500] or response.reason_phrase)
