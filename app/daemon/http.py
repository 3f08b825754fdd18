"""The daemon's HTTP servers: /metrics and /healthz (a small threaded server with bounded
clients), or, with `daemon.web: true`, the review UI and API with the same /metrics and the
same /healthz (`Daemon.healthz`: one answer, 503 when degraded)."""

from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from app.runtime import make_detector

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from app.daemon.core import Daemon

_HTTP_TIMEOUT_S = 10.0  # per socket operation of a /metrics or /healthz client
_HTTP_MAX_CLIENTS = 16  # connections served at once; more are closed at once


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `_HTTP_MAX_CLIENTS` at once; a client error
    (timeout, reset) is one debug line, never a traceback in the log."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(_HTTP_MAX_CLIENTS)

    def process_request(self, request, client_address) -> None:  # noqa: ANN001
        if not self._slots.acquire(blocking=False):
            log.warning("HTTP: %d clients already connected; closing a new connection from %s",
                        _HTTP_MAX_CLIENTS, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        log.debug("HTTP client %s: %s", client_address[0], sys.exc_info()[1])


def serve_web(daemon: Daemon):
    """The review UI and API (`daemon.web`) on the metrics port, with /metrics and
    /healthz, under uvicorn in a thread. The web app gets a detector of its own (the
    worker's is not shared between threads) and the daemon's embedder and gallery."""
    import uvicorn
    from fastapi.responses import JSONResponse, Response

    from app.web.app import create_app, uvicorn_config
    from app.web.context import WebContext

    d = daemon.cfg.daemon
    ctx = WebContext(daemon.cfg, daemon.gallery, make_detector(daemon.cfg), daemon.embedder,
                     daemon.threshold, daemon.web_auth, cameras=daemon.camera_status)
    app = create_app(ctx)
    ctx.start_refresher(daemon.stopping)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(daemon.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        code, health = daemon.healthz()
        return JSONResponse(health, status_code=code)

    server = uvicorn.Server(uvicorn_config(app, host=d.metrics_host, port=d.metrics_port))
    threading.Thread(target=server.run, name="web", daemon=True).start()
    log.info("review UI on http://%s:%d/, metrics on /metrics, health on /healthz",
             d.metrics_host, d.metrics_port)
    return server


def serve_http(daemon: Daemon) -> ThreadingHTTPServer:
    """/metrics and /healthz on `daemon.metrics_port`, in a thread; the server."""
    d = daemon.cfg.daemon

    class Handler(BaseHTTPRequestHandler):
        timeout = _HTTP_TIMEOUT_S  # a client that stalls is dropped, its thread freed

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            if path == "/metrics":
                body = generate_latest(daemon.metrics.registry)
                ctype, code = CONTENT_TYPE_LATEST, 200
            elif path == "/healthz":
                code, health = daemon.healthz()
                body, ctype = json.dumps(health).encode(), "application/json"
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    http = _BoundedHTTPServer((d.metrics_host, d.metrics_port), Handler)
    threading.Thread(target=http.serve_forever, name="http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, health on /healthz", d.metrics_host,
             http.server_address[1])
    return http
