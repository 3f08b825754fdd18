"""The routing op `facemoe::TopKMoE` as a Python IPluginV3 for TensorRT and TensorRT-RTX.

The ONNX parser maps each `TopKMoE` node (domain `facemoe`, attribute plugin_version "1") to
this plugin once `register(trt)` has put the creator in the registry under namespace `facemoe`.
Inputs are the node's: x [..., d], router [N, d], w1 [N, d, h], b1 [N, h], w2 [N, h, d],
b2 [N, d] (the weights arrive as constant inputs from the ONNX initializers); the one output has
x's shape and type. Serialized fields: num_experts, top_k, gate, plugin_version. `enqueue` runs
the CUDA kernels of `engine.ops.kernels.topk_moe` (NVRTC, cuda-python), which compute only the
k selected experts per token.

Both TensorRT Python modules (`tensorrt`, `tensorrt_rtx`) have the same plugin interfaces but
distinct classes, so the plugin classes are made per module by `plugin_classes(trt)`.
A class-based Python plugin must be registered again in every process that loads an engine.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from engine.ops.reference import OP_DOMAIN, OP_NAME, OP_VERSION

PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION = OP_NAME, OP_DOMAIN, OP_VERSION
GATES = ("softmax_topk", "raw_logits")
NUM_INPUTS = 6


@dataclass(frozen=True)
class MoEAttrs:
    num_experts: int
    top_k: int
    gate: str = "softmax_topk"
    plugin_version: str = PLUGIN_VERSION

    def __post_init__(self) -> None:
        from engine.ops.kernels.topk_moe import MAX_EXPERTS

        if not 1 <= self.top_k <= self.num_experts <= MAX_EXPERTS:
            raise ValueError(f"{PLUGIN_NAME}: need 1 <= top_k <= num_experts <= {MAX_EXPERTS}, "
                             f"got top_k={self.top_k} num_experts={self.num_experts}")
        if self.gate not in GATES:
            raise ValueError(f"{PLUGIN_NAME}: unknown gate {self.gate!r}; expected one of {GATES}")
        if self.plugin_version != PLUGIN_VERSION:
            raise ValueError(f"{PLUGIN_NAME}: engine has plugin version {self.plugin_version!r}, "
                             f"this build has {PLUGIN_VERSION!r}; rebuild the engine")

    @classmethod
    def from_fields(cls, fields: Any) -> MoEAttrs:
        """From a PluginFieldCollection (ONNX node attributes, or the serialized fields)."""
        values = {f.name: _field_value(f) for f in fields}
        missing = {"num_experts", "top_k"} - set(values)
        if missing:
            raise ValueError(f"{PLUGIN_NAME}: missing fields {sorted(missing)}")
        return cls(num_experts=int(values["num_experts"]), top_k=int(values["top_k"]),
                   gate=str(values.get("gate", "softmax_topk")),
                   plugin_version=str(values.get("plugin_version", PLUGIN_VERSION)))


def _field_value(field: Any) -> int | str:
    data = np.asarray(field.data)
    if data.dtype.kind in "SUO" or data.dtype.itemsize == 1:  # CHAR fields: bytes of a string
        return data.astype(np.uint8).tobytes().rstrip(b"\0").decode()
    return int(data.reshape(-1)[0])


def _volume(dims: Any) -> int:
    return math.prod(int(v) for v in dims)


@functools.cache
def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """(plugin class, creator class) built on the interfaces of this TensorRT module."""

    def fields(values: dict[str, int | str]) -> tuple[Any, list[np.ndarray]]:
        """A PluginFieldCollection and the arrays it points into (keep both alive)."""
        arrays, items = [], []
        for name, value in values.items():
            if isinstance(value, str):
                data, kind = np.frombuffer(value.encode(), np.int8).copy(), trt.PluginFieldType.CHAR
            else:
                data, kind = np.array([value], np.int32), trt.PluginFieldType.INT32
            arrays.append(data)
            items.append(trt.PluginField(name, data, kind))
        return trt.PluginFieldCollection(items), arrays

    class TopKMoEPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                        trt.IPluginV3OneRuntime):
        def __init__(self, attrs: MoEAttrs, phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = 1
            self.attrs = attrs
            self.phase = phase
            self._fields: Any = None  # TensorRT reads the fields after the call returns

        # IPluginV3
        def get_capability_interface(self, capability_type: Any) -> Any:
            return self

        def clone(self) -> TopKMoEPlugin:
            return _keep(TopKMoEPlugin(self.attrs, self.phase))

        # IPluginV3OneBuild
        def get_output_data_types(self, input_types: list) -> list:
            return [input_types[0]]

        def get_output_shapes(self, inputs: list, shape_inputs: list, expr_builder: Any) -> list:
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos: int, in_out: list, num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in (trt.DataType.FLOAT, trt.DataType.HALF)
            return desc.type == in_out[0].desc.type  # weights and output: the type of x

        def configure_plugin(self, inputs: list, outputs: list) -> None:
            if len(inputs) != NUM_INPUTS:
                raise ValueError(f"{PLUGIN_NAME} takes {NUM_INPUTS} inputs, got {len(inputs)}")
            router = tuple(inputs[1].desc.dims)
            if router and router[0] not in (-1, self.attrs.num_experts):
                raise ValueError(f"{PLUGIN_NAME}: router has {router[0]} experts, "
                                 f"num_experts is {self.attrs.num_experts}")

        def get_workspace_size(self, inputs: list, outputs: list) -> int:
            from engine.ops.kernels.topk_moe import workspace_layout

            x_max = tuple(inputs[0].max)
            w1 = tuple(inputs[2].desc.dims)  # [N, d, h]; weights are constants: static dims
            itemsize = 2 if inputs[0].desc.type == trt.DataType.HALF else 4
            return workspace_layout(self._shape(x_max, w1), itemsize)[1]

        def get_valid_tactics(self) -> list[int]:
            return []

        # IPluginV3OneRuntime
        def set_tactic(self, tactic: int) -> None:
            pass

        def on_shape_change(self, inputs: list, outputs: list) -> None:
            pass

        def attach_to_context(self, resource_context: Any) -> TopKMoEPlugin:
            return self.clone()

        def get_fields_to_serialize(self) -> Any:
            a = self.attrs
            self._fields = fields({"num_experts": a.num_experts, "top_k": a.top_k,
                                   "gate": a.gate, "plugin_version": a.plugin_version})
            return self._fields[0]

        def enqueue(self, input_desc: list, output_desc: list, inputs: list, outputs: list,
                    workspace: int, stream: int) -> None:
            from engine.ops.kernels.topk_moe import current_kernels

            shape = self._shape(tuple(input_desc[0].dims), tuple(input_desc[2].dims))
            router, w1, b1, w2, b2 = inputs[1:]
            current_kernels().enqueue(
                shape, half=input_desc[0].type == trt.DataType.HALF,
                raw_logits=self.attrs.gate == "raw_logits", x=inputs[0], router=router,
                w1=w1, b1=b1, w2=w2, b2=b2, y=outputs[0], workspace=workspace, stream=stream)

        def _shape(self, x_dims: tuple, w1_dims: tuple) -> Any:
            from engine.ops.kernels.topk_moe import MoEShape

            return MoEShape(tokens=_volume(x_dims[:-1]), dim=int(x_dims[-1]),
                            hidden=int(w1_dims[2]), experts=self.attrs.num_experts,
                            top_k=self.attrs.top_k)

    class TopKMoECreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self._fields = fields({"num_experts": 0, "top_k": 0, "gate": "",
                                   "plugin_version": ""})
            self.field_names = self._fields[0]

        def create_plugin(self, name: str, field_collection: Any, phase: Any) -> TopKMoEPlugin:
            return _keep(TopKMoEPlugin(MoEAttrs.from_fields(field_collection), phase))

    return TopKMoEPlugin, TopKMoECreator


_CREATORS: dict[str, Any] = {}
_ALIVE: list[Any] = []  # TensorRT holds raw pointers to Python plugin objects: keep them alive


def _keep(plugin: Any) -> Any:
    _ALIVE.append(plugin)
    return plugin


def ensure_rtx_library_link() -> None:
    """Make `libtensorrt_rtx.so` resolvable before TensorRT-RTX's ONNX parser makes a plugin.

    The wheel ships only `libtensorrt_rtx.so.1`, but the parser dlopens the unversioned name
    after creating a plugin, and the process aborts when that fails. Preloading the .so.1 does
    not help (its SONAME is the versioned name); the parser library's RPATH is $ORIGIN, so a
    symlink next to it is found without LD_LIBRARY_PATH. It is made here once per install.
    """
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or spec.origin is None:
        return  # not the pip wheel: a system install has the unversioned link
    libs = Path(spec.origin).parent
    link, target = libs / "libtensorrt_rtx.so", libs / "libtensorrt_rtx.so.1"
    if link.exists() or not target.exists():
        return
    try:
        link.symlink_to(target.name)
    except FileExistsError:
        pass  # made by a concurrent process
    except OSError as e:
        raise RuntimeError(f"TensorRT-RTX needs the link {link} -> {target.name}, which cannot "
                           f"be made ({e.strerror}); run: ln -s {target.name} {link}") from e


def register(trt: ModuleType) -> Any:
    """Register the creator with this TensorRT module's plugin registry (once per process)."""
    if trt.__name__ == "tensorrt_rtx":
        ensure_rtx_library_link()
    if trt.__name__ not in _CREATORS:
        _, creator_cls = plugin_classes(trt)
        creator = creator_cls()
        if not trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
            raise RuntimeError(f"could not register the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} plugin "
                               f"with {trt.__name__}")
        _CREATORS[trt.__name__] = creator
    return _CREATORS[trt.__name__]
