"""FaceMoE-Swin backbone: shapes, gradients, window maths, parameter count, ONNX parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.models import create_model
from trainer.models.moe import moe_layers
from trainer.models.swin import (
    FaceMoESwin,
    PatchMerging,
    SwinMoEBlock,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

# Two blocks in the first stages so the shifted-window (masked) path runs too.
SMALL = {"depths": [2, 2, 1], "dim": 48, "heads": [2, 2, 2]}


@pytest.fixture
def small() -> FaceMoESwin:
    torch.manual_seed(0)
    return create_model("facemoe-swin-b", **SMALL)


@pytest.mark.unit
def test_forward_shape_and_attributes(small: FaceMoESwin) -> None:
    small.eval()  # deterministic: no drop path, BatchNorm on running stats
    x = torch.randn(2, 3, small.input_size, small.input_size)
    y = small(x)
    assert small.input_size == 120 and small.embed_dim == 512
    assert y.shape == (2, 512) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    tokens = small.forward_features(x)
    assert tokens.shape == (2, 25, 48 * 4)  # 20 -> 10 -> 5 tokens a side, width doubled twice
    torch.testing.assert_close(small.forward_head(tokens), y)
    assert len(moe_layers(small)) == sum(SMALL["depths"])  # MoE in every block


@pytest.mark.unit
def test_the_smallest_override_builds() -> None:
    model = create_model("facemoe-swin-b", depths=[1, 1, 1], dim=48, heads=[2, 2, 2])
    assert model(torch.randn(2, 3, 120, 120)).shape == (2, 512)


@pytest.mark.unit
def test_every_parameter_gets_a_gradient(small: FaceMoESwin) -> None:
    small.train()
    small(torch.randn(2, 3, 120, 120)).sum().backward()
    missing = [n for n, p in small.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in small.parameters())


@pytest.mark.unit
def test_full_size_parameter_count() -> None:
    with torch.device("meta"):  # count without allocating 1.9 GB
        model = create_model("facemoe-swin-b")
    assert model.input_size == 120 and model.embed_dim == 512
    assert sum(p.numel() for p in model.parameters()) == 463_827_664
    assert len(moe_layers(model)) == 22
    blocks = [m for m in model.modules() if isinstance(m, SwinMoEBlock)]
    assert [b.resolution for b in blocks] == [20] * 2 + [10] * 18 + [5] * 2
    assert [b.shift for b in blocks] == [0, 2] * 10 + [0, 0]  # the 5x5 stage is one window


@pytest.mark.unit
def test_window_partition_round_trip() -> None:
    x = torch.randn(2, 20, 20, 3)
    assert window_partition(x, 5).shape == (32, 25, 3)
    assert torch.equal(window_reverse(window_partition(x, 5), 5, 20, 20), x)


@pytest.mark.unit
def test_mask_only_touches_windows_on_the_wrapped_edges() -> None:
    masked = (shifted_window_mask(20, 20, 5, 2) != 0).flatten(1).any(1)
    grid = masked.reshape(4, 4)  # 4x4 windows, row-major
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[-1, :] = expected[:, -1] = True
    assert torch.equal(grid, expected)


@pytest.mark.unit
def test_patch_merging_matches_strided_concatenation() -> None:
    merge = PatchMerging(7, 10)
    x = torch.randn(2, 100, 7)
    g = x.reshape(2, 10, 10, 7)
    four = [g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]]
    ref = torch.cat(four, dim=-1).reshape(2, 25, 28)
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(ref)))


def _naive_shifted_attention(block: SwinMoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Global attention over the rolled grid, allowed only within a window and a region."""
    r, w, s, attn = block.resolution, block.window, block.shift, block.attn
    b, n, c = x.shape
    g = torch.roll(x.reshape(b, r, r, c), (-s, -s), (1, 2)).reshape(b, n, c)
    i, j = torch.div(torch.arange(n), r, rounding_mode="floor"), torch.arange(n) % r

    def region(v: torch.Tensor) -> torch.Tensor:
        return (v >= r - w).long() + (v >= r - s).long()

    same = lambda v: v[:, None] == v[None, :]  # noqa: E731
    allowed = same(i // w) & same(j // w) & same(region(i)) & same(region(j))
    # Offsets within a window; clamped where pairs are masked anyway (other windows).
    di = (i[:, None] - i[None, :] + w - 1).clamp(0, 2 * w - 2)
    dj = (j[:, None] - j[None, :] + w - 1).clamp(0, 2 * w - 2)
    bias = attn.bias_table[di * (2 * w - 1) + dj].permute(2, 0, 1)  # heads, n, n
    q, k, v = attn.qkv(g).reshape(b, n, 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
    scores = (q * attn.scale) @ k.transpose(-2, -1) + bias
    y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    y = attn.proj(y.transpose(1, 2).reshape(b, n, c))
    return torch.roll(y.reshape(b, r, r, c), (s, s), (1, 2)).reshape(b, n, c)


@pytest.mark.unit
def test_shifted_window_attention_equals_masked_global_attention() -> None:
    torch.manual_seed(0)
    moe = {"num_experts": 3, "top_k": 2, "gate": "softmax_topk", "dispatch": "dense"}
    block = SwinMoEBlock(16, 20, 2, 5, 2, 4.0, moe, 0.0)
    with torch.no_grad():
        block.attn.bias_table.normal_()  # make the bias matter
    x = torch.randn(2, 400, 16)
    torch.testing.assert_close(block._attend(x), _naive_shifted_attention(block, x))


@pytest.mark.slow
@pytest.mark.contract
def test_onnx_export_matches_torch(small: FaceMoESwin, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    small.eval()
    path = tmp_path / "swin.onnx"
    torch.onnx.export(
        small,
        (torch.randn(2, 3, 120, 120),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 120, 120)  # another batch size than the export's
    with torch.no_grad():
        expected = small(x).numpy()
    (got,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
