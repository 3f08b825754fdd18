"""Measuring a model: `facemoe eval lfw|openset|ident`, `facemoe calibrate` (open-set FAR
curves and threshold) and `facemoe explain` (which expert each face token goes to)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.cli.common import UserError, _config, _out, common


def add_calibrate(sub: argparse._SubParsersAction) -> None:
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


def add_eval(sub: argparse._SubParsersAction) -> None:
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


def add_explain(sub: argparse._SubParsersAction) -> None:
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
