"""What every request meets first (`app.limits`): body caps before reading, JSON depth and NUL before parsing,
query strings, request ids and security headers, a JSON 500 that names its request id, the failed-login limit,
server-side logout, the admin token's length and the data directory's mode."""

from __future__ import annotations

import logging
import stat

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.config import AppSettings
from app.limits import json_depth, json_problem, query_problem
from app.main import create_app
from storage import repository as repo
from webui import COOKIE_NAME, SECURITY_HEADERS

TOKEN = "admin-secret-for-tests-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path):
    app = create_app(AppSettings(data_dir=tmp_path / "coord", admin_token=TOKEN), send=lambda *a: None)
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as c:
        yield c


def test_an_oversized_body_is_refused_before_it_is_read_or_authenticated(client):
    declared = client.post(
        "/v1/silos", content=b"{}", headers={"Content-Type": "application/json", "Content-Length": str(60 << 20)}
    )
    assert declared.status_code == 413 and "at most 1048576" in declared.json()["detail"]

    def stream():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * (64 << 10)

    streamed = client.post("/v1/silos", content=stream(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "exceeds" in streamed.json()["detail"]
    form = client.post("/ui/login", content=b"token=" + b"x" * (2 << 20), headers={"Content-Type": "text/plain"})
    assert form.status_code == 413


def test_deep_nul_and_surrogate_json_is_refused_before_parsing(client):
    deep = b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/v1/silos", content=deep, headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 422 and "nested 100001 levels" in r.json()["detail"]
    for body, needle in ((b'{"name": "a\\u0000b"}', "NUL"), (b'{"name": "a\\ud800b"}', "lone surrogate")):
        r = client.post("/v1/silos", content=body, headers={**ADMIN, "Content-Type": "application/json"})
        assert r.status_code == 422 and needle in r.json()["detail"]
    ok = client.post("/v1/silos", json={"name": "emoji\U0001f600"}, headers=ADMIN)  # a surrogate pair is fine
    assert ok.status_code in (201, 422) and "surrogate" not in ok.text


def test_the_json_checks_on_their_own():
    assert json_depth(b'{"a": [1, {"b": "[[[["}]}') == 3
    assert json_problem(b'{"a": "\\\\u0000"}', 32) is None  # an escaped backslash, then text "u0000"
    assert json_problem(b'{"a": "\\ud83d\\ude00"}', 32) is None
    assert "lone surrogate" in json_problem(b'{"a": "\\ude00"}', 32)
    assert query_problem(b"silo=a%00b") and query_problem(b"q=%ED%A0%80") and query_problem(b"q=%FF")
    assert query_problem(b"silo=caf%C3%A9&q=a+b") is None


def test_bad_query_strings_and_huge_offsets_are_422_not_500(client):
    job = "0" * 32
    for query in ("silo=a%00b", "search=%ED%A0%80", "offset=9223372036854775808", "offset=2147483648",
                  "min_score=nan"):  # fmt: skip
        r = client.get(f"/v1/jobs/{job}/scores?{query}", headers=ADMIN)
        assert r.status_code == 422, (query, r.status_code, r.text)


def test_every_response_has_a_request_id_and_the_security_headers(client):
    for path in ("/healthz", "/ui/login", "/v1/jobs", "/nowhere"):
        r = client.get(path)
        assert len(r.headers["x-request-id"]) == 16, path
        for name, value in SECURITY_HEADERS.items():
            assert r.headers[name] == value, (path, name)


def test_an_unexpected_error_is_a_logged_json_500_with_its_request_id(client, monkeypatch, caplog):
    def broken(session):
        raise RuntimeError("secret internals: /etc/passwd")

    monkeypatch.setattr(repo, "list_silos", broken)
    with caplog.at_level(logging.ERROR, logger="clues.api"):
        r = client.get("/v1/silos", headers=ADMIN)
    assert r.status_code == 500
    request_id = r.headers["x-request-id"]
    assert r.json() == {"detail": f"internal error; the coordinator's log has it under request id {request_id}"}
    assert "secret internals" not in r.text and "Traceback" not in r.text
    record = next(rec for rec in caplog.records if request_id in rec.getMessage())
    assert record.exc_info is not None and "secret internals" in str(record.exc_info[1])


def test_failed_authentication_is_rate_limited_per_address(client):
    for _ in range(20):
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    limited = client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert client.get("/v1/jobs", headers=ADMIN).status_code == 429  # not even a right guess gets through now
    assert client.post("/ui/login", data={"token": TOKEN}).status_code == 429


def test_the_login_form_counts_failures_too(client):
    for _ in range(20):
        assert client.post("/ui/login", data={"token": "guess"}).status_code == 401
    assert client.post("/ui/login", data={"token": "guess"}).status_code == 429


def test_logout_revokes_the_session_on_the_server(client):
    r = client.post("/ui/login", data={"token": TOKEN})
    assert r.status_code == 303
    cookie = r.cookies[COOKIE_NAME]
    assert client.get("/v1/jobs", cookies={COOKIE_NAME: cookie}).status_code == 200
    client.cookies.set(COOKIE_NAME, cookie)
    assert client.post("/ui/logout", headers={"Origin": "http://testserver"}).status_code == 303
    client.cookies.clear()
    assert client.get("/v1/jobs", cookies={COOKIE_NAME: cookie}).status_code == 401  # a copy of the cookie is dead


def test_a_short_admin_token_is_refused_at_start(tmp_path):
    with pytest.raises(ValidationError, match="at least 32"):
        AppSettings(data_dir=tmp_path, admin_token="x")
    AppSettings(data_dir=tmp_path, admin_token="y" * 32)


def test_the_data_directory_is_the_owners_only(tmp_path):
    data = tmp_path / "coord"
    data.mkdir(mode=0o755)
    create_app(AppSettings(data_dir=data, admin_token=TOKEN), send=lambda *a: None)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
