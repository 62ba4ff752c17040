"""Triton cross-entropy and fused linear cross-entropy.

``cross_entropy``: one program per row makes one pass over the logits for the loss (an online log-sum-exp plus
the target logit, and the logits' sum for label smoothing) and, when the logits need a gradient, a second pass
that writes ``softmax - (1 - eps) * onehot - eps / V`` (times 1/n_valid for ``mean``) right away. Backward then
only scales that stored gradient by the upstream gradient (nothing at all when it is 1, as for a plain
``loss.backward()``): no second softmax, no saved log-probabilities. Math is fp32 whatever the logits' dtype.

Where the gradient goes: by default into a new buffer (the logits are left alone). With
``inplace_backward=True`` it overwrites the logits' own storage, saving an (N, V) buffer; only do that when
nothing reads the logits afterwards (they usually are a throw-away intermediate such as ``lm_head(h)``). The
logits' autograd version counter is bumped, so another autograd node that saved them raises instead of
silently using gradients as logits. Internally-made copies (the ``(N, C, d1, ...)`` layout is made contiguous as
``(N*d1*..., C)``) are always overwritten in place since nothing else can see them.

``fused_linear_cross_entropy``: ``cross_entropy(hidden @ weight.T + bias, target)`` without ever holding the
(N, V) logits: tokens go through in chunks; each chunk's logits are computed, turned into their gradient in place
by the kernel above, and immediately contracted into ``grad_hidden`` (chunk rows) and ``grad_weight``/``grad_bias``
(accumulated in fp32), all during the forward as Liger-Kernel does. Memory is O(chunk x V) plus the gradients
themselves. With ``reduction="none"`` the per-row upstream gradient is only known in backward, so the forward
computes losses only and backward recomputes each chunk's logits.

Targets outside ``[0, V)`` (other than ``ignore_index``) raise on CPU tensors; on CUDA, checking would need a
device sync, so the kernel gives such rows a NaN loss and NaN gradient instead (loud, never silently wrong).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmfast import _backend, _validation
from llmfast.ops._spec import KernelSpec
from llmfast.ops.softmax import cast_out
from llmfast.reference import cross_entropy as reference

# ----------------------------------------------------------------------------------------------------------------
# Tuning, in one place
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VocabTile:
    """Columns of a row handled per loop iteration, and the warps of one program (one row)."""

    block_v: int
    num_warps: int


CE_TILES: dict[str, VocabTile] = {
    "v1k": VocabTile(1024, 4),   # vocabularies up to 1024: one iteration
    "v4k": VocabTile(4096, 8),   # larger vocabularies loop in 4096-column blocks
}
# Fused linear cross-entropy: token rows per chunk. At least MIN_CHUNKS chunks (so the chunk logits are at most a
# quarter of the full logits) and at most CHUNK_LOGITS_BYTES of logits per chunk, but never fewer than
# MIN_CHUNK_ROWS rows, which keeps the per-chunk matmuls reasonably shaped.
MIN_CHUNKS = 4
CHUNK_LOGITS_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 16

REDUCTIONS = ("none", "mean", "sum")
TARGET_DTYPES = (torch.int64, torch.int32)
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pick_ce_tile(n_cols: int) -> tuple[str, VocabTile]:
    return ("v1k", CE_TILES["v1k"]) if n_cols <= 1024 else ("v4k", CE_TILES["v4k"])


# ----------------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, grad_ptr, loss_ptr, target_ptr, grad_scale_ptr,
    n_cols, logits_row_stride, grad_row_stride, grad_scale_stride,
    ignore_index, label_smoothing,
    HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row: loss = lse - (1 - eps) * x[t] - eps * mean(x); optionally grad = (softmax - smoothed onehot) * scale.

    ``grad_ptr`` may equal ``logits_ptr`` (gradient in place): each block is read before it is overwritten and
    rows are private to their program.
    """
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    target = tl.load(target_ptr + row).to(tl.int64)
    active = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    n_read = tl.where(active, n_cols, 0)  # columns this row reads: none for ignored rows

    # Pass 1: online log-sum-exp, per-lane running max and rescaled sum.
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    run_total = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < n_read
        x = tl.load(logits_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x, propagate_nan=tl.PropagateNan.ALL)  # NaN must stick
        seen = new_max != float("-inf")  # a lane that has seen only -inf keeps sum 0, not NaN
        run_sum = tl.where(seen, run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max), 0.0)
        run_max = new_max
        if HAS_SMOOTHING:
            run_total += tl.where(ok, x, 0.0)
    row_max = tl.max(run_max, axis=0)
    lane_weight = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_max - row_max))
    lse = row_max + tl.log(tl.sum(run_sum * lane_weight, axis=0))

    x_target = tl.load(logits_row + tl.where(active & in_range, target, 0)).to(tl.float32)
    if HAS_SMOOTHING:
        loss = lse - (1.0 - label_smoothing) * x_target - label_smoothing * (tl.sum(run_total, axis=0) / n_cols)
    else:
        loss = lse - x_target
    loss = tl.where(active, tl.where(in_range, loss, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        # Pass 2: the gradient, scaled now (1/n_valid for mean, or the upstream per-row gradient) so backward has
        # nothing left to do. Ignored rows get zeros without reading the logits; bad targets get NaN.
        scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
        scale = tl.where(active, tl.where(in_range, scale, float("nan")), 0.0)
        grad_row = grad_ptr + row * grad_row_stride
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            x = tl.load(logits_row + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
            g = tl.exp(x - lse)
            if HAS_SMOOTHING:
                g -= label_smoothing / n_cols
                g = tl.where(cols == target, g - (1.0 - label_smoothing), g)
            else:
                g = tl.where(cols == target, g - 1.0, g)
            g = tl.where(active, g * scale, 0.0)
            tl.store(grad_row + cols, cast_out(g, grad_ptr.dtype.element_ty), mask=in_row)


def _cross_entropy_rows_triton(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                               label_smoothing: float, grad: torch.Tensor | None,
                               grad_scale: torch.Tensor | None) -> torch.Tensor:
    """Per-row fp32 losses of 2-D ``logits`` (unit column stride); with ``grad`` (may be ``logits`` itself),
    also the gradient times ``grad_scale`` (a 0-d or per-row fp32 tensor)."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    if n_rows == 0:
        return loss
    _, tile = pick_ce_tile(n_cols)
    compute_grad = grad is not None
    scale = grad_scale if compute_grad else loss
    _backend.record_kernel_launch("cross_entropy_fwd" + ("_grad" if compute_grad else ""))
    _cross_entropy_kernel[(n_rows,)](
        logits, grad if compute_grad else logits, loss, target, scale,
        n_cols, logits.stride(0), grad.stride(0) if compute_grad else 0,
        scale.stride(0) if scale.dim() == 1 else 0,
        int(ignore_index), float(label_smoothing),
        HAS_SMOOTHING=label_smoothing > 0, COMPUTE_GRAD=compute_grad, BLOCK_V=tile.block_v,
        num_warps=tile.num_warps)
    return loss


def _cross_entropy_rows_torch(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                              label_smoothing: float, grad: torch.Tensor | None,
                              grad_scale: torch.Tensor | None) -> torch.Tensor:
    """Same contract as the Triton version with torch ops (the CPU path of the chunked fused op).

    Works in one fp32 buffer: a copy of 16-bit logits, or the fp32 logits themselves when they are the gradient's
    destination (the chunk is private), so no temporary of the chunk's size is made beyond that buffer.
    """
    n_cols = logits.shape[1]
    x = logits.float()
    if x.data_ptr() == logits.data_ptr() and (grad is None or grad.data_ptr() != logits.data_ptr()):
        x = x.clone()  # the caller's logits must survive
    active = target != ignore_index
    safe_target = torch.where(active, target, torch.zeros_like(target)).long()
    loss = -(1.0 - label_smoothing) * x.gather(1, safe_target[:, None]).squeeze(1)
    if label_smoothing > 0:
        loss -= label_smoothing * x.mean(dim=1)
    row_max = x.amax(dim=1)
    exp_sum = x.sub_(row_max[:, None]).exp_().sum(dim=1)  # x now holds exp(x - max)
    loss += row_max + exp_sum.log()                          # + log-sum-exp
    loss = torch.where(active, loss, torch.zeros_like(loss))
    if grad is not None:
        x.div_(exp_sum[:, None])  # softmax
        if label_smoothing > 0:
            x.sub_(label_smoothing / n_cols)
        x.scatter_add_(1, safe_target[:, None], torch.full_like(x[:, :1], label_smoothing - 1.0))
        x.mul_((grad_scale.expand(target.shape) * active)[:, None])
        if x.data_ptr() != grad.data_ptr():
            grad.copy_(x)
    return loss


# ----------------------------------------------------------------------------------------------------------------
# Validation and shapes
# ----------------------------------------------------------------------------------------------------------------


def _check_common(target: torch.Tensor, ignore_index: object, reduction: object, label_smoothing: object) -> None:
    _validation.check_tensor("target", target, dtypes=TARGET_DTYPES)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def _check_target_values(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Out-of-range targets raise for CPU tensors; on CUDA the kernel marks them NaN (checking would sync)."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"target values must be in [0, {n_classes}) or ignore_index={ignore_index}, got {value}")


def _canonical_logits(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, classes) logits and (rows,) targets from torch's layouts: (C,)+(), (N, C)+(N,), (N, C, d...)+(N, d...)."""
    if logits.dim() == 0:
        raise ValueError("logits must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    if logits.dim() == 1:
        expected = ()
    else:
        expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        layout = {1: "()", 2: "(N,)"}.get(logits.dim(), "(N, d1, ...)")
        raise ValueError(f"target must have shape {layout} = {expected} for logits of shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    if logits.shape[-1 if logits.dim() == 1 else 1] == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if logits.dim() == 1:
        return logits.unsqueeze(0), target.reshape(1)
    if logits.dim() == 2:
        rows = logits
    else:
        rows = logits.movedim(1, -1).reshape(-1, logits.shape[1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, target.reshape(-1).contiguous()


def _reduce(loss_rows: torch.Tensor, n_valid: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / n_valid  # all rows ignored: 0 / 0 = NaN, as torch gives
    return total.to(dtype)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ----------------------------------------------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------------------------------------------


def _scale_stored_grad(ctx, grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Multiply the gradient computed in forward by the upstream gradient, in place (skipped when it is 1)."""
    if grad_output.dim() == 0:
        if float(grad_output) == 1.0:
            return grad
        scale = grad_output.to(grad.dtype)
    else:
        scale = grad_output.reshape(-1, 1).to(grad.dtype)
    if ctx.grad_consumed:
        raise RuntimeError("llmfast cross_entropy: backward ran twice on a loss whose stored gradient was already "
                           "scaled in place; recompute the loss instead of using retain_graph=True")
    ctx.grad_consumed = True
    return grad.mul_(scale)


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
                label_smoothing: float, inplace: bool) -> torch.Tensor:
        active = target != ignore_index
        n_valid = active.sum().to(torch.float32)
        grad = None
        if logits.requires_grad:
            if inplace:
                grad = logits
                torch.autograd.graph.increment_version(logits)
            else:
                grad = torch.empty_like(logits)
        if reduction == "mean":
            grad_scale = 1.0 / n_valid
        else:
            grad_scale = torch.ones((), device=logits.device, dtype=torch.float32)
        loss_rows = _cross_entropy_rows_triton(logits, target, ignore_index, label_smoothing, grad, grad_scale)
        ctx.grad_logits = grad
        ctx.grad_consumed = False
        return _reduce(loss_rows, n_valid, reduction, logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        grad = _scale_stored_grad(ctx, ctx.grad_logits, grad_output)
        return grad, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, inplace_backward: bool = False) -> torch.Tensor:
    """Cross-entropy between ``logits`` and class indices ``target``, with ``F.cross_entropy``'s semantics.

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``; fp16/bf16/fp32 (math in fp32), fp64 through torch.
        target: class indices, int64 or int32, shaped ``()``, ``(N,)`` or ``(N, d1, ...)``.
        ignore_index: targets equal to it add nothing and get zero gradient.
        reduction: ``"mean"`` (over non-ignored targets; NaN when all are ignored, as torch), ``"sum"``, ``"none"``.
        label_smoothing: eps in [0, 1]: the target distribution is ``(1 - eps) * onehot + eps / C``.
        inplace_backward: write the gradient into the logits' storage during forward instead of a new buffer (saves
            an (N, C) buffer). Only when nothing reads ``logits`` after this call; see the module docstring.

    The loss is returned in the logits' dtype. The gradient is computed during forward (one kernel, no softmax
    saved), so backward costs nothing when the upstream gradient is 1.
    """
    _validation.check_tensor("logits", logits, dtypes=LOGIT_DTYPES)
    _check_common(target, ignore_index, reduction, label_smoothing)
    _validation.check_same_device(logits=logits, target=target)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    rows, flat_target = _canonical_logits(logits, target)
    _check_target_values(flat_target, rows.shape[1], ignore_index)
    impl = _backend.resolve("cross_entropy", logits)
    if impl == "reference":
        return reference.cross_entropy(logits, target, ignore_index, reduction, label_smoothing)
    if impl == "torch" or logits.dtype == torch.float64:
        return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=float(label_smoothing))
    # A reshaped copy made above is private, so its storage can take the gradient.
    inplace = inplace_backward or not _shares_storage(rows, logits)
    loss = _CrossEntropyFunction.apply(rows, flat_target, ignore_index, reduction, float(label_smoothing), inplace)
    if reduction == "none":
        return loss.reshape(target.shape)
    return loss


# ----------------------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy
# ----------------------------------------------------------------------------------------------------------------

_RowsFn = Callable[[torch.Tensor, torch.Tensor, int, float, "torch.Tensor | None", "torch.Tensor | None"],
                   torch.Tensor]


def chunk_rows(n_rows: int, n_classes: int, element_size: int) -> int:
    """Token rows per chunk of the fused linear cross-entropy (see MIN_CHUNKS / CHUNK_LOGITS_BYTES)."""
    by_count = triton.next_power_of_2(max(1, triton.cdiv(n_rows, MIN_CHUNKS)))
    by_bytes = max(1, CHUNK_LOGITS_BYTES // max(1, n_classes * element_size))
    by_bytes = 1 << (by_bytes.bit_length() - 1)  # round down to a power of two
    return max(MIN_CHUNK_ROWS, min(by_count, by_bytes))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()


_mm_out_dtype_works = True  # torch.mm(..., out_dtype=) for 16-bit CUDA inputs: torch >= 2.8


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc (fp32) += grad_logits.T @ hidden without rounding the chunk's product to a 16-bit dtype (rounding
    every chunk's partial sum would add up to several times the error of torch's single matmul)."""
    global _mm_out_dtype_works
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden)
        return
    if grad_logits.is_cuda and _mm_out_dtype_works:
        try:
            acc += torch.mm(grad_logits.t(), hidden, out_dtype=acc.dtype)  # 16-bit tensor cores, fp32 result
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _mm_out_dtype_works = False
    acc.addmm_(grad_logits.t().to(acc.dtype), hidden.to(acc.dtype))


def _linear_ce_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                      ignore_index: int, label_smoothing: float, rows_fn: _RowsFn, chunk: int,
                      grad_scale: torch.Tensor | None, need: tuple[bool, bool, bool]):
    """Loop over token chunks: per-row losses and, when ``grad_scale`` is given, the three gradients.

    ``grad_scale`` is 0-d (mean/sum: 1/n_valid or 1) or per row (the upstream gradient for reduction "none").
    """
    n_rows = hidden.shape[0]
    loss_rows = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    compute_grad = grad_scale is not None
    grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype) \
        if compute_grad and need[0] else None
    # fp32 accumulators across chunks, cast to the weight's dtype once at the end.
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
        if compute_grad and need[1] else None
    grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) \
        if compute_grad and need[2] and bias is not None else None
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias)
        scale = None
        if compute_grad:
            scale = grad_scale if grad_scale.dim() == 0 else grad_scale[start:end]
        # The chunk's logits become their gradient in place.
        loss_rows[start:end] = rows_fn(logits, target[start:end], ignore_index, label_smoothing,
                                       logits if compute_grad else None, scale)
        if not compute_grad:
            continue
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            _accumulate_weight_grad(grad_weight, logits, h)
        if grad_bias is not None:
            grad_bias += logits.sum(dim=0, dtype=torch.float32)
        del logits
    return loss_rows, grad_hidden, grad_weight, grad_bias


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                ignore_index: int, reduction: str, label_smoothing: float, chunk: int, rows_fn: _RowsFn,
                loss_dtype: torch.dtype) -> torch.Tensor:
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        n_valid = (target != ignore_index).sum().to(torch.float32)
        grad_scale = None
        if any(need) and reduction != "none":
            grad_scale = 1.0 / n_valid if reduction == "mean" else torch.ones((), device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # inputs are already in the dtype to use
            loss_rows, gh, gw, gb = _linear_ce_chunks(hidden, weight, bias, target, ignore_index, label_smoothing,
                                                      rows_fn, chunk, grad_scale, need)
        ctx.need, ctx.reduction = need, reduction
        ctx.weight_dtype = weight.dtype
        ctx.grads = (gh, gw, gb)
        ctx.grad_consumed = False
        if reduction == "none" and any(need):
            # The per-row upstream gradient is known only in backward: keep the inputs and recompute there.
            ctx.save_for_backward(hidden, weight, bias, target)
            ctx.recompute = (ignore_index, label_smoothing, chunk, rows_fn)
        return _reduce(loss_rows, n_valid, reduction, loss_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            ignore_index, label_smoothing, chunk, rows_fn = ctx.recompute
            with torch.autocast(hidden.device.type, enabled=False):
                _, gh, gw, gb = _linear_ce_chunks(hidden, weight, bias, target, ignore_index, label_smoothing,
                                                  rows_fn, chunk, grad_output.reshape(-1).float(), ctx.need)
        else:
            gh, gw, gb = ctx.grads
            if float(grad_output) != 1.0:
                if ctx.grad_consumed:
                    raise RuntimeError("llmfast fused_linear_cross_entropy: backward ran twice on a loss whose "
                                       "stored gradients were already scaled; recompute the loss instead")
                ctx.grad_consumed = True
                for g in (gh, gw, gb):
                    if g is not None:
                        g.mul_(grad_output.to(g.dtype))
        ctx.grads = (None, None, None)
        gw = gw.to(ctx.weight_dtype) if gw is not None else None
        gb = gb.to(ctx.weight_dtype) if gb is not None else None
        return gh, gw, gb, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", *, label_smoothing: float = 0.0,
                               chunk_size: int | None = None) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materialising the (N, V) logits.

    Args:
        hidden: ``(N, C)`` (or ``(..., C)``), fp16/bf16/fp32.
        weight: ``(V, C)``, the output projection (e.g. the tied embedding), same dtype as ``hidden``.
        target: int64/int32 class indices shaped like ``hidden`` without its last dim.
        bias: optional ``(V,)``.
        ignore_index, reduction, label_smoothing: as :func:`cross_entropy`.
        chunk_size: token rows per chunk (default: :func:`chunk_rows`); peak extra memory is about
            ``chunk_size x V`` logits plus the gradients of ``hidden``, ``weight`` and ``bias``.

    Gradients of ``hidden``, ``weight`` and ``bias`` are computed chunk by chunk during forward (for ``"mean"``
    and ``"sum"``) and only scaled in backward.
    """
    _validation.check_tensor("hidden", hidden, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    _validation.check_tensor("weight", weight, ndim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32,
                                                                torch.float64))
    _check_common(target, ignore_index, reduction, label_smoothing)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape (N, C) with C = weight.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(hidden.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                         f"got {tuple(target.shape)}")
    if bias is not None:
        _validation.check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    _validation.check_same_dtype(hidden=hidden, weight=weight, bias=bias)
    _validation.check_same_device(hidden=hidden, weight=weight, target=target, bias=bias)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (class), got shape (0, C)")
    device_type = hidden.device.type
    loss_dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        loss_dtype = torch.float32  # as F.cross_entropy under autocast
        # As F.linear would under autocast: the projection runs in the autocast dtype (the loss math is fp32).
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    flat_target = target.reshape(-1).contiguous()
    _check_target_values(flat_target, weight.shape[0], ignore_index)
    impl = _backend.resolve("fused_linear_cross_entropy", hidden)
    if impl == "reference":
        return reference.fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction,
                                                     label_smoothing)
    rows_fn = _cross_entropy_rows_triton if impl == "triton" and hidden.dtype != torch.float64 \
        else _cross_entropy_rows_torch
    chunk = chunk_size or chunk_rows(hidden2d.shape[0], weight.shape[0], hidden.element_size())
    loss = _FusedLinearCrossEntropyFunction.apply(hidden2d, weight, bias, flat_target, ignore_index, reduction,
                                                  float(label_smoothing), chunk, rows_fn, loss_dtype)
    return loss.reshape(target.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------------------------------------------
# Peak memory (for the benchmark and the memory test)
# ----------------------------------------------------------------------------------------------------------------


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated when it started.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: torch's profiler with ``profile_memory=True``
    records every allocation and free of torch's CPU allocator (sizes signed); the running sum of those records,
    in time order, is the live byte count and its maximum is the peak. Only torch tensors are counted (not
    Python objects), which is what the comparison is about.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------------------------
# Compile check
# ----------------------------------------------------------------------------------------------------------------


def compile_specs() -> list[KernelSpec]:
    """The cross-entropy kernel at each vocabulary tile, with and without gradient / label smoothing."""
    specs = []
    for cfg, tile in CE_TILES.items():
        for t in ("fp16", "bf16", "fp32"):
            for compute_grad in (False, True):
                for smoothing in (False, True):
                    signature = {"logits_ptr": f"*{t}", "grad_ptr": f"*{t}", "loss_ptr": "*fp32",
                                 "target_ptr": "*i64", "grad_scale_ptr": "*fp32", "n_cols": "i32",
                                 "logits_row_stride": "i32", "grad_row_stride": "i32", "grad_scale_stride": "i32",
                                 "ignore_index": "i32", "label_smoothing": "fp32",
                                 "HAS_SMOOTHING": "constexpr", "COMPUTE_GRAD": "constexpr", "BLOCK_V": "constexpr"}
                    name = "cross_entropy" + ("_grad" if compute_grad else "") + ("_smooth" if smoothing else "")
                    specs.append(KernelSpec(
                        name, _cross_entropy_kernel, signature,
                        {"HAS_SMOOTHING": smoothing, "COMPUTE_GRAD": compute_grad, "BLOCK_V": tile.block_v},
                        f"{cfg}_{t}", num_warps=tile.num_warps))
    return specs
