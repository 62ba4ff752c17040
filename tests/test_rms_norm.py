"""Triton RMSNorm (interpreter) against the float64 reference, forward and backward.

Tolerance policy (flash-attn's): the kernel's error against the float64 reference may be at most twice the error
the same reference math makes when run in the input's dtype, plus a small atol.
"""
import os

import pytest
import torch

import llmfast
from llmfast import _backend
from llmfast.nn import RMSNorm
from llmfast.ops import _norm
from llmfast.reference import rms_norm as ref

# cpu (the Triton interpreter) by default; cuda under ``python -m llmfast.gpu_report``.
DEVICE = torch.device(os.environ.get("LLMFAST_TEST_DEVICE", "cpu"))
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN positions differ"
    diff = torch.where(got == want, torch.zeros_like(got), (got - want).abs())[~torch.isnan(want)]
    return diff.max().item() if diff.numel() else 0.0


def assert_within_policy(what: str, got, want64, lowp, dtype) -> None:
    err, base = _max_error(got, want64), _max_error(lowp, want64)
    assert err <= 2 * base + ATOL[dtype], f"{what}: error {err:.3g} > 2 x torch-math error {base:.3g} + {ATOL[dtype]}"


def run(fn, tensors, view, grads, **kw):
    """fn(*views of fresh leaves, **kw); backward with ``grads``; returns (outputs, leaf grads)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    x, w, r = (None if t is None else (view(t) if i != 1 else t) for i, t in enumerate(leaves))
    out = fn(x, w, residual=r, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    return [o.detach() for o in outs], [None if t is None else t.grad for t in leaves]


def triton_rms_norm(*args, **kw):
    with llmfast.backend("triton"):
        return llmfast.rms_norm(*args, **kw)


def check(x, weight=None, residual=None, *, eps=1e-6, offset=0.0, view=lambda t: t):
    """Outputs and gradients (x, weight, residual) of the Triton path vs the reference in float64 and x's dtype."""
    dtype = x.dtype
    shape = view(x).shape
    n_out = 2 if residual is not None else 1
    grads = [torch.randn(shape, dtype=torch.float64, device=DEVICE) for _ in range(n_out)]
    tensors = [x, weight, residual]
    kw = dict(eps=eps, offset=offset)
    want, want_grads = run(ref.rms_norm, [None if t is None else t.double() for t in tensors], view, grads, **kw)
    lowp, lowp_grads = run(ref.rms_norm, tensors, view, grads, **kw)
    got, got_grads = run(triton_rms_norm, tensors, view, grads, **kw)
    for name, g, w64, lp in zip(("y", "h"), got, want, lowp):
        assert g.dtype == lp.dtype and g.shape == lp.shape, name
        assert_within_policy(name, g, w64, lp, dtype)
    for name, g, w64, lp in zip(("dx", "dweight", "dresidual"), got_grads, want_grads, lowp_grads):
        if g is not None:
            assert g.dtype == lp.dtype
            assert_within_policy(name, g, w64, lp, dtype)
    return got


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def launched(op: str, n_cols: int) -> dict[str, int]:
    """The kernel launches one forward + backward makes on DEVICE's configs (single-pass or looped)."""
    configs = _norm._configs(DEVICE)
    return {f"{op}_{kind}{'_looped' if _norm.pick_tile(n_cols, configs, kind == 'bwd')[2] else ''}": 1
            for kind in ("fwd", "bwd")}


SHAPES = [(1, 1), (3, 2), (5, 7), (2, 3, 97), (4, 1000), (33, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_residual_and_offset_match_reference(shape, dtype):
    _backend.reset_kernel_launch_counts()
    check(rand(*shape, dtype=dtype), rand(shape[-1], dtype=dtype), rand(*shape, dtype=dtype), offset=0.5)
    assert llmfast.kernel_launch_counts() == launched("rms_norm", shape[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 97), (2, 4, 257)], ids=str)
def test_plain_matches_reference(shape, dtype):
    check(rand(*shape, dtype=dtype) * 3, rand(shape[-1], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_without_weight(dtype):
    check(rand(6, 45, dtype=dtype))
    check(rand(3, 45, dtype=dtype), None, rand(3, 45, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 1031), (1, 70_001), (5, 1500)], ids=str)
def test_long_rows_loop(shape, dtype):
    _backend.reset_kernel_launch_counts()
    check(rand(*shape, dtype=dtype), rand(shape[-1], dtype=dtype), rand(*shape, dtype=dtype), offset=1.0)
    assert llmfast.kernel_launch_counts() == launched("rms_norm", shape[-1])


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("shape,kernel", [((3, 4096), "rms_norm_fwd"), ((2, 8192), "rms_norm_fwd"),
                                          ((1, 20_000), "rms_norm_fwd_looped"),
                                          ((1, 131_072), "rms_norm_bwd_looped")], ids=str)
def test_gpu_tiles(monkeypatch, arch, shape, kernel):
    """The tiles a GPU launches (one row per program, 4096-16384 columns), numerically in the interpreter."""
    monkeypatch.setenv("LLMFAST_CONFIG_ARCH", arch)
    _backend.reset_kernel_launch_counts()
    check(rand(*shape, dtype=torch.bfloat16), rand(shape[-1], dtype=torch.bfloat16),
          rand(*shape, dtype=torch.bfloat16))
    assert llmfast.kernel_launch_counts()[kernel] == 1
    launch = _backend.last_launch_config(kernel)  # the variable really picked the GPU tiles (interpreter's: <= 1024)
    assert launch["arch"] == arch and launch["BLOCK_C"] >= 4096


def test_leading_shapes():
    check(rand(37), rand(37))                                  # 1-d: one row
    check(rand(2, 3, 5, 33, dtype=torch.float16), rand(33, dtype=torch.float16))
    check(rand(1, 1, 1, 3), rand(3), rand(1, 1, 1, 3))


@pytest.mark.parametrize("view", [
    lambda t: t[..., ::2],              # strided columns, rows still one level: read in place
    lambda t: t.transpose(0, 1),        # leading dims that do not merge: copied
    lambda t: t[:, ::3, 1::2],          # both
], ids=["strided_cols", "transposed", "sliced"])
def test_non_contiguous_inputs(view):
    base = rand(6, 10, 66)
    n = view(base).shape[-1]
    check(base, rand(n), rand(6, 10, 66), view=view, offset=0.25)


def test_strided_weight_and_broadcast_input():
    check(rand(5, 40), rand(80)[::2], rand(5, 40))           # a weight viewed with stride 2
    base = rand(1, 40)
    check(base, rand(40), view=lambda t: t.expand(6, 40))   # stride-0 rows


def test_expanded_gradient():
    # sum() hands backward a stride-0 gradient
    x = rand(7, 40).requires_grad_()
    w = rand(40).requires_grad_()
    with llmfast.backend("triton"):
        llmfast.rms_norm(x, w).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref.rms_norm(x64, w64).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w64.grad.float(), atol=1e-5, rtol=1e-5)


def test_frozen_weight():
    x, w = rand(6, 30).requires_grad_(), rand(30)  # w does not require grad: no weight gradient is computed
    with llmfast.backend("triton"):
        llmfast.rms_norm(x, w, offset=1.0).pow(2).sum().backward()
    x64 = x.detach().double().requires_grad_()
    ref.rms_norm(x64, w.double(), offset=1.0).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-5, rtol=1e-5)
    assert w.grad is None


def test_only_h_used_downstream():
    x, r = rand(4, 20).requires_grad_(), rand(4, 20).requires_grad_()
    with llmfast.backend("triton"):
        _, h = llmfast.rms_norm(x, rand(20), residual=r)
    h.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    torch.testing.assert_close(r.grad, torch.ones_like(r))


def test_weight_of_another_dtype_promotes_like_hugging_face():
    x, w = rand(5, 64, dtype=torch.bfloat16), rand(64)
    got = check(x, w)[0]
    assert got.dtype == torch.float32  # HF: fp32 weight * bf16 normalized -> fp32


def llama_rms_norm(x, weight, eps):
    """Hugging Face's LlamaRMSNorm.forward, verbatim in substance."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bitwise_hugging_face_llama(dtype):
    x, w = rand(16, 300, dtype=dtype) * 2, rand(300, dtype=dtype)
    want = llama_rms_norm(x, w, 1e-6)
    with llmfast.backend("triton"):
        got = llmfast.rms_norm(x, w, 1e-6)
    # fp32 rsqrt may differ from torch's in the last bit, which can flip a rounding of n now and then.
    assert (got != want).float().mean().item() < 0.01
    torch.testing.assert_close(got, want, atol=0, rtol=2 ** -6)
    if DEVICE.type == "cpu":
        assert torch.equal(llmfast.rms_norm(x, w, 1e-6), want)  # auto on the CPU: torch's math, same order


def test_gemma_offset():
    x, w = rand(4, 50), rand(50) * 0.1
    with llmfast.backend("triton"):
        got = llmfast.rms_norm(x, w, 1e-6, offset=1.0)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_backends_agree():
    x, w, r = rand(3, 5, 48, dtype=torch.bfloat16), rand(48, dtype=torch.bfloat16), rand(3, 5, 48,
                                                                                        dtype=torch.bfloat16)
    with llmfast.backend("reference"):
        want = llmfast.rms_norm(x, w, offset=1.0, residual=r)
    auto = llmfast.rms_norm(x, w, offset=1.0, residual=r)  # CPU: torch-native path
    with llmfast.backend("triton"):
        got = llmfast.rms_norm(x, w, offset=1.0, residual=r)
    for a, b, c in zip(want, auto, got):
        if DEVICE.type == "cpu":  # auto: torch's math in the reference's order
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-2, rtol=1e-2)


def test_float64_and_empty_go_through_torch():
    x = torch.randn(4, 10, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, device=DEVICE, requires_grad=True)
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        y = llmfast.rms_norm(x, w)
        empty = llmfast.rms_norm(rand(0, 10), rand(10))
    assert llmfast.kernel_launch_counts() == {}
    torch.testing.assert_close(y, ref.rms_norm(x, w))
    torch.autograd.gradcheck(lambda x, w: llmfast.rms_norm(x, w), (x, w))
    assert empty.shape == (0, 10)


def test_weight_gradient_is_deterministic():
    x, w = rand(300, 40, dtype=torch.bfloat16), rand(40)
    grads = []
    for _ in range(2):
        wl = w.clone().requires_grad_()
        with llmfast.backend("triton"):
            llmfast.rms_norm(x, wl).float().pow(2).sum().backward()
        grads.append(wl.grad)
    assert torch.equal(grads[0], grads[1])


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(24)

        def forward(self, x, r):
            y, h = self.norm(x, r)
            return y * 2 + h

    torch._dynamo.reset()
    block = Block().to(DEVICE)
    block.norm.weight.data = rand(24)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, r = rand(3, 5, 24).requires_grad_(), rand(3, 5, 24).requires_grad_()
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        out = compiled(x, r)
        out.sum().backward()
    assert llmfast.kernel_launch_counts() == launched("rms_norm", 24)
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    w64 = block.norm.weight.detach().double().requires_grad_()
    y64, h64 = ref.rms_norm(x64, w64, 1e-6, residual=r64)
    (y64 * 2 + h64).sum().backward()
    torch.testing.assert_close(out, (y64 * 2 + h64).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.grad, r64.grad.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block.norm.weight.grad, w64.grad.float(), atol=1e-5, rtol=1e-5)


def test_torch_compile_dynamic_shapes():
    def f(x, w, r):
        y, h = llmfast.rms_norm(x, w, residual=r)
        return y * h

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    with llmfast.backend("triton"):
        for shape in [(3, 5, 24), (2, 7, 24), (4, 24)]:
            x, w, r = rand(*shape).requires_grad_(), rand(24).requires_grad_(), rand(*shape)
            out = compiled(x, w, r)
            out.sum().backward()
            torch.testing.assert_close(out, f(x.detach(), w.detach(), r), atol=0, rtol=0)
            assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_module_state_matches_hugging_face():
    norm = RMSNorm(16, eps=1e-5, device=DEVICE)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    assert norm.variance_epsilon == norm.eps == 1e-5
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    norm.load_state_dict({"weight": torch.arange(16.0)})
    x = rand(2, 16)
    torch.testing.assert_close(norm(x), llama_rms_norm(x, norm.weight.detach(), 1e-5))
    gemma = RMSNorm(16, offset=1.0, device=DEVICE)
    assert torch.equal(gemma.weight, torch.zeros_like(gemma.weight))
    torch.testing.assert_close(gemma(x), RMSNorm(16, device=DEVICE)(x))
    y, h = norm(x, x)
    torch.testing.assert_close(h, 2 * x)
    assert "offset=1.0" in repr(gemma)


def test_module_fused_add_under_autocast_promotes_like_the_unfused_sum():
    """Under autocast a block's 16-bit output meets the fp32 residual stream: the fused add promotes to fp32, as
    ``x + residual`` would (outside autocast mixed dtypes stay an error, below)."""
    norm = RMSNorm(16, device=DEVICE)
    x16, residual = rand(3, 16).to(torch.bfloat16), rand(3, 16)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y, h = norm(x16, residual)
    want_h = x16.float() + residual
    assert h.dtype == torch.float32 and torch.equal(h, want_h)
    torch.testing.assert_close(y, llama_rms_norm(want_h, norm.weight.detach(), norm.eps))


@pytest.mark.parametrize("call,exc,words", [
    (lambda: llmfast.rms_norm(rand(4, 8), rand(7)), ValueError, ["weight", "(8,)", "(7,)"]),
    (lambda: llmfast.rms_norm(rand(4, 8), rand(2, 4)), ValueError, ["weight", "(2, 4)"]),
    (lambda: llmfast.rms_norm(torch.ones(4, 8, dtype=torch.int32, device=DEVICE), rand(8)), TypeError, ["x", "int32"]),
    (lambda: llmfast.rms_norm(rand(4, 8), torch.ones(8, dtype=torch.int64, device=DEVICE)), TypeError,
     ["weight", "int64"]),
    (lambda: llmfast.rms_norm([1.0, 2.0], rand(2)), TypeError, ["x", "list"]),
    (lambda: llmfast.rms_norm(torch.tensor(1.0), rand(1)), ValueError, ["x", "0-d"]),
    (lambda: llmfast.rms_norm(rand(4, 8), rand(8), -1e-6), ValueError, ["eps", ">= 0"]),
    (lambda: llmfast.rms_norm(rand(4, 8), rand(8), "1e-6"), TypeError, ["eps", "str"]),
    (lambda: llmfast.rms_norm(rand(4, 8), rand(8), offset=float("nan")), ValueError, ["offset", "finite"]),
    (lambda: llmfast.rms_norm(rand(4, 8), rand(8), residual=rand(4, 9)), ValueError, ["residual", "(4, 9)"]),
    (lambda: llmfast.rms_norm(rand(4, 8), rand(8), residual=rand(4, 8, dtype=torch.float16)), TypeError,
     ["residual", "float16"]),
    (lambda: llmfast.rms_norm(rand(4, 8), None, offset=1.0), ValueError, ["offset", "weight"]),
    (lambda: RMSNorm(0), ValueError, ["hidden_size", "0"]),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_tiles_cover_every_width():
    for arch, configs in _norm.NORM_CONFIGS.items():
        for backward in (False, True):
            limit = configs.max_single_pass_bwd if backward else configs.max_single_pass
            for n in (1, 15, 16, 17, 1000, limit, limit + 1):
                name, tile, looped = _norm.pick_tile(n, configs, backward)
                assert looped == (n > limit), (arch, n)
                assert looped or tile.block_c >= n
