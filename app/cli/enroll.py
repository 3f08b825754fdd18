"""`facemoe enroll`: add a person to the gallery from photos, folders, a video or stored
events' kept crops."""

from __future__ import annotations

import argparse

from app.cli.common import _config, _embedder, _gallery_path, _key, _out, common


def add_enroll(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "enroll",
        help="add a person to the gallery from images, folders, a video or stored events",
    )
    sp.add_argument("name")
    sp.add_argument("paths", nargs="*", help="photos, folders of photos, or videos")
    sp.add_argument(
        "--event",
        type=int,
        action="append",
        metavar="ID",
        help="enroll from the face crops kept with a stored event (an id from `facemoe "
        "gallery events`); repeat for several tracks of the same person",
    )
    sp.add_argument(
        "--face",
        type=int,
        help="in images with several faces, enroll the N-th largest (0 = largest); in "
        "videos with several people, the N-th longest track",
    )
    sp.add_argument("--track", type=int, metavar="ID",
                    help="in a video with several people, enroll this track (ids are listed "
                         "when enrollment is refused)")
    sp.add_argument("--min-quality", type=float, metavar="Q",
                    help="leave out faces below this quality (default: enroll.min_quality)")
    sp.add_argument(
        "--outlier-margin",
        type=lambda v: v if v == "auto" else float(v),
        default="auto",
        help="with >= 3 faces, leave out a face whose cosine to the medoid face is this far "
        "below the median (default: 0.56 x (1 - the model's threshold), e.g. 0.04 for dlib's "
        "network, 0.30 for facemoe-edge)",
    )
    sp.add_argument(
        "--keep-outliers", action="store_true", help="enroll every face (no outlier rejection)"
    )
    common(sp)
    sp.set_defaults(func=cmd_enroll)


def cmd_enroll(args: argparse.Namespace) -> int:
    from app.enroll import ImageLimits, enroll
    from app.runtime import make_detector, open_gallery

    cfg = _config(args)
    e = cfg.enroll
    limits = ImageLimits(e.max_side, e.max_pixels,
                         e.min_quality if args.min_quality is None else args.min_quality,
                         e.warn_quality, cfg.embed.min_det_score, cfg.embed.min_exposure)
    detector, embedder = make_detector(cfg), _embedder(cfg)
    with open_gallery(_gallery_path(args, cfg), embedder, key=_key(args)) as gallery:
        report = enroll(
            args.name,
            args.paths,
            detector,
            embedder,
            gallery,
            face=args.face,
            outlier_margin=None if args.keep_outliers else args.outlier_margin,
            events=args.event,
            tracking=cfg.tracker,
            track=args.track,
            limits=limits,
        )
    faces = report.faces
    text = f"enrolled {report.name!r}: {len(faces)} template(s)"
    if report.rejected:
        text += f", {len(report.rejected)} rejected as outlier(s):"
        for r in report.rejected:
            text += f"\n  rejected {r.source}: {r.reason}"
    _out(
        args,
        {
            "name": report.name,
            "templates": len(faces),
            "sources": [f.source for f in faces],
            "qualities": [round(f.quality, 3) for f in faces],
            "rejected": [r.as_json() for r in report.rejected],
            "skipped": report.skipped,
        },
        text + "".join(f"\n  skipped {s}" for s in report.skipped),
    )
    return 0
