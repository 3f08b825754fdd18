"""The webhook sink against a real HTTP server on 127.0.0.1 that fails, stalls and recovers."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.sinks import SinkError, WebhookSink
from benchmarks.rtsp_camera import free_port
from tests.gallery_helpers import event

pytestmark = pytest.mark.unit

SECRET = "correct horse battery staple"


class Receiver:
    """A webhook target: answers each POST with the next status of `script` (then 204),
    sleeping `stall` seconds first when the status is 'stall'."""

    def __init__(self, port: int = 0, script: list[int | str] = (), stall: float = 0.0) -> None:
        self.script, self.stall = list(script), stall
        self.received: list[tuple[dict, str | None, bytes]] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                status = receiver.script.pop(0) if receiver.script else 204
                if status == "stall":
                    time.sleep(receiver.stall)
                    status = 204
                if status == 204:
                    receiver.received.append(
                        (json.loads(body), self.headers.get("X-FaceMoE-Signature-256"), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_failing_then_stalling_target_gets_every_event_in_order_and_signed():
    target = Receiver(script=[503, 503, "stall", 500], stall=1.5)
    incidents: list[tuple[str, int]] = []
    sink = WebhookSink(target.url, timeout=0.5, secret=SECRET, retry_initial_s=0.05,
                       retry_max_s=0.2, count=lambda kind, n: incidents.append((kind, n)))
    events = [event(i, None) for i in range(8)]
    try:
        t = time.monotonic()
        for ev in events:
            sink.write([ev])
        assert time.monotonic() - t < 0.1  # the caller (the daemon's sink thread) never waits
        assert sink.flush(20), f"{sink.pending()} not delivered"
    finally:
        sink.close()
        target.close()
    ids = [r[0]["id"] for r in target.received]
    # a stalled POST may have reached the target before it timed out: at least once, in order
    assert list(dict.fromkeys(ids)) == [e.id for e in events]
    assert sink.retries >= 4 and ("retry", 1) in incidents and sink.dropped == 0
    for record, signature, body in target.received:
        expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert signature == f"sha256={expected}"
        assert record == next(e for e in events if e.id == record["id"]).to_json()


def test_a_full_queue_drops_the_oldest_and_counts_them():
    port = free_port()  # nobody listens yet
    incidents: list[tuple[str, int]] = []
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook", timeout=0.5, queue=4,
                       retry_initial_s=0.05, retry_max_s=0.1,
                       count=lambda kind, n: incidents.append((kind, n)))
    events = [event(i, None) for i in range(10)]
    try:
        sink.write(events)
        assert sink.dropped == 6 and ("dropped", 6) in incidents
        time.sleep(0.3)  # some failed tries
        target = Receiver(port)
        try:
            assert sink.flush(10)
        finally:
            target.close()
    finally:
        sink.close()
    assert [r[0]["id"] for r in target.received] == [e.id for e in events[6:]]
    assert target.received[0][1] is None  # no secret: no signature header


def test_a_rejected_event_is_dropped_and_the_next_one_sent():
    target = Receiver(script=[400])
    sink = WebhookSink(target.url, retry_initial_s=0.05)
    try:
        sink.write([event(1, None), event(2, None)])
        assert sink.flush(10)
    finally:
        sink.close()
        target.close()
    assert [r[0]["track_id"] for r in target.received] == [2] and sink.dropped == 1
    with pytest.raises(SinkError, match="closed"):
        sink.write([event(3, None)])
    with pytest.raises(SinkError, match="http"):
        WebhookSink("ftp://127.0.0.1/x")
