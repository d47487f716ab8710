"""Schemathesis against openapi/openapi.json on the running app (uvicorn, real HTTP): no input gives a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

SPEC = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
EXAMPLES = 40


def _operations():
    schema = schemathesis.openapi.from_path(SPEC)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.integration
@pytest.mark.parametrize("operation", _operations(), ids=lambda op: op.label)
def test_no_server_errors(operation, coordinator):
    """Generated requests for every operation, as the admin (which reaches every handler's validation), with a
    bogus token and with none."""
    headers_list = ({"Authorization": f"Bearer {coordinator.admin_token}"}, {"Authorization": "Bearer x"}, {})

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def check(case):
        for headers in headers_list:
            response = case.call(base_url=coordinator.url, headers=headers)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
            )

    check()
