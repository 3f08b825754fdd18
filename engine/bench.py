"""`facemoe bench embed`: embedding throughput, latency percentiles and peak memory of a backend."""

from __future__ import annotations

import platform
import resource
import time
from datetime import date

import numpy as np

from engine.backends import BackendError, load_backend, thread_options


def bench_embed(
    model_dir: str,
    backend: str = "onnxruntime",
    batch: int = 32,
    iters: int = 20,
    warmup: int = 3,
    threads: int = 0,
    moe_dispatch: str = "auto",
) -> dict:
    """`moe_dispatch` (torch backend only): auto, dense, sparse or triton MoE layers."""
    options = thread_options(backend, threads)
    if backend == "torch":
        options["moe_dispatch"] = moe_dispatch
    elif moe_dispatch != "auto":
        raise BackendError(f"--moe-dispatch {moe_dispatch} applies to the torch backend only")
    b = load_backend(model_dir, backend, **options)
    size = b.input_size
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    for _ in range(warmup):
        b.embed(x)
    lat = []
    for _ in range(iters):
        t = time.perf_counter()
        b.embed(x)
        lat.append(time.perf_counter() - t)
    lat_ms = np.array(lat) * 1000
    gpu_mem = None
    if getattr(b, "device", None) is not None and "cuda" in str(b.device):
        import torch

        gpu_mem = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {
        "model": b.manifest["name"],
        "backend": b.name,
        "moe_dispatch": getattr(b, "moe_dispatch", None),
        "batch": batch,
        "iters": iters,
        "faces_per_s": round(batch * iters / float(np.sum(lat)), 1),
        "latency_ms_p50": round(float(np.percentile(lat_ms, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(lat_ms, 99)), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": gpu_mem,
        "device": str(getattr(b, "device", "cpu")),
        "cpu": platform.processor() or platform.machine(),
        "date": date.today().isoformat(),
    }
