"""Video input and output through GStreamer (decoding never goes through cv2.VideoCapture).

`open_source` turns a path or URI (file, RTSP, HTTP, v4l2 device) into a `VideoSource`
that yields `app.records.Frame`s; `VideoWriter` encodes BGR frames to an H.264 MP4.
Every failure a user can cause surfaces as a `SourceError` with a one-line message.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
import weakref
from collections.abc import Iterator
from contextlib import ExitStack
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import numpy as np

from app.fsutil import atomic_path
from app.records import Frame

try:
    import ctypes

    # GStreamer pulls in libunwind, whose unwinder would then handle C++ exceptions thrown by
    # torch, OpenCV or matplotlib and abort the process. Loading libgcc_s's first keeps the
    # normal unwinder in charge.
    try:
        ctypes.CDLL("libgcc_s.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstApp", "1.0")
    from gi.repository import Gst, GstApp  # noqa: F401  (GstApp adds AppSink.try_pull_sample)
except (ImportError, ValueError) as _exc:  # pragma: no cover - depends on the host
    Gst = None
    _GI_ERROR: Exception | None = _exc
else:
    _GI_ERROR = None

log = logging.getLogger(__name__)

_POLL_NS = 250_000_000  # how long one appsink pull waits before the bus is checked again
_MAX_BUFFERS = 8  # frames queued in the appsink before decoding blocks (files) or drops (live)
_GIF_STALL_S = 0.5  # see VideoSource._stalled_at_end
_MAX_RESYNC = 100  # restarts of one element/pad iteration before giving up (see _items)


class SourceError(Exception):
    """A video input/output failure; `str()` is a one-line message for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def init_gstreamer() -> None:
    """Initialise GStreamer once; raise SourceError when the bindings are missing."""
    if Gst is None:
        raise SourceError(
            f"GStreamer Python bindings unavailable ({_GI_ERROR}); install python3-gi "
            "python3-gst-1.0 gir1.2-gst-plugins-base-1.0 and use a venv with system site packages"
        )
    if not Gst.is_initialized():
        Gst.init(None)
    if not _GLIB_ROUTED:
        _route_glib_log()


_GLIB_DOMAINS = ("GStreamer", "GLib", "GLib-GObject")
_GLIB_ROUTED = False


def _route_glib_log() -> None:
    """Send GStreamer's and GLib's CRITICAL/WARNING messages (printed straight to stderr by
    default) through Python logging, where repeated lines are collapsed (app.logs)."""
    from gi.repository import GLib

    glib_log = logging.getLogger(f"{__name__}.glib")
    levels = GLib.LogLevelFlags.LEVEL_CRITICAL | GLib.LogLevelFlags.LEVEL_WARNING

    def handler(domain: str, level: GLib.LogLevelFlags, message: str, _data: object) -> None:
        severe = bool(level & GLib.LogLevelFlags.LEVEL_CRITICAL)
        glib_log.log(logging.ERROR if severe else logging.WARNING, "%s-%s: %s", domain,
                     "CRITICAL" if severe else "WARNING", message)

    global _GLIB_ROUTED
    for domain in _GLIB_DOMAINS:
        GLib.log_set_handler(domain, levels, handler, None)
    _GLIB_ROUTED = True


def _make(factory: str, name: str | None = None, **props: object) -> Gst.Element:
    """Create a GStreamer element or raise SourceError naming the missing element."""
    element = Gst.ElementFactory.make(factory, name)
    if element is None:
        raise SourceError(
            f"GStreamer element '{factory}' is not available; install the GStreamer plugin "
            "packages (gstreamer1.0-plugins-base/good/bad/ugly, gstreamer1.0-libav)"
        )
    for key, value in props.items():
        element.set_property(key.replace("_", "-"), value)
    return element


# query parameters that carry credentials (rtsp://cam/stream?token=..., ?apikey=...)
_SECRET_PARAMS = re.compile(
    r"(?i)^(.*[-_])?(token|access[-_]?token|auth|authorization|key|api[-_]?key|password|passwd|"
    r"pass|pwd|secret|sig|signature|credential|credentials|session|sid)$")


def redact_uri(uri: str) -> str:
    """Hide a password embedded in a URI (rtsp://user:pass@host) and credential query
    parameters (?token=...) for messages and logs."""
    try:
        parts = urlsplit(uri)
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            parts = parts._replace(netloc=f"{parts.username}:***@{host}")
    except ValueError:  # e.g. a bad port: hide everything after the scheme
        return uri.split("://", 1)[0] + "://***" if "://" in uri else uri
    fields = parse_qsl(parts.query, keep_blank_values=True)
    if any(_SECRET_PARAMS.match(k) for k, _ in fields):
        parts = parts._replace(query=urlencode(
            [(k, "***" if _SECRET_PARAMS.match(k) else v) for k, v in fields], safe="*"))
    return urlunsplit(parts)


def _resolve(uri: str) -> tuple[str, str, bool]:
    """Return (GStreamer URI, name for messages, is a local file) for a path or URI."""
    if "://" in uri:
        if not uri.startswith("file://"):
            return uri, redact_uri(uri), False
        path = Path(unquote(urlsplit(uri).path))
        name = str(path)
    else:
        path = Path(uri).expanduser()
        name = uri
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SourceError(f"no such file: {name}") from None
    except OSError as exc:
        raise SourceError(f"cannot read {name}: {exc.strerror}") from None
    if stat.S_ISCHR(mode):  # a capture device such as /dev/video0
        return f"v4l2://{path.resolve()}", name, False
    if stat.S_ISDIR(mode):
        raise SourceError(f"not a video file: {name} is a directory")
    if not os.access(path, os.R_OK):
        raise SourceError(f"cannot read {name}: permission denied")
    return path.resolve().as_uri(), name, True


def _items(iterator: Gst.Iterator) -> list:
    """Every item of a GStreamer iterator (elements of a bin, pads of an element).

    A bin whose children change while it is iterated (uridecodebin plugging the demuxer and
    decoder during preroll) answers RESYNC: the items seen so far are stale, so the iterator
    is resynced and read again from the start. Iterating with Python's `for` would raise
    `IteratorError` instead.
    """
    for _ in range(_MAX_RESYNC):
        items = []
        while True:
            result, value = iterator.next()
            if result == Gst.IteratorResult.OK:
                items.append(value)
            elif result == Gst.IteratorResult.DONE:
                return items
            elif result == Gst.IteratorResult.RESYNC:
                iterator.resync()
                break
            else:
                raise SourceError(f"cannot list GStreamer elements ({result.value_nick})")
    raise SourceError(f"GStreamer element list kept changing ({_MAX_RESYNC} resyncs)")


def _error_text(message: Gst.Message) -> tuple[str, bool]:
    """(first line of a GStreamer ERROR message, whether it is a resource/IO error)."""
    err, _debug = message.parse_error()
    text = err.message.strip().splitlines()[0] if err.message else "unknown GStreamer error"
    return text.rstrip("."), err.domain == "gst-resource-error-quark"


def _on_pad_added_weak(element: Gst.Element, pad: Gst.Pad,
                       ref: weakref.ReferenceType[VideoSource]) -> None:
    source = ref()
    if source is not None:
        source._on_pad_added(element, pad)


def _release_pipeline(pipeline: Gst.Pipeline) -> None:
    """Drop what a stopped pipeline keeps: queued bus messages hold element references."""
    bus = pipeline.get_bus()
    if bus is not None:
        bus.set_flushing(True)
        bus.set_flushing(False)


class VideoSource:
    """Decoded BGR frames from one source; iterate it, then `close()` (or use `with`)."""

    def __init__(self, uri: str, camera: str = "file", *, loop: bool = False,
                 timeout: float = 30.0) -> None:
        init_gstreamer()
        self.camera = camera
        self._uri, self._name, self._is_file = _resolve(uri)
        self._loop = loop
        self._timeout = timeout
        self._live = False
        self._fps = 0.0
        self._size: tuple[int, int] = (0, 0)
        self._duration: float | None = None
        self._frames_read = 0
        self._pts_offset = 0.0  # added to buffer PTS after each loop restart
        self._last_pts: float | None = None
        self._end_time = 0.0  # media time just past the last frame of the current pass
        self._pass_frames = 0
        self._video_linked = False
        self._gif_workaround = False
        self._closed = False

        self._pipeline = Gst.Pipeline.new(f"source-{camera}")
        self._decode = _make("uridecodebin", uri=self._uri)
        self._convert = _make("videoconvert")
        caps = _make("capsfilter", caps=Gst.Caps.from_string("video/x-raw,format=BGR"))
        self._sink = _make("appsink", emit_signals=False, sync=False,
                           max_buffers=_MAX_BUFFERS, drop=False)
        for element in (self._decode, self._convert, caps, self._sink):
            self._pipeline.add(element)
        if not (self._convert.link(caps) and caps.link(self._sink)):
            self._pipeline.set_state(Gst.State.NULL)
            raise SourceError("cannot link videoconvert to appsink")
        # A bound method would keep `self` alive from C (a cycle Python's GC cannot see),
        # leaking the pipeline and its bus's socket pair on every open: connect through a
        # weak reference and disconnect in close().
        self._pad_handler = self._decode.connect("pad-added", _on_pad_added_weak,
                                                 weakref.ref(self))
        self._bus = self._pipeline.get_bus()
        try:
            self._preroll()
        except BaseException:
            self.close()
            raise
        log.info("opened %s: %dx%d at %.3f fps%s", self._name, *self._size, self._fps,
                 " (live)" if self._live else "")

    def _on_pad_added(self, _element: Gst.Element, pad: Gst.Pad) -> None:
        """Link the first video pad of uridecodebin to videoconvert; ignore the others."""
        caps = pad.get_current_caps() or pad.query_caps(None)
        if self._video_linked or not caps.to_string().startswith("video/"):
            return
        result = pad.link(self._convert.get_static_pad("sink"))
        self._video_linked = result == Gst.PadLinkReturn.OK
        if not self._video_linked:
            log.error("%s: cannot link decoded video pad (%s)", self._name, result.value_nick)

    def _fail(self, text: str) -> SourceError:
        return SourceError(f"cannot decode {self._name}: {text}")

    def _wait_async(self) -> None:
        """Wait for the pending state change; raise SourceError on a bus ERROR or timeout."""
        deadline = time.monotonic() + self._timeout
        while True:
            message = self._bus.timed_pop_filtered(
                _POLL_NS, Gst.MessageType.ERROR | Gst.MessageType.ASYNC_DONE
            )
            if message is not None:
                if message.type == Gst.MessageType.ERROR:
                    raise self._error(message)
                return
            stopped = self._stopped_demuxer() if self._is_file else None
            if stopped is not None:
                raise self._fail(f"not a playable video ({stopped} stopped before any frame)")
            if time.monotonic() >= deadline:
                raise self._fail(f"no video within {self._timeout:g} s")

    def _stopped_demuxer(self) -> str | None:
        """Name of an element whose streaming task stopped before the first frame, if any.

        decodebin drops ERROR messages posted while it is still starting a newly plugged
        element (a race: qtdemux rejecting a file without a moov atom is often lost), so the
        pipeline would wait forever; a paused task before preroll reveals that failure.
        typefind pauses its task by design once the type is known and is ignored.
        """
        for element in _items(self._decode.iterate_recurse()):
            factory = element.get_factory()
            if factory is None or factory.get_name() == "typefind":
                continue
            for pad in _items(element.iterate_sink_pads()):
                if pad.get_task_state() == Gst.TaskState.PAUSED:
                    return factory.get_name()
        return None

    def _error(self, message: Gst.Message) -> SourceError:
        """SourceError for a bus ERROR: cannot open (I/O), not a video, or decoding failed."""
        text, resource = _error_text(message)
        if resource:
            return SourceError(f"cannot open {self._name}: {text}")
        if not self._video_linked:
            return self._fail(f"not a playable video ({text})")
        return self._fail(text)

    def _preroll(self) -> None:
        """Bring the pipeline to PLAYING, surfacing open/demux/decode errors before returning."""
        result = self._pipeline.set_state(Gst.State.PAUSED)
        if result == Gst.StateChangeReturn.FAILURE:
            message = self._bus.pop_filtered(Gst.MessageType.ERROR)
            raise self._error(message) if message else self._fail("cannot start pipeline")
        self._live = result == Gst.StateChangeReturn.NO_PREROLL
        if self._live:  # a slow consumer gets the newest frames instead of stalling the camera
            self._sink.set_property("drop", True)
            self._pipeline.set_state(Gst.State.PLAYING)
        self._wait_async()
        caps = self._sink.get_static_pad("sink").get_current_caps()
        if caps is None:
            raise self._fail("no video caps negotiated")
        self._read_caps(caps)
        self._gif_workaround = any(
            element.get_factory() is not None
            and element.get_factory().get_name() == "avdemux_gif"
            for element in _items(self._decode.iterate_recurse())
        )
        ok, duration = self._pipeline.query_duration(Gst.Format.TIME)
        if ok and duration > 0 and not self._live:
            self._duration = duration / Gst.SECOND
        if not self._live and self._pipeline.set_state(Gst.State.PLAYING) == (
            Gst.StateChangeReturn.FAILURE
        ):
            raise self._fail("cannot start playback")

    def _read_caps(self, caps: Gst.Caps) -> None:
        structure = caps.get_structure(0)
        self._size = (structure.get_value("width"), structure.get_value("height"))
        ok, num, den = structure.get_fraction("framerate")
        self._fps = num / den if ok and num > 0 and den > 0 else 0.0

    @property
    def fps(self) -> float:
        """Nominal frame rate from the caps; 0.0 when the stream does not declare one."""
        return self._fps

    @property
    def size(self) -> tuple[int, int]:
        """Frame size (width, height)."""
        return self._size

    @property
    def frames_read(self) -> int:
        """Frames yielded so far."""
        return self._frames_read

    @property
    def duration(self) -> float | None:
        """Container duration in seconds for seekable sources, else None."""
        return self._duration

    @property
    def is_live(self) -> bool:
        """True for live sources (RTSP, capture devices)."""
        return self._live

    def __iter__(self) -> Iterator[Frame]:
        return self._frames()

    def _frames(self) -> Iterator[Frame]:
        """Yield frames until the end of the stream; errors close the pipeline and raise."""
        waited = 0.0
        while not self._closed:
            try:
                sample = self._sink.try_pull_sample(_POLL_NS)
                if sample is not None:
                    waited = 0.0
                    frame = self._to_frame(sample)
                else:
                    self._raise_bus_error()
                    if self._sink.is_eos() or self._stalled_at_end(waited):
                        if self._restart():
                            continue
                        self.close()
                        return
                    waited += _POLL_NS / Gst.SECOND
                    if waited >= self._timeout:
                        raise SourceError(f"{self._name}: no frame for {self._timeout:g} s")
                    continue
            except SourceError:
                self.close()
                raise
            yield frame

    def _raise_bus_error(self) -> None:
        message = self._bus.pop_filtered(Gst.MessageType.ERROR)
        if message is not None:
            raise self._error(message)

    def _stalled_at_end(self, idle: float) -> bool:
        """True when a GIF has stopped producing frames near its end without an EOS.

        GStreamer 1.22's avdemux_gif spins forever at the end of some GIFs instead of
        sending EOS, so for GIFs a pause of `_GIF_STALL_S` near the end counts as the end.
        """
        return (self._gif_workaround and idle >= _GIF_STALL_S and self._pass_frames > 0
                and self._reached_duration())

    def _reached_duration(self) -> bool:
        """Whether this pass played (nearly) the container's duration, when one is known.

        Video may legitimately end a little before the container (longer audio track);
        stopping far short of it means the file lost data (e.g. a truncated download).
        """
        if self._duration is None:
            return True
        played = self._end_time - self._pts_offset
        return played >= self._duration - max(1.0, 0.1 * self._duration)

    def _restart(self) -> bool:
        """At end of stream: rewind when looping (True), else check completeness (False)."""
        if not self._reached_duration():
            played = self._end_time - self._pts_offset
            raise self._fail(
                f"stream ended at {played:.2f} s of {self._duration:.2f} s "
                "(truncated or damaged file)"
            )
        if not (self._loop and self._is_file and self._pass_frames > 0):
            log.info("%s: end of stream after %d frames", self._name, self._frames_read)
            return False
        self._pts_offset = self._end_time
        self._pass_frames = 0
        flags = Gst.SeekFlags.FLUSH | Gst.SeekFlags.KEY_UNIT
        if not self._pipeline.seek_simple(Gst.Format.TIME, flags, 0):
            raise self._fail("cannot rewind for looping")
        log.debug("%s: looped at %.3f s", self._name, self._pts_offset)
        return True

    def _to_frame(self, sample: Gst.Sample) -> Frame:
        """Copy a BGR sample into a Frame, removing GStreamer's row padding."""
        caps = sample.get_caps()
        if caps is not None:
            self._read_caps(caps)
        width, height = self._size
        buffer = sample.get_buffer()
        ok, info = buffer.map(Gst.MapFlags.READ)
        if not ok:
            raise self._fail("cannot map frame buffer")
        try:
            data = np.frombuffer(info.data, dtype=np.uint8)
            stride = data.size // height if height else 0
            if stride < width * 3:
                raise self._fail(f"frame buffer of {data.size} bytes is too small for "
                                 f"{width}x{height} BGR")
            rows = data[: stride * height].reshape(height, stride)
            image = rows[:, : width * 3].copy().reshape(height, width, 3)  # own the pixels
        finally:
            buffer.unmap(info)
        pts = self._frame_pts(buffer)
        frame = Frame(camera=self.camera, index=self._frames_read, pts=pts, image=image)
        self._frames_read += 1
        self._pass_frames += 1
        return frame

    def _frame_pts(self, buffer: Gst.Buffer) -> float:
        """Media time of a buffer; synthesised when the PTS is missing or not increasing.

        Some demuxers (avdemux_gif) stamp every frame 0: then the previous frame's time plus
        its duration (from the buffer, else 1/fps) is used, which is index/fps at a
        constant rate. A file's first frame is at 0 s: H.264 with B-frames muxed without an
        edit list (x264enc's defaults into mp4mux) presents its first frame at the decode
        delay (2 frames) and MPEG-TS clocks start anywhere, which would make every event time
        late against frame index / fps.
        """
        step = 1.0 / self._fps if self._fps else 0.0
        if buffer.duration != Gst.CLOCK_TIME_NONE:
            step = buffer.duration / Gst.SECOND
        if buffer.pts != Gst.CLOCK_TIME_NONE:
            if self._frames_read == 0 and not self._live:
                self._pts_offset = -buffer.pts / Gst.SECOND
            if self._pass_frames == 0 and self._frames_read > 0:  # first frame after a loop
                self._pts_offset = self._end_time - buffer.pts / Gst.SECOND
            pts = self._pts_offset + buffer.pts / Gst.SECOND
            if self._last_pts is not None and pts <= self._last_pts:
                pts = self._end_time
        else:
            pts = self._end_time  # 0.0 for the first frame
        self._last_pts = pts
        self._end_time = pts + step
        return pts

    def close(self) -> None:
        """Stop decoding and release the pipeline (idempotent)."""
        if self._closed:
            return
        self._closed = True
        handler = getattr(self, "_pad_handler", None)
        if handler is not None:
            self._decode.disconnect(handler)
            self._pad_handler = None
        self._pipeline.set_state(Gst.State.NULL)
        _release_pipeline(self._pipeline)

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def open_source(uri: str, camera: str = "file", *, loop: bool = False,
                timeout: float = 30.0) -> VideoSource:
    """Open a video file path or URI (file://, rtsp://, http(s)://, v4l2://, /dev/videoN).

    The pipeline is prerolled before returning, so a missing or undecodable file raises
    `SourceError` here. `loop` restarts files at their end (pts keeps increasing);
    `timeout` bounds the wait for the first frame and between frames, in seconds.
    """
    return VideoSource(str(uri), camera, loop=loop, timeout=timeout)


class VideoWriter:
    """H.264 MP4 writer: `write()` BGR frames, then `close()` (or use `with`).

    Writes through `atomic_path`: a private temporary beside `path` (O_EXCL, mode 0600,
    random name, handed to GStreamer as a descriptor) that replaces `path` only after the
    muxer finished; on any failure the partial file is removed and `SourceError` is raised.
    """

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int]) -> None:
        init_gstreamer()
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise ValueError(f"video size must be positive, got {size}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        if self.path.is_dir():
            raise SourceError(f"cannot write {self.path}: it is a directory")
        self._size = (width, height)
        self._rate = Fraction(fps).limit_denominator(1001)
        # H.264 4:2:0 needs even sides: odd frames get a black last column/row.
        self._encoded = (width + width % 2, height + height % 2)
        self._stride = (self._encoded[0] * 3 + 3) & ~3  # GStreamer pads BGR rows to 4 bytes
        self._count = 0
        self._closed = True  # nothing to release until the encoder exists
        if not self.path.parent.is_dir():  # a typo in a folder name: not a new folder
            raise SourceError(f"cannot write {self.path}: no folder {self.path.parent}")
        self._output = ExitStack()  # the temporary: replaces `path` when closed, else removed
        try:
            self._part = self._output.enter_context(atomic_path(self.path, suffix=".part"))
            self._fd = os.open(self._part, os.O_WRONLY)
        except OSError as exc:
            self._output.__exit__(type(exc), exc, None)
            raise SourceError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._closed = False

        self._pipeline = Gst.Pipeline.new("writer")
        caps = Gst.Caps.from_string(
            f"video/x-raw,format=BGR,width={self._encoded[0]},height={self._encoded[1]},"
            f"framerate={self._rate.numerator}/{self._rate.denominator}"
        )
        self._src = _make("appsrc", caps=caps, format=Gst.Format.TIME, is_live=False,
                          block=True, max_bytes=8 * self._stride * self._encoded[1])
        elements = [
            self._src,
            _make("videoconvert"),
            _make("capsfilter", caps=Gst.Caps.from_string("video/x-raw,format=I420")),
            _make("x264enc", speed_preset="veryfast", tune="zerolatency"),
            _make("h264parse"),
            _make("mp4mux"),
            _make("fdsink", fd=self._fd),  # mp4mux seeks back to write the index: a file
        ]
        for element in elements:
            self._pipeline.add(element)
        for upstream, downstream in zip(elements, elements[1:], strict=False):
            if not upstream.link(downstream):
                self._abort(f"cannot link {upstream.get_factory().get_name()} to "
                            f"{downstream.get_factory().get_name()}")
        self._bus = self._pipeline.get_bus()
        if self._pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            self._abort(self._bus_error() or "cannot start the encoder")
        log.info("writing %s: %dx%d at %s fps", self.path, *self._encoded, self._rate)

    def _bus_error(self) -> str | None:
        message = self._bus.pop_filtered(Gst.MessageType.ERROR)
        return _error_text(message)[0] if message is not None else None

    def _release(self) -> None:
        self._closed = True
        self._pipeline.set_state(Gst.State.NULL)
        _release_pipeline(self._pipeline)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _drop_output(self) -> None:
        """Delete the partial file (the temporary of `atomic_path`, told the write failed)."""
        failed = SourceError(f"cannot write {self.path}")
        self._output.__exit__(SourceError, failed, None)

    def _abort(self, reason: str) -> None:
        """Tear down, delete the partial file and raise SourceError."""
        self._release()
        self._drop_output()
        raise SourceError(f"cannot write {self.path}: {reason}")

    def write(self, bgr: np.ndarray) -> None:
        """Append one uint8[H, W, 3] BGR frame of the writer's size."""
        if self._closed:
            raise SourceError(f"cannot write {self.path}: writer is closed")
        width, height = self._size
        if bgr.shape != (height, width, 3) or bgr.dtype != np.uint8:
            raise ValueError(
                f"expected uint8[{height}, {width}, 3] frame, got {bgr.dtype}{list(bgr.shape)}"
            )
        if self._stride == width * 3 and self._encoded[1] == height:
            data = np.ascontiguousarray(bgr).tobytes()
        else:
            padded = np.zeros((self._encoded[1], self._stride), dtype=np.uint8)
            padded[:height, : width * 3] = bgr.reshape(height, width * 3)
            data = padded.tobytes()
        buffer = Gst.Buffer.new_wrapped(data)
        start = self._timestamp(self._count)
        buffer.pts = start
        buffer.dts = Gst.CLOCK_TIME_NONE
        buffer.duration = self._timestamp(self._count + 1) - start
        result = self._src.push_buffer(buffer)
        if result != Gst.FlowReturn.OK:
            self._abort(self._bus_error() or f"encoder refused frame ({result.value_nick})")
        self._count += 1

    def _timestamp(self, index: int) -> int:
        """Nanosecond timestamp of frame `index` (exact for rational rates like 30000/1001)."""
        return int(index * Gst.SECOND * self._rate.denominator // self._rate.numerator)

    @property
    def frames_written(self) -> int:
        """Frames accepted so far."""
        return self._count

    def close(self, timeout: float = 60.0) -> None:
        """Finish the file: send EOS, wait for the muxer, then rename `.part` to the path."""
        if self._closed:
            return
        if self._count == 0:
            self._abort("no frames were written")
        self._src.end_of_stream()
        message = self._bus.timed_pop_filtered(
            int(timeout * Gst.SECOND), Gst.MessageType.EOS | Gst.MessageType.ERROR
        )
        if message is None:
            self._abort(f"encoder did not finish within {timeout:g} s")
        if message.type == Gst.MessageType.ERROR:
            self._abort(_error_text(message)[0])
        self._release()
        self._output.close()  # fsynced, then it replaces `path`
        log.info("wrote %s: %d frames", self.path, self._count)

    def discard(self) -> None:
        """Stop without finishing the file; the partial output is deleted."""
        if not self._closed:
            self._release()
            self._drop_output()

    def __enter__(self) -> VideoWriter:
        return self

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            log.warning("%s: writer dropped without close(); partial output discarded",
                        self.path)
            self.discard()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
