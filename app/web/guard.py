"""Who may talk to the server at all, before any route runs: the DNS-rebinding guard.

A web page on another site can make the browser resolve its own name (a.evil) to 127.0.0.1
and then read the review UI as if it were that site (DNS rebinding): the browser sends
`Host: a.evil:PORT`. So every request must name an allowed host:

- a loopback name (localhost, 127.0.0.1, ::1), any IP literal (a page cannot rebind an
  address: its origin would be that address, i.e. this server), the host the server binds,
  and the names in `web.allowed_hosts` (a `*` there turns the check off);
- when no user or token is configured (every request acts as the local user), a request that
  a browser marks as coming from another origin (`Origin` not this server's, `Origin: null`,
  `Sec-Fetch-Site: cross-site/same-site` except a top-level link followed with GET) is refused.

Refusals are 400 (bad Host) or 403 (cross-origin), one line of JSON, before the body is read.
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})


def split_host(value: str) -> str:
    """The host part of a Host header or netloc, lower-case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def json_answer(send: Send, status: int, text: str,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer `{"detail": text}` with `status` from a middleware (nothing read of the body)."""
    body = json.dumps({"detail": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class HostGuard:
    """ASGI middleware: the Host allow-list always, the Origin check without users."""

    def __init__(self, app: ASGIApp, *, allowed: list[str], bind_host: str,
                 check_origin: bool) -> None:
        self.app = app
        names = {split_host(h) for h in allowed if h.strip()}
        self.any_host = "*" in names
        self.allowed = frozenset(LOOPBACK_NAMES | names | {split_host(bind_host)})
        self.check_origin = check_origin

    def host_ok(self, host: str) -> bool:
        name = split_host(host)
        return bool(name) and (self.any_host or name in self.allowed or _is_ip(name))

    def _refusal(self, headers: dict[bytes, bytes], method: str) -> tuple[int, str] | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.host_ok(host):
            return 400, (f"Host {host[:100]!r} is not allowed (add it to web.allowed_hosts)")
        if not self.check_origin:
            return None
        site = headers.get(b"sec-fetch-site", b"").decode("latin-1")
        if site in ("cross-site", "same-site"):
            navigation = (headers.get(b"sec-fetch-mode") == b"navigate"
                          and method in ("GET", "HEAD"))
            if not navigation:
                return 403, "cross-site request refused"
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1").strip()
            netloc = urlsplit(text).netloc if text != "null" else ""
            if not netloc or netloc.lower() != host.strip().lower():
                return 403, "cross-origin request refused"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(dict(scope["headers"]), scope["method"])
            if refusal is not None:
                await json_answer(send, *refusal)
                return
        await self.app(scope, receive, send)
