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
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from app.config import WebConfig

log = logging.getLogger(__name__)

COOKIE = "facemoe_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
PASSWORD_ENV, USER_ENV, TOKEN_ENV = "FACEMOE_WEB_PASSWORD", "FACEMOE_WEB_USER", "FACEMOE_WEB_TOKEN"
_SCRYPT = (2**14, 8, 1)
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
MAX_FAILURES, FAILURE_WINDOW_S = 5, 300.0  # failed logins per user and per address, then a wait
MAX_SESSIONS = 10_000  # live sessions kept server-side (the oldest go first)


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


class LoginLimiter:
    """Failed logins per key (a user name, a client address) within `FAILURE_WINDOW_S`.

    An attempt is admitted atomically before the password is checked and counts against
    every key until it ends (`attempt`): parallel guesses cannot all be checked while the
    first ones are still being verified."""

    def __init__(self, limit: int = MAX_FAILURES, window_s: float = FAILURE_WINDOW_S) -> None:
        self.limit, self.window_s = limit, window_s
        self._failures: dict[str, deque[float]] = {}
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def _wait(self, key: str, now: float) -> float:
        times = self._failures.get(key)
        while times and now - times[0] > self.window_s:
            times.popleft()
        if times is not None and not times:
            del self._failures[key]
        used = len(times or ()) + self._running.get(key, 0)
        if used < self.limit:
            return 0.0
        return self.window_s - (now - times[0]) if times else 1.0

    def wait(self, *keys: str) -> float:
        """Seconds before the next attempt for `keys` is admitted (0: now)."""
        now = time.monotonic()
        with self._lock:
            return max(self._wait(k, now) for k in keys)

    @contextmanager
    def attempt(self, *keys: str) -> Iterator[Callable[[], None]]:
        """Admit an attempt (LoginRefused with the wait when over the limit); yields a
        `failed()` to call when the credentials were wrong."""
        now = time.monotonic()
        with self._lock:
            wait = max(self._wait(k, now) for k in keys)
            if wait > 0:
                raise LoginRefused(wait)
            if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
                self._failures.clear()
            for k in keys:
                self._running[k] = self._running.get(k, 0) + 1
        failed = []
        try:
            yield lambda: failed.append(True)
        finally:
            with self._lock:
                for k in keys:
                    self._running[k] -= 1
                    if not self._running[k]:
                        del self._running[k]
                    if failed:
                        self._failures.setdefault(k, deque(maxlen=self.limit)).append(
                            time.monotonic())


class LoginRefused(Exception):
    """Too many failed logins: `wait` seconds before the next attempt."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"too many failed logins: try again in {max(1, round(wait / 60))} min")
        self.wait = wait


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
        self.host = host
        self.session_s = cfg.session_hours * 3600
        self.proxies = [ipaddress.ip_network(p, strict=False) for p in cfg.trusted_proxies]
        self.limiter = LoginLimiter()
        self._sessions: dict[str, tuple[str, float, str]] = {}  # nonce -> user, expiry, hash
        self._sessions_lock = threading.Lock()
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

    def set_password(self, name: str, password_hash: str) -> int:
        """Give `name` a new password (hash); its sessions end. Returns the sessions ended."""
        self.users[name] = password_hash
        return self.revoke_user(name)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client of a request: the peer, or when the peer is a configured proxy
        (`web.trusted_proxies`), the last address in X-Forwarded-For that is not one."""
        client = peer or "?"
        if not forwarded_for or not self._trusted(client):
            return client
        for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
            client = hop
            if not self._trusted(hop):
                break
        return client

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.proxies)

    def check_token(self, token: str) -> bool:
        got = hash_token(token)
        return any(hmac.compare_digest(got, t) for t in self.tokens)

    # --- sessions -----------------------------------------------------------------------------

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def login(self, name: str, password: str, client: str) -> str | None:
        """Check a login within the limits (LoginRefused when over them); a new session
        cookie, or None for wrong credentials."""
        with self.limiter.attempt(f"user:{name}", f"addr:{client}") as failed:
            if self.check_password(name, password):
                return self.new_session(name)
            failed()
            return None

    def new_session(self, name: str) -> str:
        nonce, exp = secrets.token_hex(16), time.time() + self.session_s
        with self._sessions_lock:
            now = time.time()
            for old in [n for n, (_, e, _) in self._sessions.items() if e < now]:
                del self._sessions[old]
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[nonce] = (name, exp, self.users.get(name, ""))
        body = json.dumps({"u": name, "exp": exp, "n": nonce}).encode()
        payload = base64.urlsafe_b64encode(body)
        return f"{payload.decode()}.{self._sign(payload)}"

    def _nonce(self, cookie: str | None) -> tuple[str, str, float] | None:
        """(user, nonce, expiry) of a cookie this server signed, None otherwise."""
        if not cookie or "." not in cookie:
            return None
        payload, sig = cookie.rsplit(".", 1)
        if not hmac.compare_digest(self._sign(payload.encode()), sig):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(payload.encode()))
            return str(body["u"]), str(body["n"]), float(body["exp"])
        except (ValueError, KeyError, TypeError):
            return None

    def read_session(self, cookie: str | None) -> User | None:
        signed = self._nonce(cookie)
        if signed is None:
            return None
        name, nonce, exp = signed
        with self._sessions_lock:
            live = self._sessions.get(nonce)
        if live is None or live[0] != name or exp < time.time():
            return None  # ended at logout, by a password change, or expired
        if self.required and self.users.get(name) != live[2]:
            return None
        return User(name, "session", self._sign(f"csrf:{nonce}".encode()))

    def end_session(self, cookie: str | None) -> bool:
        """Logout: the session of `cookie` is no longer accepted."""
        signed = self._nonce(cookie)
        if signed is None:
            return False
        with self._sessions_lock:
            return self._sessions.pop(signed[1], None) is not None

    def revoke_user(self, name: str) -> int:
        """End every session of `name`; returns how many."""
        with self._sessions_lock:
            ended = [n for n, (u, _, _) in self._sessions.items() if u == name]
            for n in ended:
                del self._sessions[n]
        return len(ended)

    def csrf_ok(self, user: User, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(user.csrf, str(token))
