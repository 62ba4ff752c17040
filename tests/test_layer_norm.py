"""Triton LayerNorm (interpreter) against the float64 reference and torch.nn.functional.layer_norm.

Tolerance policy (flash-attn's): the kernel's error against the float64 reference may be at most twice the error
the same reference math makes when run in the input's dtype, plus a small atol.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast import _backend
from llmfast.nn import LayerNorm
from llmfast.ops import _norm
from llmfast.reference import layer_norm as ref

# cpu (the Triton interpreter) by default; cuda under ``python -m llmfast.gpu_report``.
DEVICE = torch.device(os.environ.get("LLMFAST_TEST_DEVICE", "cpu"))
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN positions differ"
    diff = torch.where(got == want, torch.zeros_like(got), (got - want).abs())[~torch.isnan(want)]
    return diff.max().item() if diff.numel() else 0.0


def assert_within_policy(what: str, got, want64, lowp, dtype, scale: float = 1.0) -> None:
    err, base = _max_error(got, want64), _max_error(lowp, want64)
    atol = ATOL[dtype] * scale
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 x torch-math error {base:.3g} + {atol}"


def run(fn, tensors, view, grad, shape, eps):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    x, w, b = leaves
    out = fn(view(x), shape, w, b, eps)
    out.backward(grad.to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def triton_layer_norm(*args):
    with llmfast.backend("triton"):
        return llmfast.layer_norm(*args)


def check(x, shape, weight=None, bias=None, *, eps=1e-5, view=lambda t: t, scale=1.0):
    """Output and gradients (x, weight, bias) of the Triton path vs the reference in float64 and x's dtype."""
    dtype = x.dtype
    grad = torch.randn(view(x).shape, dtype=torch.float64, device=DEVICE)
    tensors = [x, weight, bias]
    want, want_grads = run(ref.layer_norm, [None if t is None else t.double() for t in tensors], view, grad, shape,
                           eps)
    lowp, lowp_grads = run(ref.layer_norm, tensors, view, grad, shape, eps)
    got, got_grads = run(triton_layer_norm, tensors, view, grad, shape, eps)
    assert got.dtype == dtype and got.shape == lowp.shape
    assert_within_policy("y", got, want, lowp, dtype, scale)
    for name, g, w64, lp in zip(("dx", "dweight", "dbias"), got_grads, want_grads, lowp_grads):
        if g is not None:
            assert g.dtype == lp.dtype
            assert_within_policy(name, g, w64, lp, dtype, scale)
    return got


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def launched(op: str, n_cols: int) -> dict[str, int]:
    """The kernel launches one forward + backward makes on DEVICE's configs (single-pass or looped)."""
    configs = _norm._configs(DEVICE)
    return {f"{op}_{kind}{'_looped' if _norm.pick_tile(n_cols, configs, kind == 'bwd')[2] else ''}": 1
            for kind in ("fwd", "bwd")}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (5, 7), (2, 3, 97), (4, 1000), (33, 16)], ids=str)
def test_matches_reference(shape, dtype):
    _backend.reset_kernel_launch_counts()
    n = shape[-1]
    check(rand(*shape, dtype=dtype) * 2 + 0.5, n, rand(n, dtype=dtype), rand(n, dtype=dtype))
    assert llmfast.kernel_launch_counts() == launched("layer_norm", n)


@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
def test_optional_affine(affine):
    n = 45
    w = rand(n, dtype=torch.bfloat16) if affine == "weight" else None
    b = rand(n, dtype=torch.bfloat16) if affine == "bias" else None
    check(rand(6, n, dtype=torch.bfloat16), n, w, b)


def test_normalized_shape_of_several_dims():
    check(rand(3, 4, 5, 6), (5, 6), rand(5, 6), rand(5, 6))
    check(rand(2, 3, 7, dtype=torch.float16), [3, 7], rand(3, 7, dtype=torch.float16))
    check(rand(4, 9), torch.Size([4, 9]), rand(4, 9), rand(4, 9))  # every dim normalized: one row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 1031), (1, 70_001), (5, 1500)], ids=str)
def test_long_rows_loop(shape, dtype):
    _backend.reset_kernel_launch_counts()
    n = shape[-1]
    check(rand(*shape, dtype=dtype), n, rand(n, dtype=dtype), rand(n, dtype=dtype))
    assert llmfast.kernel_launch_counts() == launched("layer_norm", n)


@pytest.mark.parametrize("n", [500, 3000], ids=lambda n: f"n{n}")
def test_large_mean_does_not_cancel_the_variance(n):
    # mean 1e4, spread 1: E[x^2] - E[x]^2 in fp32 would lose every digit; both paths centre first / use Welford
    x = rand(3, n) + 1e4
    y = check(x, n, rand(n), rand(n))
    assert y.std() > 0.5


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("shape,kernel", [((3, 4096), "layer_norm_fwd"), ((1, 20_000), "layer_norm_fwd_looped")],
                         ids=str)
def test_gpu_tiles(monkeypatch, arch, shape, kernel):
    monkeypatch.setenv("LLMFAST_CONFIG_ARCH", arch)
    _backend.reset_kernel_launch_counts()
    n = shape[-1]
    check(rand(*shape, dtype=torch.bfloat16), n, rand(n, dtype=torch.bfloat16), rand(n, dtype=torch.bfloat16))
    assert llmfast.kernel_launch_counts()[kernel] == 1
    launch = _backend.last_launch_config(kernel)  # the variable really picked the GPU tiles (interpreter's: <= 1024)
    assert launch["arch"] == arch and launch["BLOCK_C"] >= 4096


@pytest.mark.parametrize("view", [
    lambda t: t[..., ::2],
    lambda t: t.transpose(0, 1),
    lambda t: t[:, ::3, 1::2],
], ids=["strided_cols", "transposed", "sliced"])
def test_non_contiguous_inputs(view):
    base = rand(6, 10, 66)
    n = view(base).shape[-1]
    check(base, n, rand(n), rand(n), view=view)


def test_strided_parameters_and_broadcast_input():
    check(rand(5, 3, 8), (3, 8), rand(8, 3).t(), rand(3, 16)[:, ::2])  # non-contiguous weight and bias
    check(rand(1, 40), 40, rand(40), rand(40), view=lambda t: t.expand(6, 40))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch(dtype):
    x, w, b = rand(8, 300, dtype=dtype), rand(300, dtype=dtype), rand(300, dtype=dtype)
    with llmfast.backend("triton"):
        got = llmfast.layer_norm(x, (300,), w, b, 1e-5)
    want = F.layer_norm(x.float(), (300,), w.float(), b.float(), 1e-5).to(dtype)
    torch.testing.assert_close(got, want)


def test_weight_of_another_dtype():
    x, w, b = rand(5, 64, dtype=torch.bfloat16), rand(64), rand(64)
    got = check(x, 64, w, b)
    assert got.dtype == torch.bfloat16  # torch: output in the input's dtype


def test_backends_agree():
    x, w, b = rand(3, 5, 48), rand(48), rand(48)
    with llmfast.backend("reference"):
        want = llmfast.layer_norm(x, 48, w, b)
    auto = llmfast.layer_norm(x, 48, w, b)  # CPU: torch's F.layer_norm; CUDA: the kernels
    with llmfast.backend("triton"):
        got = llmfast.layer_norm(x, 48, w, b)
    torch.testing.assert_close(auto, want)
    torch.testing.assert_close(got, want)


def test_float64_goes_through_torch():
    x = torch.randn(4, 10, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, device=DEVICE, requires_grad=True)
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        torch.autograd.gradcheck(lambda x, w: llmfast.layer_norm(x, 10, w), (x, w))
    assert llmfast.kernel_launch_counts() == {}


def test_gradients_are_deterministic():
    x, w, b = rand(300, 40, dtype=torch.bfloat16), rand(40), rand(40)
    grads = []
    for _ in range(2):
        wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
        with llmfast.backend("triton"):
            llmfast.layer_norm(x, 40, wl, bl).float().pow(2).sum().backward()
        grads.append((wl.grad, bl.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    norm = LayerNorm((3, 8), device=DEVICE)
    norm.weight.data, norm.bias.data = rand(3, 8), rand(3, 8)
    compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")
    x = rand(5, 3, 8).requires_grad_()
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        out = compiled(x)
        (out * out).sum().backward()
    assert llmfast.kernel_launch_counts() == launched("layer_norm", 24)
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (norm.weight, norm.bias))
    want = ref.layer_norm(x64, (3, 8), w64, b64)
    (want * want).sum().backward()
    torch.testing.assert_close(out, want.float(), atol=1e-5, rtol=1e-5)
    for got, exact in ((x.grad, x64.grad), (norm.weight.grad, w64.grad), (norm.bias.grad, b64.grad)):
        torch.testing.assert_close(got, exact.float(), atol=1e-5, rtol=1e-5)


def test_torch_compile_dynamic_shapes():
    def f(x, w, b):
        return llmfast.layer_norm(x, x.shape[-1], w, b)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    with llmfast.backend("triton"):
        for shape in [(3, 5, 24), (2, 7, 24), (4, 24)]:
            x, w, b = rand(*shape).requires_grad_(), rand(24).requires_grad_(), rand(24).requires_grad_()
            out = compiled(x, w, b)
            out.pow(2).sum().backward()
            torch.testing.assert_close(out, f(x.detach(), w.detach(), b.detach()), atol=0, rtol=0)
            assert x.grad.shape == x.shape and b.grad.shape == b.shape


@pytest.mark.parametrize("kw", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_module_is_a_drop_in(kw):
    theirs = torch.nn.LayerNorm(32, device=DEVICE, **kw)
    ours = LayerNorm(32, device=DEVICE, **kw)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for p in theirs.parameters():
        p.data.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert (ours.normalized_shape, ours.eps, ours.elementwise_affine) == (
        theirs.normalized_shape, theirs.eps, theirs.elementwise_affine)
    x = rand(4, 32)
    with llmfast.backend("triton"):
        got = ours(x)
    torch.testing.assert_close(got, theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: llmfast.layer_norm(rand(4, 8), 7), ValueError, ["normalized_shape", "(7,)", "(4, 8)"]),
    (lambda: llmfast.layer_norm(rand(4, 8), (2, 4, 8)), ValueError, ["normalized_shape"]),
    (lambda: llmfast.layer_norm(rand(4, 8), ()), ValueError, ["normalized_shape", "()"]),
    (lambda: llmfast.layer_norm(rand(4, 8), 8.0), TypeError, ["normalized_shape", "8.0"]),
    (lambda: llmfast.layer_norm(rand(4, 8), True), TypeError, ["normalized_shape", "bool"]),
    (lambda: llmfast.layer_norm(rand(4, 8), 8, rand(7)), ValueError, ["weight", "(8,)", "(7,)"]),
    (lambda: llmfast.layer_norm(rand(4, 8), 8, None, rand(2, 4)), ValueError, ["bias", "(2, 4)"]),
    (lambda: llmfast.layer_norm(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), 8), TypeError, ["x", "int64"]),
    (lambda: llmfast.layer_norm(rand(4, 8), 8, torch.ones(8, dtype=torch.bool, device=DEVICE)), TypeError,
     ["weight", "bool"]),
    (lambda: llmfast.layer_norm(rand(4, 8), 8, eps=-1.0), ValueError, ["eps", ">= 0"]),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
