"""Build TensorRT engines of a model artifact, with the FaceMoE routing plugin.

One builder over two APIs: TensorRT-RTX (module `tensorrt_rtx`; RTX GPUs, builds ahead of time
without a GPU) and standard TensorRT (module `tensorrt`; builds for the GPU it runs on). The
plugin-form ONNX (each MoE layer one `facemoe::TopKMoE` node) is parsed with the routing
plugin registered, so the parser maps those nodes to it.

Precision is carried by the ONNX types on a strongly typed network in both flavours:
TensorRT-RTX has no FP16 builder flag, and standard TensorRT deprecated weak typing. With
`fp16=True` the graph is converted to float16 (`to_fp16`) except its final L2 normalisation,
and the engine still takes and returns float32.

An engine directory holds `engine.plan` and `engine.json` (the model manifest plus build
info); `needs_rebuild` compares that info with the model, the installed TensorRT and the GPU.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.ops.reference import OP_DOMAIN, OP_NAME, OP_VERSION
from trainer.fsutil import PUBLIC, write_bytes
from trainer.manifest import derived_manifest, read_manifest, write_json_atomic

log = logging.getLogger(__name__)

FLAVOURS = ("auto", "rtx", "standard")
TRT_MODULES = {"rtx": "tensorrt_rtx", "standard": "tensorrt"}
ENGINE_DIR, ENGINE_FILE, ENGINE_MANIFEST = "engine", "engine.plan", "engine.json"
RUNTIME_CACHE = "runtime.cache"  # TensorRT-RTX kernels compiled at load (the backend writes it)
INPUT_NAME = "input"
# Compute capabilities TensorRT-RTX 1.7 can target; without explicit targets its engines run
# on the portable set (Turing 7.5 must be asked for, and an FP32 GEMM cannot run there).
RTX_TARGETS = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
RTX_PORTABLE = ("8.0", "8.6", "8.9", "12.0", "12.1")
# The final L2 normalisation (ReduceL2 -> Clip -> Expand -> Div) stays float32 under fp16.
FP32_TAIL_OPS = frozenset({"ReduceL2", "ReduceSumSquare", "LpNormalization", "Sqrt", "Clip", "Max",
                           "Expand", "Div", "Shape", "Constant"})


class EngineBuildError(RuntimeError):
    """An engine cannot be built here; the message says why in one line."""


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "8.6"


def visible_gpu(ordinal: int = 0) -> Gpu | None:
    """The CUDA device `ordinal` (name, compute capability), or None without driver or device."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    try:
        (err,) = driver.cuInit(0)
    except RuntimeError:  # cuda-python raises when libcuda (the driver) is not installed
        return None
    ok = driver.CUresult.CUDA_SUCCESS
    if err != ok:
        return None
    err, count = driver.cuDeviceGetCount()
    if err != ok or ordinal >= count:
        return None
    _, device = driver.cuDeviceGet(ordinal)
    _, name = driver.cuDeviceGetName(64, device)
    attr = driver.CUdevice_attribute
    major, minor = (driver.cuDeviceGetAttribute(a, device)[1]
                    for a in (attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                              attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))
    return Gpu(name=name.split(b"\0")[0].decode(), compute_capability=f"{major}.{minor}")


def installed_flavours() -> list[str]:
    return [f for f, module in TRT_MODULES.items() if importlib.util.find_spec(module) is not None]


def resolve_flavour(flavour: str = "auto", gpu: Gpu | None = None) -> str:
    """'rtx' or 'standard'. auto: the one installed; with both, TensorRT-RTX unless `gpu` is
    a GPU TensorRT-RTX cannot target (e.g. an H100)."""
    if flavour not in FLAVOURS:
        raise EngineBuildError(f"unknown TensorRT flavour {flavour!r}; expected one of {FLAVOURS}")
    installed = installed_flavours()
    if flavour != "auto":
        if flavour not in installed:
            raise EngineBuildError(f"TensorRT flavour {flavour} is not installed (no module "
                                   f"{TRT_MODULES[flavour]}); pip install 'facemoe-edge[engine]'")
        return flavour
    if not installed:
        raise EngineBuildError("TensorRT is not installed (neither tensorrt_rtx nor tensorrt); "
                               "pip install 'facemoe-edge[engine]'")
    if "rtx" in installed and (len(installed) == 1 or gpu is None
                               or gpu.compute_capability in RTX_TARGETS):
        return "rtx"
    return "standard"


def import_tensorrt(flavour: str) -> ModuleType:
    """The TensorRT module of a resolved flavour, with the routing plugin registered."""
    from engine.ops.trt_plugin import register

    try:
        trt = importlib.import_module(TRT_MODULES[flavour])
        register(trt)
    except (ImportError, RuntimeError) as e:
        raise EngineBuildError(f"cannot use {TRT_MODULES[flavour]}: {e}") from e
    return trt


def make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that forwards to `logging` and keeps the errors for the exception."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            S = trt.ILogger.Severity
            if severity in (S.INTERNAL_ERROR, S.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == S.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 graph whose inputs and outputs stay float32.

    Float initializers, Constant values and Cast(to=float) become float16; each float graph
    input is cast to float16 where it enters. The tail that L2-normalises the output (ops in
    FP32_TAIL_OPS reached backwards from the outputs, used by nothing else) stays float32, its
    float inputs from the float16 part cast back. Custom nodes (TopKMoE) take their inputs' type.
    """
    model = onnx.shape_inference.infer_shapes(model)  # a copy, with every tensor's type
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    producer = {out: node for node in g.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tail: set[int] = set()
    stack = [o.name for o in g.output]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in tail and node.op_type in FP32_TAIL_OPS:
            tail.add(id(node))
            stack.extend(node.input)
    pruned = True
    while pruned:  # a tail node whose result also feeds the float16 part is not tail
        pruned = False
        for node in g.node:
            if id(node) in tail and any(id(c) not in tail for out in node.output
                                        for c in consumers.get(out, [])):
                tail.discard(id(node))
                pruned = True

    def is_float(name: str) -> bool:
        return types.get(name) == TensorProto.FLOAT

    def half(t: TensorProto) -> TensorProto:
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)

    used_by_fp16 = {i for node in g.node if id(node) not in tail for i in node.input}
    converted = set()
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and init.name in used_by_fp16:
            init.CopyFrom(half(init))
            converted.add(init.name)
    graph_inputs = {i.name for i in g.input}
    casts: dict[tuple[str, int], str] = {}
    cast_nodes = []

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            casts[name, to] = f"{name}_{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}"
            cast_nodes.append(helper.make_node("Cast", [name], [casts[name, to]], to=to,
                                               name=casts[name, to] + "_cast"))
        return casts[name, to]

    for node in g.node:
        if id(node) in tail:
            for j, name in enumerate(node.input):
                from_fp16 = name in converted or (name in producer
                                                  and id(producer[name]) not in tail)
                if is_float(name) and from_fp16 and node.op_type != "Shape":
                    node.input[j] = cast(name, TensorProto.FLOAT)
            continue
        for j, name in enumerate(node.input):
            from_fp32 = name in graph_inputs or (name in producer and id(producer[name]) in tail)
            if is_float(name) and from_fp32:
                node.input[j] = cast(name, TensorProto.FLOAT16)
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(half(attr.t))
    for out in g.output:  # an output made in float16 (no float32 tail): cast it back
        node = producer.get(out.name)
        if node is None or id(node) in tail or not is_float(out.name):
            continue
        inner = f"{out.name}_fp16"
        for n in g.node:
            n.output[:] = [inner if o == out.name else o for o in n.output]
            n.input[:] = [inner if i == out.name else i for i in n.input]
        cast_nodes.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT,
                                           name=f"{out.name}_fp32_cast"))
    nodes = _toposort([*cast_nodes, *g.node], graph_inputs | {i.name for i in g.initializer})
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # the float32 annotations no longer hold; TensorRT infers types
    return model


def _toposort(nodes: list, available: set[str]) -> list:
    available = set(available) | {""}
    ordered, pending = [], list(nodes)
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or an undefined input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    return ordered


def _targets(flavour: str, gpu_target: str | list[str], gpu: Gpu | None) -> tuple[str, list[str]]:
    """(mode, compute capabilities) of the engine: portable, current or explicit."""
    if flavour == "standard":
        if gpu is None:
            raise EngineBuildError("standard TensorRT builds on the GPU it runs on; none found "
                                   "(TensorRT-RTX can build without a GPU: --flavour rtx)")
        if gpu_target not in ("auto", "current"):
            raise EngineBuildError("standard TensorRT builds only for the current GPU "
                                   f"(gpu_target={gpu_target!r})")
        return "current", [gpu.compute_capability]
    if gpu_target == "auto":
        gpu_target = "current" if gpu is not None and gpu.compute_capability in RTX_TARGETS \
            else "portable"
    if gpu_target == "portable":
        return "portable", list(RTX_PORTABLE)
    if gpu_target == "current":
        if gpu is None:
            raise EngineBuildError("gpu_target=current needs a GPU; none found")
        if gpu.compute_capability not in RTX_TARGETS:
            raise EngineBuildError(f"TensorRT-RTX cannot target {gpu.name} (compute capability "
                                   f"{gpu.compute_capability}); targets: {', '.join(RTX_TARGETS)}")
        return "current", [gpu.compute_capability]
    wanted = gpu_target.split(",") if isinstance(gpu_target, str) else list(gpu_target)
    ccs = []
    for item in wanted:
        text = item.strip().lower().removeprefix("sm_").removeprefix("sm")
        cc = text if "." in text else f"{text[:-1]}.{text[-1:]}"
        if cc not in RTX_TARGETS:
            raise EngineBuildError(f"unknown GPU target {item!r}; TensorRT-RTX targets "
                                   f"{', '.join(RTX_TARGETS)}, 'portable' or 'current'")
        ccs.append(cc)
    return "explicit", ccs


def _apply_targets(trt: ModuleType, config: Any, mode: str, ccs: list[str]) -> None:
    """TensorRT-RTX only: the compute capabilities the engine is built for."""
    if mode == "portable":
        return  # TensorRT-RTX's default: RTX_PORTABLE
    values = [trt.ComputeCapability.CURRENT] if mode == "current" else \
        [getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")) for cc in ccs]
    config.num_compute_capabilities = len(values)
    for i, value in enumerate(values):
        if not config.set_compute_capability(value, i):
            raise EngineBuildError(f"TensorRT-RTX rejected compute capability {value}")


def default_timing_cache(flavour: str, version: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "facemoe" / f"tensorrt-{flavour}-{version}.timing"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_engine(model_dir: str | Path, out: str | Path | None = None, *, flavour: str = "auto",
                 fp16: bool = True, min_batch: int = 1, opt_batch: int = 32, max_batch: int = 64,
                 timing_cache: str | Path | None = None, workspace_mb: int | None = None,
                 gpu_target: str | list[str] = "auto") -> Path:
    """Build `<out>/engine.plan` + `<out>/engine.json` (out defaults to MODEL_DIR/engine).

    gpu_target (TensorRT-RTX): "auto" (the visible GPU, else portable), "portable" (compute
    capability 8.0-12.x), "current", or compute capabilities such as "7.5" / "sm86" / "8.6,8.9".
    timing_cache: a file loaded before and saved after the build (standard TensorRT; TensorRT-RTX
    has none: its kernels are compiled when the engine loads, see the backend's runtime cache).
    Returns the engine directory.
    """
    from engine.export import ensure_onnx

    model_dir = Path(model_dir)
    out = Path(out) if out is not None else model_dir / ENGINE_DIR
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EngineBuildError(f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                               f"{min_batch}, {opt_batch}, {max_batch}")
    manifest = read_manifest(model_dir)
    gpu = visible_gpu()
    flavour = resolve_flavour(flavour, gpu)
    trt = import_tensorrt(flavour)
    mode, ccs = _targets(flavour, gpu_target, gpu)
    onnx_path = ensure_onnx(model_dir, "plugin")
    onnx_bytes = onnx_path.read_bytes()
    model_bytes = to_fp16(onnx.load_from_string(onnx_bytes)).SerializeToString() if fp16 \
        else onnx_bytes

    started = time.perf_counter()
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes, str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: "
                               f"{errors[0] if errors else 'unknown error'}")
    plugins = [network.get_layer(i).name for i in range(network.num_layers)
               if network.get_layer(i).type == trt.LayerType.PLUGIN_V3]
    if manifest.get("num_experts") and not plugins:
        raise EngineBuildError(f"no {OP_DOMAIN}::{OP_NAME} plugin layer after parsing "
                               f"{onnx_path.name}; is the plugin registered?")

    config = builder.create_builder_config()
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    size = int(manifest["input_size"])
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (min_batch, 3, size, size), (opt_batch, 3, size, size),
                      (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    cache_path = None
    if flavour == "rtx":
        _apply_targets(trt, config, mode, ccs)
    else:
        cache_path = Path(timing_cache) if timing_cache else default_timing_cache(
            flavour, trt.__version__)
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), True)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        reason = logger.errors[-1] if logger.errors else "unknown error"
        raise EngineBuildError(f"TensorRT could not build the engine: {reason.splitlines()[0]}")
    plan = bytes(plan)
    seconds = time.perf_counter() - started
    if cache_path is not None:
        write_bytes(cache_path, bytes(config.get_timing_cache().serialize()), PUBLIC)
    write_bytes(out / ENGINE_FILE, plan, PUBLIC)
    (out / RUNTIME_CACHE).unlink(missing_ok=True)  # compiled for the previous plan
    info = derived_manifest(
        manifest, kind="tensorrt", engine=ENGINE_FILE, flavour=flavour,
        tensorrt_module=trt.__name__, tensorrt_version=trt.__version__,
        plugin={"name": f"{OP_DOMAIN}::{OP_NAME}", "version": OP_VERSION, "layers": plugins},
        gpu_target={"mode": mode, "compute_capabilities": ccs,
                    "device": gpu.name if gpu and mode == "current" else None},
        fp16=fp16, precision="fp16" if fp16 else "fp32",
        input={"name": INPUT_NAME, "shape": [-1, 3, size, size], "dtype": "float32"},
        batch={"min": min_batch, "opt": opt_batch, "max": max_batch},
        workspace_mb=workspace_mb, timing_cache=str(cache_path) if cache_path else None,
        onnx=onnx_path.name, onnx_sha256=_sha256(onnx_bytes), plan_sha256=_sha256(plan),
        plan_bytes=len(plan), build_seconds=round(seconds, 3),
        built=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_json_atomic(out / ENGINE_MANIFEST, info)
    log.info("built %s engine (%s, %s, batch %d..%d) in %.1f s: %s (%.1f MB)", flavour,
             info["build"]["precision"], mode, min_batch, max_batch, seconds, out / ENGINE_FILE,
             len(plan) / 1e6)
    return out


def read_engine_manifest(engine_dir: str | Path) -> dict[str, Any]:
    path = Path(engine_dir) / ENGINE_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no engine manifest: {path}")
    return json.loads(path.read_text())


def needs_rebuild(model_dir: str | Path, engine_dir: str | Path | None = None, *,
                  flavour: str = "auto", gpu: Gpu | None = None, fp16: bool | None = None,
                  max_batch: int | None = None) -> tuple[bool, str]:
    """(True, why) when the engine is missing or was built from other weights, another plugin
    version, another TensorRT flavour or version, for other GPUs (`gpu`: where it will run),
    another precision (`fp16`) or a smaller batch than `max_batch`; else (False, 'up to date')."""
    model_dir = Path(model_dir)
    engine_dir = Path(engine_dir) if engine_dir is not None else model_dir / ENGINE_DIR
    if not (engine_dir / ENGINE_FILE).is_file() or not (engine_dir / ENGINE_MANIFEST).is_file():
        return True, f"no engine in {engine_dir}"
    info = read_engine_manifest(engine_dir)
    build = info.get("build", {})
    model_hash = read_manifest(model_dir)["weights_sha256"]
    if info.get("weights_sha256") != model_hash:
        return True, (f"model weights changed (engine {str(info.get('weights_sha256'))[:12]}, "
                      f"model {model_hash[:12]})")
    built_plugin = build.get("plugin", {}).get("version")
    if built_plugin != OP_VERSION:
        return True, f"routing plugin version changed ({built_plugin} -> {OP_VERSION})"
    try:
        wanted = resolve_flavour(flavour, gpu)
    except EngineBuildError as e:
        return True, str(e)
    if build.get("flavour") != wanted:
        return True, f"TensorRT flavour changed ({build.get('flavour')} -> {wanted})"
    try:
        version = import_tensorrt(wanted).__version__
    except EngineBuildError as e:
        return True, str(e)
    if build.get("tensorrt_version") != version:
        return True, f"TensorRT version changed ({build.get('tensorrt_version')} -> {version})"
    targets = build.get("gpu_target", {}).get("compute_capabilities", [])
    if gpu is not None and gpu.compute_capability not in targets:
        return True, (f"engine targets compute capability {', '.join(targets)}; {gpu.name} is "
                      f"{gpu.compute_capability}")
    if fp16 is not None and build.get("fp16") != fp16:
        return True, f"precision changed (fp16={build.get('fp16')} -> {fp16})"
    if max_batch is not None and build.get("batch", {}).get("max", 0) < max_batch:
        return True, f"max batch {build.get('batch', {}).get('max')} < {max_batch}"
    return False, "up to date"
