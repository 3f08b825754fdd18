"""`facemoe`: the one entry point. `--json` prints one JSON object on stdout; logs go to stderr.

User mistakes end with a one-line message on stderr and a non-zero exit, never a traceback.
Each command's parser and handler live together in a module of this package (`add_<command>`
beside `cmd_<command>`; the gallery's in `app.gallery_cli`); `build_parser` puts them in the
order `facemoe --help` lists them, and `main` runs one.
"""

from __future__ import annotations

import argparse
import logging
import sys

from app import __version__, gallery_cli
from app.cli import box, engine, enroll, evaluate, process, recognize, site, train
from app.cli.common import UserError
from app.logs import install_repeat_filter

log = logging.getLogger("facemoe")

# every command, in the order of `facemoe --help`
COMMANDS = (
    enroll.add_enroll,
    gallery_cli.add_gallery,
    process.add_process,
    recognize.add_recognize,
    recognize.add_compare,
    box.add_serve,
    box.add_run,
    box.add_fleet,
    train.add_train,
    site.add_use_model,
    train.add_soup,
    evaluate.add_calibrate,
    train.add_import,
    train.add_data,
    evaluate.add_eval,
    evaluate.add_explain,
    engine.add_export,
    engine.add_build_engine,
    engine.add_bench,
)


def build_parser() -> argparse.ArgumentParser:
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
    for add in COMMANDS:
        add(sub)
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

