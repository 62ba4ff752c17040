"""Triton cross-entropy and fused linear cross-entropy (interpreter) against the float64 reference.

Tolerance policy (flash-attn's): error against the float64 reference <= 2 x the error of the reference math run
in the input's low-precision dtype + a small atol.
"""
import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast import _backend
from llmfast.nn import cross_entropy as nn_ce
from llmfast.ops import cross_entropy as ops
from llmfast.reference import cross_entropy as ref

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-6, torch.float64: 1e-12}


def _max_error(got, want):
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN positions differ"
    diff = torch.where(got == want, torch.zeros_like(got), (got - want).abs())[~torch.isnan(want)]
    return diff.max().item() if diff.numel() else 0.0


def assert_within_policy(got, want64, lowp, dtype, scale=1.0):
    err, base = _max_error(got, want64), _max_error(lowp, want64)
    atol = ATOL[dtype] * scale
    assert err <= 2 * base + atol, f"error {err:.3g} > 2 x torch-math error {base:.3g} + {atol:.3g}"


def _targets(n, v, ignore=(1,)):
    t = torch.randint(0, v, (n,))
    for i in ignore:
        if i < n:
            t[i] = -100
    return t


def check_ce(logits, target, **kw):
    """Loss and logits gradient of llmfast.cross_entropy (Triton) vs the reference in float64 / low precision."""
    reduction = kw.get("reduction", "mean")
    ignore_index = kw.get("ignore_index", -100)
    smoothing = kw.get("label_smoothing", 0.0)
    shape = target.shape if reduction == "none" else ()
    grad_out = torch.rand(shape, dtype=torch.float64) + 0.5

    def run(x, fn):
        x = x.detach().clone().requires_grad_()
        loss = fn(x, target, ignore_index, reduction, smoothing)
        loss.backward(grad_out.to(loss.dtype))
        return loss, x.grad

    def kernel(x, *args):
        with llmfast.backend("triton"):
            return llmfast.cross_entropy(x, *args)

    want, want_grad = run(logits.double(), ref.cross_entropy)
    lowp, lowp_grad = run(logits, ref.cross_entropy)
    got, got_grad = run(logits, kernel)
    assert got.dtype == logits.dtype and got.shape == want.shape
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    assert_within_policy(got, want, lowp, logits.dtype, scale)
    assert_within_policy(got_grad, want_grad, lowp_grad, logits.dtype)
    # and torch's own cross-entropy agrees with the reference it is judged by
    torch_loss = F.cross_entropy(logits.double(), target.long(), ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=smoothing)
    torch.testing.assert_close(torch_loss, want.detach(), equal_nan=True)
    return got, got_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_reference(dtype, reduction, label_smoothing):
    logits = (torch.randn(7, 1000) * 3).to(dtype)
    _backend.reset_kernel_launch_counts()
    check_ce(logits, _targets(7, 1000), reduction=reduction, label_smoothing=label_smoothing)
    assert llmfast.kernel_launch_counts() == {"cross_entropy_fwd_grad": 1}


@pytest.mark.parametrize("shape", [(1, 1), (3, 50_000), (5, 4099)])
def test_vocab_sizes(shape):
    n, v = shape
    check_ce(torch.randn(n, v, dtype=torch.bfloat16) * 4, torch.randint(0, v, (n,)), label_smoothing=0.05)


def test_ignore_index_everywhere_and_nowhere():
    logits = torch.randn(6, 40)
    # everywhere: mean is 0/0 = NaN like torch, sum is 0, and the gradient is zero
    t = torch.full((6,), -100)
    loss, grad = check_ce(logits, t)
    assert torch.isnan(loss) and (grad == 0).all()
    loss, grad = check_ce(logits, t, reduction="sum", label_smoothing=0.2)
    assert loss.item() == 0 and (grad == 0).all()
    # nowhere, and a custom ignore_index that is a real class
    check_ce(logits, torch.randint(0, 40, (6,)))
    t = torch.tensor([3, 5, 3, 0, 39, 3])
    loss, grad = check_ce(logits, t, ignore_index=3, reduction="none")
    assert (loss[t == 3] == 0).all() and (grad[t == 3] == 0).all()


def test_torch_layouts():
    check_ce(torch.randn(3, 11, 4, 5), torch.randint(0, 11, (3, 4, 5)), reduction="none")   # (N, C, d1, d2)
    check_ce(torch.randn(3, 11, 4), torch.randint(0, 11, (3, 4)), label_smoothing=0.3)
    check_ce(torch.randn(13), torch.tensor(4))                                                 # unbatched
    check_ce(torch.randn(5, 30)[:, ::2], torch.randint(0, 15, (5,)))                           # strided columns
    check_ce(torch.randn(4, 9), torch.randint(0, 9, (4,), dtype=torch.int32))                  # int32 targets


def test_fp16_extreme_logits():
    logits = torch.randn(4, 300).half()
    logits[0, 7] = 65504.0
    logits[1] = -65504.0
    logits[2, ::3] = 65504.0
    t = torch.tensor([7, 3, 0, 5])
    loss, grad = check_ce(logits, t, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_inplace_backward_reuses_logits_storage():
    logits = torch.randn(6, 50, requires_grad=True)
    t = _targets(6, 50)
    expected = F.cross_entropy(logits.double(), t)
    expected.backward()
    h = logits.detach().clone().requires_grad_()
    inter = h * 1.0  # an intermediate, as lm_head(x) would be
    with llmfast.backend("triton"):
        loss = llmfast.cross_entropy(inter, t, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(h.grad, logits.grad.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(inter.detach(), logits.grad.float(), atol=1e-6, rtol=1e-5)  # storage reused

    # an autograd node that saved the logits notices they were overwritten
    h = logits.detach().clone().requires_grad_()
    inter = h * 1.0
    watched = inter.sin()  # sin saves its input for backward
    with llmfast.backend("triton"):
        loss = llmfast.cross_entropy(inter, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + watched.sum()).backward()


def test_default_keeps_logits_and_scales_gradient():
    logits = torch.randn(5, 20, requires_grad=True)
    keep = logits.detach().clone()
    t = _targets(5, 20)
    with llmfast.backend("triton"):
        loss = llmfast.cross_entropy(logits, t, label_smoothing=0.1)
    assert torch.equal(logits.detach(), keep)
    (loss * 3.0).backward(retain_graph=True)
    x64 = keep.double().requires_grad_()
    (3.0 * F.cross_entropy(x64, t, label_smoothing=0.1)).backward()
    torch.testing.assert_close(logits.grad, x64.grad.float(), atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (loss * 3.0).backward()
    # upstream gradient 1: nothing is scaled, a second backward is fine
    logits.grad = None
    with llmfast.backend("triton"):
        loss = llmfast.cross_entropy(logits, t)
    loss.backward(retain_graph=True)
    loss.backward()
    x64 = keep.double().requires_grad_()
    F.cross_entropy(x64, t).backward()
    torch.testing.assert_close(logits.grad, 2 * x64.grad.float(), atol=1e-6, rtol=1e-5)


def test_no_grad_needed_skips_the_gradient_pass():
    _backend.reset_kernel_launch_counts()
    logits = torch.randn(4, 30)
    t = torch.randint(0, 30, (4,))
    with llmfast.backend("triton"):
        loss = llmfast.cross_entropy(logits, t)
    assert llmfast.kernel_launch_counts() == {"cross_entropy_fwd": 1}
    torch.testing.assert_close(loss, F.cross_entropy(logits, t))


def test_out_of_range_targets():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"target values must be in \[0, 10\) or ignore_index=-100, got 10"):
        llmfast.cross_entropy(logits, torch.tensor([1, 10, 2]))
    with pytest.raises(ValueError, match="got -5"):
        llmfast.fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(10, 4), torch.tensor([1, -5, 2]))
    # where checking would need a device sync (CUDA) the kernel marks the row NaN instead
    grad = torch.empty_like(logits)
    loss = ops._cross_entropy_rows_triton(logits, torch.tensor([1, 10, -100]), -100, 0.0, grad,
                                          torch.ones(()))
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and loss[2] == 0
    assert torch.isnan(grad[1]).all() and (grad[2] == 0).all() and torch.isfinite(grad[0]).all()


def test_bad_input_raises():
    logits = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="target must have dtype in"):
        llmfast.cross_entropy(logits, t.float())
    with pytest.raises(ValueError, match=r"target must have shape \(N,\) = \(4,\).*got \(5,\)"):
        llmfast.cross_entropy(logits, torch.randint(0, 10, (5,)))
    with pytest.raises(ValueError, match="reduction must be one of"):
        llmfast.cross_entropy(logits, t, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        llmfast.cross_entropy(logits, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        llmfast.cross_entropy(logits, t, ignore_index=-100.0)
    with pytest.raises(TypeError, match="logits must have dtype in"):
        llmfast.cross_entropy(logits.long(), t)
    with pytest.raises(ValueError, match="0-d"):
        llmfast.cross_entropy(torch.tensor(1.0), t)
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="hidden must have shape"):
        llmfast.fused_linear_cross_entropy(torch.randn(4, 7), w, t)
    with pytest.raises(ValueError, match="target must have shape"):
        llmfast.fused_linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="bias must have shape"):
        llmfast.fused_linear_cross_entropy(h, w, t, torch.randn(9))
    with pytest.raises(TypeError, match="share one dtype"):
        llmfast.fused_linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        llmfast.fused_linear_cross_entropy(h, w, t, chunk_size=0)


def test_backends_dispatch():
    logits, t = torch.randn(4, 30), torch.randint(0, 30, (4,))
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("auto"):
        torch.testing.assert_close(llmfast.cross_entropy(logits, t), F.cross_entropy(logits, t))
    with llmfast.backend("reference"):
        torch.testing.assert_close(llmfast.cross_entropy(logits, t, label_smoothing=0.2),
                                   ref.cross_entropy(logits, t, label_smoothing=0.2))
    assert llmfast.kernel_launch_counts() == {}


# ---------------------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy
# ---------------------------------------------------------------------------------------------------------------


def check_fused(n, c, v, dtype, *, bias=True, reduction="mean", label_smoothing=0.0, chunk_size=None,
                backend="triton", need=(True, True, True), lead=()):
    hidden = torch.randn(*lead, n, c).to(dtype)
    weight = (torch.randn(v, c) / c ** 0.5).to(dtype)
    b = (torch.randn(v) * 0.1).to(dtype) if bias else None
    target = torch.randint(0, v, (*lead, n))
    target.view(-1)[::5] = -100
    grad_out = (torch.rand(target.shape if reduction == "none" else (), dtype=torch.float64) + 0.5)

    def run(cast, fn):
        ins = [hidden, weight, b]
        leaves = [None if t is None else cast(t).detach().clone().requires_grad_(r) for t, r in zip(ins, need)]
        loss = fn(leaves[0], leaves[1], target, leaves[2])
        loss.backward(grad_out.to(loss.dtype))
        return loss, [None if t is None else t.grad for t in leaves]

    def reference(h, w, t, bb):
        return ref.fused_linear_cross_entropy(h, w, t, bb, -100, reduction, label_smoothing)

    def kernel(h, w, t, bb):
        with llmfast.backend(backend):
            return llmfast.fused_linear_cross_entropy(h, w, t, bb, -100, reduction, label_smoothing=label_smoothing,
                                                      chunk_size=chunk_size)

    want, want_grads = run(lambda t: t.double(), reference)
    lowp, lowp_grads = run(lambda t: t, reference)
    got, got_grads = run(lambda t: t, kernel)
    assert got.dtype == dtype and got.shape == want.shape
    assert_within_policy(got, want, lowp, dtype, max(1.0, want.abs().max().item()))
    for name, g, w_, l_, r in zip(("hidden", "weight", "bias"), got_grads, want_grads, lowp_grads, need):
        if w_ is None or not r:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == w_.shape, name
        assert_within_policy(g, w_, l_, dtype)
    return got_grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_matches_reference(dtype, reduction):
    _backend.reset_kernel_launch_counts()
    check_fused(37, 16, 300, dtype, reduction=reduction, chunk_size=16)
    counts = llmfast.kernel_launch_counts()
    if reduction == "none":  # losses in forward, gradients recomputed chunk by chunk in backward
        assert counts == {"cross_entropy_fwd": 3, "cross_entropy_fwd_grad": 3}
    else:
        assert counts == {"cross_entropy_fwd_grad": 3}


def test_fused_variants():
    check_fused(20, 8, 5000, torch.float32, bias=False, label_smoothing=0.1)          # looped vocabulary
    check_fused(9, 8, 50, torch.float16, lead=(2,), reduction="none", chunk_size=4)    # (B, T, C) hidden
    check_fused(12, 8, 40, torch.float32, need=(True, False, False))                  # frozen weight and bias
    check_fused(12, 8, 40, torch.bfloat16, need=(False, True, True), label_smoothing=0.2, chunk_size=5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_torch_chunked_path(reduction):
    # CPU "auto": the same chunked algorithm with torch ops for the per-chunk cross-entropy
    _backend.reset_kernel_launch_counts()
    check_fused(33, 16, 200, torch.float32, reduction=reduction, label_smoothing=0.1, chunk_size=8, backend="auto")
    check_fused(33, 16, 200, torch.bfloat16, reduction=reduction, chunk_size=8, backend="auto")
    assert llmfast.kernel_launch_counts() == {}


def test_fused_inference_and_gpt_signature():
    hidden, weight = torch.randn(10, 8), torch.randn(50, 8)
    target = torch.randint(0, 50, (10,))
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        loss = llmfast.fused_linear_cross_entropy(hidden, weight, target)  # (N, C), (V, C), (N,) int64
    assert llmfast.kernel_launch_counts() == {"cross_entropy_fwd": 1}
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), target))


def test_fused_under_autocast_follows_linear_and_cross_entropy():
    hidden = torch.randn(16, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    target = torch.randint(0, 40, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with llmfast.backend("triton"):
            loss = llmfast.fused_linear_cross_entropy(hidden, weight, target)
        want = F.cross_entropy(F.linear(hidden, weight), target)
    assert loss.dtype == want.dtype == torch.float32  # the loss in fp32, the projection in bf16, as torch
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(loss, (hidden, weight))
    want_grads = torch.autograd.grad(want, (hidden, weight))
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-2)


def test_fused_scaled_upstream_gradient_and_double_backward():
    hidden = torch.randn(8, 4, requires_grad=True)
    weight = torch.randn(20, 4, requires_grad=True)
    target = torch.randint(0, 20, (8,))
    with llmfast.backend("triton"):
        loss = llmfast.fused_linear_cross_entropy(hidden, weight, target)
    (loss * 0.5).backward(retain_graph=True)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    (0.5 * F.cross_entropy(h64 @ w64.t(), target)).backward()
    torch.testing.assert_close(hidden.grad, h64.grad.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad, w64.grad.float(), atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (loss * 0.5).backward()


def test_fused_peak_memory_at_most_a_quarter_of_torch():
    """Peak bytes during forward + backward, measured (CPU: torch's profiler memory records; CUDA: the
    allocator's peak), at a size where the logits dominate as they do in LM training."""
    n, c, v = 1024, 64, 8192
    hidden = torch.randn(n, c, requires_grad=True)
    weight = (torch.randn(v, c) * 0.05).requires_grad_()
    target = torch.randint(0, v, (n,))

    def torch_linear_ce():
        F.cross_entropy(F.linear(hidden, weight), target).backward()

    def fused():
        llmfast.fused_linear_cross_entropy(hidden, weight, target).backward()

    torch_peak = ops.peak_memory_bytes(torch_linear_ce, "cpu")
    fused_peak = ops.peak_memory_bytes(fused, "cpu")
    assert torch_peak >= 2 * n * v * 4  # sanity: torch holds at least logits and their gradient at once
    assert fused_peak <= torch_peak / 4, (fused_peak, torch_peak)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


def test_cross_entropy_loss_module_is_drop_in():
    logits, t = torch.randn(6, 12), _targets(6, 12)
    ours = nn_ce.CrossEntropyLoss(ignore_index=-100, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="sum", label_smoothing=0.1)
    assert repr(ours) == repr(theirs)
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        torch.testing.assert_close(ours(logits, t), theirs(logits, t))
    assert llmfast.kernel_launch_counts() == {"cross_entropy_fwd": 1}
    # per-class weights and probability targets: torch computes them
    w = torch.rand(12)
    torch.testing.assert_close(nn_ce.CrossEntropyLoss(weight=w)(logits, t),
                               torch.nn.CrossEntropyLoss(weight=w)(logits, t))
    probs = torch.softmax(torch.randn(6, 12), -1)
    torch.testing.assert_close(nn_ce.CrossEntropyLoss()(logits, probs), F.cross_entropy(logits, probs))
    with pytest.warns(UserWarning, match="size_average"):
        legacy = nn_ce.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"


def test_fused_linear_module():
    module = nn_ce.FusedLinearCrossEntropyLoss(reduction="sum", label_smoothing=0.1, chunk_size=4)
    hidden, weight, bias = torch.randn(10, 6), torch.randn(30, 6), torch.randn(30)
    target = torch.randint(0, 30, (10,))
    with llmfast.backend("triton"):
        got = module(hidden, weight, target, bias)
    want = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    assert "chunk_size=4" in repr(module)
