"""Triton softmax, log-softmax and masked softmax (interpreter) against the float64 reference.

Tolerance policy (flash-attn's): the kernel's error against the float64 reference may be at most twice the error
the same reference math makes when run in the input's low-precision dtype, plus a small atol.
"""
import pytest
import torch

import llmfast
from llmfast import _backend
from llmfast.nn import softmax as nn_softmax
from llmfast.ops import softmax as ops
from llmfast.reference import softmax as ref

# Padding lanes of partially filled tiles compute exp(-inf - -inf) in the interpreter (masked out on store).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-6}


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| where both are numbers; NaN positions must agree, equal infinities count as 0."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN positions differ"
    diff = torch.where(got == want, torch.zeros_like(got), (got - want).abs())
    diff = diff[~torch.isnan(want)]
    return diff.max().item() if diff.numel() else 0.0


def assert_within_policy(got: torch.Tensor, want64: torch.Tensor, lowp: torch.Tensor, dtype: torch.dtype) -> None:
    err, base = _max_error(got, want64), _max_error(lowp, want64)
    assert err <= 2 * base + ATOL[dtype], f"error {err:.3g} > 2 x torch-math error {base:.3g} + {ATOL[dtype]}"


def check_op(op: str, x: torch.Tensor, dim: int = -1) -> None:
    """Forward and backward of llmfast.<op> (Triton) against the reference in float64 and in x's dtype."""
    kernel_fn, ref_fn = getattr(llmfast, op), getattr(ref, op)
    grad_out = torch.randn(x.shape, dtype=torch.float64)

    x64 = x.detach().double().requires_grad_()
    want = ref_fn(x64, dim)
    want.backward(grad_out)

    xl = x.detach().clone().requires_grad_()
    lowp = ref_fn(xl, dim)
    lowp.backward(grad_out.to(x.dtype))

    xk = x.detach().clone().requires_grad_()
    with llmfast.backend("triton"):
        got = kernel_fn(xk, dim)
    assert got.dtype == x.dtype and got.shape == x.shape
    got.backward(grad_out.to(x.dtype))

    assert_within_policy(got, want, lowp, x.dtype)
    assert_within_policy(xk.grad, x64.grad, xl.grad, x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 1000), (4, 33), (3, 5, 17), (2, 3000)])
def test_matches_reference(shape, op, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    _backend.reset_kernel_launch_counts()
    check_op(op, x)
    counts = llmfast.kernel_launch_counts()
    assert counts[f"{op}_fwd"] == 1 and counts[f"{op}_bwd"] == 1


@pytest.mark.parametrize("op,shape", [
    ("softmax", (1, 300_000)),     # one long row: split into segments, statistics kernel + looped kernel
    ("log_softmax", (1, 70_001)),
    ("softmax", (4, 20_000)),      # enough rows: one program per row loops twice, no statistics kernel
])
def test_long_rows_loop_online(op, shape):
    x = torch.randn(shape) * 4
    _backend.reset_kernel_launch_counts()
    check_op(op, x)
    counts = llmfast.kernel_launch_counts()
    assert counts[f"{op}_fwd_looped"] == 1 and counts[f"{op}_bwd_looped"] == 1
    segmented = shape[0] < ops.target_programs(x.device)  # LLMFAST_CONFIG_ARCH sets the target
    assert (f"{op}_fwd_looped_stats" in counts) == segmented
    assert (f"{op}_bwd_looped_stats" in counts) == segmented


@pytest.mark.parametrize("shape,dim", [
    ((1000, 7), 0),        # few contiguous rows: row tiles read the column through its stride
    ((300, 40), 0),        # strided tiles (rows contiguous), single pass
    ((3, 50, 20), 1),      # a middle dim
    ((1200, 24), 0),       # strided, looped
    ((4, 6, 5), -3),       # negative dim
])
def test_other_dims(shape, dim):
    check_op("softmax", torch.randn(shape, dtype=torch.bfloat16), dim)
    check_op("log_softmax", torch.randn(shape), dim)


def test_strided_path_runs_in_place_for_other_dims():
    x = torch.randn(300, 40)
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        y = llmfast.softmax(x, 0)
    assert y.stride() == x.stride()  # the output keeps x's layout: no transposed copy was made
    torch.testing.assert_close(y, torch.softmax(x.double(), 0).float())
    assert ops.pick_tile(300, strided=True)[0].startswith("strided")


def test_non_contiguous_inputs_and_gradients():
    base = torch.randn(6, 40, 30)
    x = base.permute(2, 0, 1)[:, ::2, :]  # (30, 3, 40), no dim contiguous in a simple way
    check_op("softmax", x, -1)
    check_op("log_softmax", x, 1)
    # an expanded (stride-0) upstream gradient, as sum() produces
    xk = torch.randn(5, 9, requires_grad=True)
    with llmfast.backend("triton"):
        llmfast.log_softmax(xk, 1).sum().backward()
    xr = xk.detach().double().requires_grad_()
    ref.log_softmax(xr, 1).sum().backward()
    torch.testing.assert_close(xk.grad, xr.grad.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_outliers(dtype):
    x = torch.randn(8, 500) * 2
    x[:, 17] = 60.0
    x[3, 400] = -60.0
    x[5] = torch.linspace(-80, 80, 500)
    check_op("softmax", x.to(dtype))
    check_op("log_softmax", x.to(dtype))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_fp16_extremes(op):
    x = torch.randn(4, 257).half()
    x[0, 3] = 65504.0
    x[1, :] = -65504.0
    x[2, 10] = -65504.0
    x[3, ::2] = 65504.0
    check_op(op, x)
    with llmfast.backend("triton"):
        y = getattr(llmfast, op)(x)
    assert not torch.isnan(y).any()  # fp32 math: x - max never overflows
    if op == "softmax":
        torch.testing.assert_close(y[1].float(), torch.full((257,), 1 / 257), atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("n_cols", [5, 20_000])
def test_special_values_match_torch(n_cols):
    inf, nan = float("inf"), float("nan")
    x = torch.randn(5, n_cols)
    x[0] = -inf                 # all -inf: NaN, as torch
    x[1, : n_cols // 2] = -inf  # some -inf: zeros there
    x[2, 1] = inf               # +inf: NaN
    x[3, 2] = nan               # NaN propagates along the row
    for op in ("softmax", "log_softmax"):
        with llmfast.backend("triton"):
            got = getattr(llmfast, op)(x)
        want = getattr(torch, op)(x.double(), -1)
        assert _max_error(got, want) <= 1e-6, op


def test_scalar_and_empty_inputs():
    with llmfast.backend("triton"):
        assert llmfast.softmax(torch.tensor(3.0)).item() == 1.0
        assert llmfast.log_softmax(torch.tensor(3.0)).item() == 0.0
        assert llmfast.softmax(torch.randn(0, 5)).shape == (0, 5)
        assert llmfast.softmax(torch.randn(4, 0), 1).shape == (4, 0)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="dim out of range"):
        llmfast.softmax(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="dim out of range"):
        llmfast.log_softmax(torch.randn(3, 4), -3)
    with pytest.raises(TypeError, match="x must have dtype"):
        llmfast.softmax(torch.arange(6))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        llmfast.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="dim must be an int"):
        llmfast.softmax(torch.randn(3), 0.5)


def test_backends_dispatch():
    x = torch.randn(4, 33)
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("auto"):  # CPU tensors: torch's kernels
        torch.testing.assert_close(llmfast.softmax(x), torch.softmax(x, -1))
        torch.testing.assert_close(llmfast.masked_softmax(x, causal=True), ref.masked_softmax(x, causal=True))
    with llmfast.backend("reference"):
        torch.testing.assert_close(llmfast.log_softmax(x, 0), ref.log_softmax(x, 0))
    assert llmfast.kernel_launch_counts() == {}
    with llmfast.backend("triton"):
        llmfast.softmax(x)
    assert llmfast.kernel_launch_counts() == {"softmax_fwd": 1}


def test_float64_is_exact():
    x = torch.randn(5, 40, dtype=torch.float64)
    with llmfast.backend("triton"):
        torch.testing.assert_close(llmfast.softmax(x), torch.softmax(x, -1), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# masked_softmax
# ---------------------------------------------------------------------------------------------------------------


def check_masked(x, mask=None, scale=1.0, causal=False, dim=-1, mask_grad=False):
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    needs_mask_grad = mask_grad and mask is not None and mask.is_floating_point()

    def run(xx, mm, fn):
        xx = xx.detach().clone().requires_grad_()
        if needs_mask_grad:
            mm = mm.detach().clone().requires_grad_()
        y = fn(xx, mm, scale, causal, dim)
        y.backward(grad_out.to(y.dtype))
        return y, xx.grad, mm.grad if needs_mask_grad else None

    to64 = (lambda m: m.double() if m.is_floating_point() else m) if mask is not None else (lambda m: None)
    want, want_dx, want_dm = run(x.double(), to64(mask), ref.masked_softmax)
    lowp, lowp_dx, lowp_dm = run(x, mask, ref.masked_softmax)

    def kernel(xx, mm, *args):
        with llmfast.backend("triton"):
            return llmfast.masked_softmax(xx, mm, *args)

    got, got_dx, got_dm = run(x, mask, kernel)
    assert_within_policy(got, want, lowp, x.dtype)
    assert_within_policy(got_dx, want_dx, lowp_dx, x.dtype)
    if needs_mask_grad:
        assert got_dm.shape == mask.shape
        assert_within_policy(got_dm, want_dm, lowp_dm, x.dtype)
    return got, got_dx


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_bool_broadcast_and_scale(dtype):
    b, h, s = 2, 3, 37
    x = torch.randn(b, h, s, s).to(dtype)
    keep = torch.rand(b, 1, s, s) > 0.3
    keep[0, 0, 5] = False  # a fully masked query row
    _backend.reset_kernel_launch_counts()
    got, got_dx = check_masked(x, keep, scale=0.125)
    assert llmfast.kernel_launch_counts()["masked_softmax_fwd"] == 1
    assert (got[0, :, 5] == 0).all() and (got_dx[0, :, 5] == 0).all()


def test_masked_additive_padding_mask_with_gradient():
    x = torch.randn(2, 4, 9, 30)
    add = torch.zeros(2, 1, 1, 30)
    add[1, ..., 20:] = float("-inf")   # padded keys
    add[0, ..., :3] = torch.randn(3)   # a learned bias
    check_masked(x, add, scale=0.3, mask_grad=True)


def test_masked_causal():
    x = torch.randn(3, 12, 20)  # 12 queries, 20 keys: top-left aligned
    got, _ = check_masked(x, causal=True, scale=2.0)
    assert (got[:, 4, 5:] == 0).all()
    keep = torch.rand(12, 20) > 0.5
    keep[:, 0] = False  # query 0 sees only key 0: fully masked with the causal limit
    got, got_dx = check_masked(x, keep, causal=True)
    assert (got[:, 0] == 0).all() and (got_dx[:, 0] == 0).all()


def test_masked_causal_along_another_dim_and_long_rows():
    x = torch.randn(6, 5, 4)
    check_masked(x, causal=True, dim=0)
    x = torch.randn(2, 3, 20_000)  # looped kernels with a mask
    keep = torch.rand(2, 1, 20_000) > 0.5
    keep[1, 0] = False
    _backend.reset_kernel_launch_counts()
    got, _ = check_masked(x, keep, scale=0.5)
    assert llmfast.kernel_launch_counts()["masked_softmax_fwd_looped"] == 1
    assert (got[1] == 0).all()


def test_masked_softmax_bad_input_raises():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="mask must be broadcastable"):
        llmfast.masked_softmax(x, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        llmfast.masked_softmax(x, torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="causal=True needs x with at least 2 dims"):
        llmfast.masked_softmax(torch.randn(4), causal=True)
    with pytest.raises(TypeError, match="scale must be a float"):
        llmfast.masked_softmax(x, scale="2")
    with pytest.raises(ValueError, match="dim out of range"):
        llmfast.masked_softmax(x, dim=3)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


def test_modules_are_drop_in():
    x = torch.randn(3, 4, 5)
    for ours, theirs in ((nn_softmax.Softmax(dim=1), torch.nn.Softmax(dim=1)),
                         (nn_softmax.LogSoftmax(dim=-1), torch.nn.LogSoftmax(dim=-1))):
        assert repr(ours) == repr(theirs)
        with llmfast.backend("triton"):
            torch.testing.assert_close(ours(x), theirs(x))
    with pytest.warns(UserWarning, match="Implicit dimension"):
        torch.testing.assert_close(nn_softmax.Softmax()(x), torch.softmax(x, 0))
