"""`facemoe process`: recognise faces in video files (one process, or many workers over
many files), writing events to the gallery and optionally JSONL and an annotated video."""

from __future__ import annotations

import argparse
import logging
import sys
import unicodedata
from pathlib import Path

from app.cli.common import UserError, _config, _embedder, _gallery_path, _key, _out, common

log = logging.getLogger("facemoe")


def add_process(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("process", help="recognise faces in video files")
    sp.add_argument("videos", nargs="*", metavar="VIDEO",
                    help="video files, folders (searched for video files) or stream URIs")
    sp.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="worker processes for many videos (each loads the models; default 1)")
    sp.add_argument("--shard", metavar="K/N",
                    help="only every N-th video from the K-th (0-based) of the sorted list: "
                         "one share of the work per machine")
    sp.add_argument("--events", help="append events as JSON lines to this file")
    sp.add_argument("--annotate", help="write the video with boxes, track ids and names (mp4)")
    sp.add_argument("--camera", help="camera name in events (default: the file name)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    sp.add_argument("--publish", action="store_true",
                    help="also publish alerts, tracks and presence to daemon.mqtt (MQTT, Home "
                    "Assistant) as box daemon.box, as the daemon does")
    sp.add_argument("--validate-config", action="store_true", help="check the config and exit")
    sp.add_argument(
        "--allow-empty-gallery",
        action="store_true",
        help="process even with no one enrolled (every face is unknown)",
    )
    common(sp)
    sp.set_defaults(func=cmd_process)


def cmd_process(args: argparse.Namespace) -> int:
    from app.process import find_videos, process_video, shard
    from app.runtime import make_detector, open_gallery, open_set

    cfg = _config(args)
    if args.validate_config:
        _out(args, {"config": "ok"}, "config ok")
        return 0
    try:
        videos = find_videos(args.videos)
        if args.shard:
            videos = shard(videos, args.shard)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for what, target in (("--annotate", args.annotate),
                         ("--events", args.events or cfg.output.events_jsonl)):
        if target and Path(target).expanduser().is_dir():
            raise UserError(f"{what} {target} is a directory; give a file name")
    if args.publish and cfg.daemon.mqtt is None:
        raise UserError("--publish needs an MQTT broker in the config (daemon.mqtt)")
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    if len(args.videos) > 1 or args.shard or Path(args.videos[0]).is_dir():
        if args.annotate:
            raise UserError("--annotate takes one video")
        return _process_many(args, cfg, videos)
    args.video = videos[0]
    camera = _camera_name(args.camera, args.video)
    detector, embedder = make_detector(cfg), _embedder(cfg)
    path = _gallery_path(args, cfg)
    with open_gallery(path, embedder, create=args.allow_empty_gallery,
                      key=_key(args)) as gallery:
        if not gallery.identities():
            if not args.allow_empty_gallery:
                raise UserError(
                    f"gallery {path} is empty: enroll someone first (facemoe enroll NAME PHOTO) "
                    "or pass --allow-empty-gallery"
                )
            log.warning("the gallery %s is empty: every face will be reported as unknown", path)
        summary = process_video(
            args.video,
            cfg,
            detector,
            embedder,
            gallery,
            open_set(cfg, embedder),
            events_jsonl=args.events or cfg.output.events_jsonl,
            annotate=args.annotate,
            camera=camera,
            progress=not args.no_progress and sys.stderr.isatty(),
            publish=args.publish,
        )
    payload = summary.as_json()
    lines = [
        f"{e.camera} track {e.track_id}: "
        + (f"{e.identity} ({e.score:.3f})" if e.identity else
           f"unknown (nearest {e.candidate} {e.score:.3f})" if e.candidate else "unknown")
        + f" {e.start:.2f}-{e.end:.2f}s, {e.frames} frames"
        for e in summary.events
    ]
    lines.append(
        f"{payload['frames']} frames in {payload['seconds']} s ({payload['fps']} fps), "
        f"{payload['tracks']} tracks, {payload['events']} events, "
        f"{payload['embedded_crops']} crops embedded"
    )
    _out(args, payload, "\n".join(lines))
    return 0


def _process_many(args: argparse.Namespace, cfg, videos: list[str]) -> int:  # noqa: ANN001
    """`process` over many videos with a worker pool and one progress bar."""
    from app.process import Batch, process_many

    if args.camera is not None:
        _camera_name(args.camera, "")
    for video in videos:
        if args.camera is None:
            _camera_name(None, video)
    path = _gallery_path(args, cfg)
    results = process_many(
        videos, Batch(cfg, str(path), _key(args), args.events or cfg.output.events_jsonl,
                      args.camera, args.allow_empty_gallery, args.publish),
        jobs=args.jobs, progress=not args.no_progress and sys.stderr.isatty())
    done = [s.as_json() for _, s, e in results if s is not None]
    failed = {v: e for v, _, e in results if e is not None}
    payload = {"videos": done, "failed": failed,
               "frames": sum(d["frames"] for d in done),
               "events": sum(d["events"] for d in done)}
    lines = [f"{d['video']}: {d['frames']} frames, {d['events']} events, identified "
             f"{', '.join(d['identified']) or 'no one'}" for d in done]
    lines += [f"{v}: FAILED: {e}" for v, e in failed.items()]
    lines.append(f"{len(done)} of {len(videos)} video(s) processed: {payload['frames']} frames, "
                 f"{payload['events']} events")
    _out(args, payload, "\n".join(lines))
    return 1 if failed else 0


def _camera_name(given: str | None, video: str) -> str:
    """The camera name of `process`'s events: --camera, else the file name's stem; one that
    would break a line of output (control, format or line-separator characters) is refused."""
    name = given if given is not None else Path(video).stem
    shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if not 1 <= len(name) <= 256 or name != shown or any(
            unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        where = "--camera" if given is not None else f"the file name of {shown!r}"
        raise UserError(f"{where}: a camera name is 1 to 256 printable characters, got "
                        f"{shown.encode('ascii', 'backslashreplace').decode()!r}"
                        + ("" if given is not None else "; give one with --camera NAME"))
    return name
