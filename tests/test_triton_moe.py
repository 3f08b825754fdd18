"""The fused Triton MoE op (engine/ops/triton_moe.py) against the NumPy reference, on CPU.

Without a GPU, Triton kernels run only in Triton's interpreter (NumPy), which Triton picks
when a kernel is decorated, i.e. when engine.ops.triton_moe is imported, from
TRITON_INTERPRET at that moment. Setting the variable inside the pytest process would
depend on import order (any earlier test or plugin that imported the op would have compiled
it for a GPU) and would leak interpreter mode into every later test. So the kernels run in
one child process started with TRITON_INTERPRET=1 in its environment: this module writes
every case's inputs to an .npz, the child (this same file run as a script) runs the Triton
op on them and writes its outputs back, and the assertions run here against
`topk_moe_reference`. The pytest process itself never imports triton.

Interpreter mode checks the kernels' arithmetic, masking, tiling and indexing; it cannot
check GPU-only behaviour (compilation for a given GPU, shared-memory limits, races,
speed): benchmarks/gpu_moe.py covers that on a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.contract

REPO = Path(__file__).resolve().parent.parent
HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (extra 'gpu')")

D, H = 40, 48  # not multiples of the interpreter's 32-wide K/N blocks


def _weights(rng, n, d=D, h=H):
    return {
        "router": rng.standard_normal((n, d)) * 0.3,
        "w1": rng.standard_normal((n, d, h)) * 0.1,
        "b1": rng.standard_normal((n, h)) * 0.1,
        "w2": rng.standard_normal((n, h, d)) * 0.1,
        "b2": rng.standard_normal((n, d)) * 0.1,
    }


def _cases() -> dict[str, dict]:
    """name -> {arrays (float64), top_k, gate, dtype}."""
    rng = np.random.default_rng(0)
    cases = {}
    for n, k in [(3, 2), (4, 1)]:
        for gate in ("softmax_topk", "raw_logits"):
            for dtype in ("float32", "float16"):
                # 39 tokens: not a multiple of the 16-row blocks
                arrays = {"x": rng.standard_normal((3, 13, D)), **_weights(rng, n)}
                cases[f"n{n}k{k}-{gate}-{dtype}"] = dict(
                    arrays=arrays, top_k=k, gate=gate, dtype=dtype
                )
    # Expert 3 receives no token: positive inputs, its router row negative, the others positive.
    for gate in ("softmax_topk", "raw_logits"):
        w = _weights(rng, 4)
        w["router"] = np.abs(w["router"])
        w["router"][3] *= -1
        arrays = {"x": np.abs(rng.standard_normal((21, D))), **w}
        cases[f"empty-expert-{gate}"] = dict(arrays=arrays, top_k=2, gate=gate, dtype="float32")
    # Exact ties: integer inputs and router give integer logits (exact in fp32 and fp16);
    # router row 1 repeats row 0, so experts 0 and 1 always tie.
    for n, k in [(4, 2), (4, 1), (3, 2)]:
        for gate in ("softmax_topk", "raw_logits"):
            w = _weights(rng, n)
            w["router"] = rng.integers(-1, 2, (n, D)).astype(np.float64)
            w["router"][1] = w["router"][0]
            arrays = {"x": rng.integers(-1, 2, (2, 17, D)).astype(np.float64), **w}
            dtype = "float16" if (n, k, gate) == (4, 2, "raw_logits") else "float32"
            cases[f"ties-n{n}k{k}-{gate}-{dtype}"] = dict(
                arrays=arrays, top_k=k, gate=gate, dtype=dtype
            )
    # All logits equal (zero router): every token picks experts 0..k-1.
    w = _weights(rng, 3)
    w["router"][:] = 0.0
    arrays = {"x": rng.standard_normal((5, D)), **w}
    cases["all-tied-n3k2"] = dict(arrays=arrays, top_k=2, gate="softmax_topk", dtype="float32")
    cases["one-token"] = dict(
        arrays={"x": rng.standard_normal((1, D)), **_weights(rng, 3)},
        top_k=2,
        gate="softmax_topk",
        dtype="float32",
    )
    return cases


CASES = _cases()
NAMES = ("x", "router", "w1", "b1", "w2", "b2")


def _inputs(case: dict) -> list[np.ndarray]:
    return [case["arrays"][a].astype(case["dtype"]) for a in NAMES]


@pytest.fixture(scope="module")
def triton_out(tmp_path_factory) -> dict[str, np.ndarray]:
    """Run every case (and the MoEMLP check) through the Triton interpreter in a child."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (extra 'gpu')")
    tmp = tmp_path_factory.mktemp("triton_moe")
    arrays, meta = {}, {}
    for name, case in CASES.items():
        for a, v in zip(NAMES, _inputs(case), strict=True):
            arrays[f"{name}__{a}"] = v
        meta[name] = {"top_k": case["top_k"], "gate": case["gate"]}
    np.savez(tmp / "in.npz", meta=np.array(json.dumps(meta)), **arrays)
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp / "in.npz"), str(tmp / "out.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode:
        pytest.fail(f"Triton interpreter child failed:\n{proc.stderr[-4000:]}")
    with np.load(tmp / "out.npz") as f:
        return dict(f)


def _child(inp: str, out: str) -> None:
    """Runs with TRITON_INTERPRET=1, before anything imported triton."""
    import torch

    from engine.ops.triton_moe import INTERPRET, experts_triton, route_triton, topk_moe_triton
    from trainer.models.moe import MoEMLP, fused_dispatch, route

    assert INTERPRET, "TRITON_INTERPRET=1 did not reach the child"
    # importing the op registered it as MoEMLP's "triton" dispatch
    assert fused_dispatch("triton").route is route_triton
    assert fused_dispatch("triton").experts is experts_triton
    torch.manual_seed(0)
    results = {}
    with np.load(inp) as f:
        meta = json.loads(str(f["meta"]))
        for name, m in meta.items():
            x, router, w1, b1, w2, b2 = (torch.from_numpy(f[f"{name}__{a}"]) for a in NAMES)
            results[f"{name}__y"] = topk_moe_triton(
                x, router, w1, b1, w2, b2, m["top_k"], m["gate"]
            ).numpy()
            tokens = x.reshape(-1, x.shape[-1])
            _, idx = route_triton(tokens @ router.T, m["top_k"], m["gate"])
            results[f"{name}__idx"] = idx.numpy()
    # MoEMLP(dispatch="triton") against dispatch="dense" on the same weights.
    for gate in ("softmax_topk", "raw_logits"):
        dense = MoEMLP(16, 24, 3, 2, gate, "dense").eval()
        with torch.no_grad():
            dense.b1.normal_(0, 0.1)
            dense.b2.normal_(0, 0.1)
        fused = MoEMLP(16, 24, 3, 2, gate, "triton").eval()
        fused.load_state_dict(dense.state_dict())
        x = torch.randn(2, 37, 16)
        with torch.no_grad():
            results[f"layer-{gate}__dense"] = dense(x).numpy()
            results[f"layer-{gate}__triton"] = fused(x).numpy()
            results[f"layer-{gate}__last_idx"] = fused.last.top_idx.numpy()
            results[f"layer-{gate}__route_idx"] = route(dense.router(x.reshape(-1, 16)), 2, gate)[
                1
            ].numpy()
    np.savez(out, **results)


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_triton_op_matches_numpy_reference(triton_out, name):
    from engine.ops import topk_moe_reference
    from engine.ops.reference import topk_select

    case = CASES[name]
    inputs = _inputs(case)
    ref = topk_moe_reference(*inputs, top_k=case["top_k"], gate=case["gate"])
    got = triton_out[f"{name}__y"]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    x, router = (a.astype(np.float64) for a in inputs[:2])
    _, ref_idx = topk_select(x.reshape(-1, D) @ router.T, case["top_k"])
    np.testing.assert_array_equal(triton_out[f"{name}__idx"], ref_idx)  # tie rule included
    if case["dtype"] == "float32":
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=1e-2, atol=5e-3)


def test_cases_cover_what_they_claim():
    from engine.ops.reference import topk_select

    for name, case in CASES.items():
        x, router = (case["arrays"][a] for a in ("x", "router"))
        logits = x.reshape(-1, D) @ router.T
        _, idx = topk_select(logits, case["top_k"])
        if name.startswith("empty-expert"):
            assert 3 not in idx and set(np.unique(idx)) == {0, 1, 2}
        if name.startswith("ties"):
            assert (logits[:, 0] == logits[:, 1]).all()
            # the tie is decided at least once (both tied experts would not fit in the top-k)
            assert (idx == 0).any() and ((idx == 1).sum() < (idx == 0).sum())
        if name == "all-tied-n3k2":
            assert idx.tolist() == [[0, 1]] * len(idx)


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("gate", ["softmax_topk", "raw_logits"])
def test_moemlp_triton_dispatch_equals_dense(triton_out, gate):
    np.testing.assert_allclose(
        triton_out[f"layer-{gate}__triton"],
        triton_out[f"layer-{gate}__dense"],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        triton_out[f"layer-{gate}__last_idx"], triton_out[f"layer-{gate}__route_idx"]
    )


def test_triton_dispatch_is_inference_only():
    # Raised before triton is imported, so it holds with or without triton installed.
    import torch

    from trainer.models.moe import MoEMLP

    m = MoEMLP(16, 24, 3, 2, dispatch="triton")
    with pytest.raises(RuntimeError, match="inference only"):
        m(torch.randn(4, 16))
    with pytest.raises(ValueError, match="unknown dispatch"):
        MoEMLP(16, 24, 3, 2, dispatch="fused")


def test_triton_dispatch_unregistered_says_what_to_import(monkeypatch):
    # The trainer does not import the engine: until engine.ops.triton_moe is imported (it
    # registers the op), a "triton" layer says so in one line.
    import torch

    from trainer.models import moe

    monkeypatch.delitem(moe._FUSED, "triton", raising=False)
    m = moe.MoEMLP(16, 24, 3, 2, dispatch="triton").eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="import engine.ops.triton_moe"):
        m(torch.randn(4, 16))
    with pytest.raises(ValueError, match="unknown fused dispatch"):
        moe.register_dispatch("sparse", moe.route, moe.moe_dense)


def test_torch_backend_dispatch_choice_on_cpu():
    import torch

    from engine.backends import BackendError
    from engine.backends.torch_backend import choose_dispatch

    cpu = torch.device("cpu")
    assert choose_dispatch(cpu) == "dense"
    assert choose_dispatch(cpu, "sparse") == "sparse"
    with pytest.raises(BackendError, match="needs a CUDA device"):
        choose_dispatch(cpu, "triton")
    with pytest.raises(BackendError, match="unknown MoE dispatch"):
        choose_dispatch(cpu, "fused")


def test_bench_cli_and_gpu_benchmark_arguments():
    import torch

    from app.cli import build_parser

    args = build_parser().parse_args(["bench", "embed", "--backend", "torch"])
    assert args.moe_dispatch == "auto"
    args = build_parser().parse_args(["bench", "embed", "--moe-dispatch", "sparse"])
    assert args.moe_dispatch == "sparse"

    spec = importlib.util.spec_from_file_location("gpu_moe", REPO / "benchmarks" / "gpu_moe.py")
    gpu_moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_moe)
    a = gpu_moe.parse_args([])
    assert (a.model, a.batch, a.dtype, a.dispatches) == (
        "facemoe-swin-b",
        256,
        "fp16",
        ["triton", "sparse", "dense"],
    )
    with pytest.raises(SystemExit):
        gpu_moe.parse_args(["--dispatch", "fused"])
    if not torch.cuda.is_available():
        assert gpu_moe.main(["--dispatch", "dense"]) == 2  # one-line "needs a CUDA GPU"


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
