"""The exported OpenAPI spec in openapi/ is the app's current one."""

from __future__ import annotations

import json
from pathlib import Path

from clues.service import export_openapi

SPEC = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def test_exported_spec_is_current():
    current = export_openapi()
    stored = json.loads(SPEC.read_text())
    assert stored == current, (
        "openapi/openapi.json is stale: run 'clues coordinator openapi --out openapi/openapi.json'"
    )


def test_every_route_has_a_stable_operation_id_and_binary_uploads_are_declared():
    spec = export_openapi()
    ops = [op for path in spec["paths"].values() for op in path.values()]
    ids = [op["operationId"] for op in ops]
    assert len(ids) == len(set(ids)) and all("__" not in i for i in ids)
    upload = spec["paths"]["/v1/jobs/{job_id}/shards/{checkpoint}/{part}"]["put"]
    assert "application/octet-stream" in upload["requestBody"]["content"]
