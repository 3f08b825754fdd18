"""TensorRT backend: runs the model's engine (TensorRT-RTX or standard TensorRT) on a GPU.

The engine directory (default MODEL_DIR/engine) is built, or rebuilt for this GPU, when
`needs_rebuild` says so and `rebuild=True`. The routing plugin is registered before the
engine is deserialised (Python plugins live in the process, not in the plan). Memory, the
stream and the context are handled with cuda-python's driver API on the device's primary
context, which TensorRT's CUDA runtime shares. TensorRT-RTX compiles its kernels when the
engine loads; they are kept in `runtime.cache` next to the plan so later loads are fast.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends import BackendError, check_output
from engine.build import (
    ENGINE_DIR,
    ENGINE_FILE,
    INPUT_NAME,
    RTX_TARGETS,
    RUNTIME_CACHE,
    EngineBuildError,
    build_engine,
    import_tensorrt,
    make_logger,
    needs_rebuild,
    read_engine_manifest,
    resolve_flavour,
    visible_gpu,
)
from engine.ops.kernels.topk_moe import CudaError, check
from trainer.fsutil import PUBLIC, write_bytes
from trainer.manifest import read_manifest

log = logging.getLogger(__name__)
RTX_GPUS = "compute capability 7.5/8.6/8.9/12.x"
BUILD_OPTIONS = ("fp16", "min_batch", "opt_batch", "max_batch", "workspace_mb", "timing_cache")


def _ordinal(device: int | str) -> int:
    if isinstance(device, int):
        return device
    if device in ("auto", "cuda", "gpu"):
        return 0
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    raise BackendError(f"the TensorRT backend runs on a CUDA GPU, not {device!r}")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, model_dir: Path, engine_dir: Path | None = None, *, flavour: str = "auto",
                 device: int | str = 0, rebuild: bool = True, **build_options: Any) -> None:
        model_dir = Path(model_dir)
        self.manifest = read_manifest(model_dir)
        self.input_size = int(self.manifest["input_size"])
        self.dim = int(self.manifest["embedding_dim"])
        self.engine_dir = Path(engine_dir) if engine_dir is not None else model_dir / ENGINE_DIR
        ordinal = _ordinal(device)
        gpu = visible_gpu(ordinal)
        try:
            self.flavour = resolve_flavour(flavour, gpu)
        except EngineBuildError as e:
            raise BackendError(str(e)) from e
        if gpu is None:
            need = f"an RTX GPU ({RTX_GPUS})" if self.flavour == "rtx" else "a CUDA GPU"
            raise BackendError(f"TensorRT{'-RTX' if self.flavour == 'rtx' else ''} engines need "
                               f"{need}; none found")
        if self.flavour == "rtx" and gpu.compute_capability not in RTX_TARGETS:
            raise BackendError(f"TensorRT-RTX engines need an RTX GPU ({RTX_GPUS}); {gpu.name} "
                               f"is {gpu.compute_capability}")
        self.gpu = gpu
        stale, why = needs_rebuild(model_dir, self.engine_dir, flavour=self.flavour, gpu=gpu,
                                   fp16=build_options.get("fp16"),
                                   max_batch=build_options.get("max_batch"))
        if stale:
            if not rebuild:
                raise BackendError(f"the TensorRT engine needs a rebuild ({why}); run: facemoe "
                                   f"build-engine {model_dir}")
            log.info("building the TensorRT engine: %s", why)
            try:
                build_engine(model_dir, self.engine_dir, flavour=self.flavour, gpu_target="current",
                             **build_options)
            except Exception as e:  # any build failure must let `auto` fall back, in one line
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise BackendError(f"cannot build the TensorRT engine: {reason}") from e
        self.engine_info = read_engine_manifest(self.engine_dir)  # model manifest + build info
        self._lock = threading.Lock()
        self._buffers: list[Any] = []
        self._open(ordinal)

    def _open(self, ordinal: int) -> None:
        from cuda.bindings import driver

        try:
            trt = import_tensorrt(self.flavour)
        except EngineBuildError as e:
            raise BackendError(str(e)) from e
        try:
            self._device = check(driver.cuDeviceGet(ordinal), "cuDeviceGet")
            self._ctx = check(driver.cuDevicePrimaryCtxRetain(self._device),
                               "cuDevicePrimaryCtxRetain")
            check(driver.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            self._stream = check(driver.cuStreamCreate(0), "cuStreamCreate")
        except CudaError as e:
            raise BackendError(f"cannot use {self.gpu.name}: {e}") from e
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        plan = (self.engine_dir / ENGINE_FILE).read_bytes()
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            reason = self._logger.errors[-1] if self._logger.errors else "unknown error"
            raise BackendError(f"cannot load {self.engine_dir / ENGINE_FILE}: "
                               f"{reason.splitlines()[0]}")
        self._runtime_cache = None
        if self.flavour == "rtx":
            config = self._engine.create_runtime_config()
            # The plugin loads its kernels on the first enqueue, which must not be captured.
            config.cuda_graph_strategy = trt.CudaGraphStrategy.DISABLED
            self._runtime_cache = config.create_runtime_cache()
            cache_file = self.engine_dir / RUNTIME_CACHE
            blob = cache_file.read_bytes() if cache_file.is_file() else b""
            if blob and not self._runtime_cache.deserialize(blob):
                log.warning("ignoring an unreadable TensorRT-RTX runtime cache %s", cache_file)
            config.set_runtime_cache(self._runtime_cache)
            self._context = self._engine.create_execution_context(config)
        else:
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError("TensorRT could not create an execution context")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._output = next(n for n in names
                            if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        _, _, max_shape = self._engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.max_batch = int(max_shape[0])
        image = 3 * self.input_size * self.input_size * 4
        self._d_input = self._alloc(self.max_batch * image)
        self._d_output = self._alloc(self.max_batch * self.dim * 4)
        self._context.set_tensor_address(INPUT_NAME, int(self._d_input))
        self._context.set_tensor_address(self._output, int(self._d_output))
        if self._engine.get_tensor_dtype(self._output) != trt.DataType.FLOAT:
            raise BackendError(f"engine output {self._output!r} is not float32; rebuild it")
        self._cache_saved = False
        log.info("TensorRT backend: %s %s engine on %s (batch <= %d)", self.flavour,
                 self.engine_info["build"].get("precision"), self.gpu.name, self.max_batch)

    def _alloc(self, nbytes: int) -> Any:
        from cuda.bindings import driver

        ptr = check(driver.cuMemAlloc(nbytes), "cuMemAlloc")
        self._buffers.append(ptr)
        return ptr

    def embed(self, batch: np.ndarray) -> np.ndarray:
        from cuda.bindings import driver

        batch = np.ascontiguousarray(batch, dtype=np.float32)
        size = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise BackendError(f"expected a float32[N,3,{size},{size}] batch, got {batch.shape}")
        out = np.empty((len(batch), self.dim), np.float32)
        with self._lock:
            check(driver.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            for start in range(0, len(batch), self.max_batch):
                chunk = batch[start:start + self.max_batch]
                result = out[start:start + len(chunk)]
                check(driver.cuMemcpyHtoDAsync(self._d_input, chunk.ctypes.data, chunk.nbytes,
                                               self._stream), "cuMemcpyHtoDAsync")
                self._context.set_input_shape(INPUT_NAME, chunk.shape)
                if not self._context.execute_async_v3(int(self._stream)):
                    reason = self._logger.errors[-1] if self._logger.errors else "unknown error"
                    raise BackendError(f"TensorRT inference failed: {reason.splitlines()[0]}")
                check(driver.cuMemcpyDtoHAsync(result.ctypes.data, self._d_output, result.nbytes,
                                               self._stream), "cuMemcpyDtoHAsync")
                check(driver.cuStreamSynchronize(self._stream), "cuStreamSynchronize")
            if len(batch) and not self._cache_saved:
                self._save_runtime_cache()
        return check_output(out, len(batch), self.dim)

    def _save_runtime_cache(self) -> None:
        """Keep the kernels TensorRT-RTX compiled for this GPU (after the first inference and
        on close, when shape-specialised kernels compiled since then are added)."""
        self._cache_saved = True
        if self._runtime_cache is None:
            return
        path = self.engine_dir / RUNTIME_CACHE
        try:
            write_bytes(path, bytes(self._runtime_cache.serialize()), PUBLIC)
        except OSError as e:
            log.warning("cannot save the TensorRT-RTX runtime cache %s: %s", path, e)

    def close(self) -> None:
        from cuda.bindings import driver

        with self._lock:
            if self._cache_saved:
                self._save_runtime_cache()
            self._runtime_cache = None
            self._context = self._engine = self._runtime = None
            for ptr in self._buffers:
                driver.cuMemFree(ptr)
            self._buffers.clear()
            if getattr(self, "_stream", None) is not None:
                driver.cuStreamDestroy(self._stream)
                self._stream = None
                driver.cuDevicePrimaryCtxRelease(self._device)

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create(model_dir: Path, **options: Any) -> TensorRTBackend:
    """`load_backend(..., "auto")` passes every backend the same options: keep ours."""
    known = {"engine_dir", "flavour", "device", "rebuild", *BUILD_OPTIONS}
    ignored = sorted(set(options) - known)
    if ignored:
        log.debug("TensorRT backend ignores options %s", ignored)
    return TensorRTBackend(model_dir, **{k: v for k, v in options.items() if k in known})
