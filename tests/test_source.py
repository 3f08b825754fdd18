"""GStreamer source and writer on the shared clips (decoding, errors, round trip, live)."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.source import Gst, SourceError, VideoWriter, _items, _make, init_gstreamer, open_source
from benchmarks.rtsp_camera import free_port
from tests.conftest import open_fds, plant_symlinks

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def videos(data_dir: Path) -> Path:
    return data_dir / "videos"


def _one_line_naming(error: SourceError, path: Path | str) -> None:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text
    assert str(path) in text


def test_decode_hamilton(videos: Path) -> None:
    path = videos / "short_hamilton_clip.mp4"
    with open_source(str(path), camera="cam0") as source:
        assert source.fps == pytest.approx(29.97, abs=0.01)
        assert source.size == (640, 360)
        frames = list(source)
        assert source.frames_read == 275
    assert len(frames) == 275
    assert [f.index for f in frames] == list(range(275))
    assert {f.camera for f in frames} == {"cam0"}
    pts = np.array([f.pts for f in frames])
    assert pts[0] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(pts) > 0)
    assert np.diff(pts).mean() == pytest.approx(1001 / 30000, rel=1e-3)
    first = frames[0].image
    assert first.dtype == np.uint8 and first.shape == (360, 640, 3) and first.flags.c_contiguous

    # Frames own their pixels (not views of recycled GStreamer buffers) and are BGR:
    # compare with FFmpeg's decode through OpenCV as an independent oracle.
    capture = cv2.VideoCapture(str(path))
    for index in range(11):
        ok, reference = capture.read()
        assert ok
        if index in (0, 10):
            assert cv2.PSNR(reference, frames[index].image) > 35
            assert cv2.PSNR(reference, np.ascontiguousarray(frames[index].image[..., ::-1])) < 30
    capture.release()


def test_decode_gif_matches_mp4(videos: Path) -> None:
    with open_source(str(videos / "intel_classroom.gif")) as source:
        gif = list(source)
        assert source.size == (480, 270)
    assert len(gif) == 45
    pts = [f.pts for f in gif]
    assert pts[0] == 0.0 and all(b > a for a, b in zip(pts, pts[1:], strict=False))
    with open_source(str(videos / "intel_classroom.mp4")) as source:
        mp4 = list(source)
    assert len(mp4) == 45
    # The MP4 was made from the GIF with a 1:1 frame mapping (PSNR 38-42 dB per the README).
    assert cv2.PSNR(gif[20].image, mp4[20].image) > 33


def test_odd_row_stride_and_uri(videos: Path, tmp_path: Path) -> None:
    """A width whose BGR rows GStreamer pads to 4 bytes decodes without skew; file:// works."""
    path = tmp_path / "odd.mp4"
    frame = np.zeros((150, 202, 3), np.uint8)
    frame[:, :101] = (255, 0, 0)  # left half blue, right half black
    with VideoWriter(path, 10, (202, 150)) as writer:
        for _ in range(5):
            writer.write(frame)
    with open_source(path.as_uri()) as source:
        decoded = [f.image for f in source]
    assert len(decoded) == 5 and decoded[0].shape == (150, 202, 3)
    assert np.abs(decoded[-1].astype(int) - frame).mean() < 6


def test_loop_keeps_pts_increasing(videos: Path) -> None:
    with open_source(str(videos / "intel_face-demographics-walking.mp4"), loop=True) as source:
        frames = []
        for frame in source:
            frames.append(frame)
            if len(frames) == 50:
                break
    pts = [f.pts for f in frames]
    assert [f.index for f in frames] == list(range(50))
    assert all(b > a for a, b in zip(pts, pts[1:], strict=False))
    assert pts[35] - pts[34] == pytest.approx(1 / 12, abs=1e-3)  # seamless across the loop


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(SourceError) as info:
        open_source(str(path))
    assert str(info.value) == f"no such file: {path}"


def test_text_file_named_mp4(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    with pytest.raises(SourceError) as info:
        open_source(str(path))
    _one_line_naming(info.value, path)


def test_truncated_mp4_without_moov(videos: Path, tmp_path: Path) -> None:
    """short_hamilton_clip.mp4 keeps its moov atom at the end: 30% of it cannot be opened."""
    data = (videos / "short_hamilton_clip.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) * 30 // 100])
    for _ in range(3):  # decodebin can lose the demuxer's error in a race; see _stopped_demuxer
        with pytest.raises(SourceError) as info:
            open_source(str(path), timeout=10)
        _one_line_naming(info.value, path)
        assert "within" not in str(info.value)  # reported as undecodable, not as a timeout


def test_truncated_mp4_mid_stream(videos: Path, tmp_path: Path) -> None:
    """intel_classroom.mp4 has its moov first: it opens, then iteration stops with an error."""
    data = (videos / "intel_classroom.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) * 30 // 100])
    frames = []
    with open_source(str(path)) as source, pytest.raises(SourceError) as info:
        for frame in source:
            frames.append(frame)
    _one_line_naming(info.value, path)
    assert "truncated" in str(info.value)
    assert len(frames) < 45
    assert all(f.image.shape == (270, 480, 3) for f in frames)


@pytest.mark.parametrize("size", [(160, 120), (202, 150)])
def test_writer_round_trip(tmp_path: Path, size: tuple[int, int]) -> None:
    width, height = size
    path = tmp_path / "out.mp4"
    frames = []
    for i in range(20):
        frame = np.full((height, width, 3), 40 + 8 * i, np.uint8)
        frame[: height // 2, : width // 2] = (200, 30, 90)
        frames.append(frame)
    with VideoWriter(path, 12.0, size) as writer:
        for frame in frames:
            writer.write(frame)
        assert writer.frames_written == 20
    assert path.is_file() and not (tmp_path / "out.mp4.part").exists()
    with open_source(str(path)) as source:
        assert source.fps == pytest.approx(12.0)
        decoded = list(source)
    assert len(decoded) == 20
    assert decoded[0].size == size
    assert [round(f.pts * 12) for f in decoded] == list(range(20))
    for got, want in zip(decoded, frames, strict=True):
        assert np.abs(got.image.astype(int) - want).mean() < 6


def test_b_frame_h264_starts_at_zero(tmp_path: Path) -> None:
    """x264enc's defaults (B-frames) into mp4mux present the first frame at 2 frames (0.08 s
    at 25 fps); frame times must still be index / fps, or every event is 0.08 s late."""
    path = tmp_path / "bframes.mp4"
    init_gstreamer()
    pipeline = Gst.parse_launch(
        "videotestsrc num-buffers=12 ! video/x-raw,width=160,height=120,framerate=25/1 "
        f"! x264enc ! mp4mux ! filesink location={path}"
    )
    pipeline.set_state(Gst.State.PLAYING)
    message = pipeline.get_bus().timed_pop_filtered(
        30 * Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR
    )
    pipeline.set_state(Gst.State.NULL)
    assert message is not None and message.type == Gst.MessageType.EOS
    with open_source(str(path)) as source:
        pts = [f.pts for f in source]
    assert pts == pytest.approx([i / 25 for i in range(12)], abs=1e-6)


def test_writer_discards_on_error(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError), VideoWriter(path, 10, (64, 48)) as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8))
        raise RuntimeError("caller failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError), VideoWriter(path, 10, (64, 48)) as writer:
        writer.write(np.zeros((50, 64, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_writer_unwritable_path(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "out.mp4"
    with pytest.raises(SourceError) as info:
        VideoWriter(path, 10, (64, 48))
    _one_line_naming(info.value, path)


class _ResyncOnce:
    """A GStreamer iterator over `items` whose list changes once: RESYNC after the first item."""

    def __init__(self, items: list[str]) -> None:
        self.items, self.position, self.resyncs, self.changed = items, 0, 0, False

    def next(self) -> tuple[Gst.IteratorResult, str | None]:
        if not self.changed and self.position == 1:
            self.changed = True
            return Gst.IteratorResult.RESYNC, None
        if self.position == len(self.items):
            return Gst.IteratorResult.DONE, None
        self.position += 1
        return Gst.IteratorResult.OK, self.items[self.position - 1]

    def resync(self) -> None:
        self.position, self.resyncs = 0, self.resyncs + 1


def test_element_iteration_survives_resync() -> None:
    """decodebin plugging elements while the source checks them made ~1 in 90 opens raise
    IteratorError (GST_ITERATOR_RESYNC): the list is read again from the start instead."""
    init_gstreamer()
    iterator = _ResyncOnce(["typefind", "qtdemux", "avdec_h264"])
    assert _items(iterator) == ["typefind", "qtdemux", "avdec_h264"]
    assert iterator.resyncs == 1
    bin_ = Gst.Bin.new("b")
    for name in ("one", "two"):
        bin_.add(_make("identity", name))
    assert sorted(e.get_name() for e in _items(bin_.iterate_recurse())) == ["one", "two"]


def test_missing_element_is_named() -> None:
    with pytest.raises(SourceError, match="'nosuchelement'"):
        _make("nosuchelement")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_http_source(videos: Path) -> None:
    handler = functools.partial(_QuietHandler, directory=str(videos))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with open_source(f"{base}/intel_classroom.mp4") as source:
            assert not source.is_live
            assert sum(1 for _ in source) == 45
        with pytest.raises(SourceError) as info:
            open_source(f"{base}/missing.mp4")
        _one_line_naming(info.value, f"{base}/missing.mp4")
    finally:
        server.shutdown()
        thread.join(5)


def test_rtsp_live_source() -> None:
    """A local GstRtspServer stream is read as a live source; a bad mount fails up front."""
    gi = pytest.importorskip("gi")
    try:
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, GstRtspServer
    except (ImportError, ValueError):
        pytest.skip("GstRtspServer (gir1.2-gst-rtsp-server-1.0) not installed")
    server = GstRtspServer.RTSPServer()
    server.set_service("0")
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        "( videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=15/1 "
        "! x264enc tune=zerolatency speed-preset=ultrafast ! rtph264pay name=pay0 pt=96 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory("/cam", factory)
    context = GLib.MainContext.new()
    server.attach(context)
    loop = GLib.MainLoop.new(context, False)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        port = server.get_bound_port()
        uri = f"rtsp://user:secret@127.0.0.1:{port}/cam"
        with open_source(uri, camera="door", timeout=15) as source:
            assert source.is_live and source.size == (160, 120)
            frames = []
            for frame in source:
                frames.append(frame)
                if len(frames) == 5:
                    break
        assert [f.camera for f in frames] == ["door"] * 5
        assert all(b.pts > a.pts for a, b in zip(frames, frames[1:], strict=False))
        with pytest.raises(SourceError) as info:
            open_source(f"rtsp://user:secret@127.0.0.1:{port}/nothere", timeout=15)
        assert "secret" not in str(info.value) and "/nothere" in str(info.value)
    finally:
        loop.quit()
        thread.join(5)


def test_source_open_close_keeps_descriptors_flat(data_dir: Path) -> None:
    clip = str(data_dir / "videos" / "short_hamilton_clip.mp4")
    dead = f"rtsp://127.0.0.1:{free_port()}/cam"
    for _ in range(3):  # warm-up: GStreamer loads plugins and starts its shared threads once
        with open_source(clip) as src:
            next(iter(src))
        with pytest.raises(SourceError):
            open_source(dead, timeout=2)
    before = open_fds()
    for _ in range(200):
        with open_source(clip) as src:
            next(iter(src))
    after_files = open_fds()
    for _ in range(200):
        with pytest.raises(SourceError):
            open_source(dead, timeout=2)
    after_failed = open_fds()
    assert after_files - before <= 2, (before, after_files)
    assert after_failed - before <= 2, (before, after_failed)


def test_annotated_video_does_not_follow_a_planted_part_file(tmp_path: Path) -> None:
    import numpy as np

    from app.source import VideoWriter

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "out.mp4"
    plant_symlinks(tmp_path, ["out.mp4.part"], victim)
    with VideoWriter(target, 25.0, (64, 48)) as writer:
        for i in range(10):
            writer.write(np.full((48, 64, 3), i * 20, np.uint8))
    assert victim.read_text() == "precious\n"
    assert os.stat(target).st_mode & 0o777 == 0o600
    with open_source(str(target)) as src:
        assert len(list(src)) == 10
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(SourceError, match="is a directory"):
        VideoWriter(tmp_path, 25.0, (64, 48))


def test_token_in_camera_url_is_redacted() -> None:
    from app.source import redact_uri

    assert redact_uri("rtsp://admin:pw@10.0.0.1:554/live?token=s3cr3t&channel=1") == (
        "rtsp://admin:***@10.0.0.1:554/live?token=***&channel=1")
    assert redact_uri("http://cam/mjpg?api_key=abc") == "http://cam/mjpg?api_key=***"
    assert redact_uri("rtsp://cam/live?channel=1&subtype=0") == "rtsp://cam/live?channel=1&subtype=0"
    with pytest.raises(SourceError) as err:
        open_source(f"rtsp://127.0.0.1:{free_port()}/live?token=s3cr3t", timeout=2)
    assert "s3cr3t" not in str(err.value) and "token=***" in str(err.value)


def test_gstreamer_criticals_go_through_python_logging(caplog, capfd) -> None:
    import logging

    from app.source import Gst, init_gstreamer

    init_gstreamer()
    with caplog.at_level(logging.WARNING, logger="app.source.glib"):
        for _ in range(3):
            Gst.Caps.new_empty().get_structure(0)  # a GStreamer-CRITICAL assertion
    assert "GStreamer-CRITICAL" not in capfd.readouterr().err
    messages = [r.getMessage() for r in caplog.records if r.name == "app.source.glib"]
    assert len(messages) == 3 and messages[0].startswith(
        "GStreamer-CRITICAL: gst_caps_get_structure: assertion")
