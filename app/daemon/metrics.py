"""The daemon's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# frame to event: a track ends `tracker.max_missed` detections after its last frame
_EVENT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The daemon's Prometheus metrics in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        cam = ["camera"]
        self.frames = Counter("facemoe_frames", "frames processed", cam, registry=r)
        self.dropped = Counter("facemoe_frames_dropped", "frames dropped (queue full)", cam,
                               registry=r)
        self.reconnects = Counter("facemoe_reconnects", "camera reconnects", cam, registry=r)
        self.events = Counter("facemoe_events", "events (finished tracks)", cam, registry=r)
        self.recognized = Counter("facemoe_recognized", "'recognized' alerts (open tracks)",
                                  cam, registry=r)
        self.events_dropped = Counter("facemoe_events_dropped", "events dropped (sink queue full)",
                                      registry=r)
        self.sink_errors = Counter("facemoe_sink_errors", "failed sink writes", ["sink"],
                                   registry=r)
        self.sink_incidents = Counter(
            "facemoe_sink_incidents",
            "MQTT/webhook incidents: kind=disconnect (connection lost), retry (failed send, "
            "retried), dropped (a full buffer dropped its oldest message, or a rejected event)",
            ["sink", "kind"], registry=r)
        self.corrupt_templates = Gauge(
            "facemoe_gallery_corrupt_templates",
            "templates left out of matching because they are corrupt (see `gallery check`)",
            registry=r)
        self.sink_pending = Gauge("facemoe_sink_pending", "messages waiting for delivery",
                                  ["sink"], registry=r)
        self.sink_oldest = Gauge(
            "facemoe_sink_oldest_seconds",
            "age of the oldest event or message a sink has not delivered (0: none waits)",
            ["sink"], registry=r)
        self.fps = Gauge("facemoe_fps", "processed frames per second", cam, registry=r)
        self.queue = Gauge("facemoe_queue_depth", "frames waiting", cam, registry=r)
        self.up = Gauge("facemoe_camera_up", "1 while the camera delivers frames", cam, registry=r)
        self.latency = Histogram("facemoe_stage_seconds", "per-frame stage latency",
                                 ["camera", "stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.event_latency = Histogram(
            "facemoe_event_latency_seconds",
            "seconds from the arrival of a track's last frame to its event reaching the sinks",
            cam, buckets=_EVENT_BUCKETS, registry=r)
