"""Triton SwiGLU / GeGLU (interpreter) against the float64 reference, forward and backward.

Tolerance policy as in the other op tests: the kernel's error against float64 may be at most twice the error the
reference math makes in the input's dtype, plus a small atol; every Triton test checks the kernels launched.
"""
from __future__ import annotations

import os

import pytest
import torch

import llmfast
from llmfast.nn import GeGLUMLP, SwiGLUMLP
from llmfast.reference import swiglu as ref

# exp() of a huge gate overflows to inf inside the kernels by design (the activations saturate, see ops/swiglu.py).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DEVICE = torch.device(os.environ.get("LLMFAST_TEST_DEVICE", "cpu"))
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, BF16, F32]
ATOL = {F16: 1e-3, BF16: 2e-3, F32: 1e-5}
# (name, llmfast call, reference call, kernel name prefix)
OPS = {
    "swiglu": (lambda g, u: llmfast.swiglu(g, u), ref.swiglu, "silu_gated"),
    "geglu": (lambda g, u: llmfast.geglu(g, u), ref.geglu, "gelu_gated"),
    "geglu_tanh": (lambda g, u: llmfast.geglu(g, u, approximate="tanh"),
                   lambda g, u: ref.geglu(g, u, "tanh"), "gelu_tanh_gated"),
}


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def assert_within_policy(what, got, want64, lowp, dtype):
    assert got.dtype == lowp.dtype and got.shape == want64.shape, (what, got.dtype, got.shape)
    err, base = _max_error(got, want64), _max_error(lowp, want64)
    assert err <= 2 * base + ATOL[dtype], f"{what}: error {err:.3g} > 2 x torch-math error {base:.3g} + {ATOL[dtype]}"


def launches(kernel: str) -> int:
    return llmfast.kernel_launch_counts().get(kernel, 0)


def check(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    fn, ref_fn, kernel = OPS[op]
    dtype = gate.dtype
    # The upstream gradient is representable in the tested dtype, so float64 and the kernels see the same one.
    dy = torch.randn(gate.shape, device=DEVICE).to(dtype).double()
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate, up))
    want = ref_fn(g64, u64)
    want.backward(dy)
    gl, ul = (t.detach().clone().requires_grad_() for t in (gate, up))
    lowp = ref_fn(gl, ul)
    lowp.backward(dy.to(dtype))
    gk, uk = (t.detach().clone().requires_grad_() for t in (gate, up))
    before_f, before_b = launches(f"{kernel}_fwd"), launches(f"{kernel}_bwd")
    with llmfast.backend("triton"):
        got = fn(gk, uk)
        got.backward(dy.to(dtype))
    assert launches(f"{kernel}_fwd") == before_f + 1 and launches(f"{kernel}_bwd") == before_b + 1
    assert_within_policy("out", got.detach(), want.detach(), lowp.detach(), dtype)
    assert_within_policy("d_gate", gk.grad, g64.grad, gl.grad, dtype)
    assert_within_policy("d_up", uk.grad, u64.grad, ul.grad, dtype)


def rand(*shape, dtype=F32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(1,), (1, 1), (7, 131), (2, 3, 67), (257,)])
def test_matches_reference(shape, op, dtype):
    # Gate values up to about +-12: both saturated tails of the activations and the curved middle.
    check(op, rand(*shape, dtype=dtype, scale=4.0), rand(*shape, dtype=dtype))


@pytest.mark.parametrize("op", list(OPS))
def test_long_row(op, monkeypatch):
    """70 001 columns: a row of many blocks, the last one partial (the GPU's 1024-wide blocks: the interpreter's
    64-wide ones would take a minute here)."""
    monkeypatch.setenv("LLMFAST_CONFIG_ARCH", "sm90")
    check(op, rand(1, 70_001, dtype=BF16, scale=4.0), rand(1, 70_001, dtype=BF16))


@pytest.mark.parametrize("op", list(OPS))
def test_extreme_gates(op):
    """Huge gates: silu/gelu saturate (exp overflows to inf inside the kernels) without NaN."""
    gate = torch.tensor([[-1e4, -100.0, -20.0, -1e-6, 0.0, 1e-6, 20.0, 100.0, 1e4]], device=DEVICE)
    check(op, gate, rand(*gate.shape))


@pytest.mark.parametrize("op", list(OPS))
def test_fused_gate_up_halves_are_read_in_place(op):
    """The two halves of one (..., 2I) projection are strided views: no copy needed, same answer."""
    gate_up = rand(2, 5, 2 * 37, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    check(op, gate, up)
    # Leading dims that fold into no single row stride, and a transposed last dim, are copied first.
    check(op, rand(4, 6, 9).transpose(0, 1), rand(6, 4, 9))
    check(op, rand(5, 8).t(), rand(8, 5))


def test_gpu_tiles_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("LLMFAST_CONFIG_ARCH", "sm80")
    for op in OPS:
        check(op, rand(3, 1500, dtype=BF16, scale=3.0), rand(3, 1500, dtype=BF16))
        assert llmfast._backend.last_launch_config(f"{OPS[op][2]}_fwd")["BLOCK"] == 1024


def test_backends_agree_and_fp64():
    gate, up = rand(3, 10), rand(3, 10)
    for name in ("auto", "reference"):
        with llmfast.backend(name):
            torch.testing.assert_close(llmfast.swiglu(gate, up), ref.swiglu(gate, up))
            torch.testing.assert_close(llmfast.geglu(gate, up, "tanh"), ref.geglu(gate, up, "tanh"))
    with llmfast.backend("triton"):
        got = llmfast.swiglu(gate.double(), up.double())
    torch.testing.assert_close(got, ref.swiglu(gate.double(), up.double()))
    with llmfast.backend("triton"):
        assert llmfast.swiglu(rand(0, 4), rand(0, 4)).shape == (0, 4)


def test_torch_compile_fullgraph():
    def fn(gate, up):
        return (llmfast.swiglu(gate, up) + llmfast.geglu(gate, up, "tanh") + llmfast.geglu(gate, up)).sum()

    compile_backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    gate, up = rand(3, 40).requires_grad_(), rand(3, 40).requires_grad_()
    before = sum(llmfast.kernel_launch_counts().values())
    with llmfast.backend("triton"):
        out = compiled(gate, up)
        out.backward()
    assert sum(llmfast.kernel_launch_counts().values()) == before + 6
    g2, u2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    with llmfast.backend("reference"):
        want = fn(g2, u2)
        want.backward()
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gate.grad, g2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(up.grad, u2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls,kwargs,act", [
    (SwiGLUMLP, {}, lambda g: torch.nn.functional.silu(g)),
    (GeGLUMLP, {}, lambda g: torch.nn.functional.gelu(g, approximate="tanh")),
    (GeGLUMLP, {"approximate": "none"}, lambda g: torch.nn.functional.gelu(g)),
])
def test_mlp_modules_match_the_huggingface_layout(cls, kwargs, act):
    mlp = cls(12, 20, **kwargs).to(DEVICE)
    names = sorted(mlp.state_dict())
    assert names == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    assert mlp.gate_proj.weight.shape == (20, 12) and mlp.down_proj.weight.shape == (12, 20)
    x = rand(2, 3, 12).requires_grad_()
    with llmfast.backend("triton"):
        got = mlp(x)
    want = mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, wx, atol=1e-5, rtol=1e-5)
    assert sorted(cls(4, 6, bias=True, **kwargs).state_dict()) == [
        "down_proj.bias", "down_proj.weight", "gate_proj.bias", "gate_proj.weight", "up_proj.bias",
        "up_proj.weight"]


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
@pytest.mark.parametrize("make,error,match", [
    (lambda: llmfast.swiglu(rand(3, 4), rand(3, 5)), ValueError, "gate and up must have the same shape"),
    (lambda: llmfast.geglu(rand(3, 4), rand(4, 3)), ValueError, "same shape"),
    (lambda: llmfast.swiglu(rand(3, 4), rand(3, 4, dtype=F16)), TypeError, "share one dtype"),
    (lambda: llmfast.swiglu(torch.ones(3, 4, dtype=torch.int32), torch.ones(3, 4, dtype=torch.int32)),
     TypeError, "gate must have dtype"),
    (lambda: llmfast.swiglu(rand(3, 4), torch.ones(3, 4, dtype=torch.int64)), TypeError, "up must have dtype"),
    (lambda: llmfast.swiglu([1.0], rand(1)), TypeError, "gate must be a torch.Tensor"),
    (lambda: llmfast.geglu(rand(3, 4), rand(3, 4), approximate="fast"), ValueError, "approximate"),
])
def test_bad_input(backend, make, error, match):
    with llmfast.backend(backend), pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_every_launchable_config_is_compile_checked(arch):
    from llmfast.ops import swiglu as ops

    specs = [s for s in ops.compile_specs() if s.arches == (int(arch[2:]),)]
    for kind in ("fwd", "bwd"):
        for activation in ops.ACTIVATIONS:
            for t in ("bf16", "fp16", "fp32"):
                cfg = ops.GATED_CONFIGS[arch][kind]
                assert any(s.kernel == f"{activation}_gated_{kind}" and s.config == f"{kind}_{t}"
                           and s.launch_args["BLOCK"] == cfg["BLOCK"] and s.num_warps == cfg["num_warps"]
                           for s in specs)
