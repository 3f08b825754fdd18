"""A looping RTSP camera on 127.0.0.1 for tests and benchmarks of the daemon.

Run as a script (`python benchmarks/rtsp_camera.py CLIP PORT`) it serves CLIP's H.264 access
units at real time, looped, at rtsp://127.0.0.1:PORT/cam (no re-encoding) and prints "ready".
`RtspCamera` runs that script in a subprocess that can be killed and restarted on the same port.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rtsp_available() -> bool:
    """Whether GStreamer's RTSP server bindings (gir1.2-gst-rtsp-server-1.0) are installed."""
    try:
        import gi

        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GstRtspServer  # noqa: F401
    except (ImportError, ValueError):
        return False
    return True


class RtspCamera:
    """The server script in a subprocess; `start` again after `kill` reuses the port (and URL)."""

    def __init__(self, clip: Path, port: int | None = None) -> None:
        self.clip, self.port = clip, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the port can stay busy for a moment after a kill
            cmd = [sys.executable, __file__, str(self.clip), str(self.port)]
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            if self.proc.stdout.readline().strip() == "ready":  # EOF when it could not bind
                return
            self.proc.wait(5)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the RTSP camera server did not start on port {self.port}")
            time.sleep(0.3)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def serve(clip: str, port: str) -> None:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    reader = Gst.parse_launch(
        f"filesrc location={clip} ! qtdemux ! h264parse config-interval=-1 ! "
        "video/x-h264,stream-format=byte-stream,alignment=au ! appsink name=out sync=false"
    )
    reader.set_state(Gst.State.PLAYING)
    sink = reader.get_by_name("out")
    units, caps = [], None
    while (sample := sink.emit("pull-sample")) is not None:
        caps = caps or sample.get_caps()
        buf = sample.get_buffer()
        units.append(buf.extract_dup(0, buf.get_size()))
    reader.set_state(Gst.State.NULL)
    ok, num, den = caps.get_structure(0).get_fraction("framerate")
    fps = num / den if ok and num and den else 25.0

    def feed(appsrc) -> None:  # the clip's access units at real time, looped
        i, t0 = 0, time.monotonic()
        while True:
            if (
                appsrc.emit("push-buffer", Gst.Buffer.new_wrapped(units[i % len(units)]))
                != Gst.FlowReturn.OK
            ):
                return
            i += 1
            time.sleep(max(0.0, t0 + i / fps - time.monotonic()))

    def configure(_factory, media) -> None:
        src = media.get_element().get_by_name("src")
        src.set_property("caps", caps)
        threading.Thread(target=feed, args=(src,), daemon=True).start()

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        "( appsrc name=src is-live=true do-timestamp=true format=time ! "
        "h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
    )
    factory.connect("media-configure", configure)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        sys.exit("cannot bind")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
