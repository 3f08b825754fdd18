"""TensorRT engine build, routing plugin and CUDA kernels.

CPU tiers: workspace layout, kernel-argument packing, NVRTC compilation of the kernels for
every RTX target, the float16 graph conversion (run in ONNX Runtime). `tensorrt` tier (needs
tensorrt_rtx; builds ahead of time without a GPU): the engine holds the plugin, fp16 with a
dynamic batch profile builds, the engine manifest, rebuild decisions, backend fallback.
`gpu` tier: the kernels against the NumPy reference and the engine against ONNX Runtime.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.backends import BackendError, load_backend
from engine.build import (
    ENGINE_FILE,
    ENGINE_MANIFEST,
    EngineBuildError,
    Gpu,
    build_engine,
    needs_rebuild,
    read_engine_manifest,
    to_fp16,
    visible_gpu,
)
from engine.ops.kernels.topk_moe import MoEShape, _params, workspace_layout
from engine.ops.reference import OP_DOMAIN, OP_NAME, OP_VERSION, topk_moe_reference

pytestmark = pytest.mark.contract

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx (TensorRT-RTX) is not installed")


def _nvrtc_available() -> bool:
    try:
        from cuda.bindings import nvrtc

        return nvrtc.nvrtcVersion()[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
    except Exception:  # no cuda-python, or no libnvrtc to load
        return False


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 1-block FaceMoE-edge artifact (3 experts, top-2); ONNX files are exported on demand."""
    from trainer.artifact import save_artifact
    from trainer.models import create_model, model_config

    small = dict(depth=1, dim=48, heads=2, stem_width=8)
    arch = model_config("facemoe-edge", **small)
    model = create_model("facemoe-edge", **small).eval()
    return save_artifact(model, arch, tmp_path_factory.mktemp("trt") / "model", name="tiny",
                         version="0")


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory) -> Path:
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx (TensorRT-RTX) is not installed")
    return build_engine(tiny_model, tmp_path_factory.mktemp("engine"), flavour="rtx", fp16=True,
                        min_batch=1, opt_batch=32, max_batch=64, gpu_target="portable")


# --- CPU: kernel plumbing -------------------------------------------------------------------


def test_workspace_layout_is_aligned_and_sized():
    shape = MoEShape(tokens=64 * 49, dim=48, hidden=96, experts=3, top_k=2)
    offsets, total = workspace_layout(shape, itemsize=2)
    assert all(o % 256 == 0 for o in offsets.values())
    assert list(offsets.values()) == sorted(offsets.values())
    slots = shape.tokens * shape.top_k
    assert offsets["expert_out"] + 4 * slots * shape.dim <= total
    assert total - offsets["expert_out"] < 4 * slots * shape.dim + 256
    assert offsets["expert_out"] - offsets["hidden"] >= 2 * slots * shape.hidden


def test_kernel_params_point_at_each_value():
    address, keep = _params((ctypes.c_void_p, 0xDEADBEEF000), (ctypes.c_int, -7),
                            (ctypes.c_int, 3))
    pointers = (ctypes.c_void_p * 3).from_address(address)
    assert ctypes.c_void_p.from_address(pointers[0]).value == 0xDEADBEEF000
    assert ctypes.c_int.from_address(pointers[1]).value == -7
    assert ctypes.c_int.from_address(pointers[2]).value == 3
    del keep


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC (cuda-toolkit[nvrtc]) not installed")
@pytest.mark.parametrize("arch", [75, 86, 89, 120])
def test_kernels_compile_for_rtx_targets(arch):
    from engine.ops.kernels.topk_moe import compile_cubin

    cubin = compile_cubin(arch)
    assert cubin[:4] == b"\x7fELF"
    for name in ("moe_gate_f16", "moe_expert_up_f32", "moe_combine_f16", "moe_permute"):
        assert name.encode() in cubin


def test_fp16_graph_matches_fp32_in_onnxruntime(tiny_model):
    import onnx
    import onnxruntime as ort

    from engine.export import ensure_onnx

    fp32 = onnx.load(str(ensure_onnx(tiny_model, "standard")))
    fp16 = to_fp16(fp32)
    onnx.checker.check_model(fp16)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    halves = [i for i in fp16.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) >= len(fp32.graph.initializer) // 2
    x = np.random.default_rng(0).standard_normal((3, 3, 112, 112)).astype(np.float32)

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x})[0]

    a, b = run(fp32), run(fp16)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)
    assert (a * b).sum(1).min() > 0.999


def test_rtx_library_link_is_made_next_to_the_library(tmp_path, monkeypatch):
    import importlib.machinery

    from engine.ops.trt_plugin import ensure_rtx_library_link

    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"")
    spec = importlib.machinery.ModuleSpec("tensorrt_rtx_libs", None,
                                          origin=str(tmp_path / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    ensure_rtx_library_link()
    ensure_rtx_library_link()  # idempotent
    link = tmp_path / "libtensorrt_rtx.so"
    assert link.is_symlink() and str(link.readlink()) == "libtensorrt_rtx.so.1"


# --- TensorRT-RTX: ahead-of-time build without a GPU ----------------------------------------


@pytest.mark.tensorrt
@needs_rtx
def test_engine_holds_the_routing_plugin(built, tiny_model):
    plan = (built / ENGINE_FILE).read_bytes()
    # The engine inspector needs a deserialised engine (a GPU); the plan carries the plugin's
    # name, namespace and serialized fields as bytes.
    assert OP_NAME.encode() in plan and OP_DOMAIN.encode() in plan
    assert b"softmax_topk" in plan
    build = read_engine_manifest(built)["build"]
    assert build["plugin"]["name"] == f"{OP_DOMAIN}::{OP_NAME}"
    assert build["plugin"]["version"] == OP_VERSION
    assert len(build["plugin"]["layers"]) == 1  # depth=1: one MoE layer


@pytest.mark.tensorrt
@needs_rtx
def test_fp16_dynamic_profile_and_manifest(built, tiny_model):
    import tensorrt_rtx

    info = read_engine_manifest(built)
    assert info == json.loads((built / ENGINE_MANIFEST).read_text())
    model = json.loads((tiny_model / "manifest.json").read_text())
    assert {k: info[k] for k in model} == model  # the model manifest, carried unchanged
    build = info["build"]
    assert build["kind"] == "tensorrt" and build["flavour"] == "rtx"
    assert build["tensorrt_version"] == tensorrt_rtx.__version__
    assert build["fp16"] is True and build["precision"] == "fp16"
    assert build["batch"] == {"min": 1, "opt": 32, "max": 64}
    assert build["input"] == {"name": "input", "shape": [-1, 3, 112, 112], "dtype": "float32"}
    assert build["gpu_target"]["mode"] == "portable"
    assert "8.6" in build["gpu_target"]["compute_capabilities"]
    onnx_file = tiny_model / build["onnx"]
    import hashlib

    assert build["onnx_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert build["plan_bytes"] == (built / ENGINE_FILE).stat().st_size


@pytest.mark.tensorrt
@needs_rtx
def test_turing_needs_fp16(tiny_model, tmp_path):
    out = build_engine(tiny_model, tmp_path / "turing", flavour="rtx", gpu_target="sm75",
                       max_batch=8, opt_batch=8)
    assert read_engine_manifest(out)["build"]["gpu_target"]["compute_capabilities"] == ["7.5"]
    with pytest.raises(EngineBuildError, match="could not build"):
        build_engine(tiny_model, tmp_path / "turing32", flavour="rtx", fp16=False,
                     gpu_target="7.5", max_batch=8, opt_batch=8)
    with pytest.raises(EngineBuildError, match="unknown GPU target"):
        build_engine(tiny_model, tmp_path / "x", flavour="rtx", gpu_target="9.0")


@pytest.mark.tensorrt
@needs_rtx
def test_needs_rebuild(built, tiny_model, tmp_path):
    assert needs_rebuild(tiny_model, built, flavour="rtx") == (False, "up to date")
    assert not needs_rebuild(tiny_model, built, gpu=Gpu("RTX 3090", "8.6"), fp16=True,
                             max_batch=64)[0]
    stale, why = needs_rebuild(tiny_model, built, gpu=Gpu("RTX 2080", "7.5"))
    assert stale and "7.5" in why
    assert needs_rebuild(tiny_model, built, fp16=False)[0]
    assert needs_rebuild(tiny_model, built, max_batch=128)[0]
    assert needs_rebuild(tiny_model, tmp_path / "none")[0]

    other_model = tmp_path / "model"
    shutil.copytree(tiny_model, other_model)
    manifest = json.loads((other_model / "manifest.json").read_text())
    manifest["weights_sha256"] = "0" * 64
    (other_model / "manifest.json").write_text(json.dumps(manifest))
    stale, why = needs_rebuild(other_model, built)
    assert stale and "weights" in why

    old_plugin = tmp_path / "engine"
    shutil.copytree(built, old_plugin)
    info = read_engine_manifest(old_plugin)
    info["build"]["plugin"]["version"] = "0"
    (old_plugin / ENGINE_MANIFEST).write_text(json.dumps(info))
    stale, why = needs_rebuild(tiny_model, old_plugin)
    assert stale and "plugin" in why


@pytest.mark.tensorrt
@needs_rtx
def test_plugin_fields_round_trip():
    import tensorrt_rtx as trt

    from engine.build import import_tensorrt
    from engine.ops.trt_plugin import MoEAttrs, plugin_classes

    import_tensorrt("rtx")
    creator = trt.get_plugin_registry().get_creator(OP_NAME, OP_VERSION, OP_DOMAIN)
    assert creator is not None
    plugin_cls, _ = plugin_classes(trt)
    attrs = MoEAttrs(num_experts=4, top_k=2, gate="raw_logits")
    fields = plugin_cls(attrs).get_fields_to_serialize()
    assert MoEAttrs.from_fields(fields) == attrs
    with pytest.raises(ValueError, match="top_k"):
        MoEAttrs(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="rebuild"):
        MoEAttrs(num_experts=2, top_k=1, plugin_version="0")


# --- backends: clean refusal without a GPU, fallback to ONNX Runtime -------------------------


@pytest.mark.skipif(visible_gpu() is not None, reason="a GPU is present")
def test_tensorrt_backend_refuses_without_gpu(tiny_model):
    with pytest.raises(BackendError) as err:
        load_backend(tiny_model, "tensorrt")
    message = str(err.value)
    assert "\n" not in message
    if HAS_RTX:
        assert "RTX GPU" in message and "none found" in message


@pytest.mark.skipif(visible_gpu() is not None, reason="a GPU is present")
def test_auto_falls_back_to_onnxruntime(tiny_model):
    backend = load_backend(tiny_model, "auto")
    assert backend.name == "onnxruntime"
    out = backend.embed(np.zeros((2, 3, 112, 112), np.float32))
    assert out.shape == (2, 512) and out.dtype == np.float32


# --- GPU: kernels against the NumPy reference, engine against ONNX Runtime -------------------


class _Device:
    """Primary context of device 0 and a few helpers over the driver API."""

    def __init__(self) -> None:
        from cuda.bindings import driver

        from engine.ops.kernels.topk_moe import check

        self.driver, self.check = driver, check
        check(driver.cuInit(0), "cuInit")
        self.dev = check(driver.cuDeviceGet(0), "cuDeviceGet")
        self.ctx = check(driver.cuDevicePrimaryCtxRetain(self.dev), "retain")
        check(driver.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        self.buffers = []

    def upload(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        ptr = self.alloc(a.nbytes)
        self.check(self.driver.cuMemcpyHtoD(ptr, a.ctypes.data, a.nbytes), "cuMemcpyHtoD")
        return ptr

    def alloc(self, nbytes: int) -> int:
        ptr = int(self.check(self.driver.cuMemAlloc(max(nbytes, 1)), "cuMemAlloc"))
        self.buffers.append(ptr)
        return ptr

    def download(self, ptr: int, like: np.ndarray) -> np.ndarray:
        out = np.empty_like(like)
        self.check(self.driver.cuCtxSynchronize(), "cuCtxSynchronize")
        self.check(self.driver.cuMemcpyDtoH(out.ctypes.data, ptr, out.nbytes), "cuMemcpyDtoH")
        return out

    def close(self) -> None:
        for ptr in self.buffers:
            self.driver.cuMemFree(ptr)
        self.driver.cuDevicePrimaryCtxRelease(self.dev)


@pytest.fixture(scope="module")
def device():
    if visible_gpu() is None:
        pytest.skip("no CUDA GPU (cuda-python found no device)")
    if not _nvrtc_available():
        pytest.skip("NVRTC (cuda-toolkit[nvrtc]) not installed")
    d = _Device()
    yield d
    d.close()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n,k,gate", [(3, 2, "softmax_topk"), (8, 2, "raw_logits"),
                                      (4, 1, "softmax_topk"), (1, 1, "softmax_topk"),
                                      (16, 4, "softmax_topk")])
@pytest.mark.parametrize("tokens", [1, 37, 2 * 49 * 3])
def test_kernels_match_reference(device, dtype, n, k, gate, tokens):
    from engine.ops.kernels.topk_moe import current_kernels

    rng = np.random.default_rng(n * 100 + k + tokens)
    d, h = 48, 80  # not multiples of the 16 tile
    x = rng.standard_normal((tokens, d)).astype(dtype)
    router = (rng.standard_normal((n, d)) * 0.3).astype(dtype)
    w1 = (rng.standard_normal((n, d, h)) * 0.1).astype(dtype)
    b1 = (rng.standard_normal((n, h)) * 0.1).astype(dtype)
    w2 = (rng.standard_normal((n, h, d)) * 0.1).astype(dtype)
    b2 = (rng.standard_normal((n, d)) * 0.1).astype(dtype)
    if n >= 4:
        router[1] = router[2]  # tied logits: the lower expert index wins, as in torch.topk
    shape = MoEShape(tokens=tokens, dim=d, hidden=h, experts=n, top_k=k)
    _, size = workspace_layout(shape, np.dtype(dtype).itemsize)
    y = device.alloc(x.nbytes)
    current_kernels().enqueue(
        shape, half=dtype == np.float16, raw_logits=gate == "raw_logits", x=device.upload(x),
        router=device.upload(router), w1=device.upload(w1), b1=device.upload(b1),
        w2=device.upload(w2), b2=device.upload(b2), y=y, workspace=device.alloc(size), stream=0)
    got = device.download(y, x).astype(np.float64)
    f32 = [a.astype(np.float32) for a in (x, router, w1, b1, w2, b2)]
    want = topk_moe_reference(*f32, top_k=k, gate=gate).astype(np.float64)
    tol = 1e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=tol)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_backend_matches_onnxruntime(tiny_model, tmp_path):
    gpu = visible_gpu()
    if gpu is None or not HAS_RTX or gpu.compute_capability not in ("7.5", "8.6", "8.9", "12.0"):
        pytest.skip("needs TensorRT-RTX and an RTX GPU")
    ort = load_backend(tiny_model, "onnxruntime")
    x = np.random.default_rng(1).standard_normal((5, 3, 112, 112)).astype(np.float32)
    with load_backend(tiny_model, "tensorrt", engine_dir=tmp_path / "engine") as trt:
        assert trt.name == "tensorrt"
        got = trt.embed(x)
        assert (tmp_path / "engine" / "runtime.cache").is_file()
    assert (got * ort.embed(x)).sum(1).min() > 0.995
