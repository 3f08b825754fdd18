"""The site fine-tune's commands: `facemoe finetune --from-gallery` (a site recipe on the
gallery's named events and templates), `facemoe data prepare --from-gallery` (the site pool
alone) and `facemoe use-model` (switch to a model: re-embed the gallery, then set model.dir).
Their options are added by `app.cli.train` (`pool_rules`) and `add_use_model`."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.cli.common import UserError, _out


def add_use_model(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("use-model", help="switch to a model (a site fine-tune, or back): "
                                          "re-embed the gallery, then set model.dir")
    sp.add_argument("dir", help="model artifact directory")
    sp.add_argument("--config", help="the app config to change (default: the installed one)")
    sp.add_argument("--gallery", help="gallery database (default: the config's)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_use_model)


def cmd_use_model(args: argparse.Namespace) -> int:
    from app.paths import default_config
    from app.sitemodel import use_model

    config = args.config or str(default_config())
    r = use_model(config, args.dir, args.gallery)
    _out(args, {"config": config, "model_dir": args.dir, **r.as_json()},
         f"{config}: model.dir {args.dir}; re-embedded {r.templates} templates "
         f"({r.model_from} -> {r.model_to})")
    return 0


def train_from_gallery(args: argparse.Namespace, overrides: dict) -> int:
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


def prepare_from_gallery(args: argparse.Namespace) -> int:
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


def pool_rules(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--min-identities", type=int, default=3,
                    help="with --from-gallery: people with enough named tracks needed (3)")
    sp.add_argument("--min-tracks", type=int, default=2,
                    help="with --from-gallery: named tracks a person needs to be checked (2)")
