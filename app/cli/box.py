"""What runs on a box: `facemoe run` (the daemon over the configured cameras,
its config checked first), `facemoe serve` (the review UI and REST API) and `facemoe fleet`
(the boxes of a site and their cameras)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.cli.common import (
    KEY_HELP,
    UserError,
    _config,
    _gallery_path,
    _key,
    _model_id,
    _out,
    common,
)


def add_serve(sub: argparse._SubParsersAction) -> None:
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


def add_run(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("run", help="the daemon: recognise faces on the configured cameras")
    sp.add_argument(
        "--config", help="app config YAML with a `cameras:` list (default: configs/app.yaml)"
    )
    sp.add_argument("--validate-config", action="store_true", help="check the config and exit")
    sp.add_argument("--key-file", help=KEY_HELP)
    sp.set_defaults(func=cmd_run)


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


def add_fleet(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "fleet", help="the boxes (daemons) of a site on this gallery database and their cameras")
    sp.add_argument("--silent-after", type=float, default=60.0, metavar="S",
                    help="flag a box not heard of for this many seconds (default 60)")
    sp.add_argument("--forget", metavar="BOX",
                    help="a box gone for good: remove it from the fleet, so no erasure waits "
                         "for it to erase its copies")
    common(sp)
    sp.set_defaults(func=cmd_fleet)


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
