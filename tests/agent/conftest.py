"""Agent fixtures: one tiny warmup run and one real coordinator (uvicorn, in-process tasks) shared by the package,
with two registered silos; `make_job` sets up an open job from the run; `Recorder` sees every request sent."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.client import AdminClient, SiloClient
from clues.admin import create_job_from_run, job_spec_from_run
from tests.conftest import SILOS, Coordinator, TinyData, serve_coordinator


@dataclass
class World:
    """`TinyData` plus a coordinator serving it and the two silos' tokens."""

    data: TinyData
    coordinator: Coordinator
    admin: AdminClient
    tokens: dict[str, str]

    @property
    def root(self) -> Path:
        return self.data.root

    @property
    def run_dir(self) -> Path:
        return self.data.run_dir

    @property
    def samples(self) -> dict:
        return self.data.samples

    def data_file(self, silo: str, dest: Path) -> Path:
        return self.data.data_file(silo, dest)

    def client(self, silo: str, transport: httpx.BaseTransport | None = None, **kwargs) -> SiloClient:
        return SiloClient(self.coordinator.url, self.tokens[silo], transport=transport, **kwargs)


def make_job(world: World, name: str, *, silos=SILOS, open_it: bool = True, **fields) -> str:
    """A job made from the warmup run with the admin CLI's own functions (checkpoints and anchors uploaded; opened
    unless ``open_it`` is False)."""
    spec = job_spec_from_run(
        world.run_dir,
        name=name,
        silos=list(silos),
        precondition=True,
        similarity="cosine",
        threshold={"kind": "mean-anchor"},
        auto_score=True,
    )
    return create_job_from_run(world.admin, world.run_dir, world.data.anchors_file, {**spec, **fields}, open_it)["id"]


class Recorder(httpx.BaseTransport):
    """An HTTP transport that records every request (URL, headers, body) and can cut the link after N shard PUTs."""

    def __init__(self, fail_after_shards: int | None = None):
        self.inner = httpx.HTTPTransport()
        self.sent: list[tuple[str, str, bytes]] = []
        self.fail_after_shards = fail_after_shards
        self.shard_puts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.sent.append((request.method, str(request.url), str(request.headers.raw).encode() + body))
        if request.method == "PUT" and "/shards/" in request.url.path:
            if self.fail_after_shards is not None and self.shard_puts >= self.fail_after_shards:
                raise httpx.ConnectError("link down (test)", request=request)
            self.shard_puts += 1
        return self.inner.handle_request(request)

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, url, _ in self.sent if m == method and fragment in url)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="package")
def world(tiny_data) -> World:
    with (
        serve_coordinator(tiny_data.root / f"coord-{os.getpid()}") as coordinator,
        AdminClient(coordinator.url, coordinator.admin_token) as admin,
    ):
        tokens = {name: admin.register_silo(name)["token"] for name in SILOS}
        yield World(tiny_data, coordinator, admin, tokens)
