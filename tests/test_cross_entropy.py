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


def check_ce(logits, target, *, check_torch=True, **kw):
    """Loss and logits gradient of llmfast.cross_entropy (Triton) vs the reference in float64 / low precision.

    ``kw`` are cross_entropy's keyword options; a ``weight`` is given in float64 to the judge."""
    reduction = kw.get("reduction", "mean")
    shape = target.shape if reduction == "none" else ()
    grad_out = torch.rand(shape, dtype=torch.float64) + 0.5

    def run(x, fn, **extra):
        x = x.detach().clone().requires_grad_()
        out = fn(x, target, **{**kw, **extra})
        loss = out.loss if isinstance(out, llmfast.CrossEntropyOutput) else out
        loss.backward(grad_out.to(loss.dtype))
        return loss, x.grad, out

    def kernel(x, t, **k):
        with llmfast.backend("triton"):
            return llmfast.cross_entropy(x, t, **k)

    weight = kw.get("weight")
    want, want_grad, want_out = run(logits.double(), ref.cross_entropy,
                                    **({"weight": weight.double()} if weight is not None else {}))
    lowp, lowp_grad, _ = run(logits, ref.cross_entropy)
    got, got_grad, got_out = run(logits, kernel)
    assert got.dtype == logits.dtype and got.shape == want.shape
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    assert_within_policy(got, want, lowp, logits.dtype, scale)
    assert_within_policy(got_grad, want_grad, lowp_grad, logits.dtype)
    if isinstance(want_out, llmfast.CrossEntropyOutput):
        if want_out.z_loss is not None:
            assert got_out.z_loss.dtype == logits.dtype and not got_out.z_loss.requires_grad
            assert_within_policy(got_out.z_loss, want_out.z_loss, want_out.z_loss.to(logits.dtype), logits.dtype,
                                 max(1.0, want_out.z_loss.abs().max().item()) * 4)
        if want_out.predicted_tokens is not None:
            pred = got_out.predicted_tokens
            assert pred.dtype == torch.int64 and pred.shape == target.shape
            if kw.get("softcap") is None:  # with softcap, fp32 tanh may tie or untie near-equal maxima
                assert torch.equal(pred, want_out.predicted_tokens)
        if want_out.token_accuracy is not None:
            assert got_out.token_accuracy.dtype == torch.float32
            if kw.get("softcap") is None:
                torch.testing.assert_close(got_out.token_accuracy, want_out.token_accuracy.float(), equal_nan=True)
    # and torch's own cross-entropy agrees with the reference it is judged by
    torch_kw = {k: kw[k] for k in ("ignore_index", "reduction", "label_smoothing") if k in kw}
    if check_torch and set(kw) <= set(torch_kw) | {"weight"}:
        torch_loss = F.cross_entropy(logits.double(), target.long(), weight=weight.double() if weight is not None
                                     else None, **torch_kw)
        torch.testing.assert_close(torch_loss, want.detach(), equal_nan=True)
    return got, got_grad, got_out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_reference(dtype, reduction, label_smoothing):
    logits = (torch.randn(7, 1000) * 3).to(dtype)
    _backend.reset_kernel_launch_counts()
    check_ce(logits, _targets(7, 1000), reduction=reduction, label_smoothing=label_smoothing)
    assert llmfast.kernel_launch_counts() == {"cross_entropy_fwd_grad": 1}


OPTION_COMBOS = [(w, ls, z, cap) for w in (False, True) for ls in (0.0, 0.2) for z in (0.0, 1e-2)
                 for cap in (None, 4.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("combo", range(len(OPTION_COMBOS)))
def test_liger_options_every_combination(dtype, combo):
    """Class weight x label smoothing x z-loss x softcap, forward and backward, with the logging outputs; the
    reduction cycles with the combination (all three for the full one below)."""
    use_weight, eps, zscale, cap = OPTION_COMBOS[combo]
    v = 211  # prime
    logits = (torch.randn(9, v) * 4).to(dtype)
    kw = dict(reduction=("mean", "sum", "none")[combo % 3], label_smoothing=eps, lse_square_scale=zscale,
              softcap=cap, return_z_loss=zscale > 0, return_token_accuracy=combo % 2 == 0,
              return_predicted_tokens=combo % 4 < 2)
    if use_weight:
        kw["weight"] = torch.rand(v) + 0.1
    _backend.reset_kernel_launch_counts()
    check_ce(logits, _targets(9, v, ignore=(1, 4)), **kw)
    assert llmfast.kernel_launch_counts() == {"cross_entropy_fwd_grad": 1}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(1, 5003), (4, 1031), (3, 2)], ids=str)
def test_liger_options_all_at_once(reduction, shape):
    n, v = shape
    logits = torch.randn(n, v, dtype=torch.bfloat16) * 6
    check_ce(logits, torch.randint(0, v, (n,)), weight=torch.rand(v) + 0.5, label_smoothing=0.15,
             lse_square_scale=1e-3, softcap=3.0, reduction=reduction, return_z_loss=True,
             return_token_accuracy=True, return_predicted_tokens=True)


def test_class_weight_matches_torch_exactly_with_ignore_and_smoothing():
    logits = torch.randn(6, 13, 3, dtype=torch.float64)
    target = torch.randint(0, 13, (6, 3))
    target[0, 1] = target[4, 2] = 7  # a custom ignore_index that is a real class
    w = torch.rand(13, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        for eps in (0.0, 0.3):
            want = F.cross_entropy(logits, target, weight=w, ignore_index=7, reduction=reduction, label_smoothing=eps)
            got = ref.cross_entropy(logits, target, weight=w, ignore_index=7, reduction=reduction,
                                    label_smoothing=eps)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            check_ce(logits.float(), target, weight=w.float(), ignore_index=7, reduction=reduction,
                     label_smoothing=eps)


def test_softcap_saturates_without_nan():
    logits = torch.tensor([[1e4, -1e4, 0.0, 3.0, 1e-6], [-5e4, 2e4, 7.0, -7.0, 0.29]])
    loss, grad, _ = check_ce(logits, torch.tensor([1, 4]), softcap=30.0, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_cross_entropy_output_unpacks_like_liger():
    logits, t = torch.randn(5, 20), _targets(5, 20)
    with llmfast.backend("triton"):
        loss, z = llmfast.cross_entropy(logits, t, lse_square_scale=1e-4, return_z_loss=True)
        out = llmfast.cross_entropy(logits, t, return_token_accuracy=True)
        plain = llmfast.cross_entropy(logits, t, lse_square_scale=1e-4)
    torch.testing.assert_close(loss, plain)
    assert z.shape == () and out.z_loss is None and out.predicted_tokens is None
    assert 0.0 <= out.token_accuracy.item() <= 1.0


def test_liger_positional_order():
    # liger_cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
    #                     lse_square_scale, softcap, return_z_loss, return_token_accuracy, return_predicted_tokens)
    logits, t = torch.randn(5, 20), _targets(5, 20)
    w = torch.rand(20)
    with llmfast.backend("triton"):
        got = llmfast.cross_entropy(logits, t, w, None, -100, None, "sum", 0.1, 1e-3, 5.0, True, True, True)
    want = ref.cross_entropy(logits.double(), t, w.double(), None, -100, None, "sum", 0.1, 1e-3, 5.0, True, True,
                             True)
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.z_loss.double(), want.z_loss, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="size_average"):
        legacy = llmfast.cross_entropy(logits, t, None, False)  # torch's deprecated size_average=False -> sum
    torch.testing.assert_close(legacy, F.cross_entropy(logits, t, reduction="sum"))


def test_torch_path_has_every_option():
    """CPU "auto": F.cross_entropy where it computes the same thing, else the same per-row contract in torch."""
    logits, t = torch.randn(6, 50) * 3, _targets(6, 50)
    w = torch.rand(50)
    _backend.reset_kernel_launch_counts()
    for kw in (dict(weight=w, label_smoothing=0.1), dict(softcap=2.0, lse_square_scale=0.01, weight=w,
                                                          return_predicted_tokens=True)):
        for reduction in ("mean", "none"):
            x = logits.clone().requires_grad_()
            out = llmfast.cross_entropy(x, t, reduction=reduction, **kw)
            loss = out.loss if isinstance(out, llmfast.CrossEntropyOutput) else out
            loss.sum().backward()
            x64 = logits.double().requires_grad_()
            want = ref.cross_entropy(x64, t, reduction=reduction, **{**kw, "weight": w.double()})
            want = want.loss if isinstance(want, llmfast.CrossEntropyOutput) else want
            want.sum().backward()
            torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert llmfast.kernel_launch_counts() == {}


@pytest.mark.parametrize("shape", [(1, 1), (3, 50_000), (5, 4099)])
def test_vocab_sizes(shape):
    n, v = shape
    check_ce(torch.randn(n, v, dtype=torch.bfloat16) * 4, torch.randint(0, v, (n,)), label_smoothing=0.05)


def test_ignore_index_everywhere_and_nowhere():
    logits = torch.randn(6, 40)
    # everywhere: mean is 0/0 = NaN like torch, sum is 0, and the gradient is zero
    t = torch.full((6,), -100)
    loss, grad, _ = check_ce(logits, t)
    assert torch.isnan(loss) and (grad == 0).all()
    loss, grad, _ = check_ce(logits, t, reduction="sum", label_smoothing=0.2)
    assert loss.item() == 0 and (grad == 0).all()
    # nowhere, and a custom ignore_index that is a real class
    check_ce(logits, torch.randint(0, 40, (6,)))
    t = torch.tensor([3, 5, 3, 0, 39, 3])
    loss, grad, _ = check_ce(logits, t, ignore_index=3, reduction="none")
    assert (loss[t == 3] == 0).all() and (grad[t == 3] == 0).all()


def test_torch_layouts():
    check_ce(torch.randn(3, 11, 4, 5), torch.randint(0, 11, (3, 4, 5)), reduction="none")   # (N, C, d1, d2)
    check_ce(torch.randn(3, 11, 4), torch.randint(0, 11, (3, 4)), label_smoothing=0.3)
    check_ce(torch.randn(13), torch.tensor(4))                                                 # unbatched
    check_ce(torch.randn(5, 30)[:, ::2], torch.randint(0, 15, (5,)))                           # strided columns
    check_ce(torch.randn(4, 9), torch.randint(0, 9, (4,), dtype=torch.int32))                  # int32 targets
    check_ce(torch.randn(3, 11, 4), torch.randint(0, 11, (3, 4)), weight=torch.rand(11), softcap=2.0,  # options
             reduction="none", lse_square_scale=1e-2, return_z_loss=True, return_token_accuracy=True,
             return_predicted_tokens=True)
    check_ce(torch.randn(13), torch.tensor(4), return_predicted_tokens=True, label_smoothing=0.2)


def test_fp16_extreme_logits():
    logits = torch.randn(4, 300).half()
    logits[0, 7] = 65504.0
    logits[1] = -65504.0
    logits[2, ::3] = 65504.0
    t = torch.tensor([7, 3, 0, 5])
    loss, grad, _ = check_ce(logits, t, reduction="none")
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
    with pytest.raises(ValueError, match=r"target\[1\] = 10 is out of range: class indices must be in \[0, 10\) "
                                         r"\(or ignore_index=-100\)"):
        llmfast.cross_entropy(logits, torch.tensor([1, 10, 2]))
    with pytest.raises(ValueError, match=r"target\[1, 0\] = -5 is out of range"):
        llmfast.cross_entropy(torch.randn(2, 10, 3), torch.tensor([[1, 2, 3], [-5, 0, 0]]))
    with pytest.raises(ValueError, match=r"target\[1\] = -5 is out of range: class indices must be in \[0, 10\)"):
        llmfast.fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(10, 4), torch.tensor([1, -5, 2]))
    # where checking would need a device sync (CUDA) the kernel marks the row NaN instead
    grad = torch.empty_like(logits)
    opts = ops.LossOptions(lse_square_scale=0.1, track_argmax=True)
    res = ops.rows_triton(logits, torch.tensor([1, 10, -100]), opts, grad, torch.ones(2))
    assert torch.isfinite(res.ce[0]) and torch.isnan(res.ce[1]) and res.ce[2] == 0
    assert torch.isnan(res.z[1]) and res.pred[2] == -1
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
    with pytest.raises(TypeError, match="input must have dtype in"):
        llmfast.cross_entropy(logits.long(), t)
    with pytest.raises(ValueError, match="0-d"):
        llmfast.cross_entropy(torch.tensor(1.0), t)
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="input must have shape"):
        llmfast.fused_linear_cross_entropy(torch.randn(4, 7), w, t)
    with pytest.raises(ValueError, match="target must have shape"):
        llmfast.fused_linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="bias must have shape"):
        llmfast.fused_linear_cross_entropy(h, w, t, torch.randn(9))
    with pytest.raises(TypeError, match="share one dtype"):
        llmfast.fused_linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        llmfast.fused_linear_cross_entropy(h, w, t, chunk_size=0)
    # the options
    with pytest.raises(ValueError, match=r"weight must have shape \(10,\), one entry per class, got \(9,\)"):
        llmfast.cross_entropy(logits, t, torch.rand(9))
    with pytest.raises(TypeError, match="weight must be a .* got int -100 .ignore_index comes after it"):
        llmfast.cross_entropy(logits, t, -100)
    with pytest.raises(ValueError, match=r"ce_weight must have shape \(10,\)"):
        llmfast.fused_linear_cross_entropy(h, w, t, ce_weight=torch.rand(3))
    with pytest.raises(ValueError, match="softcap must be None or a positive float, got -1"):
        llmfast.cross_entropy(logits, t, softcap=-1.0)
    with pytest.raises(TypeError, match="lse_square_scale must be a float, got str"):
        llmfast.cross_entropy(logits, t, lse_square_scale="1e-4")
    with pytest.raises(ValueError, match="lse_square_scale must be finite"):
        llmfast.cross_entropy(logits, t, lse_square_scale=float("inf"))
    with pytest.raises(TypeError, match="return_z_loss must be a bool, got int"):
        llmfast.cross_entropy(logits, t, return_z_loss=1)
    with pytest.raises(TypeError, match="accum_dtype must be None or a floating dtype"):
        llmfast.fused_linear_cross_entropy(h, w, t, accum_dtype=torch.int32)
    with pytest.raises(TypeError, match="use_token_scaling must be a bool"):
        llmfast.fused_linear_cross_entropy(h, w, t, use_token_scaling=1)


def test_backends_dispatch():
    logits, t = torch.randn(4, 30), torch.randint(0, 30, (4,))
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("auto"):
        torch.testing.assert_close(llmfast.cross_entropy(logits, t), F.cross_entropy(logits, t))
    with llmfast.backend("reference"):
        torch.testing.assert_close(llmfast.cross_entropy(logits, t, label_smoothing=0.2),
                                   ref.cross_entropy(logits, t, label_smoothing=0.2))
    assert llmfast.kernel_launch_counts() == {}
    # every option through the reference backend is the reference itself (gradients included)
    w = torch.rand(30)
    kw = dict(weight=w, label_smoothing=0.1, lse_square_scale=1e-2, softcap=3.0, reduction="none",
              return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    with llmfast.backend("reference"):
        got = llmfast.cross_entropy(x1, t, **kw)
        h, hw = torch.randn(4, 6), torch.randn(30, 6)
        got_fused = llmfast.fused_linear_cross_entropy(h, hw, t, ce_weight=w, softcap=3.0, use_token_scaling=True)
    want = ref.cross_entropy(x2, t, **kw)
    got.loss.sum().backward()
    want.loss.sum().backward()
    for field in ("loss", "z_loss", "token_accuracy", "predicted_tokens"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field))
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(got_fused, ref.fused_linear_cross_entropy(h, hw, t, ce_weight=w, softcap=3.0,
                                                                         use_token_scaling=True))
    assert llmfast.kernel_launch_counts() == {}


# ---------------------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy
# ---------------------------------------------------------------------------------------------------------------


def check_fused(n, c, v, dtype, *, bias=True, chunk_size=None, backend="triton", need=(True, True, True), lead=(),
                **kw):
    """Loss and gradients of input, weight and bias vs the reference (float64 judge, low-precision peer); ``kw`` are
    fused_linear_cross_entropy's options (a ``ce_weight`` goes to the judge in float64)."""
    reduction = kw.get("reduction", "mean")
    hidden = torch.randn(*lead, n, c).to(dtype)
    weight = (torch.randn(v, c) / c ** 0.5 * kw.pop("logit_scale", 1.0)).to(dtype)
    b = (torch.randn(v) * 0.1).to(dtype) if bias else None
    target = torch.randint(0, v, (*lead, n))
    target.view(-1)[::5] = -100
    grad_out = (torch.rand(target.shape if reduction == "none" else (), dtype=torch.float64) + 0.5)

    def run(cast, fn, **extra):
        ins = [hidden, weight, b]
        leaves = [None if t is None else cast(t).detach().clone().requires_grad_(r) for t, r in zip(ins, need)]
        out = fn(leaves[0], leaves[1], target, leaves[2], **{**kw, **extra})
        loss = out.loss if isinstance(out, llmfast.CrossEntropyOutput) else out
        loss.backward(grad_out.to(loss.dtype))
        return loss, [None if t is None else t.grad for t in leaves], out

    def kernel(h, w, t, bb, **k):
        with llmfast.backend(backend):
            return llmfast.fused_linear_cross_entropy(h, w, t, bb, chunk_size=chunk_size, **k)

    ce_weight = kw.get("ce_weight")
    want, want_grads, want_out = run(lambda t: t.double(), ref.fused_linear_cross_entropy,
                                     **({"ce_weight": ce_weight.double()} if ce_weight is not None else {}))
    lowp, lowp_grads, _ = run(lambda t: t, ref.fused_linear_cross_entropy)
    got, got_grads, got_out = run(lambda t: t, kernel)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # fp32 loss for 16-bit
    assert got.shape == want.shape
    assert_within_policy(got, want, lowp, dtype, max(1.0, want.abs().max().item()))
    for name, g, w_, l_, r in zip(("hidden", "weight", "bias"), got_grads, want_grads, lowp_grads, need):
        if w_ is None or not r:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == w_.shape, name
        try:
            # the atol scales with the gradient's size, as the loss's does: an fp32 weight gradient of size ~2 sums
            # 13 rows of products that cancel, and a few ulp of it already exceed an unscaled 1e-6
            assert_within_policy(g, w_, l_, dtype, max(1.0, w_.abs().max().item()))
        except AssertionError as err:
            raise AssertionError(f"gradient of {name}: {err}") from None
    if isinstance(want_out, llmfast.CrossEntropyOutput):
        for field in ("z_loss", "token_accuracy", "predicted_tokens"):
            w_, g = getattr(want_out, field), getattr(got_out, field)
            assert (w_ is None) == (g is None), field
        if want_out.z_loss is not None:
            torch.testing.assert_close(got_out.z_loss.double(), want_out.z_loss, rtol=2e-2, atol=1e-3)
        if want_out.predicted_tokens is not None:
            assert got_out.predicted_tokens.shape == target.shape
            if dtype == torch.float32 and kw.get("softcap") is None:
                assert torch.equal(got_out.predicted_tokens, want_out.predicted_tokens)
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
    check_fused(20, 8, 5003, torch.float32, bias=False, label_smoothing=0.1)          # looped vocabulary (prime)
    check_fused(1, 8, 97, torch.float16, chunk_size=1)                                 # N = 1
    check_fused(9, 8, 50, torch.float16, lead=(2,), reduction="none", chunk_size=4)    # (B, T, C) hidden
    check_fused(12, 8, 40, torch.float32, need=(True, False, False))                  # frozen weight and bias
    check_fused(12, 8, 40, torch.bfloat16, need=(False, True, True), label_smoothing=0.2, chunk_size=5)


FUSED_COMBOS = [(w, ls, z, cap) for w in (False, True) for ls in (0.0, 0.1) for z in (0.0, 1e-2)
                for cap in (None, 3.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("combo", range(len(FUSED_COMBOS)))
def test_fused_liger_options(dtype, combo):
    use_weight, eps, zscale, cap = FUSED_COMBOS[combo]
    v = 97
    kw = dict(reduction=("mean", "sum", "none")[combo % 3], label_smoothing=eps, lse_square_scale=zscale,
              softcap=cap, return_z_loss=zscale > 0, return_token_accuracy=combo % 2 == 1,
              return_predicted_tokens=combo % 4 == 0, logit_scale=4.0)
    if use_weight:
        kw["ce_weight"] = torch.rand(v) + 0.1
    check_fused(13, 8, v, dtype, chunk_size=5, bias=combo % 2 == 0, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_token_scaling(dtype, reduction):
    """use_token_scaling: each row's loss and gradient times softmax(logits)[target], a constant for autograd."""
    _backend.reset_kernel_launch_counts()
    check_fused(13, 8, 61, dtype, chunk_size=5, reduction=reduction, use_token_scaling=True, logit_scale=3.0,
                ce_weight=torch.rand(61) + 0.1, label_smoothing=0.1, lse_square_scale=1e-2, softcap=4.0,
                return_z_loss=True)
    check_fused(13, 8, 61, dtype, chunk_size=5, reduction=reduction, use_token_scaling=True, backend="auto")
    assert set(llmfast.kernel_launch_counts()) <= {"cross_entropy_fwd", "cross_entropy_fwd_grad"}


@pytest.mark.parametrize("accum_dtype", [None, torch.float32, torch.bfloat16])
def test_fused_accum_dtype(accum_dtype):
    # the weight/bias gradients accumulate across chunks in accum_dtype (fp32 unless told otherwise)
    grads = check_fused(40, 8, 64, torch.bfloat16, chunk_size=8, accum_dtype=accum_dtype) \
        if accum_dtype != torch.bfloat16 else None
    if accum_dtype == torch.bfloat16:  # Liger's default: cheaper, less exact; just close to the fp32 result
        h, w = torch.randn(40, 8).bfloat16(), torch.randn(64, 8).bfloat16()
        t = torch.randint(0, 64, (40,))
        got = []
        for acc in (torch.bfloat16, torch.float32):
            wl = w.clone().requires_grad_()
            with llmfast.backend("triton"):
                llmfast.fused_linear_cross_entropy(h, wl, t, accum_dtype=acc, chunk_size=8).backward()
            got.append(wl.grad.float())
        torch.testing.assert_close(got[0], got[1], atol=2e-2, rtol=5e-2)
    else:
        assert grads[1].dtype == torch.bfloat16


def test_fused_liger_positional_order():
    # liger_fused_linear_cross_entropy(input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
    #   label_smoothing, reduction, softcap, return_z_loss, accum_dtype, use_token_scaling, return_token_accuracy,
    #   return_predicted_tokens)
    h, w, b = torch.randn(10, 6), torch.randn(30, 6), torch.randn(30)
    t, cw = _targets(10, 30), torch.rand(30)
    with llmfast.backend("triton"):
        got = llmfast.fused_linear_cross_entropy(h, w, t, b, cw, -100, 1e-3, 0.1, "sum", 4.0, True, None, False,
                                                 True, True)
    want = ref.fused_linear_cross_entropy(h.double(), w.double(), t, b.double(), cw.double(), -100, 1e-3, 0.1,
                                          "sum", 4.0, True, None, False, True, True)
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.token_accuracy.double(), want.token_accuracy.double())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_torch_chunked_path(reduction):
    # CPU "auto": the same chunked algorithm with torch ops for the per-chunk cross-entropy
    _backend.reset_kernel_launch_counts()
    check_fused(33, 16, 200, torch.float32, reduction=reduction, label_smoothing=0.1, chunk_size=8, backend="auto")
    check_fused(33, 16, 200, torch.bfloat16, reduction=reduction, chunk_size=8, backend="auto")
    check_fused(33, 16, 199, torch.bfloat16, reduction=reduction, chunk_size=8, backend="auto", softcap=2.0,
                ce_weight=torch.rand(199), lse_square_scale=1e-2, label_smoothing=0.1, return_z_loss=True)
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


def test_fused_16bit_has_no_fp32_copy_of_the_chunk():
    """bf16 inputs: the chunk's gradient is written in its own bf16 buffer and fp32 work is done a bounded block of
    rows at a time, so the peak stays below (chunk logits in bf16 + the same chunk in fp32), which the fp32
    temporary alone would need; the loss comes back in fp32 as Hugging Face's upcast loss."""
    n, c, v = 512, 32, 8192
    hidden = torch.randn(n, c).bfloat16().requires_grad_()
    weight = (torch.randn(v, c) * 0.05).bfloat16().requires_grad_()
    target = torch.randint(0, v, (n,))

    def fused():
        loss = llmfast.fused_linear_cross_entropy(hidden, weight, target, chunk_size=n)  # one chunk: all logits
        assert loss.dtype == torch.float32
        loss.backward()

    def torch_hf():
        F.cross_entropy(F.linear(hidden, weight).float(), target).backward()

    fused()
    torch_hf()  # .grad buffers exist from here on
    chunk_bf16 = n * v * 2
    fused_peak = ops.peak_memory_bytes(fused, "cpu")
    torch_peak = ops.peak_memory_bytes(torch_hf, "cpu")
    assert fused_peak < chunk_bf16 + 2 * chunk_bf16, (fused_peak, chunk_bf16)
    assert fused_peak < torch_peak / 2, (fused_peak, torch_peak)


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
    # per-class weights run on the kernel too; probability targets go to torch
    w = torch.rand(12)
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("triton"):
        torch.testing.assert_close(nn_ce.CrossEntropyLoss(weight=w, label_smoothing=0.2)(logits, t),
                                   torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.2)(logits, t))
    assert llmfast.kernel_launch_counts() == {"cross_entropy_fwd": 1}
    probs = torch.softmax(torch.randn(6, 12), -1)
    torch.testing.assert_close(nn_ce.CrossEntropyLoss()(logits, probs), F.cross_entropy(logits, probs))
    with pytest.warns(UserWarning, match="size_average"):
        legacy = nn_ce.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"


def test_cross_entropy_loss_module_liger_options():
    logits, t = torch.randn(6, 12), _targets(6, 12)
    w = torch.rand(12)
    module = nn_ce.CrossEntropyLoss(weight=w, lse_square_scale=1e-3, softcap=5.0, return_z_loss=True,
                                    return_token_accuracy=True, reduction="sum")
    assert "softcap=5.0" in repr(module)
    with llmfast.backend("triton"):
        got = module(logits, t)
    want = ref.cross_entropy(logits.double(), t, w.double(), reduction="sum", lse_square_scale=1e-3, softcap=5.0,
                             return_z_loss=True, return_token_accuracy=True)
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.z_loss.double(), want.z_loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="need class-index targets"):
        module(logits, torch.softmax(logits, -1))


def test_fused_linear_module():
    module = nn_ce.FusedLinearCrossEntropyLoss(reduction="sum", label_smoothing=0.1, chunk_size=4)
    hidden, weight, bias = torch.randn(10, 6), torch.randn(30, 6), torch.randn(30)
    target = torch.randint(0, 30, (10,))
    with llmfast.backend("triton"):
        got = module(hidden, weight, target, bias)
    want = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    assert "chunk_size=4" in repr(module)
    cw = torch.rand(30)
    module = nn_ce.FusedLinearCrossEntropyLoss(ce_weight=cw, softcap=3.0, lse_square_scale=1e-3,
                                               return_predicted_tokens=True, chunk_size=4)
    with llmfast.backend("triton"):
        got = module(hidden, weight, target, bias)
    want = ref.fused_linear_cross_entropy(hidden.double(), weight.double(), target, bias.double(), cw.double(),
                                          softcap=3.0, lse_square_scale=1e-3, return_predicted_tokens=True)
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=1e-5, atol=1e-5)
    assert got.predicted_tokens.shape == target.shape and "softcap=3.0" in repr(module)


def test_liger_names_change_only_the_import():
    """Code written against liger_kernel.transformers(.functional) runs with only the import changed."""
    from llmfast import liger_cross_entropy, liger_fused_linear_cross_entropy
    from llmfast.nn import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

    logits, t = torch.randn(6, 20), _targets(6, 20)
    hidden, lin_weight = torch.randn(6, 5), torch.randn(20, 5)
    w = torch.rand(20)
    with llmfast.backend("triton"):
        loss, z_loss = liger_cross_entropy(logits, t, w, lse_square_scale=1e-4, return_z_loss=True)
        module_out = LigerCrossEntropyLoss(w, -100, 1e-4, 0.0, "mean", None, True)(logits, t)
        fused = liger_fused_linear_cross_entropy(hidden, lin_weight, t, None, w, -100, 1e-4)
        fused_module = LigerFusedLinearCrossEntropyLoss(ce_weight=w, lse_square_scale=1e-4)(lin_weight, hidden, t)
    torch.testing.assert_close(module_out.loss, loss)
    torch.testing.assert_close(module_out.z_loss, z_loss)
    torch.testing.assert_close(fused_module, fused)
    want = ref.cross_entropy(hidden.double() @ lin_weight.double().t(), t, w.double(), lse_square_scale=1e-4)
    torch.testing.assert_close(fused.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(dtype, reduction):
    """Under torch.compile both ops are custom ops (one opaque node each, no graph break): same losses, logging
    outputs and gradients as eager, computed by the same kernels."""
    torch._dynamo.reset()
    logits = (torch.randn(6, 37) * 3).to(dtype)
    t = _targets(6, 37)
    hidden, weight, bias = torch.randn(6, 8).to(dtype), (torch.randn(37, 8) * 0.5).to(dtype), torch.randn(37).to(dtype)
    w = torch.rand(37)
    ce_kw = dict(weight=w, label_smoothing=0.1, lse_square_scale=1e-2, softcap=4.0, reduction=reduction,
                 return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True)
    lin_kw = dict(ce_weight=w, label_smoothing=0.1, lse_square_scale=1e-2, softcap=4.0, reduction=reduction,
                  return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True, chunk_size=4)

    def both(x, h, wt, b):
        out = llmfast.cross_entropy(x, t, **ce_kw)
        fused = llmfast.fused_linear_cross_entropy(h, wt, t, b, **lin_kw)
        return out, fused

    def run(fn):
        leaves = [a.clone().requires_grad_() for a in (logits, hidden, weight, bias)]
        with llmfast.backend("triton"):
            out, fused = fn(*leaves)
        (out.loss.float().sum() * 1.5 + fused.loss.sum() * 0.5).backward()
        return out, fused, [leaf.grad for leaf in leaves]

    eager = run(both)
    _backend.reset_kernel_launch_counts()
    compiled = run(torch.compile(both, fullgraph=True, backend="aot_eager"))
    assert {"cross_entropy_fwd_grad"} <= set(llmfast.kernel_launch_counts())
    for got, want in zip(compiled[:2], eager[:2]):
        for field in ("loss", "z_loss", "token_accuracy", "predicted_tokens"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field))
        assert not got.z_loss.requires_grad
    for got, want in zip(compiled[2], eager[2]):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()
