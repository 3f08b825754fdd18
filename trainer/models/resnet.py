"""dlib's face ResNet v1 in PyTorch, and FaceMoE upcycled from it.

`ResNetFace` is the 29-conv network of dlib's dnn_face_recognition_ex.cpp (150x150 RGB chip ->
128-d): a 7x7/2 stem and max pool, then five stages of residual blocks (32, 64, 128, 256, 256
channels; 35, 17, 8, 4, 2 px). dlib's strided convolutions and pools have no padding, and a
down-sampling block's shortcut is a 2x2 average pool of its input, zero-padded on channels and
bottom/right to the block's output shape (no 1x1 projection); `Affine` is dlib's frozen batch
norm (per-channel scale and shift).

`moe_after` upcycles it into FaceMoE: after each named stage a pre-norm transformer block runs
over the stage's spatial positions as tokens, its MLP a sparse top-k mixture of experts
(`MoEMLP`). The blocks' residual branches end in zero-initialised projections, so at step 0 the
upcycled network computes exactly the imported one; fine-tuning then adds what low resolution
needs while the trunk keeps what it knew (the paper's selective drift).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.layers import FaceMoEBlock
from trainer.models.registry import register_model
from trainer.preprocess import CropTemplate

# dlib's input contract, carried by the architecture (as timm's pretrained configs do): RGB minus
# dlib's channel means, divided by 256, on its 150x150 chip.
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)
# The product's 5 YuNet landmarks on dlib's 150x150 chip (get_face_chip, padding 0.25): the mean,
# over the 16,887 training-pool faces of shared/data/teacher with eye_disagreement < 0.2, of the
# YuNet points mapped by the similarity transform dlib used for that face's chip (dlib's 5-point
# chip template applied to its own 5-point shape). tests/test_import_dlib.py re-derives it.
DLIB_150 = CropTemplate(
    150,
    ((46.817, 45.102), (101.275, 44.512), (74.065, 77.445), (51.678, 100.06), (98.245, 99.538)),
)

STAGES = ("s1", "s2", "s3", "s4", "s5")
WIDTHS = (32, 64, 128, 256, 256)
DEPTHS = (3, 4, 3, 3, 1)  # blocks per stage; every stage after the first starts by down-sampling


class Affine(nn.Module):
    """Per-channel scale and shift (dlib's `affine`: a batch norm frozen after training)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[:, None, None] + self.beta[:, None, None]


class ResBlock(nn.Module):
    """dlib's residual block for a `size` x `size` input (its padding is fixed by the size)."""

    def __init__(self, cin: int, cout: int, stride: int, size: int) -> None:
        super().__init__()
        self.down = stride == 2
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=0 if self.down else 1)
        self.aff1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1)
        self.aff2 = Affine(cout)
        branch = (size - 3) // 2 + 1 if self.down else size  # 3x3/2 conv, no padding
        short = (size - 2) // 2 + 1 if self.down else size  # 2x2/2 average pool
        out = max(branch, short)  # dlib zero-pads the smaller one
        self.pad_branch = (0, out - branch, 0, out - branch, 0, 0)  # bottom/right
        self.pad_short = (0, out - short, 0, out - short, 0, cout - cin)  # and channels
        self.out_size = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        short = F.avg_pool2d(x, 2, 2) if self.down else x
        if any(self.pad_branch):
            y = F.pad(y, self.pad_branch)
        if any(self.pad_short):
            short = F.pad(short, self.pad_short)
        return F.relu(y + short)


def stem_size(img_size: int) -> int:
    """Spatial size after the stem (7x7/2 conv and 3x3/2 max pool, no padding, as in dlib)."""
    return ((img_size - 7) // 2 + 1 - 3) // 2 + 1


class ResNetFace(nn.Module):
    """dlib's face ResNet v1 (`moe_after=()`), or FaceMoE upcycled from it.

    Output [B, embed_dim], not normalised (normalise it to get the embedding).
    """

    input_mean = tuple(round(m / 255.0, 8) for m in DLIB_MEAN_RGB)  # (x/255 - mean)/std
    input_std = (round(256.0 / 255.0, 8),) * 3
    crop_template = DLIB_150

    def __init__(
        self,
        img_size: int = 150,
        embed_dim: int = 128,
        moe_after: tuple[str, ...] | list[str] = (),
        num_experts: int = 4,
        top_k: int = 2,
        gate: str = "softmax_topk",
        dispatch: str = "dense",
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        unknown = set(moe_after) - set(STAGES)
        if unknown:
            raise ValueError(f"moe_after: unknown stages {sorted(unknown)}; known: {STAGES}")
        self.input_size, self.embed_dim = img_size, embed_dim
        self.stem = nn.Sequential(nn.Conv2d(3, WIDTHS[0], 7, 2), Affine(WIDTHS[0]), nn.ReLU())
        moe = {"num_experts": num_experts, "top_k": top_k, "gate": gate, "dispatch": dispatch}
        stages, cin, size = [], WIDTHS[0], stem_size(img_size)
        self.stage_sizes: list[int] = []  # spatial size after each stage
        for i, (name, width, depth) in enumerate(zip(STAGES, WIDTHS, DEPTHS, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(depth):
                block = ResBlock(cin, width, 2 if (i > 0 and j == 0) else 1, size)
                blocks.append(block)
                cin, size = width, block.out_size
            if name in moe_after:
                blocks.append(FaceMoEBlock(width, size * size, heads, mlp_ratio, moe))
            stages.append(nn.Sequential(*blocks))
            self.stage_sizes.append(size)
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(WIDTHS[-1], embed_dim, bias=False)

    def probe_trainable(self, name: str) -> bool:
        """Fine-tuning stage 1 trains only what the import did not bring: the FaceMoE blocks
        (and the embedding layer, so a dense network has something to adapt too)."""
        if name.startswith("fc."):
            return True
        parts = name.split(".")
        if parts[0] != "stages" or len(parts) < 3:
            return False
        block = self.stages[int(parts[1])][int(parts[2])]
        return isinstance(block, FaceMoEBlock)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem(x), 3, 2)
        return self.stages(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_R29 = dict(img_size=150, embed_dim=128, num_experts=4, top_k=2, gate="softmax_topk",
            dispatch="dense", heads=4, mlp_ratio=2.0)
register_model("dlib-resnet-v1", ResNetFace, **_R29, moe_after=[])
register_model("facemoe-r29", ResNetFace, **_R29, moe_after=["s2", "s3"])
