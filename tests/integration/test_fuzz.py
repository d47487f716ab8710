"""Schemathesis against openapi/openapi.json on the running app (uvicorn, real HTTP): no generated input gives a
5xx, and every answer's status is one the spec documents for that operation.

Each operation is called as the admin (which reaches every handler's validation), as a silo, with a bogus token and
with none; examples are derandomized (the same ones every run) and bounded per operation, so the step takes a fixed
time. The failed-authentication limit is raised for this run only: the bogus-token calls are the point, and a 429
after 20 of them would hide what the routes answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from agent.client import AdminClient
from tests.conftest import serve_coordinator

SPEC = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
EXAMPLES = 40


def _operations():
    schema = schemathesis.openapi.from_path(SPEC)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    with serve_coordinator(tmp_path_factory.mktemp("fuzz"), auth_failures_per_minute=1_000_000) as coordinator:
        with AdminClient(coordinator.url, coordinator.admin_token) as admin:
            silo_token = admin.register_silo("fuzz-silo")["token"]
        yield coordinator, silo_token


@pytest.mark.integration
@pytest.mark.parametrize("operation", _operations(), ids=lambda op: op.label)
def test_no_server_errors_and_no_undocumented_statuses(operation, running):
    coordinator, silo_token = running
    documented = set(operation.definition.raw.get("responses", {}))
    headers_list = (
        {"Authorization": f"Bearer {coordinator.admin_token}"},
        {"Authorization": f"Bearer {silo_token}"},
        {"Authorization": "Bearer x"},
        {},
    )

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy())
    def check(case):
        for headers in headers_list:
            response = case.call(base_url=coordinator.url, headers=headers)
            where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
            assert response.status_code < 500, where
            assert str(response.status_code) in documented, f"undocumented status; {where}"
            if response.status_code >= 400:
                assert isinstance(response.json().get("detail"), str), f"error body is not {{detail: str}}; {where}"

    check()
