"""The engine's commands: `facemoe export` (ONNX), `facemoe build-engine` (TensorRT) and
`facemoe bench embed`."""

from __future__ import annotations

import argparse

from app.cli.common import _out


def add_export(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("export", help="export a model artifact to ONNX")
    sp.add_argument("model", nargs="?", default=None, help="model artifact (default: the config's)")
    sp.add_argument("--config")
    sp.add_argument("--form", choices=["standard", "plugin", "both"], default="standard")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from engine.export import ensure_onnx

    forms = ["standard", "plugin"] if args.form == "both" else [args.form]
    paths = [str(ensure_onnx(args.model, f)) for f in forms]
    _out(args, {"onnx": paths}, "\n".join(paths))
    return 0


def add_build_engine(sub: argparse._SubParsersAction) -> None:
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


def add_bench(sub: argparse._SubParsersAction) -> None:
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
