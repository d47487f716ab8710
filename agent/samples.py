"""The data behind a silo's dashboard (`agent.dashboard`): its local text, the coordinator's score rows joined with
it, and the filters, sorts and pages of the sample table, all in memory and with no web framework.

    Text, index_text, LocalText   what the table shows of each local sample; the data file, read again when it changes
    join_rows                     the coordinator's rows with text previews added (the join happens here only)
    JobRows                       one job's joined rows, with its sort orders cached
    SampleQuery, query_rows       the table's filters and order, and the page they select
    RowCache                      each job's rows held in memory, refetched in the background after ``ttl_s``

The text never leaves this process: the coordinator sends ids and scores, and the rows are joined here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.client import Client
from scoring.data import Sample, read_samples

log = logging.getLogger("clues.agent.samples")

PREVIEW_CHARS = 400
FETCH_PAGE = 50_000
MAX_JOBS = 8  # jobs whose rows are held at once
SORT_PATTERN = r"^(row|score|sample_id|silo|selected|part:\d{1,4})$"  # the sorts `JobRows.order` knows


def _preview(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


@dataclass(frozen=True)
class Text:
    """What the table shows of one local sample, and what text search looks in (all its text, lower-cased)."""

    instruction: str  # the prompt's non-system turns (Alpaca: instruction, blank line, input), ≤ PREVIEW_CHARS
    response: str  # ≤ PREVIEW_CHARS
    search: str


def index_text(samples: list[Sample]) -> dict[str, Text]:
    """Sample id → `Text`, computed once per read of the data file."""
    out = {}
    for s in samples:
        prompt = "\n\n".join(c for r, c in s.prompt if r != "system") or "\n\n".join(c for _, c in s.prompt)
        search = "\n".join([s.id, *(c for _, c in s.prompt), s.response]).lower()
        out[s.id] = Text(_preview(prompt), _preview(s.response), search)
    return out


class LocalText:
    """The silo's data file, read again when it changes on disk (a file that no longer reads keeps the old text)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.version = 0
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.by_id: dict[str, Text] = {}
        self.current()  # the first read raises: a bad file stops the dashboard from starting

    def current(self) -> dict[str, Text]:
        try:
            st = os.stat(self.path)
        except OSError:
            if self._stamp is None:
                raise
            return self.by_id
        with self._lock:
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                try:
                    self.by_id, self.version = index_text(read_samples(self.path)), self.version + 1
                except (OSError, ValueError) as exc:
                    if self._stamp is None:
                        raise
                    log.warning("%s: kept the text read before: %s", self.path, exc)
                self._stamp = (st.st_mtime_ns, st.st_size)
        return self.by_id


def join_rows(score_rows: list[dict], text: dict[str, Text]) -> tuple[list[dict], list[str]]:
    """The coordinator's rows with ``instruction``, ``response`` and ``text_missing`` added, and each row's search
    text (just the lower-cased id when the local file lacks the sample)."""
    rows, search = [], []
    for r in score_rows:
        t = text.get(r["sample_id"])
        rows.append({**r, "instruction": t.instruction if t else "", "response": t.response if t else ""})
        rows[-1]["text_missing"] = t is None
        search.append(t.search if t else r["sample_id"].lower())
    return rows, search


def _sort_key(sort: str) -> Callable[[dict], Any]:
    if sort.startswith("part:"):
        t = int(sort.partition(":")[2])
        return lambda r: r["parts"][t]
    if sort in ("score", "sample_id", "selected"):
        return lambda r: r[sort]
    raise ValueError(sort)


@dataclass
class JobRows:
    """One job's rows for this silo, in upload order, joined with the local text. ``orders`` caches ascending index
    orders per sort key; `patch` clears it."""

    threshold: float | None
    rows: list[dict]
    search: list[str]
    text_version: int
    fetched: float  # time.monotonic() when the fetch began
    orders: dict[str, list[int]] = field(default_factory=dict)
    without_text: int = field(init=False)

    def __post_init__(self) -> None:
        self.without_text = sum(r["text_missing"] for r in self.rows)

    @property
    def checkpoints(self) -> int | None:
        return len(self.rows[0]["parts"]) if self.rows else None

    def order(self, sort: str) -> list[int]:
        if sort in ("row", "silo"):  # every row is this silo's
            return list(range(len(self.rows)))
        order = self.orders.get(sort)
        if order is None:
            key, rows = _sort_key(sort), self.rows
            order = self.orders[sort] = sorted(range(len(rows)), key=lambda i: key(rows[i]))
        return order

    def patch(self, record: dict) -> None:
        """Put an override the coordinator recorded (`OverridePublic`) into the cached row."""
        info = None
        if record["decision"] != "auto":
            info = {k: record[k] for k in ("id", "decision", "reason", "actor", "created_at")}
        for row in self.rows:
            if row["sample_id"] == record["sample_id"]:
                row["selected"], row["override"] = record["selected"], info
        self.orders.clear()


@dataclass(frozen=True)
class SampleQuery:
    """The table's filters (None: any) and order."""

    q: str | None = None
    kept: bool | None = None
    overridden: bool | None = None
    min_score: float | None = None
    max_score: float | None = None
    sort: str = "row"
    descending: bool = False


def query_rows(job: JobRows, query: SampleQuery, limit: int, offset: int) -> tuple[int, list[dict]]:
    """``(total matching, the page)``: each filter narrows an index list, in the requested order."""
    rows, idx = job.rows, job.order(query.sort)
    if query.descending:
        idx = idx[::-1]
    if query.kept is not None:
        idx = [i for i in idx if rows[i]["selected"] is query.kept]
    if query.overridden is not None:
        idx = [i for i in idx if (rows[i]["override"] is not None) is query.overridden]
    if query.min_score is not None:
        idx = [i for i in idx if rows[i]["score"] >= query.min_score]
    if query.max_score is not None:
        idx = [i for i in idx if rows[i]["score"] <= query.max_score]
    if query.q:
        needle, search = query.q.lower(), job.search
        idx = [i for i in idx if needle in search[i]]
    return len(idx), [rows[i] for i in idx[offset : offset + limit]]


class RowCache:
    """Each job's joined rows, held in memory: all of a job's rows are fetched once (`Client.scores`) and joined with
    the local text; after ``ttl_s`` they are refetched in the background while the old ones keep serving. At most
    ``max_jobs`` jobs are held (the one fetched longest ago is forgotten first).

    Args:
        client: the coordinator client, with this silo's token.
        text: the silo's local text; rows are joined again when it changes.
        ttl_s: age after which a job's held rows are refetched.
        max_jobs: how many jobs' rows are held at once.
        local: the rows this silo scored itself for a job (a silo-local job), read instead of the coordinator's.
    """

    def __init__(
        self,
        client: Client,
        text: LocalText,
        *,
        ttl_s: float,
        max_jobs: int = MAX_JOBS,
        local: Callable[[str], dict | None] | None = None,
    ) -> None:
        self.client, self.text, self.ttl_s, self.max_jobs = client, text, ttl_s, max_jobs
        self.local = local or (lambda job_id: None)
        self._cache: dict[str, JobRows] = {}
        self._patched: dict[str, float] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()
        self._fill_locks: dict[str, threading.Lock] = {}

    def get(self, job_id: str) -> JobRows:
        """The job's joined rows: fetched now when none are held (or the local text changed), else the held ones,
        with a refetch started in the background once they are older than ``ttl_s``.

        Raises:
            agent.client.CoordinatorError: the fetch failed (the coordinator's 404 for a job not this silo's, too).
        """
        self.text.current()
        entry = self._cache.get(job_id)
        if entry is None or entry.text_version != self.text.version:
            return self._fill(job_id, force=False)
        if time.monotonic() - entry.fetched > self.ttl_s:
            with self._lock:
                if job_id in self._refreshing:
                    return entry
                self._refreshing.add(job_id)
            threading.Thread(target=self._refresh, args=(job_id,), name=f"rows-{job_id[:8]}", daemon=True).start()
        return entry

    def patch(self, job_id: str, record: dict) -> None:
        """Put an override the coordinator recorded into the job's held rows (`JobRows.patch`), if any are held; a
        fetch that began before it is not trusted to include it."""
        with self._lock:
            self._patched[job_id] = time.monotonic()
            entry = self._cache.get(job_id)
        if entry is not None:
            entry.patch(record)

    def _refresh(self, job_id: str) -> None:
        try:
            self._fill(job_id, force=True)
        except Exception as exc:  # the held rows keep serving; the next request tries again
            log.warning("job %s: refetching the scores failed: %s", job_id, exc)
        finally:
            with self._lock:
                self._refreshing.discard(job_id)

    def _fill(self, job_id: str, *, force: bool) -> JobRows:
        """Fetch and join the job's rows (one fetch at a time per job; unless ``force``, rows that another request
        fetched meanwhile are taken instead)."""
        with self._lock:
            lock = self._fill_locks.setdefault(job_id, threading.Lock())
        with lock:
            held = self._cache.get(job_id)
            if not force and held is not None and held.text_version == self.text.version:
                return held
            started = time.monotonic()
            answer = self.local(job_id) or self.client.scores(job_id, page=FETCH_PAGE)
            text, version = self.text.current(), self.text.version
            rows, search = join_rows(answer["rows"], text)
            entry = JobRows(answer["threshold"], rows, search, version, started)
            with self._lock:
                if self._patched.get(job_id, 0.0) > started:  # an override landed while this fetch ran: the
                    held = self._cache.get(job_id)  # rows may predate it, so keep the patched ones (or these)
                    entry = held if held is not None and held.text_version == version else entry
                    entry.fetched = 0.0  # and fetch again on the next request
                self._cache[job_id] = entry
                while len(self._cache) > self.max_jobs:  # forget the job fetched longest ago
                    others = (j for j in self._cache if j != job_id)
                    del self._cache[min(others, key=lambda j: self._cache[j].fetched)]
            return entry
