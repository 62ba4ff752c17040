"""Cross-entropy under ``torch.compile``: the same kernels behind ``torch.library`` custom ops with fake
implementations, so Dynamo traces a call as one opaque node (a Python autograd.Function that launches Triton
kernels cannot be traced).

Eager calls keep ``_functional.py``'s and ``_linear.py``'s autograd Functions (they can write the gradient into the
logits' own storage). Under compilation, each op's forward computes the reduced loss and the gradients in one go,
as in eager, and returns the gradients as outputs; backward scales them by the upstream gradient. The one case that
needs the upstream gradient per row before the gradient exists, fused linear cross-entropy with
``reduction="none"``, recomputes in backward through a second op.
"""
from __future__ import annotations

from typing import Optional

import torch

from llmfast.ops.cross_entropy import _kernels as K

_EMPTY = (0,)


def _options(ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: Optional[float],
             weight: Optional[torch.Tensor], track_argmax: bool, token_scaling: bool = False) -> K.LossOptions:
    return K.LossOptions(ignore_index, label_smoothing, lse_square_scale, softcap, weight, track_argmax,
                         token_scaling)


def _outputs(outs: tuple, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z_loss, token_accuracy, predicted_tokens) with empty tensors standing for the missing ones."""
    loss, z_loss, acc, pred = outs  # (a custom op's outputs may not alias each other: one empty tensor each)
    return (loss, z_loss if z_loss is not None else like.new_empty(_EMPTY, dtype=torch.float32),
            acc if acc is not None else like.new_empty(_EMPTY, dtype=torch.float32),
            pred if pred is not None else like.new_empty(_EMPTY, dtype=torch.int64))


def _fake_outputs(n_rows: int, reduction: str, loss_dtype: torch.dtype, want_z: bool, track: bool,
                  like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    shape = (n_rows,) if reduction == "none" else ()
    return (like.new_empty(shape, dtype=loss_dtype),
            like.new_empty(shape, dtype=loss_dtype) if want_z else like.new_empty(_EMPTY, dtype=torch.float32),
            like.new_empty(shape if track else _EMPTY, dtype=torch.float32),
            like.new_empty((n_rows,) if track else _EMPTY, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("llmfast::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], reduction: str,
            ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: Optional[float],
            want_z: bool, track_argmax: bool, compute_grad: bool, use_torch: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from llmfast.ops.cross_entropy._functional import normalisers, pair_scale, reduce_rows

    opts = _options(ignore_index, label_smoothing, lse_square_scale, softcap, weight, track_argmax)
    n_valid, total_weight = normalisers(target, opts)
    grad = torch.empty_like(logits) if compute_grad else None
    rows_fn = K.rows_torch if use_torch else K.rows_triton
    res = rows_fn(logits, target, opts, grad, pair_scale(reduction, n_valid, total_weight) if compute_grad else None)
    outs = reduce_rows(res, reduction, n_valid, total_weight, logits.dtype, (want_z, track_argmax, track_argmax))
    grad = grad if grad is not None else logits.new_empty(_EMPTY)
    return (*_outputs(outs, logits), grad)


@_ce_fwd.register_fake
def _(logits, target, weight, reduction, ignore_index, label_smoothing, lse_square_scale, softcap, want_z,
      track_argmax, compute_grad, use_torch):
    outs = _fake_outputs(logits.shape[0], reduction, logits.dtype, want_z, track_argmax, logits)
    return (*outs, torch.empty_like(logits) if compute_grad else logits.new_empty(_EMPTY))


def _ce_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[4])
    ctx.reduction = inputs[3]


def _ce_backward(ctx, grad_loss, *_unused):
    (grad,) = ctx.saved_tensors
    wide = torch.float64 if grad.dtype == torch.float64 else torch.float32
    scale = grad_loss.to(wide) if ctx.reduction != "none" else grad_loss.reshape(-1, 1).to(wide)
    return (grad * scale).to(grad.dtype), None, None, None, None, None, None, None, None, None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


def cross_entropy_compiled(rows: torch.Tensor, target: torch.Tensor, opts: K.LossOptions, reduction: str,
                           use_torch: bool, want: tuple[bool, bool, bool]) -> tuple:
    """(loss, z_loss, token_accuracy, predicted_tokens) like ``_CrossEntropyFunction``, as one custom op."""
    track = want[1] or want[2]
    loss, z, acc, pred, _ = _ce_fwd(rows, target, opts.weight, reduction, opts.ignore_index, opts.label_smoothing,
                                    opts.lse_square_scale, opts.softcap, want[0], track, rows.requires_grad,
                                    use_torch)
    return (loss, z.detach() if want[0] else None, acc.detach() if want[1] else None,
            pred if want[2] else None)


# ----------------------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("llmfast::fused_linear_cross_entropy_fwd", mutates_args=())
def _flce_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
              class_weight: Optional[torch.Tensor], reduction: str, ignore_index: int, label_smoothing: float,
              lse_square_scale: float, softcap: Optional[float], token_scaling: bool, want_z: bool,
              track_argmax: bool, need: list[bool], chunk: int, accum_dtype: torch.dtype, loss_dtype: torch.dtype,
              use_torch: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor]:
    from llmfast.ops.cross_entropy._functional import normalisers, pair_scale, reduce_rows
    from llmfast.ops.cross_entropy._linear import _linear_ce_chunks

    opts = _options(ignore_index, label_smoothing, lse_square_scale, softcap, class_weight, track_argmax,
                    token_scaling)
    n_valid, total_weight = normalisers(target, opts)
    wants_grad = any(need) and reduction != "none"
    grad_scale = pair_scale(reduction, n_valid, total_weight) if wants_grad else None
    rows_fn = K.rows_torch if use_torch else K.rows_triton
    with torch.autocast(hidden.device.type, enabled=False):  # the inputs are already in the dtype to use
        res, gh, gw, gb = _linear_ce_chunks(hidden, weight, bias, target, opts, rows_fn, chunk, grad_scale, False,
                                            tuple(need), accum_dtype)
    outs = reduce_rows(res, reduction, n_valid, total_weight, loss_dtype, (want_z, track_argmax, track_argmax))
    # Gradients stay in their accumulation dtypes (fp32 for 16-bit inputs) until backward has scaled them.
    return (*_outputs(outs, hidden), gh if gh is not None else hidden.new_empty(_EMPTY),
            gw if gw is not None else hidden.new_empty(_EMPTY), gb if gb is not None else hidden.new_empty(_EMPTY))


@_flce_fwd.register_fake
def _(hidden, weight, bias, target, class_weight, reduction, ignore_index, label_smoothing, lse_square_scale,
      softcap, token_scaling, want_z, track_argmax, need, chunk, accum_dtype, loss_dtype, use_torch):
    outs = _fake_outputs(hidden.shape[0], reduction, loss_dtype, want_z, track_argmax, hidden)
    grads = reduction != "none"
    gh_dtype = hidden.dtype if hidden.element_size() >= 4 else torch.float32
    return (*outs, torch.empty_like(hidden, dtype=gh_dtype) if grads and need[0] else hidden.new_empty(_EMPTY),
            torch.empty_like(weight, dtype=accum_dtype) if grads and need[1] else hidden.new_empty(_EMPTY),
            torch.empty(weight.shape[0], dtype=accum_dtype, device=weight.device)
            if grads and need[2] and bias is not None else hidden.new_empty(_EMPTY))


@torch.library.custom_op("llmfast::fused_linear_cross_entropy_bwd", mutates_args=())
def _flce_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
              class_weight: Optional[torch.Tensor], grad_rows: torch.Tensor, ignore_index: int,
              label_smoothing: float, lse_square_scale: float, softcap: Optional[float], token_scaling: bool,
              need: list[bool], chunk: int, accum_dtype: torch.dtype, use_torch: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``reduction="none"`` with the per-row upstream gradient ``grad_rows`` (recomputed)."""
    from llmfast.ops.cross_entropy._linear import _linear_ce_chunks

    opts = _options(ignore_index, label_smoothing, lse_square_scale, softcap, class_weight, False, token_scaling)
    rows_fn = K.rows_torch if use_torch else K.rows_triton
    with torch.autocast(hidden.device.type, enabled=False):
        _, gh, gw, gb = _linear_ce_chunks(hidden, weight, bias, target, opts, rows_fn, chunk,
                                          grad_rows.reshape(-1).float().contiguous(), True, tuple(need), accum_dtype)
    return (gh.to(hidden.dtype) if gh is not None else hidden.new_empty(_EMPTY),
            gw.to(weight.dtype) if gw is not None else hidden.new_empty(_EMPTY),
            gb.to(bias.dtype) if gb is not None and bias is not None else hidden.new_empty(_EMPTY))


@_flce_bwd.register_fake
def _(hidden, weight, bias, target, class_weight, grad_rows, ignore_index, label_smoothing, lse_square_scale,
      softcap, token_scaling, need, chunk, accum_dtype, use_torch):
    return (torch.empty_like(hidden) if need[0] else hidden.new_empty(_EMPTY),
            torch.empty_like(weight) if need[1] else hidden.new_empty(_EMPTY),
            torch.empty_like(bias) if need[2] and bias is not None else hidden.new_empty(_EMPTY))


def _flce_setup(ctx, inputs, output) -> None:
    (hidden, weight, bias, target, class_weight, reduction, ignore_index, label_smoothing, lse_square_scale,
     softcap, token_scaling, _want_z, _track, need, chunk, accum_dtype, _loss_dtype, use_torch) = inputs
    ctx.reduction, ctx.need, ctx.has_bias = reduction, list(need), bias is not None
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target, class_weight)
        ctx.recompute = (ignore_index, label_smoothing, lse_square_scale, softcap, token_scaling, chunk,
                         accum_dtype, use_torch)
    else:
        ctx.save_for_backward(output[4], output[5], output[6])


def _flce_backward(ctx, grad_loss, *_unused):
    if ctx.reduction == "none":
        hidden, weight, bias, target, class_weight = ctx.saved_tensors
        ignore_index, eps, s, softcap, token_scaling, chunk, accum_dtype, use_torch = ctx.recompute
        gh, gw, gb = _flce_bwd(hidden, weight, bias, target, class_weight, grad_loss, ignore_index, eps, s,
                               softcap, token_scaling, ctx.need, chunk, accum_dtype, use_torch)
    else:
        gh, gw, gb = ((g * grad_loss.to(torch.float64 if g.dtype == torch.float64 else torch.float32)).to(dtype)
                      if dtype is not None else None for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
    grads = [g if need else None for g, need in zip((gh, gw, gb), ctx.need)]
    if not ctx.has_bias:
        grads[2] = None
    return (*grads, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None)


_flce_fwd.register_autograd(_flce_backward, setup_context=_flce_setup)


def fused_linear_compiled(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          target: torch.Tensor, opts: K.LossOptions, reduction: str, chunk: int,
                          use_torch: bool, loss_dtype: torch.dtype, accum_dtype: torch.dtype,
                          want: tuple[bool, bool, bool]) -> tuple:
    """(loss, z_loss, token_accuracy, predicted_tokens) like ``_FusedLinearCrossEntropyFunction``, as custom ops."""
    need = [hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
    track = want[1] or want[2]
    loss, z, acc, pred, *_ = _flce_fwd(hidden, weight, bias, target, opts.weight, reduction, opts.ignore_index,
                                       opts.label_smoothing, opts.lse_square_scale, opts.softcap,
                                       opts.token_scaling, want[0], track, need, chunk, accum_dtype, loss_dtype,
                                       use_torch)
    return (loss, z.detach() if want[0] else None, acc.detach() if want[1] else None,
            pred if want[2] else None)
