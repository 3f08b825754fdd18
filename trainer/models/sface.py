"""OpenCV Zoo's SFace in PyTorch, and FaceMoE upcycled from it.

`SFaceNet` is the network of face_recognition_sface_2021dec.onnx (ArcFace 112x112 crop, RGB,
raw 0-255 pixels -> 128-d): the graph's own input scaling `(x - shift) * scale` (127.5 and
1/128 in the file; buffers, so the port reads them from the graph), then 14 MobileNetV1-style
units. conv_1 is a 3x3 convolution 3 -> 32 at stride 1; conv_2..conv_14 are each a depthwise
3x3 convolution then a pointwise 1x1 one, every convolution without bias and followed by batch
norm (eps 1e-3) and a per-channel PReLU. Channels 32, 64, 128, 128, 256, 256, 512 x 6, 1024,
1024; stride 2 at conv_3, conv_5, conv_7 and conv_13 (112 -> 56 -> 28 -> 14 -> 7). The head is
the ArcFace one: batch norm (eps 2e-5), dropout, flatten (1024 x 7 x 7), linear to 128 with
bias, batch norm over the embedding.

The batch norms are `FrozenBN`: their statistics are the imported ones, never re-estimated
(fine-tuning batches of degraded faces would otherwise move them), while scale and shift train.
The graph's Dropout (0.4, inactive at inference) is `dropout`, 0 by default: a distilled student
that starts as its teacher should match it at step 0 in training mode too.

Stages by output size: s112 (conv_1, conv_2), s56 (conv_3, conv_4), s28 (conv_5, conv_6), s14
(conv_7..conv_12, 512 channels) and s7 (conv_13, conv_14, 1024 channels). `moe_after` adds a
`FaceMoEBlock` (pre-norm transformer block over the positions, sparse top-k MoE MLP,
zero-initialised residual projections) after each named stage: at step 0 the upcycled network
computes exactly the imported one.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.layers import FaceMoEBlock
from trainer.models.registry import register_model
from trainer.preprocess import ARCFACE_112

STAGES = ("s112", "s56", "s28", "s14", "s7")
# (ONNX unit name, output channels, stride, stage); conv_1 is a full 3x3 convolution, the others
# depthwise-separable
UNITS = (
    ("conv_1", 32, 1, "s112"),
    ("conv_2", 64, 1, "s112"),
    ("conv_3", 128, 2, "s56"),
    ("conv_4", 128, 1, "s56"),
    ("conv_5", 256, 2, "s28"),
    ("conv_6", 256, 1, "s28"),
    *((f"conv_{i}", 512, 2 if i == 7 else 1, "s14") for i in range(7, 13)),
    ("conv_13", 1024, 2, "s7"),
    ("conv_14", 1024, 1, "s7"),
)
BN_EPS = 1e-3  # the convolutions' batch norms
HEAD_EPS = 2e-5  # bn1 and fc1
# the graph's Sub and Mul constants (the importer reads them from the file)
INPUT_SHIFT, INPUT_SCALE = 127.5, 0.0078125


class FrozenBN(nn.Module):
    """Batch norm at inference over dim 1: fixed statistics (buffers), trainable scale/shift."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)


class ConvBNPReLU(nn.Module):
    """Convolution (no bias), frozen batch norm, per-channel PReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = FrozenBN(cout, BN_EPS)
        self.act = nn.PReLU(cout)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """conv_N of SFace: a depthwise 3x3 (ONNX `conv_N_dw_*`), pointwise 1x1 (`conv_N_*`)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = ConvBNPReLU(cin, cin, 3, stride, groups=cin)
        self.pw = ConvBNPReLU(cin, cout, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class SFaceNet(nn.Module):
    """SFace (`moe_after=()`), or FaceMoE upcycled from it. Output [B, 128], not normalised."""

    # OpenCV's blobFromImage(crop, 1.0, (112, 112), 0, swapRB=True): RGB, raw 0-255 pixels,
    # i.e. (x / 255 - 0) / (1 / 255) in the manifest's convention
    input_mean = (0.0, 0.0, 0.0)
    input_std = (1 / 255, 1 / 255, 1 / 255)
    crop_template = ARCFACE_112

    def __init__(
        self,
        img_size: int = 112,
        embed_dim: int = 128,
        moe_after: tuple[str, ...] | list[str] = (),
        num_experts: int = 4,
        top_k: int = 2,
        gate: str = "softmax_topk",
        dispatch: str = "dense",
        heads: int = 8,
        mlp_ratio: float = 0.5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        unknown = set(moe_after) - set(STAGES)
        if unknown:
            raise ValueError(f"moe_after: unknown stages {sorted(unknown)}; known: {STAGES}")
        if img_size != 112 or embed_dim != 128:
            raise ValueError("SFace is 112x112 -> 128-d (its head flattens the 7x7 map)")
        self.input_size, self.embed_dim = img_size, embed_dim
        self.register_buffer("input_shift", torch.tensor(INPUT_SHIFT))
        self.register_buffer("input_scale", torch.tensor(INPUT_SCALE))
        moe = {"num_experts": num_experts, "top_k": top_k, "gate": gate, "dispatch": dispatch}
        stages: list[nn.Module] = []
        self.unit_names: list[str] = []  # ONNX name of each unit, in order (for the importer)
        cin, size = 3, img_size
        for stage in STAGES:
            blocks: list[nn.Module] = []
            for name, cout, stride, where in UNITS:
                if where != stage:
                    continue
                if name == "conv_1":
                    blocks.append(ConvBNPReLU(cin, cout, 3, stride))
                else:
                    blocks.append(DepthwiseSeparable(cin, cout, stride))
                self.unit_names.append(name)
                cin, size = cout, size // stride
            if stage in moe_after:
                blocks.append(FaceMoEBlock(cin, size * size, heads, mlp_ratio, moe))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn1 = FrozenBN(cin, HEAD_EPS)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * size * size, embed_dim)
        self.fc_bn = FrozenBN(embed_dim, HEAD_EPS)

    def units(self) -> list[nn.Module]:
        """The 14 imported units (conv_1..conv_14) in order, FaceMoE blocks left out."""
        return [b for s in self.stages for b in s if not isinstance(b, FaceMoEBlock)]

    def probe_trainable(self, name: str) -> bool:
        """Fine-tuning stage 1 trains the FaceMoE blocks and the head (bn1, fc, fc_bn)."""
        parts = name.split(".")
        if parts[0] in ("bn1", "fc", "fc_bn"):
            return True
        if parts[0] != "stages" or len(parts) < 3:
            return False
        return isinstance(self.stages[int(parts[1])][int(parts[2])], FaceMoEBlock)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages((x - self.input_shift) * self.input_scale)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc_bn(self.fc(self.drop(self.bn1(features)).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_SFACE = dict(img_size=112, embed_dim=128, num_experts=4, top_k=2, gate="softmax_topk",
              dispatch="dense", heads=8, mlp_ratio=0.5, dropout=0.0)
register_model("sface", SFaceNet, **_SFACE, moe_after=[])
# one FaceMoE block over the 14x14 map (196 tokens, 512 channels) after conv_12
register_model("facemoe-sface", SFaceNet, **_SFACE, moe_after=["s14"])
