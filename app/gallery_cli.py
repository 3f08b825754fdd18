"""`facemoe gallery list|remove|rename|export|import|reembed|purge|events|audit|settings|
check|templates|delete-template|merge`: every gallery action, its parser and its handler.

`add_gallery` adds `facemoe gallery` and its sub-commands; `cmd_gallery` runs one:
`open_gallery_for` opens
the gallery the way an action needs it; `run_gallery_action` runs one and prints its result
(one JSON object with --json). Only actions that embed (`uses_embedder`) load the model; the
others need only its name@version from the manifest. Heavy imports happen inside the
handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cli.common import _config, _embedder, _gallery_path, _model_id, _out, common

if TYPE_CHECKING:
    from app.embed import Embedder
    from app.gallery import Gallery

log = logging.getLogger(__name__)


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"days must be >= 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _on_off(text: str) -> bool:
    if text.lower() in ("on", "yes", "true", "1"):
        return True
    if text.lower() in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def add_gallery(sub: argparse._SubParsersAction) -> None:
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
    add_gallery_actions(gsub)
    sp.set_defaults(func=cmd_gallery)


def cmd_gallery(args: argparse.Namespace) -> int:
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


def add_gallery_actions(gsub: argparse._SubParsersAction) -> None:
    """Add the lifecycle actions to `facemoe gallery`'s sub-parsers."""

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        return gsub.add_parser(name, help=help_text, description=help_text)

    g = action("export", "write identities, templates and crops to one checksummed file")
    g.add_argument("file", help="the export to write (a zip; mode 0600)")
    common(g)
    g = action("import", "add the identities of an export (verified, in one transaction)")
    g.add_argument("file", help="an export written by `facemoe gallery export`")
    g.add_argument("--on-conflict", choices=["fail", "skip", "merge"], default="fail",
                   help="a name already in the gallery: refuse the import (default), keep the "
                        "gallery's identity, or add the new templates to it")
    g.add_argument("--reembed", action="store_true",
                   help="accept an export of another model: re-embed its crops with this model")
    g.add_argument("--drop-missing", action="store_true",
                   help="with --reembed: leave out templates that have no crop")
    common(g)
    g = action("reembed", "rebuild every template from its stored crop with the current model")
    g.add_argument("--drop-missing", action="store_true",
                   help="delete templates that have no stored crop (default: refuse)")
    common(g)
    g = action("purge", "apply an event retention period")
    g.add_argument("--events-older-than", type=_days, required=True, metavar="DAYS",
                   help="delete events stored more than DAYS days ago")
    common(g)
    g = action("events", "list stored events with their ids (enroll from one with "
                         "`facemoe enroll NAME --event ID`)")
    g.add_argument("--limit", type=_count, default=50,
                   help="only the most recent N (default 50)")
    g.add_argument("--camera", help="only this camera's events")
    who = g.add_mutually_exclusive_group()
    who.add_argument("--identity", help="only events that named this identity")
    who.add_argument("--unknown", action="store_true", help="only events of unknown faces")
    common(g)
    g = action("audit", "show the audit log (who enrolled, removed, renamed, exported ...)")
    g.add_argument("--limit", type=_count, help="only the most recent N rows")
    common(g)
    g = action("settings", "show the gallery's model, settings and sizes; change settings")
    g.add_argument("--store-crops", type=_on_off, metavar="on|off",
                   help="keep the aligned crops of new templates (needed to re-embed)")
    g.add_argument("--delete-crops", action="store_true",
                   help="with --store-crops off: also delete the crops already stored")
    common(g)
    g = action("check", "run SQLite's integrity check on the gallery")
    common(g)
    g = action("templates", "list an identity's templates with their ids")
    g.add_argument("name")
    common(g)
    g = action("delete-template", "delete one template (an id from `facemoe gallery templates`)")
    g.add_argument("id", type=int)
    common(g)
    g = action("merge", "move the templates and events of one identity to another, "
                        "then delete the first")
    g.add_argument("name", help="the identity merged away")
    g.add_argument("into", help="the identity that keeps everything")
    common(g)


def uses_embedder(args: argparse.Namespace) -> bool:
    """Whether the action embeds crops: `reembed`, and `import --reembed`."""
    return args.action == "reembed" or (args.action == "import" and args.reembed)


def open_gallery_for(args: argparse.Namespace, path: str, model: tuple[str, str]) -> Gallery:
    """Open the gallery for `args.action` with the configured `model` (name, version). Only
    `import` may create a gallery and it needs that model; the other actions manage a
    gallery of any model (after a model upgrade it can still be listed, exported, cleaned
    or re-embedded)."""
    from app.gallery import Gallery, load_key, verify_export

    key = load_key(getattr(args, "key_file", None))
    importing = args.action == "import"
    if importing:
        verify_export(args.file)  # before a new gallery file is made for a bad export
    gallery = Gallery(path, *model, create=importing, key=key, adopt_model=not importing)
    configured = "@".join(model)
    if gallery.model != configured and args.action != "reembed":
        log.warning("gallery %s was built with model %s, not the configured %s: recognition "
                    "needs `facemoe gallery reembed`", gallery.location, gallery.model,
                    configured)
    return gallery


def run_gallery_action(args: argparse.Namespace, gallery: Gallery,
                       embedder: Embedder | None) -> dict | None:
    """Run a lifecycle action and print its result; None when `args.action` is not one.
    `embedder` is the loaded model when `uses_embedder(args)`, else None."""
    handler = _HANDLERS.get(args.action)
    if handler is None:
        return None
    payload, text = handler(args, gallery, embedder)
    print(json.dumps(payload) if getattr(args, "json", False) else text)
    return payload


def _export(args: argparse.Namespace, gallery: Gallery, _embedder: Embedder | None
            ) -> tuple[dict, str]:
    r = gallery.export(args.file)
    return ({"gallery": gallery.location, "model": gallery.model, **r.as_json()},
            f"exported {r.identities} identities, {r.templates} templates, {r.crops} crops "
            f"to {r.path} ({r.bytes} bytes, sha256 {r.sha256})")


def _import(args: argparse.Namespace, gallery: Gallery, embedder: Embedder | None
            ) -> tuple[dict, str]:
    from app.gallery import GalleryError

    if args.drop_missing and not args.reembed:
        raise GalleryError("--drop-missing only applies with --reembed")
    r = gallery.import_file(args.file, on_conflict=args.on_conflict,
                            embedder=embedder if args.reembed else None,
                            drop_missing=args.drop_missing)
    lines = [f"imported {r.path}: {r.identities_added} identities added, "
             f"{r.identities_merged} merged, {r.identities_skipped} skipped; "
             f"{r.templates_added} templates added"
             + (f" ({r.templates_reembedded} re-embedded)" if r.templates_reembedded else "")
             + (f", {r.templates_duplicate} already present" if r.templates_duplicate else "")]
    lines += [f"left out (no crop): {d}" for d in r.templates_dropped]
    if r.crops_dropped:
        lines.append(f"{r.crops_dropped} crops not stored (store_crops is off)")
    return {"gallery": gallery.location, "model": gallery.model, **r.as_json()}, "\n".join(lines)


def _reembed(args: argparse.Namespace, gallery: Gallery, embedder: Embedder
             ) -> tuple[dict, str]:
    r = gallery.reembed(embedder, drop_missing=args.drop_missing)
    lines = [f"re-embedded {r.templates} templates: {r.model_from} -> {r.model_to}"]
    lines += [f"deleted (no crop): {d}" for d in r.dropped]
    return {"gallery": gallery.location, **r.as_json()}, "\n".join(lines)


def _purge(args: argparse.Namespace, gallery: Gallery, _embedder: Embedder | None
           ) -> tuple[dict, str]:
    n = gallery.purge_events(args.events_older_than)
    return ({"gallery": gallery.location, "events_deleted": n,
             "older_than_days": args.events_older_than},
            f"deleted {n} events older than {args.events_older_than:g} days")


def _events(args: argparse.Namespace, gallery: Gallery, _embedder: Embedder | None
            ) -> tuple[dict, str]:
    rows = gallery.stored_events(args.limit, camera=args.camera, identity=args.identity,
                                 unknown=args.unknown)
    lines = [f"{'id':>6}  {'camera':<12} {'track':>5} {'start':>9} {'end':>9} {'frames':>6} "
             f"{'crops':>5} {'score':>6}  identity"]
    lines += [f"{r.id:>6}  {r.event.camera:<12} {r.event.track_id:>5} {r.event.start:>9.2f} "
              f"{r.event.end:>9.2f} {r.event.frames:>6} {r.crops:>5} {r.event.score:>6.3f}  "
              f"{r.event.identity if r.event.identity is not None else '(unknown)'}"
              for r in rows]
    text = "\n".join(lines) if rows else "(no stored events)"
    return {"gallery": gallery.location, "events": [r.as_json() for r in rows]}, text


def _audit(args: argparse.Namespace, gallery: Gallery, _embedder: Embedder | None
           ) -> tuple[dict, str]:
    rows = gallery.audit(args.limit)
    text = "\n".join(f"{r.time:%Y-%m-%d %H:%M:%S}\t{r.user}\t{r.action}\t"
                     f"{r.identity if r.identity is not None else '-'}\t{r.detail}"
                     for r in rows) or "(no audit rows)"
    return {"gallery": gallery.location, "audit": [r.as_json() for r in rows]}, text


def _settings(args: argparse.Namespace, gallery: Gallery, _embedder: Embedder | None
              ) -> tuple[dict, str]:
    from app.gallery import GalleryError

    if args.delete_crops and args.store_crops is not False:
        raise GalleryError("--delete-crops needs --store-crops off")
    deleted = 0
    if args.store_crops is not None:
        deleted = gallery.set_store_crops(args.store_crops, delete_existing=args.delete_crops)
    info: dict[str, Any] = gallery.info()
    if args.delete_crops:
        info["crops_deleted"] = deleted
    return info, "\n".join(f"{k}: {v}" for k, v in info.items())


def _check(_args: argparse.Namespace, gallery: Gallery, _embedder: Embedder | None
           ) -> tuple[dict, str]:
    from app.gallery import GalleryError

    result = gallery.integrity_check()
    if result != "ok":
        raise GalleryError(f"gallery {gallery.location} is corrupt: {result}")
    unfinished = gallery.erasures.pending()
    if unfinished:
        raise GalleryError(
            f"gallery {gallery.location} has {len(unfinished)} unfinished erasure(s) (run "
            f"facemoe gallery remove NAME again to finish each): "
            + "; ".join(f"{t.name!r} since {t.created_at:%Y-%m-%d %H:%M}"
                        + (f" ({t.last_error})" if t.last_error else "")
                        for t in unfinished[:20]))
    corrupt = gallery.verify()
    if corrupt:
        raise GalleryError(
            f"gallery {gallery.location} has {len(corrupt)} corrupt template(s) (re-enroll "
            f"them or restore from a backup or an export): "
            + "; ".join(str(c) for c in corrupt[:20]) + ("; ..." if len(corrupt) > 20 else ""))
    waiting = [(t.name, boxes) for t, boxes in gallery.erasures.waiting_for_boxes() if boxes]
    retrain = [r for r in gallery.trained.needs_retraining() if Path(r.model_dir).is_dir()]
    text = f"{gallery.location}: ok" + "".join(
        f"\nerasure of {name!r}: boxes {', '.join(boxes)} have not erased their copies yet "
        f"(each does when it runs; `facemoe fleet --forget BOX` for a box gone for good)"
        for name, boxes in waiting) + "".join(f"\nneeds retraining: {r.line()}"
                                              for r in retrain)
    return {"gallery": gallery.location, "integrity": result,
            "erasures_waiting_for_boxes": {name: boxes for name, boxes in waiting},
            "models_to_retrain": [r.as_json() for r in retrain]}, text


def _templates(args: argparse.Namespace, gallery: Gallery, _embedder: Embedder | None
               ) -> tuple[dict, str]:
    refs = gallery.pages.template_refs(args.name)
    text = "\n".join(f"{t.id}\t{t.quality:.3f}\t{t.model}\t{'photo' if t.has_crop else '-'}\t"
                     f"{t.source}" for t in refs) or "(no templates)"
    return {"gallery": gallery.location, "name": args.name, "templates": [
        {"id": t.id, "source": t.source, "quality": round(t.quality, 4), "model": t.model,
         "created_at": t.created_at.isoformat(), "photo": t.has_crop} for t in refs]}, text


def _delete_template(args: argparse.Namespace, gallery: Gallery, _embedder: Embedder | None
                     ) -> tuple[dict, str]:
    name = gallery.delete_template(args.id)
    return ({"gallery": gallery.location, "deleted_template": args.id, "identity": name},
            f"deleted template {args.id} of {name!r}")


def _merge(args: argparse.Namespace, gallery: Gallery, _embedder: Embedder | None
           ) -> tuple[dict, str]:
    moved = gallery.merge_identities(args.name, args.into)
    return ({"gallery": gallery.location, "merged": args.name, "into": args.into,
             "templates_moved": moved},
            f"merged {args.name!r} into {args.into!r} ({moved} template(s) moved)")


_HANDLERS: dict[str, Callable[..., tuple[dict, str]]] = {
    "export": _export, "import": _import, "reembed": _reembed, "purge": _purge, "events": _events,
    "audit": _audit, "settings": _settings, "check": _check, "templates": _templates,
    "delete-template": _delete_template, "merge": _merge,
}
