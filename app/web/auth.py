"""Authentication of the review UI and API.

- Passwords are kept as scrypt hashes (`scrypt$N$r$p$salt$hash`), tokens as SHA-256 hashes
  (`sha256$hex`; a token is random, so a fast hash is enough); plaintext ones from the
  environment are hashed when read.
- Pages: a login sets a signed session cookie (HMAC-SHA256 with a key made at start-up:
  a restart logs everyone out), HttpOnly and SameSite=Strict. Every form and every mutating
  request of a session carries its CSRF token (`csrf_token` field or `X-CSRF-Token` header),
  an HMAC of the session's nonce.
- API: `Authorization: Bearer TOKEN` (no cookie, so no CSRF check).
- Without any user or token (allowed on loopback only) every request acts as the local user;
  mutating requests are still refused when a browser says they come from another site.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

from app.config import WebConfig

log = logging.getLogger(__name__)

COOKIE = "facemoe_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
PASSWORD_ENV, USER_ENV, TOKEN_ENV = "FACEMOE_WEB_PASSWORD", "FACEMOE_WEB_USER", "FACEMOE_WEB_TOKEN"
_SCRYPT = (2**14, 8, 1)
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
MAX_FAILURES, FAILURE_WINDOW_S = 5, 300.0  # failed logins per client address, then a wait


class AuthConfigError(Exception):
    """The web server may not start with this authentication set-up (one line)."""


def hash_password(password: str) -> str:
    n, r, p = _SCRYPT
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(base64.b64decode(digest)))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def hash_token(token: str) -> str:
    return "sha256$" + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class User:
    name: str
    via: str  # session | token | local
    csrf: str = ""  # the session's CSRF token (sessions only)

    @property
    def audit_name(self) -> str:
        return f"{self.name} (web)"


class Authenticator:
    """Users, tokens and sessions of one server."""

    def __init__(self, cfg: WebConfig, host: str, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        self.users = {u.name: u.password_hash for u in cfg.users}
        self.tokens = list(cfg.token_hashes)
        if env.get(PASSWORD_ENV):
            self.users[env.get(USER_ENV) or "admin"] = hash_password(env[PASSWORD_ENV])
        if env.get(TOKEN_ENV):
            self.tokens.append(hash_token(env[TOKEN_ENV]))
        bad = [t for t in self.tokens if not t.startswith("sha256$")]
        if bad:
            raise AuthConfigError("web.token_hashes must be sha256$... hashes "
                                  "(make one with: facemoe serve --hash-token)")
        self.required = bool(self.users or self.tokens)
        if not self.required and host not in LOOPBACK:
            raise AuthConfigError(
                f"serving on {host} needs authentication: set {PASSWORD_ENV} or {TOKEN_ENV}, "
                f"or web.users / web.token_hashes in the config (or bind 127.0.0.1)")
        self.session_s = cfg.session_hours * 3600
        self._failures: dict[str, deque[float]] = {}
        self._failures_lock = threading.Lock()
        self._key = secrets.token_bytes(32)
        try:
            self.local_user = getpass.getuser()
        except (KeyError, OSError):
            self.local_user = "local"

    # --- credentials --------------------------------------------------------------------------

    def check_password(self, name: str, password: str) -> bool:
        stored = self.users.get(name)
        if stored is None:
            verify_password(password, hash_password("x"))  # same time for unknown users
            return False
        return verify_password(password, stored)

    def login_wait(self, client: str) -> float:
        """Seconds `client` must wait before its next login attempt (0: none): after
        `MAX_FAILURES` failures within `FAILURE_WINDOW_S`, until the oldest one expires."""
        now = time.monotonic()
        with self._failures_lock:
            times = self._failures.get(client)
            while times and now - times[0] > FAILURE_WINDOW_S:
                times.popleft()
            if not times or len(times) < MAX_FAILURES:
                return 0.0
            return FAILURE_WINDOW_S - (now - times[0])

    def login_failed(self, client: str) -> None:
        with self._failures_lock:
            if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
                self._failures.clear()
            self._failures.setdefault(client, deque(maxlen=MAX_FAILURES)).append(
                time.monotonic())

    def check_token(self, token: str) -> bool:
        got = hash_token(token)
        return any(hmac.compare_digest(got, t) for t in self.tokens)

    # --- sessions -----------------------------------------------------------------------------

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def new_session(self, name: str) -> str:
        body = json.dumps({"u": name, "exp": time.time() + self.session_s,
                           "n": secrets.token_hex(16)}).encode()
        payload = base64.urlsafe_b64encode(body)
        return f"{payload.decode()}.{self._sign(payload)}"

    def read_session(self, cookie: str | None) -> User | None:
        if not cookie or "." not in cookie:
            return None
        payload, sig = cookie.rsplit(".", 1)
        if not hmac.compare_digest(self._sign(payload.encode()), sig):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(payload.encode()))
            name, exp, nonce = str(body["u"]), float(body["exp"]), str(body["n"])
        except (ValueError, KeyError, TypeError):
            return None
        if exp < time.time() or (self.required and name not in self.users):
            return None
        return User(name, "session", self._sign(f"csrf:{nonce}".encode()))

    def csrf_ok(self, user: User, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(user.csrf, str(token))
