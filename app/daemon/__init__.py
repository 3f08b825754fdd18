"""`facemoe run`: the long-running daemon over many live cameras.

Threads:
  - one reader per camera: GStreamer source -> a bounded frame queue (the oldest frame is
    dropped when the worker falls behind); on a failure (SourceError, end of a live stream,
    no frame for `frame_timeout_s`) it tells the worker to end the camera's open tracks and
    reconnects with exponential backoff; other cameras are unaffected;
  - one worker: round-robins the camera queues through one `FacePipeline` per camera (all
    sharing one detector and embedder) and hands events to the sinks;
  - a thread that checks the gallery for changes (enroll, rename, remove by another process)
    and swaps in a rebuilt matcher; the video path never waits for the database, and keeps
    the last good gallery while it is away;
  - a thread and a queue per sink (sinks.py; the same sinks `process` writes): snapshots
    first (they hand each batch on, so a message's snapshot exists when it arrives), then the
    gallery (batched commits; events it refuses wait in the outbox file), rotating JSONL
    (`end` events: one per track), MQTT and the webhook (`recognized` alerts too); a slow or
    failing sink delays only itself and /healthz names it;
  - a monitor (stats line, Prometheus gauges) and an HTTP server (/metrics, /healthz).
SIGTERM/SIGINT: stop the readers, end every open track, write its event, exit 0.
SIGHUP: reload the gallery matrix. A thread that dies stops the daemon with exit code 1.

Modules: camera.py (reader, frame queue, per-camera pipeline and health), core.py (the
Daemon), sinks.py (the sink factory and workers), http.py (/metrics, /healthz, review UI),
metrics.py (Prometheus).
"""

from app.daemon.camera import _RECONNECT, Camera, FrameQueue
from app.daemon.core import Daemon, run_daemon
from app.daemon.metrics import Metrics

__all__ = ["_RECONNECT", "Camera", "Daemon", "FrameQueue", "Metrics", "run_daemon"]
