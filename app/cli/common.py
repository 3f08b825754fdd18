"""What every `facemoe` command shares: `UserError` (a mistake printed as one line), the
`--config/--json/--gallery/--key-file` options (`common`), printing a result (`_out`: one JSON
object with --json) and reading the config, the gallery's key and path, and the model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEY_HELP = ("file with the gallery's AES-256 key, base64 (openssl rand -base64 32); "
            "default: $FACEMOE_GALLERY_KEY, then the file named by $FACEMOE_GALLERY_KEY_FILE")


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def common(sp: argparse.ArgumentParser, gallery: bool = True) -> None:
    """The options most commands take: --config and --json, and with `gallery` --gallery and
    --key-file."""
    sp.add_argument("--config", help="app config YAML (default: configs/app.yaml)")
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    if gallery:
        sp.add_argument("--gallery", help="gallery database (path or SQLAlchemy URL)")
        sp.add_argument("--key-file", help=KEY_HELP)


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
