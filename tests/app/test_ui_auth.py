"""Dashboard sessions without a browser: the login form, the signed HttpOnly cookie and what it authorizes, its
refusal when forged, expired or outlived by its token, the CSRF check on cookie-authenticated writes, redirects, page
errors as pages, the static files, and the session secret on disk."""

from __future__ import annotations

import base64
import json
import stat
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import AppSettings
from app.main import create_app
from storage import repository as repo
from storage.models import Silo
from tests.seed import SeededJob, seed_scored_job
from webui import COOKIE_NAME, SESSION_TTL_S, SessionSigner, load_secret, same_origin
from wire import hash_token

ADMIN_TOKEN = "admin-secret-for-tests-0123456789abcdef"


def make_app(data_dir: Path, admin_token: str = ADMIN_TOKEN, **settings):
    return create_app(AppSettings(data_dir=data_dir, admin_token=admin_token, **settings), send=lambda *a: None)


@dataclass
class Env:
    app: object
    client: TestClient
    job: SeededJob
    data_dir: Path

    def login(self, token: str, next: str | None = None, client: TestClient | None = None):
        form = {"token": token} if next is None else {"token": token, "next": next}
        return (client or self.client).post("/ui/login", data=form)


@pytest.fixture
def env(tmp_path):
    app = make_app(tmp_path)
    with TestClient(app, follow_redirects=False) as client:
        with app.state.clues.sessions() as session:
            job = seed_scored_job(session, silos=("silo1", "silo2"), per_silo=8, anchors=4, checkpoints=2)
        yield Env(app, client, job, tmp_path)


def set_cookie_of(response) -> SimpleCookie:
    cookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie


def test_login_sets_a_strict_httponly_cookie_and_redirects(env):
    r = env.login(ADMIN_TOKEN)
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    raw = r.headers["set-cookie"]
    morsel = set_cookie_of(r)[COOKIE_NAME]
    assert morsel["httponly"] is True and morsel["samesite"].lower() == "strict" and morsel["path"] == "/"
    assert int(morsel["max-age"]) == SESSION_TTL_S and not morsel["secure"]
    assert ADMIN_TOKEN not in raw and ADMIN_TOKEN not in r.headers["location"]
    assert env.client.cookies[COOKIE_NAME] == morsel.value


def test_login_form_posts_the_token(env):
    r = env.client.get("/ui/login")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'method="post"' in r.text and 'name="token"' in r.text and 'type="password"' in r.text


def test_secure_cookies_setting(tmp_path):
    app = make_app(tmp_path, secure_cookies=True)
    with TestClient(app, follow_redirects=False) as client:
        r = client.post("/ui/login", data={"token": ADMIN_TOKEN})
        assert set_cookie_of(r)[COOKIE_NAME]["secure"] is True


@pytest.mark.parametrize("token", ["wrong", "", "   ", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1]])
def test_wrong_token_is_a_401_page_without_a_cookie(env, token):
    r = env.login(token)
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("text/html") and "not valid" in r.text
    assert "set-cookie" not in r.headers and COOKIE_NAME not in env.client.cookies


def test_admin_cookie_authorizes_the_api_and_pages(env):
    env.login(ADMIN_TOKEN)
    jobs = env.client.get("/v1/jobs")
    assert jobs.status_code == 200 and [j["id"] for j in jobs.json()] == [env.job.job_id]
    assert env.client.get("/v1/silos").status_code == 200  # an admin route
    for page in ("/ui/jobs", f"/ui/jobs/{env.job.job_id}"):
        r = env.client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), page
        assert r.headers["cache-control"] == "no-store"
    assert env.job.job_id in env.client.get("/ui/jobs").text
    assert env.client.get("/ui").headers["location"] == "/ui/jobs"


def test_silo_cookie_is_the_silo(env):
    with env.app.state.clues.sessions() as session:
        other = repo.create_job(
            session, name="only-silo2-job", model="tiny:0", lora={"rank": 4, "alpha": 8.0, "target_modules": ["q"]},
            projection={"kind": "sjlt", "dim": 64, "seed": 0}, similarity="cosine",
            threshold={"kind": "mean-anchor"}, precondition=True, options={},
            checkpoints=[{"index": 0, "step": 1, "lr": 1e-4, "lr_last": 1e-4, "adam": {}}], silo_names=["silo2"],
        ).id  # fmt: skip
        session.commit()
    assert env.login(env.job.tokens["silo1"]).status_code == 303
    assert [j["id"] for j in env.client.get("/v1/jobs").json()] == [env.job.job_id]
    assert env.client.get("/v1/silos").status_code == 403  # no admin rights through a silo's session
    rows = env.client.get(f"/v1/jobs/{env.job.job_id}/scores").json()["rows"]
    assert {r["silo"] for r in rows} == {"silo1"}
    page = env.client.get("/ui/jobs")
    assert env.job.job_id in page.text and other not in page.text and "only-silo2-job" not in page.text
    r = env.client.get(f"/ui/jobs/{other}")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")


def test_no_cookie_redirects_pages_to_login_and_api_is_401(env):
    r = env.client.get("/ui/jobs")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=/ui/jobs"
    r = env.client.get(f"/ui/jobs/{env.job.job_id}", params={"tab": "a b"})
    assert r.status_code == 303
    assert r.headers["location"] == f"/ui/login?next=/ui/jobs/{env.job.job_id}%3Ftab%3Da%2Bb"
    assert env.client.get("/v1/jobs").status_code == 401


def test_redirect_after_login_round_trip(env):
    target = f"/ui/jobs/{env.job.job_id}"
    location = env.client.get(target).headers["location"]
    form = env.client.get(location)
    assert f'name="next" value="{target}"' in form.text
    r = env.login(ADMIN_TOKEN, next=target)
    assert r.status_code == 303 and r.headers["location"] == target


@pytest.mark.parametrize(
    "target",
    [
        "//evil.com",
        "//evil.com/ui/jobs",
        "https://evil",
        "https://evil.com/ui/jobs",
        "/\\evil.com",
        "/ui/\\evil.com",
        "javascript:alert(1)",
        "evil.com",
        "/v1/silos",
        "",
    ],
)
def test_next_never_leaves_the_dashboard(env, target):
    r = env.login(ADMIN_TOKEN, next=target)
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    form = env.client.get("/ui/login", params={"next": target})
    assert 'name="next" value="/ui/jobs"' in form.text


def _forge(payload: dict, mac: str) -> str:
    body = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{body}.{mac}"


def _refused(env, cookie: str) -> None:
    env.client.cookies.clear()
    env.client.cookies.set(COOKIE_NAME, cookie)
    assert env.client.get("/v1/jobs").status_code == 401
    r = env.client.get("/ui/jobs")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")


def test_forged_and_expired_cookies_are_refused(env):
    signer = env.app.state.clues.signer
    admin_hash = hash_token(ADMIN_TOKEN)
    good = signer.sign("admin", admin_hash)
    env.client.cookies.set(COOKIE_NAME, good)
    assert env.client.get("/v1/jobs").status_code == 200  # the control: a well-made cookie works
    body, mac = good.split(".")

    _refused(env, SessionSigner(b"another secret, 32 bytes long!!!").sign("admin", admin_hash))
    _refused(env, signer.sign("admin", admin_hash, now=time.time() - SESSION_TTL_S - 60))  # expired
    _refused(env, signer.sign("admin", hash_token("a guess")))  # not made with the admin token
    _refused(env, _forge({"sub": "admin", "tok": signer.fingerprint(admin_hash), "exp": time.time() + 1e6}, mac))
    _refused(env, body + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"))
    _refused(env, "garbage")
    _refused(env, good + ".x")
    silo1 = signer.sign("silo:silo1", hash_token(env.job.tokens["silo1"]))
    _refused(env, silo1.split(".")[0] + "." + mac)  # a silo's body under the admin's mac
    _refused(env, signer.sign("silo:silo1", hash_token(env.job.tokens["silo2"])))  # another silo's token
    _refused(env, signer.sign("silo:nobody", hash_token("x")))
    _refused(env, signer.sign("root", admin_hash))


def test_admin_cookie_ends_when_the_admin_token_changes(env):
    env.login(ADMIN_TOKEN)
    cookie = env.client.cookies[COOKIE_NAME]
    # a restart with the same token: the session key lives in the data dir, so the session survives
    with TestClient(make_app(env.data_dir), follow_redirects=False) as same:
        same.cookies.set(COOKIE_NAME, cookie)
        assert same.get("/v1/jobs").status_code == 200
    with TestClient(
        make_app(env.data_dir, admin_token="rotated-admin-token-0123456789abcdef"), follow_redirects=False
    ) as rotated:
        rotated.cookies.set(COOKIE_NAME, cookie)
        assert rotated.get("/v1/jobs").status_code == 401
        assert rotated.get("/ui/jobs").status_code == 303
        assert (
            rotated.get(
                "/v1/jobs", headers={"Authorization": "Bearer rotated-admin-token-0123456789abcdef"}
            ).status_code
            == 200
        )


def test_silo_cookie_ends_when_its_token_changes(env):
    env.login(env.job.tokens["silo1"])
    assert env.client.get("/v1/jobs").status_code == 200
    with env.app.state.clues.sessions() as session:
        silo = repo.get_silo_by_name(session, name="silo1")
        silo.token_hash = hash_token("a new token")
        session.commit()
    assert env.client.get("/v1/jobs").status_code == 401
    assert env.client.get("/ui/jobs").status_code == 303


def test_silo_cookie_ends_when_the_silo_is_gone(env):
    env.login(env.job.tokens["silo2"])
    with env.app.state.clues.sessions() as session:
        session.get(Silo, repo.get_silo_by_name(session, name="silo2").id).name = "renamed"
        session.commit()
    assert env.client.get("/v1/jobs").status_code == 401


# --- CSRF ----------------------------------------------------------------------------------------------------------


def _override(env, sample: int, headers: dict[str, str]):
    body = {"sample_id": env.job.sample_ids["silo1"][sample], "decision": "keep", "reason": "csrf test"}
    return env.client.post(f"/v1/jobs/{env.job.job_id}/overrides", json=body, headers=headers)


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://testserver"},  # the browser's own word wins
        {"Origin": "https://evil.example"},
        {"Origin": "http://testserver.evil.example"},
        {"Origin": "http://evil.example/testserver"},
        {"Origin": "null"},
    ],
)
def test_cookie_write_from_another_site_is_refused(env, headers):
    env.login(env.job.tokens["silo1"])
    r = _override(env, 0, headers)
    assert r.status_code == 403 and "cross-site" in r.json()["detail"]
    log = env.client.get(f"/v1/jobs/{env.job.job_id}/overrides", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert log.json()["total"] == 0


@pytest.mark.parametrize(
    "headers",
    [{"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"Origin": "http://testserver"}, {}],
)
def test_cookie_write_from_our_pages_is_allowed(env, headers):
    env.login(env.job.tokens["silo1"])
    r = _override(env, 1, headers)
    assert r.status_code == 201, r.text
    assert r.json()["actor"] == "silo1"


def test_bearer_writes_need_no_origin(env):
    headers = {"Authorization": f"Bearer {env.job.tokens['silo1']}", "Sec-Fetch-Site": "cross-site"}
    assert _override(env, 2, headers).status_code == 201  # no cookie: nothing a foreign page could ride on


def test_cookie_reads_are_not_origin_checked(env):
    env.login(ADMIN_TOKEN)
    assert env.client.get("/v1/jobs", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_logout_clears_the_cookie(env):
    env.login(ADMIN_TOKEN)
    r = env.client.post("/ui/logout")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    morsel = set_cookie_of(r)[COOKIE_NAME]
    assert morsel.value == "" and int(morsel["max-age"]) == 0
    assert COOKIE_NAME not in env.client.cookies
    assert env.client.get("/ui/jobs").status_code == 303


# --- pages ---------------------------------------------------------------------------------------------------------


def test_unknown_job_page_is_a_404_page(env):
    env.login(ADMIN_TOKEN)
    for url in (f"/ui/jobs/{'0' * 32}", f"/ui/train/{'0' * 32}"):
        r = env.client.get(url)
        assert r.status_code == 404, url
        assert r.headers["content-type"].startswith("text/html")
        assert r.text.lstrip().startswith("<!doctype html>") and "0" * 32 in r.text
        with pytest.raises(ValueError):
            r.json()
    # the API under the same cookie still answers JSON
    api = env.client.get(f"/v1/jobs/{'0' * 32}")
    assert api.status_code == 404 and "detail" in api.json()


@pytest.mark.parametrize("who", ["admin", "silo1"])
def test_pages_hold_no_token(env, who):
    token = ADMIN_TOKEN if who == "admin" else env.job.tokens["silo1"]
    env.login(token)
    cookie = env.client.cookies[COOKIE_NAME]
    for url in ("/ui/jobs", f"/ui/jobs/{env.job.job_id}"):
        html = env.client.get(url).text
        assert env.job.job_id in html
        for secret in (token, cookie, *env.job.tokens.values(), ADMIN_TOKEN):
            assert secret not in html, url


def test_static_files_are_served_without_a_session(env):
    r = env.client.get("/ui/static/plotly.min.js")
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
    assert len(r.content) > 1_000_000 and b"plotly" in r.content[:5000].lower()
    for name in ("dashboard.js", "dashboard.css"):
        assert env.client.get(f"/ui/static/{name}").status_code == 200


# --- the pieces: secret, signer, origin check ----------------------------------------------------------------------


def test_load_secret_persists_0600(tmp_path):
    path = tmp_path / "deep" / "session.key"
    first = load_secret(None, path)
    assert len(first) == 32 and path.read_bytes() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(None, path) == first and load_secret("", path) == first
    assert [p.name for p in path.parent.iterdir()] == ["session.key"]  # no temporary file left behind
    assert load_secret("from-the-environment", tmp_path / "unused.key") == b"from-the-environment"
    assert not (tmp_path / "unused.key").exists()
    assert load_secret(None, tmp_path / "other.key") != first


def test_app_keeps_its_session_key_in_the_data_dir(env):
    path = env.data_dir / "session.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(None, path) == path.read_bytes()


def test_signer_round_trip_and_refusals():
    with pytest.raises(ValueError):
        SessionSigner(b"short")
    signer = SessionSigner(b"k" * 32, ttl_s=100)
    cookie = signer.sign("silo:a", "h" * 64, now=1000.0)
    session = signer.read(cookie, now=1050.0)
    assert (session.subject, session.expires) == ("silo:a", 1100.0)
    assert signer.matches(session, "h" * 64) and not signer.matches(session, "g" * 64)
    assert signer.read(cookie, now=1100.0) is None  # expired at exactly ttl
    assert SessionSigner(b"j" * 32).read(cookie, now=1050.0) is None
    for bad in (None, "", "no-dot", "a.b.c", ".", cookie.replace(".", ".x")):
        assert signer.read(bad, now=1050.0) is None
    not_json = "bm90IGpzb24"  # base64 of "not json", correctly signed
    assert signer.read(f"{not_json}.{signer._mac(not_json)}", now=0) is None
    missing = base64.urlsafe_b64encode(b'{"sub":"admin"}').rstrip(b"=").decode()
    assert signer.read(f"{missing}.{signer._mac(missing)}", now=0) is None
    assert "h" * 64 not in cookie


@pytest.mark.parametrize(
    ("headers", "host", "ok"),
    [
        ({}, "example.org", True),
        ({"sec-fetch-site": "same-origin"}, "example.org", True),
        ({"sec-fetch-site": "none"}, "example.org", True),
        ({"sec-fetch-site": "same-site"}, "example.org", False),
        ({"sec-fetch-site": "cross-site", "origin": "https://example.org"}, "example.org", False),
        ({"origin": "https://example.org"}, "example.org", True),
        ({"origin": "https://example.org:8443"}, "example.org:8443", True),
        ({"origin": "https://example.org:8443"}, "example.org", False),
        ({"origin": "https://evil.org"}, "example.org", False),
        ({"origin": "null"}, "example.org", False),
        ({"origin": "https://example.org"}, None, False),
    ],
)
def test_same_origin(headers, host, ok):
    assert same_origin(headers, host) is ok
