"""`facemoe recognize` (name every face in photos) and `facemoe compare` (two photos: the
same person or not)."""

from __future__ import annotations

import argparse

from app.cli.common import _config, _embedder, _gallery_path, _out, common


def add_recognize(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("recognize", help="name every face in photos (nearest identities)")
    sp.add_argument("images", nargs="+", help="photos (JPEG, PNG, WebP, BMP)")
    sp.add_argument("--top", type=int, default=3, help="nearest identities per face (default 3)")
    common(sp)
    sp.set_defaults(func=cmd_recognize)


def add_compare(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("compare", help="two photos: the same person or not (largest faces)")
    sp.add_argument("a")
    sp.add_argument("b")
    common(sp, gallery=False)
    sp.set_defaults(func=cmd_compare)


def _recognizer(args: argparse.Namespace):
    from app.recognize import Recognizer
    from app.runtime import make_detector, open_gallery, open_set

    cfg = _config(args)
    detector, embedder = make_detector(cfg), _embedder(cfg)
    gallery = open_gallery(_gallery_path(args, cfg), embedder, create=False)
    return Recognizer(detector, embedder, gallery, open_set(cfg, embedder)), gallery


def cmd_recognize(args: argparse.Namespace) -> int:
    from app.faces import read_image

    images = [(path, read_image(path)) for path in args.images]  # bad files fail first
    recognizer, gallery = _recognizer(args)
    with gallery:
        results = [(path, recognizer.recognize(img, args.top)) for path, img in images]
    lines = []
    for path, faces in results:
        lines.append(f"{path}: {len(faces)} face(s)")
        for k, f in enumerate(faces):
            x, y, w, h = f.box
            near = ", ".join(f"{c.name} {c.score:.3f}" for c in f.candidates) or "empty gallery"
            lines.append(f"  face {k} at {x:.0f},{y:.0f} {w:.0f}x{h:.0f}: "
                         f"{f.identity or 'unknown'} (nearest: {near})")
    _out(args, {"threshold": recognizer.threshold, "model": recognizer.embedder.model,
                "images": [{"image": path, "faces": [f.as_json() for f in faces]}
                           for path, faces in results]},
         "\n".join(lines))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from app.faces import read_image
    from app.recognize import Recognizer
    from app.runtime import make_detector, threshold

    a, b = read_image(args.a), read_image(args.b)
    cfg = _config(args)
    embedder = _embedder(cfg)
    recognizer = Recognizer(make_detector(cfg), embedder, None, threshold(cfg, embedder))
    v = recognizer.verify(a, b, (args.a, args.b))
    verdict = "same person" if v.same else "different people"
    _out(args, {"a": args.a, "b": args.b, **v.as_json()},
         f"{verdict}: cosine {v.score:.3f} (threshold {v.threshold:.3f})")
    return 0
