"""The softmax-family references against independent float64 math (Python's math module) and gradcheck."""
import math

import pytest
import torch

from llmfast.reference import cross_entropy as ref_ce
from llmfast.reference import softmax as ref


def _softmax_row(row, log=False):
    finite = [v for v in row if v != -math.inf]
    if not finite:
        return [math.nan] * len(row)
    m = max(finite)
    total = math.fsum(math.exp(v - m) for v in row)
    if log:
        return [v - m - math.log(total) for v in row]
    return [math.exp(v - m) / total for v in row]


def _rows_math(x, dim, fn):
    """Apply ``fn`` to every 1-D slice of ``x`` along ``dim`` with plain Python floats."""
    moved = x.movedim(dim, -1)
    flat = moved.reshape(-1, moved.shape[-1]).tolist()
    out = torch.tensor([fn(row) for row in flat], dtype=torch.float64)
    return out.reshape(moved.shape).movedim(-1, dim)


@pytest.mark.parametrize("shape,dim", [((5, 9), -1), ((4, 3, 6), 1), ((7,), 0), ((3, 4), 0)])
def test_softmax_and_log_softmax_match_math(shape, dim):
    x = torch.randn(shape, dtype=torch.float64) * 5
    torch.testing.assert_close(ref.softmax(x, dim), _rows_math(x, dim, _softmax_row), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ref.log_softmax(x, dim), _rows_math(x, dim, lambda r: _softmax_row(r, log=True)),
                               rtol=1e-12, atol=1e-12)


def test_special_rows_match_torch():
    inf = float("inf")
    x = torch.tensor([[-inf, -inf, -inf], [-inf, 0.0, 1.0], [1e300, 0.0, -1e300]], dtype=torch.float64)
    torch.testing.assert_close(ref.softmax(x), torch.softmax(x, -1), equal_nan=True)
    torch.testing.assert_close(ref.log_softmax(x), torch.log_softmax(x, -1), equal_nan=True)


def _masked_math(x, keep, add, scale, causal):
    """softmax over the last dim of x * scale + add, keeping keep[...] and (if causal) j <= i; empty rows -> 0."""
    out = torch.zeros_like(x)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).tolist():
        idx = tuple(idx) if isinstance(idx, list) else (idx,)
        i = idx[-1]
        scores = []
        for j in range(x.shape[-1]):
            visible = bool(keep[idx + (j,)]) and (not causal or j <= i)
            scores.append(float(x[idx + (j,)]) * scale + float(add[idx + (j,)]) if visible else -math.inf)
        if all(s == -math.inf for s in scores):
            continue
        out[idx] = torch.tensor(_softmax_row(scores), dtype=torch.float64)
    return out


def test_masked_softmax_matches_math():
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    keep = torch.rand(2, 1, 6) > 0.3
    keep[1, 0, :] = False  # all keys of batch 1 dropped: zeros
    add = torch.randn(5, 6, dtype=torch.float64)
    want_bool = _masked_math(x, keep.expand(x.shape), torch.zeros_like(x), 0.7, causal=True)
    torch.testing.assert_close(ref.masked_softmax(x, keep, 0.7, causal=True), want_bool, rtol=1e-12, atol=1e-14)
    want_add = _masked_math(x, torch.ones_like(x, dtype=torch.bool), add.expand(x.shape), 1.3, causal=False)
    torch.testing.assert_close(ref.masked_softmax(x, add, 1.3), want_add, rtol=1e-12, atol=1e-14)
    assert (ref.masked_softmax(x, keep)[1] == 0).all()


def _ce_math(logits, target, ignore_index, reduction, eps):
    losses, count = [], 0
    for row, t in zip(logits.tolist(), target.tolist()):
        if t == ignore_index:
            losses.append(0.0)
            continue
        count += 1
        logp = _softmax_row(row, log=True)
        losses.append((1 - eps) * -logp[t] + eps * -math.fsum(logp) / len(row))
    if reduction == "none":
        return torch.tensor(losses, dtype=torch.float64)
    total = math.fsum(losses)
    return torch.tensor(total if reduction == "sum" else (total / count if count else math.nan), dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_cross_entropy_matches_math(reduction, eps):
    logits = torch.randn(6, 11, dtype=torch.float64) * 3
    target = torch.tensor([3, -100, 0, 10, 7, -100])
    want = _ce_math(logits, target, -100, reduction, eps)
    got = ref_ce.cross_entropy(logits, target, ignore_index=-100, reduction=reduction, label_smoothing=eps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    all_ignored = torch.full((6,), -100)
    torch.testing.assert_close(ref_ce.cross_entropy(logits, all_ignored, ignore_index=-100, reduction=reduction,
                                                    label_smoothing=eps),
                               _ce_math(logits, all_ignored, -100, reduction, eps), equal_nan=True)


def test_linear_cross_entropy_matches_math():
    hidden, weight, bias = (torch.randn(5, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64),
                            torch.randn(9, dtype=torch.float64))
    target = torch.tensor([1, 8, -100, 0, 4])
    logits = torch.tensor([[math.fsum(h * w for h, w in zip(hr, wr)) + b for wr, b in zip(weight.tolist(),
                                                                                       bias.tolist())]
                           for hr in hidden.tolist()], dtype=torch.float64)
    torch.testing.assert_close(ref_ce.fused_linear_cross_entropy(hidden, weight, target, bias, label_smoothing=0.1),
                               _ce_math(logits, target, -100, "mean", 0.1), rtol=1e-12, atol=0)


def test_gradcheck():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ref.softmax(t, 1), (x,))
    assert torch.autograd.gradcheck(lambda t: ref.log_softmax(t, 0), (x,))
    keep = torch.rand(3, 5) > 0.4
    keep[0] = False  # an empty row: zero output, zero gradient, no NaN
    add = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ref.masked_softmax(t, keep, 0.5, causal=True), (x,))
    assert torch.autograd.gradcheck(lambda t, m: ref.masked_softmax(t, m, 2.0), (x, add))
    target = torch.tensor([4, -100, 0])
    assert torch.autograd.gradcheck(lambda t: ref_ce.cross_entropy(t, target, label_smoothing=0.2), (x,))
    hidden = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, b: ref_ce.fused_linear_cross_entropy(h, w, target, b, reduction="sum",
                                                             label_smoothing=0.1), (hidden, weight, bias))
