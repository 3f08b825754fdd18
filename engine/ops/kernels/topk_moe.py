"""Launch the TopKMoE CUDA kernels (topk_moe.cu) with cuda-python: NVRTC compile + driver API.

Used by the TensorRT plugin's `enqueue` and, standalone, by the GPU tests against the NumPy
reference. Pointers are plain ints (device addresses); nothing here allocates or synchronises
except `TopKMoEKernels` loading its module into the current CUDA context once.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KERNEL_SOURCE = Path(__file__).with_name("topk_moe.cu")
MAX_EXPERTS = 64  # MOE_MAX_EXPERTS in the source: the gate keeps logits in shared memory
TILE = 16  # MOE_TILE
GATE_WARPS = 4  # MOE_GATE_WARPS
ALIGN = 256


class CudaError(RuntimeError):
    """A CUDA driver or NVRTC call failed."""


def check(result: tuple, what: str) -> Any:
    """The value(s) of a cuda-python call returning (status, *values); raises CudaError."""
    from cuda.bindings import driver, nvrtc

    err, *rest = result
    if isinstance(err, driver.CUresult) and err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise CudaError(f"{what}: {name.decode() if isinstance(name, bytes) else err}")
    if isinstance(err, nvrtc.nvrtcResult) and err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CudaError(f"{what}: {err.name}")
    return rest[0] if len(rest) == 1 else tuple(rest)


@dataclass(frozen=True)
class MoEShape:
    tokens: int  # T: every position of x but the last axis
    dim: int  # d
    hidden: int  # h
    experts: int  # N
    top_k: int  # k

    @property
    def slots(self) -> int:
        return self.tokens * self.top_k


def workspace_layout(shape: MoEShape, itemsize: int) -> tuple[dict[str, int], int]:
    """Byte offsets of the scratch buffers in one workspace, and its total size."""
    sizes = {
        "counts": 4 * shape.experts,
        "offsets": 4 * (shape.experts + 1),
        "cursor": 4 * shape.experts,
        "top_idx": 4 * shape.slots,
        "top_w": 4 * shape.slots,
        "perm": 4 * shape.slots,
        "slot_row": 4 * shape.slots,
        "hidden": itemsize * shape.slots * shape.hidden,
        "expert_out": 4 * shape.slots * shape.dim,
    }
    offsets, total = {}, 0
    for name, size in sizes.items():
        offsets[name] = total
        total += -(-size // ALIGN) * ALIGN
    return offsets, total


def _supported_arch(major: int, minor: int) -> int:
    """The newest NVRTC SASS target a device of this compute capability runs (same major)."""
    from cuda.bindings import nvrtc

    archs = check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    fits = [a for a in archs if a // 10 == major and a % 10 <= minor]
    if not fits:
        raise CudaError(f"NVRTC {archs} cannot target compute capability {major}.{minor}")
    return max(fits)


@functools.cache
def compile_cubin(arch: int) -> bytes:
    """topk_moe.cu compiled for sm_<arch> (e.g. 86); cached per process."""
    from cuda.bindings import nvrtc

    prog = check(nvrtc.nvrtcCreateProgram(KERNEL_SOURCE.read_bytes(), b"topk_moe.cu", 0, [], []),
                  "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17",
                f"-DMOE_MAX_EXPERTS={MAX_EXPERTS}".encode()]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise CudaError(f"NVRTC could not compile {KERNEL_SOURCE.name} for sm_{arch}:\n"
                            f"{log.decode(errors='replace')}")
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _params(*args: tuple[type, int | float]) -> tuple[int, list]:
    """kernelParams for cuLaunchKernel: the address of an array of pointers to each value.

    Returns the address and the ctypes objects that must stay alive until the launch returns
    (the driver copies the values at launch).
    """
    values = [ctype(value) for ctype, value in args]
    array = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    return ctypes.addressof(array), [values, array]


_P, _I = ctypes.c_void_p, ctypes.c_int


class TopKMoEKernels:
    """The op's kernels loaded into the CUDA context current on this thread."""

    FUNCTIONS = ("moe_offsets", "moe_permute",
                 *(f"moe_{k}_{t}" for t in ("f32", "f16") for k in ("gate", "expert_up",
                                                                   "expert_down", "combine")))

    def __init__(self) -> None:
        from cuda.bindings import driver

        device = check(driver.cuCtxGetDevice(), "cuCtxGetDevice")
        attr = driver.CUdevice_attribute
        major, minor = (check(driver.cuDeviceGetAttribute(a, device), "cuDeviceGetAttribute")
                        for a in (attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                  attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))
        self.arch = _supported_arch(major, minor)
        self.module = check(driver.cuModuleLoadData(compile_cubin(self.arch)), "cuModuleLoadData")
        self.functions = {name: check(driver.cuModuleGetFunction(self.module, name.encode()),
                                       f"cuModuleGetFunction({name})")
                          for name in self.FUNCTIONS}

    def _launch(self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int],
                stream: int, *args: tuple[type, int | float]) -> None:
        from cuda.bindings import driver

        address, keep = _params(*args)
        check(driver.cuLaunchKernel(self.functions[name], *grid, *block, 0, stream, address, 0),
               f"cuLaunchKernel({name})")
        del keep

    def enqueue(self, shape: MoEShape, *, half: bool, raw_logits: bool, x: int, router: int,
                w1: int, b1: int, w2: int, b2: int, y: int, workspace: int, stream: int) -> None:
        """y = TopKMoE(x) on `stream`; `workspace` holds workspace_layout(shape, itemsize) bytes."""
        from cuda.bindings import driver

        if not 1 <= shape.top_k <= shape.experts <= MAX_EXPERTS:
            raise CudaError(f"need 1 <= top_k <= num_experts <= {MAX_EXPERTS}, got "
                            f"top_k={shape.top_k} num_experts={shape.experts}")
        if shape.tokens == 0:
            return
        t = "f16" if half else "f32"
        off, _ = workspace_layout(shape, 2 if half else 4)
        ws = {name: workspace + o for name, o in off.items()}
        row_tiles = math.ceil(shape.tokens / TILE)  # an expert gets at most every token once
        if row_tiles > 65535:
            raise CudaError(f"{shape.tokens} tokens exceed the kernels' grid limit")
        check(driver.cuMemsetD32Async(ws["counts"], 0, shape.experts, stream), "cuMemsetD32Async")
        self._launch(f"moe_gate_{t}", (math.ceil(shape.tokens / GATE_WARPS), 1, 1),
                     (GATE_WARPS * 32, 1, 1), stream,
                     (_P, x), (_P, router), (_I, shape.tokens), (_I, shape.dim),
                     (_I, shape.experts), (_I, shape.top_k), (_I, int(raw_logits)),
                     (_P, ws["top_idx"]), (_P, ws["top_w"]), (_P, ws["counts"]))
        self._launch("moe_offsets", (1, 1, 1), (1, 1, 1), stream,
                     (_P, ws["counts"]), (_I, shape.experts), (_P, ws["offsets"]),
                     (_P, ws["cursor"]))
        self._launch("moe_permute", (math.ceil(shape.slots / 256), 1, 1), (256, 1, 1), stream,
                     (_P, ws["top_idx"]), (_I, shape.slots), (_I, shape.top_k),
                     (_P, ws["cursor"]), (_P, ws["perm"]), (_P, ws["slot_row"]))
        self._launch(f"moe_expert_up_{t}",
                     (math.ceil(shape.hidden / TILE), row_tiles, shape.experts), (TILE, TILE, 1),
                     stream, (_P, x), (_P, ws["perm"]), (_P, ws["offsets"]), (_P, w1), (_P, b1),
                     (_P, ws["hidden"]), (_I, shape.dim), (_I, shape.hidden))
        self._launch(f"moe_expert_down_{t}",
                     (math.ceil(shape.dim / TILE), row_tiles, shape.experts), (TILE, TILE, 1),
                     stream, (_P, ws["hidden"]), (_P, ws["offsets"]), (_P, w2), (_P, b2),
                     (_P, ws["expert_out"]), (_I, shape.hidden), (_I, shape.dim))
        self._launch(f"moe_combine_{t}",
                     (min(math.ceil(shape.tokens * shape.dim / 256), 65535), 1, 1), (256, 1, 1),
                     stream, (_P, ws["expert_out"]), (_P, ws["slot_row"]), (_P, ws["top_w"]),
                     (_I, shape.tokens), (_I, shape.dim), (_I, shape.top_k), (_P, y))


_LOADED: dict[int, TopKMoEKernels] = {}


def current_kernels() -> TopKMoEKernels:
    """The kernels for the current CUDA context, loaded on first use."""
    from cuda.bindings import driver

    ctx = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    key = int(ctx)
    if key == 0:
        raise CudaError("no current CUDA context")
    if key not in _LOADED:
        _LOADED[key] = TopKMoEKernels()
    return _LOADED[key]
