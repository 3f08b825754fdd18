"""GPU benchmark of the MoE dispatches: fused Triton routing op vs sparse (torch) vs dense.

Runs a registered FaceMoE backbone (default `facemoe-swin-b`, 463.8M parameters, random
weights: throughput does not depend on training) through the torch inference path at
fp16 on one CUDA GPU, once per MoE dispatch (same weights, the layers' dispatch switched in
place), and prints one JSON object: images/s (CUDA events after warm-up; the batch is
already on the GPU, so no host transfer is timed), latency per batch, peak GPU memory
(torch.cuda.max_memory_allocated), agreement of each dispatch with dense, and the issue's
targets: >= 4,000 images/s with the Triton dispatch and sparse >= 1.2x dense.
`--layer-bench` adds the MoE op alone at each stage's token shape. Not a test; needs CUDA
(the first Triton call autotunes, inside the warm-up).

    .venv/bin/python benchmarks/gpu_moe.py                       # swin-b, fp16, batch 256
    .venv/bin/python benchmarks/gpu_moe.py --dispatch triton,dense --iters 100 --layer-bench
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DISPATCHES = ("triton", "sparse", "dense")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="facemoe-swin-b", help="registered model name")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument(
        "--dispatch",
        default=",".join(DISPATCHES),
        help=f"comma-separated MoE dispatches to time, from {', '.join(DISPATCHES)}",
    )
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--target-ips", type=float, default=4000.0, help="images/s target (triton)")
    p.add_argument("--min-speedup", type=float, default=1.2, help="target sparse / dense ratio")
    p.add_argument("--layer-bench", action="store_true", help="also time the MoE op alone")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    args.dispatches = [d.strip() for d in args.dispatch.split(",") if d.strip()]
    bad = [d for d in args.dispatches if d not in DISPATCHES]
    if bad or not args.dispatches:
        p.error(f"--dispatch: unknown {bad or 'empty list'}; expected from {', '.join(DISPATCHES)}")
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--batch and --iters must be >= 1, --warmup >= 0")
    return args


def _time(fn, iters: int, warmup: int) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for i in range(iters):
        fn()
        events[i + 1].record()
    torch.cuda.synchronize()
    per = sorted(events[i].elapsed_time(events[i + 1]) for i in range(iters))
    total_ms = events[0].elapsed_time(events[-1])
    return {
        "total_ms": total_ms,
        "latency_ms_p50": round(per[len(per) // 2], 3),
        "latency_ms_min": round(per[0], 3),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def _layer_bench(model, moe_layers, dtype, args) -> list[dict]:
    """The MoE op alone on each distinct layer shape, tokens as in the full model's batch."""
    import torch

    from engine.ops.triton_moe import topk_moe_triton
    from trainer.models.moe import moe_dense

    tokens_of: dict[int, int] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: tokens_of.setdefault(id(mod), inp[0].numel()))
        for m in moe_layers
    ]
    with torch.inference_mode():
        model(
            torch.randn(
                args.batch, 3, model.input_size, model.input_size, device="cuda", dtype=dtype
            )
        )
    for h in hooks:
        h.remove()
    seen, rows = set(), []
    for m in moe_layers:
        d = m.w1.shape[1]
        key = (d, m.w1.shape[2])
        if key in seen:
            continue
        seen.add(key)
        t = tokens_of[id(m)] // d
        x = torch.randn(t, d, device="cuda", dtype=dtype)
        w = (m.router.weight, m.w1, m.b1, m.w2, m.b2)
        row = {"tokens": t, "dim": d, "hidden": key[1], "experts": m.num_experts, "k": m.top_k}
        m.dispatch = "sparse"
        fns = {
            "triton": partial(topk_moe_triton, x, *w, m.top_k, m.gate),
            "dense": partial(moe_dense, x, *w, m.top_k, m.gate),
            "sparse": partial(m, x),
        }
        with torch.inference_mode():
            for name in args.dispatches:
                r = _time(fns[name], args.iters, args.warmup)
                row[f"{name}_ms"] = round(r["total_ms"] / args.iters, 3)
        if "dense_ms" in row:
            for name in ("triton", "sparse"):
                if f"{name}_ms" in row:
                    row[f"{name}_speedup_vs_dense"] = round(row["dense_ms"] / row[f"{name}_ms"], 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_moe: needs a CUDA GPU (torch.cuda.is_available() is False); run it on the H100",
            file=sys.stderr,
        )
        return 2
    from trainer.models import create_model
    from trainer.models.moe import moe_layers

    if "triton" in args.dispatches:
        try:
            import engine.ops.triton_moe  # noqa: F401  (imports triton)
        except ImportError as e:
            print(
                f"gpu_moe: dispatch triton needs triton ({e}); install the 'gpu' extra or "
                "pass --dispatch sparse,dense",
                file=sys.stderr,
            )
            return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = create_model(args.model, dispatch="dense")
    model = model.to(dtype).eval()
    layers = moe_layers(model)
    size = model.input_size
    x = torch.randn(args.batch, 3, size, size, device="cuda", dtype=dtype)

    result: dict = {
        "benchmark": "gpu_moe",
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": sys.modules["triton"].__version__ if "triton" in sys.modules else None,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "model": args.model,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "moe_layers": len(layers),
        "experts": layers[0].num_experts if layers else None,
        "top_k": layers[0].top_k if layers else None,
        "dtype": args.dtype,
        "batch": args.batch,
        "iters": args.iters,
        "warmup": args.warmup,
        "input": "batch resident on the GPU (no host transfer timed)",
        "dispatch": {},
    }
    outputs = {}
    with torch.inference_mode():
        for name in args.dispatches:
            for m in layers:
                m.dispatch = name
            torch.cuda.empty_cache()
            r = _time(lambda: model(x), args.iters, args.warmup)
            outputs[name] = model(x).float()
            load = None
            if layers:
                idx = torch.cat([m.last.top_idx.reshape(-1) for m in layers if m.last is not None])
                load = torch.bincount(idx, minlength=layers[0].num_experts).float() / idx.numel()
                load = [round(v, 3) for v in load.tolist()]
            result["dispatch"][name] = {
                "images_per_s": round(args.batch * args.iters / (r["total_ms"] / 1000), 1),
                "latency_ms_p50": r["latency_ms_p50"],
                "latency_ms_min": r["latency_ms_min"],
                "peak_gpu_mb": r["peak_gpu_mb"],
                "expert_load": load,
            }
    if "dense" in outputs:
        ref = outputs["dense"]
        for name, out in outputs.items():
            if name != "dense":
                cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
                result["dispatch"][name]["vs_dense"] = {
                    "max_abs_diff": round((out - ref).abs().max().item(), 5),
                    "min_cosine": round(cos.min().item(), 6),
                }
    if args.layer_bench:
        result["layers"] = _layer_bench(model, layers, dtype, args)
        for m in layers:
            m.dispatch = "dense"

    ips = {k: v["images_per_s"] for k, v in result["dispatch"].items()}
    targets: dict = {"images_per_s": args.target_ips, "min_speedup_vs_dense": args.min_speedup}
    if "triton" in ips:
        targets["triton_images_per_s_met"] = ips["triton"] >= args.target_ips
    if "dense" in ips:
        for name in ("triton", "sparse"):
            if name in ips:
                ratio = ips[name] / ips["dense"]
                targets[f"{name}_speedup_vs_dense"] = round(ratio, 3)
                targets[f"{name}_speedup_met"] = ratio >= args.min_speedup
    result["targets"] = targets
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    missed = [k for k, v in targets.items() if k.endswith("_met") and v is False]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
