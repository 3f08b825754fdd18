"""`facemoe`: the one entry point. `--json` prints one JSON object on stdout; logs go to stderr.

User mistakes end with a one-line message on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import unicodedata
from pathlib import Path

from app import __version__
from app.gallery_cli import KEY_HELP
from app.logs import install_repeat_filter

log = logging.getLogger("facemoe")


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def _out(args: argparse.Namespace, payload: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload))
    else:
        print(text)


def _key(args: argparse.Namespace) -> bytes | None:
    """The key from --key-file; None lets the gallery read $FACEMOE_GALLERY_KEY(_FILE)."""
    from app.gallery import load_key

    return load_key(args.key_file) if getattr(args, "key_file", None) else None


def _config(args: argparse.Namespace):
    from app.config import load_config

    return load_config(getattr(args, "config", None))


def _embedder(cfg):
    from app.runtime import make_embedder

    return make_embedder(cfg)


def _model_id(cfg) -> tuple[str, str]:
    """(name, version) of the configured model as galleries record it, from its manifest
    (milliseconds; loading the model takes seconds)."""
    from trainer.manifest import model_id, read_manifest

    return model_id(read_manifest(cfg.model.dir))


def _gallery_path(args: argparse.Namespace, cfg) -> str:
    """--gallery (a file path, or a database URL such as postgresql+psycopg://...: never made
    into a path, which would create a SQLite file named like the URL), else the config's."""
    given = getattr(args, "gallery", None)
    if not given:
        return cfg.gallery.path
    return given if "://" in given else str(Path(given).expanduser())


# --- enroll / gallery -----------------------------------------------------------------------


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


def cmd_gallery(args: argparse.Namespace) -> int:
    from app.gallery_cli import open_gallery_for, run_gallery_action, uses_embedder

    cfg = _config(args)
    embedder = _embedder(cfg) if uses_embedder(args) else None
    path = _gallery_path(args, cfg)
    with open_gallery_for(args, path, _model_id(cfg)) as gallery:
        if args.action == "list":
            ids = gallery.identities()
            _out(
                args,
                {
                    "gallery": str(path),
                    "model": gallery.model,
                    "identities": [
                        {
                            "name": i.name,
                            "templates": i.templates,
                            "created_at": i.created_at.isoformat(),
                        }
                        for i in ids
                    ],
                },
                "\n".join(f"{i.name}\t{i.templates}\t{i.created_at:%Y-%m-%d %H:%M}" for i in ids)
                or "(empty gallery)",
            )
        elif args.action == "remove":
            from app.erasure import Outputs, erase

            erased = erase(gallery, Outputs.of(cfg, args.events_jsonl or ()), name=args.name)
            _out(args, erased.as_json(), erased.summary())
            if erased.unfinished:
                return 1
        elif args.action == "rename":
            gallery.rename(args.name, args.new_name)
            _out(
                args,
                {"renamed": args.name, "to": args.new_name},
                f"renamed {args.name!r} to {args.new_name!r}",
            )
        else:
            run_gallery_action(args, gallery, embedder)
    return 0


# --- process ---------------------------------------------------------------------------------


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


def cmd_fleet(args: argparse.Namespace) -> int:
    """Every box's last heartbeat; a box not heard of for --silent-after seconds is SILENT."""
    from app.gallery import Store
    from app.gallery.erasures import Erasures
    from app.gallery.fleet import Fleet, site_view

    cfg = _config(args)
    path = _gallery_path(args, cfg)
    with Store(path, *_model_id(cfg), create=False, key=_key(args), adopt_model=True) as store:
        if args.forget:
            Erasures(store).forget_box(args.forget)
            print(f"box {args.forget} forgotten: it left the fleet and no erasure waits for it",
                  file=sys.stderr)
        view = site_view(Fleet(store).boxes(), args.silent_after)
    boxes = view["boxes"]
    lines = []
    for b in boxes:
        flag = "SILENT " if b["silent"] else ""
        lines.append(f"{b['box']}: {flag}{b['state']}, last heard of {b['last_seen_s']:.0f} s "
                     f"ago" + "".join(f"; {r}" for r in b["reasons"]))
        for c in b["cameras"]:
            lines.append(f"  {c['name']}: {c['state']} fps={c['fps']} frames={c['frames']} "
                         f"dropped={c['dropped']} reconnects={c['reconnects']} "
                         f"events={c['events']} last_event={c['last_event'] or '-'}")
    lines += [f"CLASH {line}" for line in view["clashes"]]
    _out(args, {"gallery": str(path), **view},
         "\n".join(lines) or f"no box has written a heartbeat to {path}")
    return 1 if any(b["silent"] for b in boxes) or view["clashes"] else 0
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


def _check_run(cfg, key: bytes | None) -> None:
    """What `run` refuses at start besides the config's own validation, checked without
    starting anything (so `run --validate-config` agrees with `run`): UserError (one line)."""
    import importlib.util
    import os

    d = cfg.daemon
    if not any(c.enabled for c in cfg.cameras):
        raise UserError("no enabled camera in the config (add a `cameras:` list)")
    if d.snapshots.dir and key is not None and not d.snapshots.allow_unencrypted:
        raise UserError("daemon.snapshots.dir: the gallery is encrypted but snapshots are plain "
                        "JPEG files; remove snapshots.dir or set snapshots.allow_unencrypted: "
                        "true")
    if d.web:
        from app.web.auth import AuthConfigError, Authenticator

        try:
            Authenticator(cfg.web, d.metrics_host)
        except AuthConfigError as exc:
            raise UserError(str(exc)) from exc
    jsonl = d.jsonl.path or cfg.output.events_jsonl
    if jsonl:
        path = Path(jsonl).expanduser()
        if path.is_dir() or path.is_symlink():
            raise UserError(f"cannot open events file {path}: it is a "
                            f"{'directory' if path.is_dir() else 'symbolic link'}")
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise UserError(f"cannot write events file {path}: {parent} is not writable")
    if d.mqtt is not None:
        if importlib.util.find_spec("paho") is None:
            raise UserError("MQTT output needs paho-mqtt (pip install 'facemoe-edge[mqtt]')")
        for what in ("ca_certs", "certfile", "keyfile"):
            name = getattr(d.mqtt.tls, what, None) if d.mqtt.tls is not None else None
            if name is not None and not os.path.isfile(name):
                raise UserError(f"MQTT TLS {what} file not found: {name}")


def cmd_run(args: argparse.Namespace) -> int:
    from app.daemon import run_daemon

    cfg = _config(args)
    if args.validate_config:
        from app.gallery import load_key

        _check_run(cfg, load_key(getattr(args, "key_file", None)))
        _out(args, {"config": "ok"}, "config ok")
        return 0
    return run_daemon(cfg, key=_key(args))


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


def cmd_serve(args: argparse.Namespace) -> int:
    if args.hash_password or args.hash_token:
        import getpass
        import secrets

        from app.web.auth import hash_password, hash_token

        if args.hash_token:
            token = secrets.token_urlsafe(32)
            _out(args, {"token": token, "token_hash": hash_token(token)},
                 f"token (give it to API clients): {token}\n"
                 f"web.token_hashes entry (config): {hash_token(token)}")
            return 0
        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline()
        password = password.rstrip("\n")
        if len(password) < 8:
            raise UserError("the password must have at least 8 characters")
        _out(args, {"password_hash": hash_password(password)}, hash_password(password))
        return 0
    from app.web.app import serve
    from app.web.auth import AuthConfigError

    try:
        return serve(_config(args), _gallery_path(args, _config(args)), args.host, args.port)
    except AuthConfigError as e:
        raise UserError(str(e)) from e


# --- trainer ---------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_train_config
    from trainer.train import train

    overrides = dict(kv.split("=", 1) for kv in args.set or [])
    overrides = {k: _yaml_value(v) for k, v in overrides.items()}
    if getattr(args, "from_gallery", None):
        return _finetune_from_gallery(args, overrides)
    if args.command == "finetune":
        if args.init_from:
            overrides["model.init_from"] = args.init_from
    cfg = load_train_config(args.config, overrides)
    if args.command == "finetune" and not cfg.model.init_from:
        raise UserError("finetune needs model.init_from in the config or --init-from MODEL_DIR")
    run_dir = train(cfg, resume=args.resume)
    _out(
        args,
        {"run_dir": str(run_dir), "model": str(run_dir / "model")},
        f"trained: {run_dir / 'model'}",
    )
    return 0


def _finetune_from_gallery(args: argparse.Namespace, overrides: dict) -> int:
    from app.config import load_config
    from app.gallery import Gallery
    from app.sitepool import PoolRules
    from app.sitetune import Lfw, finetune_from_gallery
    from trainer.manifest import read_manifest
    from trainer.site import load_site_config

    if args.init_from:
        overrides["model.init_from"] = args.init_from
    if bool(args.lfw_root) != bool(args.lfw_pairs):
        raise UserError("--lfw-root and --lfw-pairs go together")
    site = load_site_config(args.config, overrides)
    start = read_manifest(site.model.init_from)
    gallery = Gallery(args.from_gallery, start["name"], start["version"], create=False,
                      adopt_model=True)
    if args.lfw_before and not args.lfw_root:
        raise UserError("--lfw-before goes with --lfw-root and --lfw-pairs")
    lfw = Lfw(Path(args.lfw_root), Path(args.lfw_pairs),
              before=Path(args.lfw_before) if args.lfw_before else None) if args.lfw_root else None
    try:
        report = finetune_from_gallery(
            args.config, gallery, load_config(args.app_config), overrides=overrides,
            rules=PoolRules(min_identities=args.min_identities, min_tracks=args.min_tracks),
            lfw=lfw)
    finally:
        gallery.close()
    ident = report["site_heldout_identification"]
    _out(args, report, f"trained: {report['model_dir']}; site held-out identification "
                       f"{ident['before']['accuracy']:.3f} -> {ident['after']['accuracy']:.3f}; "
                       f"report {Path(report['model_dir']).parent / 'site_report.md'}")
    return 0


def cmd_use_model(args: argparse.Namespace) -> int:
    from app.paths import default_config
    from app.sitemodel import use_model

    config = args.config or str(default_config())
    r = use_model(config, args.dir, args.gallery)
    _out(args, {"config": config, "model_dir": args.dir, **r.as_json()},
         f"{config}: model.dir {args.dir}; re-embedded {r.templates} templates "
         f"({r.model_from} -> {r.model_to})")
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    from trainer.soup import soup

    try:
        out = soup(args.models, args.out, name=args.name, version=args.version)
    except ValueError as e:
        raise UserError(str(e)) from e
    _out(
        args, {"model": str(out), "ingredients": args.models}, f"soup of {len(args.models)}: {out}"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if args.source == "dlib":
        from trainer.importers.dlib import import_dlib
        from trainer.importers.dlib_format import DlibFormatError

        out = args.out or f"models/{args.architecture}"
        try:
            path = import_dlib(out, args.dat, architecture=args.architecture, name=args.name)
        except (DlibFormatError, KeyError, ValueError) as e:
            raise UserError(str(e)) from e
    elif args.source == "sface":
        from trainer.importers.sface import import_sface_torch

        # not models/sface: that is install.sh's ONNX-only artifact of the same file
        default = "sface-torch" if args.architecture == "sface" else args.architecture
        out = args.out or f"models/{default}"
        try:
            path = import_sface_torch(out, args.src, architecture=args.architecture, name=args.name)
        except (OSError, ValueError) as e:
            raise UserError(str(e)) from e
    else:
        from trainer.importers.onnx_model import OnnxImportError, import_onnx

        if args.dim is None:
            raise UserError("import onnx needs --dim N (the embedding dimension)")
        out = args.out or f"models/{Path(args.file).stem}"
        try:
            path = import_onnx(
                args.file, out, template=args.template, dim=args.dim, mean=tuple(args.mean),
                std=tuple(args.std), colour=args.colour, name=args.name, licence=args.licence,
            )
        except (OnnxImportError, ValueError) as e:
            raise UserError(str(e)) from e
    _out(args, {"model": str(path)}, f"wrote model artifact {path}")
    return 0


def _yaml_value(v: str):
    import yaml

    return yaml.safe_load(v)


def _data_prepare_outputs(args: argparse.Namespace) -> None:
    """Refuse a wrong combination of `data prepare` options (one line, before any work): --input
    writes a folder of aligned images (--out-dir), --teacher one pool file (--out-pool)."""
    if args.out is not None:
        raise UserError("data prepare: --out is split in two: --out-dir DIR with --input, "
                        "--out-pool FILE.npz with --teacher")
    if bool(args.input) == bool(args.teacher):
        raise UserError("data prepare needs one of --input DIR (raw photos per identity, "
                        "with --out-dir DIR) or --teacher NPZ (with --out-pool FILE.npz)")
    if args.input:
        if args.out_pool or not args.out_dir:
            raise UserError("data prepare --input writes a folder of aligned images: give "
                            "--out-dir DIR (--out-pool is for --teacher)")
        for flag, value in (("--data-root", args.data_root), ("--model", args.template_model)):
            if value:
                raise UserError(f"data prepare: {flag} applies to --teacher only (--input "
                                "writes ArcFace 112 crops, the template training folders use)")
        out = Path(args.out_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"data prepare --out-dir {out}: is a file; give a folder")
        if out.suffix.lower() == ".npz":
            raise UserError(f"data prepare --out-dir {out}: a folder named like a pool file; "
                            "pools are written by --teacher with --out-pool")
        return
    if args.out_dir or not args.out_pool:
        raise UserError("data prepare --teacher writes one pool file: give --out-pool FILE.npz "
                        "(--out-dir is for --input)")
    pool = Path(args.out_pool)
    if pool.is_dir():
        raise UserError(f"data prepare --out-pool {pool}: is a directory; give a FILE.npz")
    if pool.suffix.lower() != ".npz":
        raise UserError(f"data prepare --out-pool {pool}: the pool file's name must end in .npz")


def cmd_data(args: argparse.Namespace) -> int:
    from app.dataprep import prepare_folder, prepare_teacher_pool
    from trainer.preprocess import ARCFACE_112, CropTemplate

    if args.from_gallery:
        return _prepare_from_gallery(args)
    _data_prepare_outputs(args)
    if args.teacher:
        data_root = (
            Path(args.data_root) if args.data_root else Path(args.teacher).resolve().parents[1]
        )
        template = ARCFACE_112
        if args.template_model:
            from trainer.manifest import read_manifest

            template = CropTemplate.from_manifest(read_manifest(args.template_model))
        n = prepare_teacher_pool(Path(args.teacher), data_root, Path(args.out_pool), template)
        _out(args, {"out": args.out_pool, "faces": n},
             f"wrote {n} aligned faces to {args.out_pool}")
        return 0
    from app.config import load_config
    from app.runtime import make_detector

    report = prepare_folder(
        Path(args.input), Path(args.out_dir), make_detector(load_config(args.config))
    )
    _out(
        args,
        {
            "out": args.out_dir,
            "written": report.written,
            "no_face": report.skipped_no_face,
            "unreadable": report.skipped_unreadable,
        },
        f"wrote {report.written} aligned faces to {args.out_dir}; "
        f"{len(report.skipped_no_face)} without a face, "
        f"{len(report.skipped_unreadable)} unreadable",
    )
    return 0


def _prepare_from_gallery(args: argparse.Namespace) -> int:
    from app.gallery import Gallery
    from app.sitepool import PoolRules, build_site_pool, save_pool
    from trainer.manifest import read_manifest
    from trainer.preprocess import ARCFACE_112, CropTemplate

    if not args.out_pool:
        raise UserError("--from-gallery needs --out-pool FILE.npz")
    template = ARCFACE_112
    if args.template_model:
        template = CropTemplate.from_manifest(read_manifest(args.template_model))
    gallery = Gallery(args.from_gallery, "site-pool", "0", create=False, adopt_model=True)
    try:
        pool = build_site_pool(gallery, template, PoolRules(min_identities=args.min_identities,
                                                            min_tracks=args.min_tracks))
    finally:
        gallery.close()
    save_pool(pool, args.out_pool)
    summary = pool.summary()
    _out(args, {"out": args.out_pool, **summary},
         f"wrote the site pool of {summary['gallery']} to {args.out_pool}: "
         f"{summary['identities']} people, {summary['train_tracks']} training tracks, "
         f"{summary['heldout_tracks']} held out, {summary['unlabelled_faces']} unlabelled faces")
    return 0


def _pool_rules(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--min-identities", type=int, default=3,
                    help="with --from-gallery: people with enough named tracks needed (3)")
    sp.add_argument("--min-tracks", type=int, default=2,
                    help="with --from-gallery: named tracks a person needs to be checked (2)")


def cmd_eval(args: argparse.Namespace) -> int:
    from app.evaluate import eval_lfw

    cfg = _config(args)
    report = eval_lfw(
        cfg,
        Path(args.root),
        Path(args.pairs),
        args.probe_res,
        model_dir=args.model,
        roc_png=args.roc,
        write_manifest=args.write_manifest,
    )
    text = "\n".join(
        f"{k}: {v['accuracy']:.2f} ± {v['std']:.2f}  TAR@FAR1e-3 {v['tar_at_far_1e-3']:.2f}"
        for k, v in report["results"].items()
    )
    _out(args, report, text)
    return 0


def cmd_eval_openset(args: argparse.Namespace) -> int:
    from app.evaluate import eval_open_set

    cfg = _config(args)
    try:
        report = eval_open_set(
            cfg, Path(args.root), Path(args.eval_list), tuple(args.size or (100, 1000)),
            args.probe_res, model_dir=args.model, progress=not args.json and sys.stderr.isatty(),
        )
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from e
    lines = [f"{report['model']}: {report['rule']}; {report['mated_probes']} mated, "
             f"{report['nonmated_probes']} non-mated probes"]
    for res, by_n in report["results"].items():
        for n, r in by_n.items():
            rule = "".join(
                f"  rule {rate}: FPIR {r[f'rule_{rate}_fpir']:.2f}% "
                f"FNIR {r[f'rule_{rate}_fnir']:.2f}%"
                for rate in ("0.01", "0.001") if f"rule_{rate}_fpir" in r)
            lines.append(f"{res} {n}: rank-1 {r['rank1']:.2f}%  FNIR@FPIR1% "
                         f"{r['fnir_at_fpir_0.01']:.2f}%  FNIR@FPIR0.1% "
                         f"{r['fnir_at_fpir_0.001']:.2f}%{rule}")
    _out(args, report, "\n".join(lines))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from app.calibrate import calibrate, write

    cfg = _config(args)
    model = args.model or cfg.model.dir
    root = Path(args.data)
    if not (root / "teacher" / "dlib_resnet_v1.npz").is_file():
        raise UserError(f"no training-side face list at {root}/teacher/dlib_resnet_v1.npz "
                        "(--data: the shared data folder)")
    try:
        result = calibrate(model, root, cfg.model.backend, progress=not args.json
                           and sys.stderr.isatty())
    except ValueError as e:
        raise UserError(str(e)) from e
    if args.write:
        write(model, result)
    curves = result["calibration"]["curves"]
    lines = [f"{result['model']}: pair threshold at FAR 1e-3: "
             f"{result['recommended_threshold']:.4f}"] + [
        f"  {c['face_px']:>3} px: FAR 1e-3 -> {c['threshold'][8]:.3f}, 1e-5 -> "
        f"{c['threshold'][16]:.3f}, 1e-7 -> {c['threshold'][24]:.3f} ({c['pairs']} pairs)"
        for c in curves]
    _out(args, result, "\n".join(lines))
    return 0


def cmd_eval_ident(args: argparse.Namespace) -> int:
    from app.evaluate import eval_identification

    cfg = _config(args)
    try:
        report = eval_identification(
            cfg,
            Path(args.root),
            args.probe_res,
            list_file=Path(args.list) if args.list else None,
            model_dir=args.model,
            progress=not args.json and sys.stderr.isatty(),
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    lines = [
        f"{report['identities']} identities, {report['images']} images: "
        f"gallery {report['gallery']} ({report['distractors']} distractors), "
        f"probes {report['probes']}, "
        f"no face {report['no_face']}, unreadable {report['unreadable']}"
    ]
    lines += [
        f"{k}: " + "  ".join(f"{r} {v:.2f}%" for r, v in res.items())
        for k, res in report["results"].items()
    ]
    _out(args, report, "\n".join(lines))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from app.explain import explain_image

    cfg = _config(args)
    image = Path(args.image)
    out = Path(args.out) if args.out else Path(f"{image.stem}-routing.png")
    probe_res = [16] if args.probe_res is None else [r for r in args.probe_res if r > 0]
    try:
        report = explain_image(cfg, image, args.model, probe_res, out)
    except ValueError as e:
        raise UserError(str(e)) from e
    k = report["top_k"]
    lines = [
        f"{report['model']}: {report['layers']} MoE layers, {report['num_experts']} experts, "
        f"top-{k}; share of top-{k} token assignments per expert (%)"
    ]
    for label, r in report["resolutions"].items():
        lines.append(f"{label}:")
        lines += [
            f"  layer {i}: " + " ".join(f"{s * 100:5.1f}" for s in row)
            for i, row in enumerate(r["shares"])
        ]
    lines.append(f"wrote {report['png']}")
    _out(args, report, "\n".join(lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from engine.export import ensure_onnx

    forms = ["standard", "plugin"] if args.form == "both" else [args.form]
    paths = [str(ensure_onnx(args.model, f)) for f in forms]
    _out(args, {"onnx": paths}, "\n".join(paths))
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from engine.build import build_engine, read_engine_manifest

    out = build_engine(
        args.model,
        args.out,
        flavour=args.flavour,
        fp16=args.fp16,
        max_batch=args.max_batch,
        gpu_target=args.gpu_target,
    )
    info = read_engine_manifest(out)["build"]
    _out(args, {"engine_dir": str(out), **info}, f"built {out / 'engine.plan'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench import bench_embed

    result = bench_embed(
        args.model,
        args.backend,
        args.batch,
        args.iters,
        threads=args.threads,
        moe_dispatch=args.moe_dispatch,
    )
    _out(args, result, "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from app.gallery_cli import add_gallery_actions

    p = argparse.ArgumentParser(prog="facemoe", description="FaceMoE Edge face recognition")
    p.add_argument("--version", action="version", version=f"facemoe {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log info messages too (-vv: debug); `run`, `train` and `finetune` log info "
        "by default",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, gallery=True):
        sp.add_argument("--config", help="app config YAML (default: configs/app.yaml)")
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        if gallery:
            sp.add_argument("--gallery", help="gallery database (path or SQLAlchemy URL)")
            sp.add_argument("--key-file", help=KEY_HELP)

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

    sp = sub.add_parser("gallery", help="manage the gallery: list, remove, export, import, ...")
    gsub = sp.add_subparsers(dest="action", required=True)
    g = gsub.add_parser("list", help="every identity with its template count")
    common(g)
    g = gsub.add_parser("remove", help="delete a person: templates, crops, stored events, and "
                        "their lines in the configured JSONL files and their snapshots")
    g.add_argument("name")
    g.add_argument("--events-jsonl", action="append", metavar="FILE",
                   help="another events JSONL file to erase the person from (e.g. one written "
                        "by `process --events`); repeatable")
    common(g)
    g = gsub.add_parser("rename", help="rename a person (past events keep the old name)")
    g.add_argument("name", help="the current name")
    g.add_argument("new_name", help="the new name (must not exist yet)")
    common(g)
    add_gallery_actions(gsub, common)
    sp.set_defaults(func=cmd_gallery)

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

    sp = sub.add_parser("recognize", help="name every face in photos (nearest identities)")
    sp.add_argument("images", nargs="+", help="photos (JPEG, PNG, WebP, BMP)")
    sp.add_argument("--top", type=int, default=3, help="nearest identities per face (default 3)")
    common(sp)
    sp.set_defaults(func=cmd_recognize)

    sp = sub.add_parser("compare", help="two photos: the same person or not (largest faces)")
    sp.add_argument("a")
    sp.add_argument("b")
    common(sp, gallery=False)
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser(
        "serve", help="the review web UI and REST API (events, unknown faces, gallery)"
    )
    sp.add_argument("--host", help="address to bind (default web.host: 127.0.0.1)")
    sp.add_argument("--port", type=int, help="port (default web.port: 8080)")
    sp.add_argument(
        "--hash-password", action="store_true",
        help="read a password on stdin and print its hash for web.users[].password_hash",
    )
    sp.add_argument(
        "--hash-token", action="store_true",
        help="make an API token and print it with its hash for web.token_hashes",
    )
    common(sp)
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("run", help="the daemon: recognise faces on the configured cameras")
    sp.add_argument(
        "--config", help="app config YAML with a `cameras:` list (default: configs/app.yaml)"
    )
    sp.add_argument("--validate-config", action="store_true", help="check the config and exit")
    sp.add_argument("--key-file", help=KEY_HELP)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser(
        "fleet", help="the boxes (daemons) of a site on this gallery database and their cameras")
    sp.add_argument("--silent-after", type=float, default=60.0, metavar="S",
                    help="flag a box not heard of for this many seconds (default 60)")
    sp.add_argument("--forget", metavar="BOX",
                    help="a box gone for good: remove it from the fleet, so no erasure waits "
                         "for it to erase its copies")
    common(sp)
    sp.set_defaults(func=cmd_fleet)

    for name in ("train", "finetune"):
        sp = sub.add_parser(name, help=f"{name} a FaceMoE model")
        sp.add_argument("--config", required=True)
        sp.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
        sp.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a config key (a.b=c)"
        )
        sp.add_argument("--json", action="store_true")
        if name == "finetune":
            sp.add_argument("--init-from", help="model artifact to fine-tune")
            sp.add_argument("--from-gallery", metavar="DB",
                            help="site fine-tune on this gallery's named events and templates "
                                 "(a site recipe, configs/finetune-site.yaml)")
            sp.add_argument("--app-config", help="with --from-gallery: the app config (detector "
                                                 "for the LFW check)")
            sp.add_argument("--lfw-root", help="with --from-gallery: LFW images, for the "
                                               "before/after forgetting check")
            sp.add_argument("--lfw-pairs", help="with --lfw-root: pairs.txt")
            sp.add_argument("--lfw-before", metavar="JSON",
                            help="with --lfw-root: the start model's `facemoe eval lfw "
                                 "--probe-res 16 --json`, measured once (else measured here)")
            _pool_rules(sp)
        sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("use-model", help="switch to a model (a site fine-tune, or back): "
                                          "re-embed the gallery, then set model.dir")
    sp.add_argument("dir", help="model artifact directory")
    sp.add_argument("--config", help="the app config to change (default: the installed one)")
    sp.add_argument("--gallery", help="gallery database (default: the config's)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_use_model)

    sp = sub.add_parser(
        "soup", help="average the weights of models fine-tuned from one start (a model soup)"
    )
    sp.add_argument("models", nargs="+", help="model artifacts with the same model.yaml")
    sp.add_argument("--out", required=True, help="directory for the averaged artifact")
    sp.add_argument("--name", default="facemoe-edge")
    sp.add_argument("--version", default="0.0.0")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_soup)

    sp = sub.add_parser(
        "calibrate", help="measure a model's open-set FAR curves per face resolution on "
        "training-side identities (for models that did not train on them)")
    sp.add_argument("--model", help="model artifact (default: the config's)")
    sp.add_argument("--data", default=str(Path("..", "shared", "data")),
                    help="the shared data folder (teacher/, celeba299/, lfw/)")
    sp.add_argument("--write", action="store_true",
                    help="store the calibration and FAR 1e-3 threshold in the manifest")
    common(sp, gallery=False)
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("import", help="make a model artifact from a pretrained face network")
    isub = sp.add_subparsers(dest="source", required=True)
    i = isub.add_parser("dlib", help="dlib's face ResNet v1 (public domain), optionally upcycled")
    i.add_argument("--dat", help="the .dat file (default: the installed face-recognition-models)")
    i.add_argument(
        "--architecture", default="dlib-resnet-v1",
        help="dlib-resnet-v1 (as is) or facemoe-r29 (FaceMoE blocks added, equal at step 0)",
    )
    i.add_argument("--out", help="artifact directory (default models/ARCHITECTURE)")
    i.add_argument("--name")
    i.add_argument("--json", action="store_true")
    i = isub.add_parser("sface", help="OpenCV Zoo's SFace (Apache-2.0) in PyTorch, optionally "
                        "upcycled, for fine-tuning")
    i.add_argument("--src", help="face_recognition_sface_2021dec.onnx (default: the installed one)")
    i.add_argument(
        "--architecture", default="sface", choices=("sface", "facemoe-sface"),
        help="sface (as is) or facemoe-sface (FaceMoE blocks added, equal at step 0)",
    )
    i.add_argument("--out", help="artifact directory (default models/sface-torch or "
                                 "models/facemoe-sface)")
    i.add_argument("--name")
    i.add_argument("--json", action="store_true")
    i = isub.add_parser("onnx", help="any ONNX face embedder (e.g. SFace, an ArcFace model)")
    i.add_argument("file", help="MODEL.onnx: one NCHW image input, one embedding output")
    i.add_argument("--template", default="arcface112", help="crop template: arcface112 | dlib150")
    i.add_argument("--dim", type=int, help="embedding dimension")
    i.add_argument("--mean", type=float, nargs=3, default=(0.5, 0.5, 0.5),
                   help="per channel, on [0,1] pixels: input = (x/255 - mean) / std")
    i.add_argument("--std", type=float, nargs=3, default=(0.5, 0.5, 0.5))
    i.add_argument("--colour", default="RGB", choices=("RGB", "BGR"))
    i.add_argument("--licence", default="", help="the weights' terms, recorded in the manifest")
    i.add_argument("--out", help="artifact directory (default models/<file stem>)")
    i.add_argument("--name")
    i.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_import)

    sp = sub.add_parser("data", help="prepare training data")
    dsub = sp.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("prepare", help="detect and align faces into a training set")
    d.add_argument("--input", help="raw photos, one sub-folder per identity (with --out-dir)")
    d.add_argument("--out-dir", help="with --input: folder for the aligned crops "
                                     "(OUT_DIR/<identity>/<photo>.jpg)")
    d.add_argument("--teacher", help="teacher embeddings .npz (../shared/data/teacher; "
                                     "with --out-pool)")
    d.add_argument("--out-pool", help="with --teacher: the training pool file to write (.npz)")
    d.add_argument("--data-root", help="root the teacher paths are relative to")
    d.add_argument(  # not `model`: main() would fill that in with the config's model
        "--model", dest="template_model",
        help="with --teacher: align to this model artifact's crop template (default: ArcFace 112)",
    )
    d.add_argument("--from-gallery", metavar="DB",
                   help="the site pool of a gallery's named events and templates (with "
                        "--out-pool; whole tracks held out per identity)")
    _pool_rules(d)
    d.add_argument("--out", help=argparse.SUPPRESS)  # split into --out-dir / --out-pool
    d.add_argument("--config")
    d.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_data)

    sp = sub.add_parser("eval", help="evaluate a model")
    esub = sp.add_subparsers(dest="benchmark", required=True)
    e = esub.add_parser("lfw", help="LFW 10-fold verification")
    e.add_argument("--root", required=True, help="LFW image root (lfw-deepfunneled)")
    e.add_argument("--pairs", required=True, help="pairs.txt")
    e.add_argument(
        "--probe-res",
        type=int,
        action="append",
        default=None,
        help="also test with the second image downsampled to NxN (repeatable)",
    )
    e.add_argument("--model", help="model artifact (default: the config's)")
    e.add_argument("--roc", help="write the ROC curves to this PNG")
    e.add_argument(
        "--write-manifest", action="store_true", help="store the results in the model's manifest"
    )
    common(e, gallery=False)
    sp.set_defaults(func=cmd_eval)

    e = esub.add_parser(
        "openset", help="1:N identification with strangers: FNIR at FPIR 1%% and 0.1%% for "
        "galleries of N people (NIST FRVT 1:N style), and the calibrated rule's FPIR")
    e.add_argument("--root", required=True, help="LFW image root (lfw-deepfunneled)")
    e.add_argument("--eval-list", required=True,
                   help="lfw/eval_identities.txt: the identities it may use (evaluation only)")
    e.add_argument("--size", type=int, action="append",
                   help="gallery size N (repeatable; default 100 and 1000)")
    e.add_argument("--probe-res", type=int, action="append", default=None,
                   help="also probe with faces at NxN (repeatable)")
    e.add_argument("--model", help="model artifact (default: the config's)")
    common(e, gallery=False)
    e.set_defaults(func=cmd_eval_openset)

    e = esub.add_parser(
        "ident", help="closed-set rank-N identification (first image per identity = gallery)"
    )
    e.add_argument(
        "--root", required=True, help="raw photos, one sub-folder per identity (or see --list)"
    )
    e.add_argument("--list", help="file of 'filename identity' lines, filenames relative to --root")
    e.add_argument(
        "--probe-res",
        type=int,
        action="append",
        default=None,
        help="also test with probes downsampled to NxN (repeatable)",
    )
    e.add_argument("--model", help="model artifact (default: the config's)")
    common(e, gallery=False)
    e.set_defaults(func=cmd_eval_ident)

    sp = sub.add_parser("explain", help="show which MoE expert each face token is routed to")
    sp.add_argument("image", help="photo; the largest face is explained")
    sp.add_argument("--model", help="model artifact (default: the config's)")
    sp.add_argument("--out", help="PNG to write (default: <image stem>-routing.png)")
    sp.add_argument(
        "--probe-res",
        type=int,
        action="append",
        default=None,
        help="also explain the face downsampled to NxN (repeatable; default 16; 0 = none)",
    )
    common(sp, gallery=False)
    sp.set_defaults(func=cmd_explain)

    sp = sub.add_parser("export", help="export a model artifact to ONNX")
    sp.add_argument("model", nargs="?", default=None, help="model artifact (default: the config's)")
    sp.add_argument("--config")
    sp.add_argument("--form", choices=["standard", "plugin", "both"], default="standard")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser(
        "build-engine", help="compile a model into a TensorRT engine with the routing plugin"
    )
    sp.add_argument("model", nargs="?", default=None, help="model artifact (default: the config's)")
    sp.add_argument("--out", help="engine directory (default: MODEL/engine)")
    sp.add_argument("--flavour", choices=["auto", "rtx", "standard"], default="auto")
    sp.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True)
    sp.add_argument("--max-batch", type=int, default=64)
    sp.add_argument("--gpu-target", default="auto", help="compute capabilities, e.g. 8.6,8.9 (RTX)")
    sp.add_argument("--config")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_build_engine)

    sp = sub.add_parser("bench", help="benchmarks")
    bsub = sp.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("embed", help="embedding throughput and latency")
    b.add_argument("--model", default=None)
    b.add_argument("--config")
    b.add_argument("--backend", default="onnxruntime")
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--threads", type=int, default=0)
    b.add_argument(
        "--moe-dispatch",
        choices=["auto", "dense", "sparse", "triton"],
        default="auto",
        help="torch backend: how the MoE layers run (auto: triton on CUDA when it imports, "
        "else sparse; dense on CPU); compare sparse vs dense compute on a GPU",
    )
    b.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_bench)
    return p


# User mistakes: (module, class) so that checking an error imports nothing (an exception of a
# class whose module was never imported cannot have been raised).
_USER_ERRORS = (
    ("trainer.config", "ConfigError"),
    ("app.enroll", "EnrollError"),
    ("app.faces", "FaceError"),
    ("app.gallery.errors", "GalleryError"),
    ("app.sinks", "SinkError"),
    ("app.source", "SourceError"),
    ("engine.backends", "BackendError"),
    ("engine.build", "EngineBuildError"),
    ("app.sitepool", "SitePoolError"),
)
# Commands whose log is their progress report (the daemon, training) log info by default.
_INFO_COMMANDS = ("run", "train", "finetune")


def _is_user_error(exc: Exception) -> bool:
    if isinstance(exc, UserError | FileNotFoundError):
        return True
    return any(
        isinstance(exc, getattr(sys.modules[module], name))
        for module, name in _USER_ERRORS
        if module in sys.modules
    )


def _setup_logging(args: argparse.Namespace) -> None:
    """Warnings and errors by default; -v adds info, -vv debug."""
    default = logging.INFO if args.command in _INFO_COMMANDS else logging.WARNING
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(
        level=max(logging.DEBUG, default - 10 * args.verbose),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_repeat_filter([h for h in root.handlers if h not in before])


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    if args.command == "process" and not args.videos and not args.validate_config:
        print("facemoe: error: process needs a VIDEO (files, folders or stream URIs)",
              file=sys.stderr)
        return 2
    try:
        if getattr(args, "model", "unset") is None:
            from app.config import load_config

            args.model = load_config(getattr(args, "config", None)).model.dir
        return args.func(args)
    except KeyboardInterrupt:
        print("facemoe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(
            f"facemoe: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
