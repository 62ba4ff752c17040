"""The cross-entropy Triton kernels, their launchers and the same per-row contract in torch.

Per row, with ``y = softcap * tanh(x / softcap)`` (or ``y = x``), class weights ``w`` (or ones), smoothing ``eps``
over ``V`` classes and target ``t``:

* ``ce = (1 - eps) * w[t] * (lse - y[t]) + eps / V * (sum(w) * lse - sum(w * y))`` (torch's weighted, smoothed
  cross-entropy before reduction), ``z = s * lse**2`` (z-loss), ``argmax(y)`` when asked;
* the gradient ``dL/dx = (p * A - eps / V * ce_scale * w - [j == t] * (1 - eps) * w[t] * ce_scale) * dy/dx`` with
  ``p = softmax(y)`` and ``A = ce_scale * ((1 - eps) * w[t] + eps / V * sum(w)) + z_scale * 2 * s * lse``, where
  ``ce_scale`` / ``z_scale`` are what reduction and upstream gradient make of each term (``1/sum(w[t])`` and
  ``1/n_valid`` for ``mean``).

``_cross_entropy_kernel`` does a row in one program: pass 1 (online log-sum-exp, per-lane running max and rescaled
sum, plus the sums and argmax the options need), the loss, then pass 2 writing the gradient (the row is still in
L2). For logits sharded over the vocabulary (``process_group``) the two passes are separate kernels,
``_ce_stats_kernel`` and ``_ce_grad_kernel``, with the all-reduce of the row statistics in between.

Ignored rows read nothing and get loss 0 and gradient 0. A target outside ``[0, V)`` gives NaN loss and gradient
(the Python side raises before launching where checking costs no device sync).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from llmfast import _backend
from llmfast.ops._spec import launch
from llmfast.ops.softmax import cast_out

# ----------------------------------------------------------------------------------------------------------------
# Tuning, in one place
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VocabTile:
    """Columns of a row handled per loop iteration, and the warps of one program (one row)."""

    block_v: int
    num_warps: int


CE_TILES: dict[str, VocabTile] = {
    # Vocabularies up to 1024: one iteration, on 8 warps (4 values a thread; on 4 warps ptxas spilled 8 bytes of
    # the fp32 gradient with class weights and smoothing on sm_90, compile_check with the launch's specialization).
    "v1k": VocabTile(1024, 8),
    "v4k": VocabTile(4096, 8),   # larger vocabularies loop in 4096-column blocks
}


def pick_ce_tile(n_cols: int) -> tuple[str, VocabTile]:
    return ("v1k", CE_TILES["v1k"]) if n_cols <= 1024 else ("v4k", CE_TILES["v4k"])


# ----------------------------------------------------------------------------------------------------------------
# Options shared by the kernels and the torch implementation
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The per-row loss options (validated by the public functions). ``weight`` is fp32, contiguous, (V,)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    softcap: float | None = None
    weight: torch.Tensor | None = None
    track_argmax: bool = False
    token_scaling: bool = False  # Liger-Kernel's use_token_scaling: each row's loss and gradient times p[t]

    @property
    def plain(self) -> bool:
        """Nothing beyond what ``F.cross_entropy`` computes."""
        return self.lse_square_scale == 0 and self.softcap is None and not self.track_argmax \
            and not self.token_scaling


class RowsOut(NamedTuple):
    """Per-row results, all (N,): ``ce`` fp32 (unreduced, unnormalised), ``z`` fp32 or None (no z-loss),
    ``pred`` int64 (-1 for ignored rows) and ``acc`` fp32 (1.0 where ``pred == target``) or None."""

    ce: torch.Tensor
    z: torch.Tensor | None
    pred: torch.Tensor | None
    acc: torch.Tensor | None


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _softcap(x, softcap):
    """``softcap * tanh(x / softcap)`` and its derivative ``1 - tanh^2``, both accurate to fp32 rounding.

    tanh from exp(-2|u|) loses digits to cancellation near 0, so |u| < 0.3 uses the odd Taylor series (the first
    term left out is below 1e-10 relative there); the derivative from exp is written as 4e/(1+e)^2, which keeps its
    digits where 1 - tanh^2 would cancel (large |u|).
    """
    u = x / softcap
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    d_big = 4.0 * e / ((1.0 + e) * (1.0 + e))
    u2 = u * u
    poly = -1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0 + u2 * (
        -1382.0 / 155925.0 + u2 * (21844.0 / 6081075.0)))))
    small = a + a * u2 * poly
    near0 = a < 0.3
    t = tl.where(near0, small, big)
    t = tl.where(u < 0, -t, t)
    d = tl.where(near0, 1.0 - t * t, d_big)
    return softcap * t, d


@triton.jit
def _row_stats(logits_row, weight_ptr, n_read, softcap, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, TRACK_ARGMAX: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1 over the first ``n_read`` columns: max, sum of exp(y - max), sum(w*y) and sum(w) (smoothing) and the
    first argmax. Per-lane running values, combined at the end."""
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    run_wy = tl.zeros([BLOCK_V], tl.float32)
    run_w = tl.zeros([BLOCK_V], tl.float32)
    run_arg = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, n_read, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < n_read
        x = tl.load(logits_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            x, _ = _softcap(x, softcap)
            x = tl.where(ok, x, float("-inf"))
        if TRACK_ARGMAX:
            run_arg = tl.where(x > run_max, cols, run_arg)  # strict: a lane keeps its first maximum
        new_max = tl.maximum(run_max, x, propagate_nan=tl.PropagateNan.ALL)  # NaN must stick
        seen = new_max != float("-inf")  # a lane that has seen only -inf keeps sum 0, not NaN
        run_sum = tl.where(seen, run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max), 0.0)
        run_max = new_max
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=ok, other=0.0)
                run_wy += tl.where(ok, w * x, 0.0)
                run_w += w
            else:
                run_wy += tl.where(ok, x, 0.0)
    row_max = tl.max(run_max, axis=0)
    lane_weight = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_max - row_max))
    sum_exp = tl.sum(run_sum * lane_weight, axis=0)
    argmax = tl.min(tl.where(run_max == row_max, run_arg, 2147483647), axis=0)
    return row_max, sum_exp, tl.sum(run_wy, axis=0), tl.sum(run_w, axis=0), argmax


@triton.jit
def _row_grad(logits_row, grad_row, weight_ptr, n_cols, n_read, t_local, lse, a, coef_t, uni, softcap, active,
              HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
              BLOCK_V: tl.constexpr):
    """Pass 2: ``grad = (p * a - uni * w - [j == t] * coef_t) * dy/dx`` over all ``n_cols`` columns (zeros for an
    inactive row, which reads nothing). ``grad_row`` may equal ``logits_row``: each block is read first."""
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            y, dy = _softcap(x, softcap)
        else:
            y = x
        g = tl.exp(y - lse) * a
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= uni * tl.load(weight_ptr + cols, mask=cols < n_read, other=0.0)
            else:
                g -= uni
        g = tl.where(cols == t_local, g - coef_t, g)
        if HAS_SOFTCAP:
            g *= dy
        g = tl.where(active, g, 0.0)
        tl.store(grad_row + cols, cast_out(g, grad_row.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, grad_ptr, loss_ptr, z_ptr, pred_ptr, acc_ptr, target_ptr, weight_ptr, scale_ptr,
    n_cols, logits_row_stride, grad_row_stride, scale_row_stride, z_scale_offset,
    ignore_index, label_smoothing, lse_square_scale, softcap,
    HAS_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    TRACK_ARGMAX: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    TOKEN_SCALING: tl.constexpr = False,
):
    """One row: loss terms (ce, z, argmax) and, with COMPUTE_GRAD, the gradient scaled by ``scale_ptr``'s row
    entries (ce scale at +0, z scale at +z_scale_offset). TOKEN_SCALING multiplies the row's loss terms and
    gradient by p[t] = exp(y[t] - lse), a constant for autograd (Liger-Kernel's ``use_token_scaling``)."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    target = tl.load(target_ptr + row).to(tl.int64)
    active = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    n_read = tl.where(active, n_cols, 0)  # columns this row reads: none for ignored rows
    safe_t = tl.where(active & in_range, target, 0)

    row_max, sum_exp, sum_wy, sum_w, argmax = _row_stats(logits_row, weight_ptr, n_read, softcap, HAS_SOFTCAP,
                                                         HAS_SMOOTHING, HAS_WEIGHT, TRACK_ARGMAX, BLOCK_V)
    lse = row_max + tl.log(sum_exp)
    y_t = tl.load(logits_row + safe_t).to(tl.float32)
    if HAS_SOFTCAP:
        y_t, _ = _softcap(y_t, softcap)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + safe_t)
        ce = w_t * (lse - y_t)
        if HAS_SMOOTHING:
            ce = (1.0 - label_smoothing) * ce + (label_smoothing / n_cols) * (sum_w * lse - sum_wy)
    else:
        w_t = 1.0
        sum_w = n_cols * 1.0
        if HAS_SMOOTHING:
            ce = lse - (1.0 - label_smoothing) * y_t - label_smoothing * (sum_wy / n_cols)
        else:
            ce = lse - y_t
    bad = tl.where(in_range, 0.0, float("nan"))  # NaN for a target out of range, 0 otherwise
    p_t = 1.0
    if TOKEN_SCALING:
        p_t = tl.exp(y_t - lse)
    tl.store(loss_ptr + row, tl.where(active, ce * p_t + bad, 0.0))
    if HAS_ZLOSS:
        tl.store(z_ptr + row, tl.where(active, lse_square_scale * lse * lse * p_t + bad, 0.0))
    if TRACK_ARGMAX:
        tl.store(pred_ptr + row, tl.where(active, argmax.to(tl.int64), -1))
        tl.store(acc_ptr + row, tl.where(active & (argmax == target), 1.0, 0.0))

    if COMPUTE_GRAD:
        ce_scale = tl.load(scale_ptr + row * scale_row_stride).to(tl.float32) * p_t
        coef_t = (1.0 - label_smoothing) * w_t * ce_scale + bad
        a = ce_scale * ((1.0 - label_smoothing) * w_t + (label_smoothing / n_cols) * sum_w) + bad
        if HAS_ZLOSS:
            z_scale = tl.load(scale_ptr + row * scale_row_stride + z_scale_offset).to(tl.float32) * p_t
            a += 2.0 * lse_square_scale * lse * z_scale
        uni = (label_smoothing / n_cols) * ce_scale
        _row_grad(logits_row, grad_ptr + row * grad_row_stride, weight_ptr, n_cols, n_read, target, lse, a, coef_t,
                  uni, softcap, active, HAS_SOFTCAP, HAS_SMOOTHING, HAS_WEIGHT, BLOCK_V)


@triton.jit
def _ce_stats_kernel(
    logits_ptr, target_ptr, weight_ptr, max_ptr, sumexp_ptr, yt_ptr, wy_ptr, arg_ptr,
    n_cols, logits_row_stride, vocab_start, ignore_index, softcap,
    HAS_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    TRACK_ARGMAX: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Pass 1 of a vocabulary shard ``[vocab_start, vocab_start + n_cols)``: the row's shard max, sum of
    exp(y - max), target logit (0 when the target is in another shard), sum(w*y) and argmax (global index)."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    target = tl.load(target_ptr + row).to(tl.int64)
    active = target != ignore_index
    t_local = target - vocab_start
    here = active & (t_local >= 0) & (t_local < n_cols)
    n_read = tl.where(active, n_cols, 0)
    row_max, sum_exp, sum_wy, _, argmax = _row_stats(logits_row, weight_ptr, n_read, softcap, HAS_SOFTCAP,
                                                     HAS_SMOOTHING, HAS_WEIGHT, TRACK_ARGMAX, BLOCK_V)
    y_t = tl.load(logits_row + tl.where(here, t_local, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        y_t, _ = _softcap(y_t, softcap)
    tl.store(max_ptr + row, row_max)
    tl.store(sumexp_ptr + row, sum_exp)
    tl.store(yt_ptr + row, tl.where(here, y_t, 0.0))
    if HAS_SMOOTHING:
        tl.store(wy_ptr + row, sum_wy)
    if TRACK_ARGMAX:
        tl.store(arg_ptr + row, argmax.to(tl.int64) + vocab_start)


@triton.jit
def _ce_grad_kernel(
    logits_ptr, grad_ptr, target_ptr, weight_ptr, lse_ptr, a_ptr, coef_ptr, uni_ptr,
    n_cols, logits_row_stride, grad_row_stride, vocab_start, ignore_index, softcap,
    HAS_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Pass 2 of a vocabulary shard, with the row's global ``lse`` and coefficients computed from the reduced
    statistics (``uni`` is one value for all rows)."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row).to(tl.int64)
    active = target != ignore_index
    n_read = tl.where(active, n_cols, 0)
    _row_grad(logits_ptr + row * logits_row_stride, grad_ptr + row * grad_row_stride, weight_ptr, n_cols, n_read,
              target - vocab_start, tl.load(lse_ptr + row), tl.load(a_ptr + row), tl.load(coef_ptr + row),
              tl.load(uni_ptr), softcap, active, HAS_SOFTCAP, HAS_SMOOTHING, HAS_WEIGHT, BLOCK_V)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _config(n_cols: int) -> dict[str, object]:
    """What a launch records (``llmfast._backend.last_launch_config``): the vocabulary tiles are the same on every
    architecture, so LLMFAST_CONFIG_ARCH does not change them."""
    name, tile = pick_ce_tile(n_cols)
    return {"config": name, "BLOCK_V": tile.block_v, "num_warps": tile.num_warps}


def _flags(opts: LossOptions) -> dict[str, bool]:
    return {"HAS_SMOOTHING": opts.label_smoothing > 0, "HAS_WEIGHT": opts.weight is not None,
            "HAS_SOFTCAP": opts.softcap is not None}


def rows_triton(logits: torch.Tensor, target: torch.Tensor, opts: LossOptions, grad: torch.Tensor | None = None,
                scale: torch.Tensor | None = None, per_row: bool = False) -> RowsOut:
    """Per-row results of 2-D ``logits`` (unit column stride). With ``grad`` (may be ``logits`` itself), also the
    gradient, scaled by ``scale``: fp32 ``[ce_scale, z_scale]`` for every row, or (``per_row``) one fp32 value per
    row for both terms (the upstream gradient of ``reduction="none"``)."""
    n_rows, n_cols = logits.shape
    dev = logits.device
    ce = torch.empty(n_rows, device=dev, dtype=torch.float32)
    z = torch.empty(n_rows, device=dev, dtype=torch.float32) if opts.lse_square_scale != 0 else None
    pred = torch.empty(n_rows, device=dev, dtype=torch.int64) if opts.track_argmax else None
    acc = torch.empty(n_rows, device=dev, dtype=torch.float32) if opts.track_argmax else None
    if n_rows == 0:
        return RowsOut(ce, z, pred, acc)
    _, tile = pick_ce_tile(n_cols)
    compute_grad = grad is not None
    if compute_grad:
        scale_stride, z_offset = (scale.stride(0), 0) if per_row else (0, 1)
    else:
        scale, scale_stride, z_offset = ce, 0, 0
    _backend.record_kernel_launch("cross_entropy_fwd" + ("_grad" if compute_grad else ""), _config(n_cols))
    launch(_cross_entropy_kernel, (n_rows,))(
        logits, grad if compute_grad else logits, ce, z if z is not None else ce,
        pred if pred is not None else target, acc if acc is not None else ce, target,
        opts.weight if opts.weight is not None else ce, scale,
        n_cols, logits.stride(0), grad.stride(0) if compute_grad else 0, scale_stride, z_offset,
        int(opts.ignore_index), float(opts.label_smoothing), float(opts.lse_square_scale),
        float(opts.softcap) if opts.softcap is not None else 1.0,
        HAS_ZLOSS=z is not None, TRACK_ARGMAX=opts.track_argmax, COMPUTE_GRAD=compute_grad,
        TOKEN_SCALING=opts.token_scaling,
        BLOCK_V=tile.block_v, num_warps=tile.num_warps, **_flags(opts))
    return RowsOut(ce, z, pred, acc)


class ShardStats(NamedTuple):
    row_max: torch.Tensor
    sum_exp: torch.Tensor
    y_t: torch.Tensor
    sum_wy: torch.Tensor | None
    argmax: torch.Tensor | None


def shard_stats_triton(logits: torch.Tensor, target: torch.Tensor, opts: LossOptions, vocab_start: int,
                       weight_shard: torch.Tensor | None) -> ShardStats:
    """Pass 1 over a vocabulary shard (see ``_ce_stats_kernel``)."""
    n_rows, n_cols = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    out = ShardStats(torch.empty(n_rows, **f32), torch.empty(n_rows, **f32), torch.empty(n_rows, **f32),
                     torch.empty(n_rows, **f32) if opts.label_smoothing > 0 else None,
                     torch.empty(n_rows, device=logits.device, dtype=torch.int64) if opts.track_argmax else None)
    if n_rows == 0:
        return out
    _, tile = pick_ce_tile(n_cols)
    _backend.record_kernel_launch("cross_entropy_shard_stats", _config(n_cols))
    flags = _flags(opts)
    flags["HAS_WEIGHT"] = weight_shard is not None
    launch(_ce_stats_kernel, (n_rows,))(
        logits, target, weight_shard if weight_shard is not None else out.row_max, out.row_max, out.sum_exp,
        out.y_t, out.sum_wy if out.sum_wy is not None else out.row_max,
        out.argmax if out.argmax is not None else target,
        n_cols, logits.stride(0), int(vocab_start), int(opts.ignore_index),
        float(opts.softcap) if opts.softcap is not None else 1.0,
        TRACK_ARGMAX=opts.track_argmax, BLOCK_V=tile.block_v, num_warps=tile.num_warps, **flags)
    return out


def shard_grad_triton(logits: torch.Tensor, grad: torch.Tensor, target: torch.Tensor, opts: LossOptions,
                      vocab_start: int, weight_shard: torch.Tensor | None, lse: torch.Tensor, a: torch.Tensor,
                      coef_t: torch.Tensor, uni: torch.Tensor) -> None:
    """Pass 2 over a vocabulary shard (see ``_ce_grad_kernel``); ``grad`` may be ``logits``."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    _, tile = pick_ce_tile(n_cols)
    _backend.record_kernel_launch("cross_entropy_shard_grad", _config(n_cols))
    flags = _flags(opts)
    flags["HAS_WEIGHT"] = weight_shard is not None
    launch(_ce_grad_kernel, (n_rows,))(
        logits, grad, target, weight_shard if weight_shard is not None else lse, lse, a, coef_t, uni,
        n_cols, logits.stride(0), grad.stride(0), int(vocab_start), int(opts.ignore_index),
        float(opts.softcap) if opts.softcap is not None else 1.0,
        BLOCK_V=tile.block_v, num_warps=tile.num_warps, **flags)


# ----------------------------------------------------------------------------------------------------------------
# The same contract with torch ops (CPU "auto" path, float64)
# ----------------------------------------------------------------------------------------------------------------

# Rows per block of the torch path: its fp32 working buffer is at most this many bytes (or one row), so 16-bit
# logits never get an fp32 copy of their full size beside them.
TORCH_BLOCK_BYTES = 2 * 2**20


def rows_torch(logits: torch.Tensor, target: torch.Tensor, opts: LossOptions, grad: torch.Tensor | None = None,
               scale: torch.Tensor | None = None, per_row: bool = False) -> RowsOut:
    """:func:`rows_triton`'s contract with torch ops, a block of rows at a time.

    Math is fp32 (fp64 for fp64 logits). Where the logits are fp32/fp64 and are the gradient's own destination, the
    block is worked on in place; otherwise a block-sized fp32 buffer is used and the gradient is written back to
    ``grad`` (in its dtype) block by block.
    """
    n_rows, n_cols = logits.shape
    dev = logits.device
    ce = torch.empty(n_rows, device=dev, dtype=torch.float32)
    z = torch.empty(n_rows, device=dev, dtype=torch.float32) if opts.lse_square_scale != 0 else None
    pred = torch.empty(n_rows, device=dev, dtype=torch.int64) if opts.track_argmax else None
    acc = torch.empty(n_rows, device=dev, dtype=torch.float32) if opts.track_argmax else None
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    block = max(1, TORCH_BLOCK_BYTES // max(1, n_cols * 4))
    eps, s = float(opts.label_smoothing), float(opts.lse_square_scale)
    weight = opts.weight.to(work_dtype) if opts.weight is not None else None
    for start in range(0, n_rows, block):
        end = min(start + block, n_rows)
        src, t = logits[start:end], target[start:end]
        in_place = grad is not None and src.dtype == work_dtype and grad.data_ptr() == logits.data_ptr() \
            and grad.stride() == logits.stride()
        y = src if in_place else src.to(work_dtype, copy=True)
        active = t != opts.ignore_index
        in_range = (t >= 0) & (t < n_cols)
        safe_t = torch.where(active & in_range, t, torch.zeros_like(t)).long()
        dy = None
        if opts.softcap is not None:
            y.div_(opts.softcap).tanh_()
            if grad is not None:
                dy = 1.0 - y * y
            y.mul_(opts.softcap)
        y_t = y.gather(1, safe_t[:, None]).squeeze(1)
        if opts.track_argmax:
            p = y.argmax(dim=1)
            pred[start:end] = torch.where(active, p, torch.full_like(p, -1))
            acc[start:end] = ((p == t) & active).float()
        w_t = weight[safe_t] if weight is not None else None
        sum_wy = None
        if eps > 0:
            sum_wy = (y * weight).sum(dim=1) if weight is not None else y.sum(dim=1)
        row_max = y.amax(dim=1)
        sum_exp = y.sub_(row_max[:, None]).exp_().sum(dim=1)  # y now holds exp(y - max)
        lse = row_max + sum_exp.log()
        if weight is not None:
            sum_w = weight.sum()
            row = w_t * (lse - y_t)
            if eps > 0:
                row = (1.0 - eps) * row + eps / n_cols * (sum_w * lse - sum_wy)
        else:
            sum_w = torch.tensor(float(n_cols), dtype=work_dtype, device=dev)
            row = lse - (1.0 - eps) * y_t - (eps * sum_wy / n_cols if eps > 0 else 0.0)
        bad = torch.where(in_range, 0.0, float("nan")).to(work_dtype)
        p_t = (y_t - lse).exp() if opts.token_scaling else torch.ones_like(lse)
        ce[start:end] = torch.where(active, row * p_t + bad, 0.0)
        if z is not None:
            z[start:end] = torch.where(active, s * lse * lse * p_t + bad, 0.0)
        if grad is None:
            continue
        sc = scale.to(work_dtype)
        if per_row:
            ce_scale = z_scale = sc[start:end]
        else:
            ce_scale, z_scale = sc[0], sc[1]
        if opts.token_scaling:
            ce_scale, z_scale = ce_scale * p_t, z_scale * p_t
        wt = w_t if w_t is not None else torch.ones_like(lse)
        a = ce_scale * ((1.0 - eps) * wt + eps / n_cols * sum_w) + bad
        if z is not None:
            a = a + 2.0 * s * lse * z_scale
        coef_t = (1.0 - eps) * wt * ce_scale + bad
        y.div_(sum_exp[:, None]).mul_(a[:, None])  # softmax * a
        if eps > 0:
            uni = eps / n_cols * ce_scale
            uni = uni[:, None] if uni.dim() == 1 else uni
            if weight is not None:
                y.addcmul_(uni, weight[None, :], value=-1.0)
            else:
                y.sub_(uni)
        y.scatter_add_(1, safe_t[:, None], -coef_t[:, None].expand(-1, 1).to(work_dtype))
        if dy is not None:
            y.mul_(dy)
        y.masked_fill_(~active[:, None], 0.0)
        if not in_place:
            grad[start:end].copy_(y)
    return RowsOut(ce, z, pred, acc)

