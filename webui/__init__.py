"""What the coordinator's dashboard (`app.ui`) and a silo's dashboard (`agent.dashboard`) share: signed session
cookies, the shared Jinja2 templates (base page, login form) and static files (CSS, the table and chart script), and
the charting library, Plotly, served from the ``plotly`` wheel installed from PyPI (never a CDN: silos may have no
internet).

No web framework here: the two servers mount these files and call these functions themselves.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
import os
import secrets
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape

PREFIX = "/ui"  # where both dashboards serve their pages
PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
COOKIE_NAME = "clues_session"
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
}
"""Headers on every response of both dashboards: no framing (clickjacking), no MIME sniffing, no referrer to other
sites, and a Content Security Policy that loads nothing from elsewhere (the pages' scripts and Plotly are served by
the dashboard itself; the pages' own inline scripts are allowed)."""
SESSION_TTL_S = 12 * 3600


def plotly_js() -> Path:
    """``plotly.min.js`` inside the installed ``plotly`` package, found without importing it.

    Raises:
        FileNotFoundError: plotly is not installed (it is a dependency of clues: ``pip install plotly``).
    """
    spec = importlib.util.find_spec("plotly")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    raise FileNotFoundError("plotly.min.js not found: install the plotly package (pip install plotly)")


def template_environment(own: Path) -> Environment:
    """Jinja2 templates from ``own`` first, then the shared ones (base page, login form, macros); autoescaped."""
    loader = ChoiceLoader([FileSystemLoader(own), FileSystemLoader(TEMPLATES_DIR)])
    return Environment(loader=loader, autoescape=select_autoescape(["html"]))


def page_context(brand: str, who: str | None, status: int, **extra: object) -> dict:
    """What the shared base template needs on every page: the header's brand and user (None: logged out), where the
    static files, the jobs page and the logout form are, the status (error pages), no charts unless a page asks."""
    return {
        "brand": brand,
        "static": f"{PREFIX}/static",
        "home": f"{PREFIX}/jobs",
        "logout_url": f"{PREFIX}/logout",
        "who": who,
        "is_admin": False,
        "charts": False,
        "status_code": status,
        **extra,
    }


def signal_columns(spec: dict, fused: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(raw values, fused signals)``: the extra columns of a scoring job's sample table and CSV export. Raw values
    (the trace score, ℓ(y|x) and each signal the job asks for) when the job keeps them (calibrated, or asking for
    signals); the fused signals whose calibrated z it stores (``fused``:
    `scoring.calibration.fused_signals` of its signals) when it is calibrated. A pure trace job has neither."""
    calibrated = spec.get("score") == "calibrated"
    signals = list(spec.get("signals") or [])
    return (["trace", "loss", *signals] if calibrated or signals else []), (list(fused) if calibrated else [])


def safe_next(target: str | None) -> str:
    """Where to go after logging in: only our own pages — no scheme, no host, no protocol-relative ``//`` (an open
    redirect otherwise); else the jobs page."""
    if target and target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/jobs"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class CookieSession:
    """Who a cookie speaks for: ``subject`` (``admin`` or ``silo:<name>``), the keyed fingerprint of the token the
    user logged in with (so that a changed or revoked token ends its sessions), and the expiry (unix seconds)."""

    subject: str
    fingerprint: str
    expires: float
    sid: str = ""
    """A random id of this login, so that logging out can revoke exactly this session server-side."""


class SessionSigner:
    """HMAC-SHA256 signed session cookies: ``base64(json).base64(mac)``. Nothing secret is in the cookie."""

    def __init__(self, secret: bytes, ttl_s: float = SESSION_TTL_S) -> None:
        if len(secret) < 16:
            raise ValueError("session secret: at least 16 bytes")
        self._secret, self.ttl_s = secret, ttl_s

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())

    def fingerprint(self, token_hash: str) -> str:
        """A keyed digest of a token's sha256 (`storage.repository.hash_token`): without the secret it reveals
        nothing about the token."""
        return self._mac("fp:" + token_hash)[:24]

    def matches(self, session: CookieSession, token_hash: str) -> bool:
        """Whether ``session`` was made with the token whose sha256 is ``token_hash``."""
        return hmac.compare_digest(session.fingerprint, self.fingerprint(token_hash))

    def sign(self, subject: str, token_hash: str, now: float | None = None) -> str:
        """A cookie value for ``subject``, logged in with the token whose sha256 is ``token_hash``."""
        payload = {
            "sub": subject,
            "tok": self.fingerprint(token_hash),
            "exp": (now or time.time()) + self.ttl_s,
            "sid": secrets.token_hex(16),
        }
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self._mac(body)}"

    def read(self, cookie: str | None, now: float | None = None) -> CookieSession | None:
        """The session, or None for a missing, forged, malformed or expired cookie."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            payload = json.loads(_unb64(body))
            session = CookieSession(
                str(payload["sub"]), str(payload["tok"]), float(payload["exp"]), str(payload["sid"])
            )
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > (now or time.time()) else None


def cookie_options(signer: SessionSigner, secure: bool) -> dict:
    """``set_cookie`` keyword arguments of a session cookie: HttpOnly, SameSite=Strict, whole site, the signer's
    lifetime, ``Secure`` when asked (HTTPS)."""
    return {"max_age": int(signer.ttl_s), "httponly": True, "samesite": "strict", "secure": secure, "path": "/"}


def load_secret(value: str | None, path: Path) -> bytes:
    """The session secret: ``value`` when set (e.g. from the environment), else the one kept in ``path``, created
    on first use (random, mode 0600, written to a temporary name and renamed) so sessions survive restarts."""
    if value:
        return value.encode()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".session-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    os.chmod(tmp, 0o600)
    try:
        os.link(tmp, path)  # first writer wins when two processes start together
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_bytes()


def same_origin(headers: dict[str, str] | object, host: str | None) -> bool:
    """Whether a cookie-authenticated request that changes state comes from our own pages: the browser's
    ``Sec-Fetch-Site`` when it sends one, else ``Origin`` against ``Host``. Clients that send neither (not a browser)
    cannot be the victim of a cross-site request and pass. Together with ``SameSite=Strict`` cookies this is the
    CSRF defence."""
    get = headers.get  # type: ignore[attr-defined]
    site = get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = get("origin")
    if origin is None:
        return True
    return origin.split("://", 1)[-1] == (host or "")
