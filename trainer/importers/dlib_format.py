"""Reading dlib's serialized face network (`dlib_face_recognition_resnet_model_v1.dat`).

Pure Python + NumPy, no dlib needed. The format is dlib's `serialize()` of the network type
(dlib/serialize.h, dlib/dnn/core.h, layers.h, input.h, loss.h):
- integers are "packed": one control byte (low 4 bits = number of bytes that follow, bit 7 =
  negative), then the magnitude little-endian;
- floats/doubles are (int64 mantissa, int16 exponent), both packed;
- bools are one ASCII byte '0' / '1'; strings are a packed length and the bytes;
- tensors are a packed version (2), n, k, nr, nc, then n*k*nr*nc little-endian float32;
- a network nests: each `add_layer` writes its version, then its whole subnetwork, then its
  own layer ("details") and some training state; tags and skips write a version and their
  subnetwork. So the file can only be read knowing the network's type, which `LAYERS` spells
  out for ResNet v1 (dlib's examples/dnn_face_recognition_ex.cpp), outermost layer first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DlibFormatError(ValueError):
    """The file is not dlib's ResNet v1 face network (or is damaged)."""


@dataclass
class DlibLayer:
    """One computational layer as stored: its version string and parameter arrays."""

    kind: str  # "con", "affine", "fc", "relu", "max_pool", "avg_pool", "add_prev", "input"
    version: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)


# block<N,BN,stride,SUB> = BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,SUB>>>>> (the stride
# is a constant of the type, checked by the con_ layer itself, not a separate record)
_BLOCK = ["affine", "con", "relu", "affine", "con"]


def _ares() -> list[str]:
    # relu<add_prev1<block<..., tag1<SUB>>>>
    return ["relu", "add_prev", *_BLOCK, "tag"]


def _ares_down() -> list[str]:
    # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<..., 2, tag1<SUB>>>>>>>
    return ["relu", "add_prev", "avg_pool", "skip", "tag", *_BLOCK, "tag"]


def resnet_v1_layers() -> list[str]:
    """The type of dlib's face ResNet v1, outermost first (loss ... input)."""
    levels = (
        [_ares_down()]  # alevel0: 256
        + [_ares(), _ares(), _ares_down()]  # alevel1: 256
        + [_ares(), _ares(), _ares_down()]  # alevel2: 128
        + [_ares(), _ares(), _ares(), _ares_down()]  # alevel3: 64
        + [_ares(), _ares(), _ares()]  # alevel4: 32
    )
    stem = ["max_pool", "relu", "affine", "con"]
    return ["loss", "fc", "avg_pool"] + [t for lv in levels for t in lv] + stem + ["input"]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"file ends early (needed {n} bytes at offset {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        ctrl = self._take(1)[0]
        size = ctrl & 0x0F
        if size > 8 or ctrl & 0x70:
            raise DlibFormatError(f"bad integer control byte {ctrl:#x} at offset {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if ctrl & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent >= 32000:  # dlib's markers for inf, -inf and nan
            return float("nan")
        return float(np.ldexp(float(mantissa), exponent))

    def bool(self) -> bool:
        ch = bytes(self._take(1))
        if ch not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool byte {ch!r} at offset {self.pos - 1}")
        return ch == b"1"

    def str(self) -> str:
        n = self.int()
        if n > 256:
            raise DlibFormatError(f"implausible string length {n} at offset {self.pos}")
        return bytes(self._take(n)).decode("ascii", errors="replace")

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise DlibFormatError(f"unsupported tensor version {version} at offset {self.pos}")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, ...]:
        version = self.int()
        if version != 1:
            raise DlibFormatError(f"unsupported alias_tensor version {version}")
        return tuple(self.int() for _ in range(4))


def _details(r: _Reader, kind: str) -> DlibLayer:
    """One layer's own serialization (the "details" of an add_layer)."""
    version = r.str()
    layer = DlibLayer(kind, version)
    if kind == "con":
        if version not in ("con_4", "con_5", "con_6"):
            raise DlibFormatError(f"expected a con_ layer, found {version!r}")
        params = r.tensor().reshape(-1)
        num_filters, nr, nc = r.int(), r.int(), r.int()
        stride_y, stride_x, pad_y, pad_x = r.int(), r.int(), r.int(), r.int()
        filters, biases = r.alias(), r.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float()
        use_bias = r.bool() if version in ("con_5", "con_6") else True
        if version == "con_6":
            r.bool()  # use_relu (a fused relu, off in this network)
        n_w = int(np.prod(filters))
        layer.arrays["weight"] = params[:n_w].reshape(num_filters, -1, nr, nc).copy()
        if use_bias:
            layer.arrays["bias"] = params[n_w : n_w + int(np.prod(biases))].copy()
        layer.info = dict(stride=stride_y, padding=pad_y, stride_x=stride_x, padding_x=pad_x)
    elif kind == "affine":
        if version in ("bn_con2", "bn_fc2"):  # a batch-norm layer, frozen into an affine one
            params = r.tensor().reshape(-1)
            r.alias(), r.alias()  # gamma, beta
            r.tensor(), r.tensor()  # means, invstds of the last batch
            mean, var = r.tensor().reshape(-1), r.tensor().reshape(-1)
            r.int(), r.int()  # num_updates, running_stats_window_size
            for _ in range(4):
                r.float()
            eps = r.float()
            c = mean.size
            gamma = params[:c] / np.sqrt(var + eps)
            layer.arrays = {"gamma": gamma, "beta": params[c : 2 * c] - gamma * mean}
        elif version in ("affine_", "affine_2"):
            params = r.tensor().reshape(-1)
            gamma_shape, _ = r.alias(), r.alias()
            r.int()  # mode
            if version == "affine_2" and r.bool():
                raise DlibFormatError("a disabled affine layer is not supported")
            c = int(np.prod(gamma_shape))
            layer.arrays = {"gamma": params[:c].copy(), "beta": params[c : 2 * c].copy()}
        else:
            raise DlibFormatError(f"expected an affine_/bn_ layer, found {version!r}")
    elif kind == "fc":
        if version not in ("fc_2", "fc_3"):
            raise DlibFormatError(f"expected an fc_ layer, found {version!r}")
        num_outputs, num_inputs = r.int(), r.int()
        params = r.tensor().reshape(-1)
        weights, biases = r.alias(), r.alias()
        bias_mode = r.int()
        for _ in range(4):
            r.float()
        if version == "fc_3":
            r.bool()
        n_w = int(np.prod(weights))
        # stored inputs x outputs; torch wants outputs x inputs
        layer.arrays["weight"] = params[:n_w].reshape(num_inputs, num_outputs).T.copy()
        if bias_mode == 0:  # FC_HAS_BIAS
            layer.arrays["bias"] = params[n_w : n_w + int(np.prod(biases))].copy()
    elif kind == "relu":
        if version == "relu_2":
            r.bool()
        elif version != "relu_":
            raise DlibFormatError(f"expected a relu_ layer, found {version!r}")
    elif kind in ("max_pool", "avg_pool"):
        if version != f"{kind}_2":
            raise DlibFormatError(f"expected a {kind}_ layer, found {version!r}")
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        layer.info = dict(size=nr, size_x=nc, stride=sy, stride_x=sx, padding=py, padding_x=px)
    elif kind == "add_prev":
        if version != "add_prev_":
            raise DlibFormatError(f"expected an add_prev_ layer, found {version!r}")
    else:
        raise AssertionError(kind)
    return layer


def _training_state(r: _Reader, version: int, over_input: bool) -> None:
    """The training-time fields an add_layer writes after its layer (not needed here)."""
    for _ in range(3):  # setup called, gradient stale, output/gradient disabled
        r.bool()
    r.tensor(), r.tensor()  # x_grad, cached_output
    if over_input:
        r.tensor()  # grad_final
        if version >= 3:
            r.int()  # sample expansion factor
    elif version == 2:
        r.tensor()  # params_grad


def read_dlib_network(data: bytes, layers: list[str] | None = None) -> list[DlibLayer]:
    """Parse a serialized dlib network; returns its layers in application order (input first).

    Raises DlibFormatError with the offset when the bytes do not match the expected type.
    """
    types = resnet_v1_layers() if layers is None else layers
    r = _Reader(data)
    out: list[DlibLayer] = []  # filled innermost first, as the recursion unwinds

    def net(i: int) -> None:
        kind = types[i]
        if kind == "loss":
            if r.int() != 1:
                raise DlibFormatError("unsupported loss-layer version")
            version = r.str()
            if version == "loss_metric_2":
                r.float(), r.float()  # margin, distance threshold
            elif version != "loss_metric_":
                raise DlibFormatError(f"expected loss_metric_, found {version!r}")
            net(i + 1)
        elif kind in ("tag", "skip"):
            if r.int() != 1:
                raise DlibFormatError(f"unsupported {kind} version at offset {r.pos}")
            net(i + 1)
        elif types[i + 1] == "input":
            version = r.int()
            if version not in (2, 3):
                raise DlibFormatError(f"unsupported input add_layer version {version}")
            if r.str() != "input_rgb_image_sized":
                raise DlibFormatError("expected an input_rgb_image_sized input layer")
            mean = [r.float() for _ in range(3)]
            size = (r.int(), r.int())
            out.append(DlibLayer("input", "input_rgb_image_sized", info=dict(
                avg_red=mean[0], avg_green=mean[1], avg_blue=mean[2], rows=size[0], cols=size[1]
            )))
            out.append(_details(r, kind))
            _training_state(r, version, over_input=True)
        else:
            version = r.int()
            if version not in (1, 2):
                raise DlibFormatError(f"unsupported add_layer version {version} at {r.pos}")
            net(i + 1)
            out.append(_details(r, kind))
            _training_state(r, version, over_input=False)

    try:
        net(0)
    except DlibFormatError:
        raise
    except (ValueError, IndexError) as e:
        raise DlibFormatError(f"damaged dlib network at offset {r.pos}: {e}") from e
    if r.pos != len(r.data):
        raise DlibFormatError(f"{len(r.data) - r.pos} unread bytes after the network")
    return out
