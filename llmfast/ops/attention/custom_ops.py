"""torch.library custom ops ``llmfast::flash_attention_forward`` / ``_backward`` with fake implementations and
autograd, so torch.compile traces through the kernels without graph breaks."""
from __future__ import annotations

import torch

from .launch import _backward_impl, _forward_impl, _lse_shape

_PROBLEM_ARGS = ("Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, str layout, "
                 "float scale, int window_left, int window_right, bool bottom_right, float dropout_p, Tensor? seed")


@torch.library.custom_op(
    "llmfast::flash_attention_forward", mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, Tensor? mask, {_PROBLEM_ARGS}) -> (Tensor, Tensor)")
def _flash_attention_forward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                             window_left, window_right, bottom_right, dropout_p, seed):
    return _forward_impl(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                         window_left, window_right, bottom_right, dropout_p, seed)


@_flash_attention_forward.register_fake
def _flash_attention_forward_fake(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout,
                                  scale, window_left, window_right, bottom_right, dropout_p, seed):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = q.new_empty(_lse_shape(q, layout), dtype=torch.float32)
    return out, lse


@torch.library.custom_op(
    "llmfast::flash_attention_backward", mutates_args=(),
    schema=(f"(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
            f"{_PROBLEM_ARGS}, bool mask_needs_grad) -> (Tensor, Tensor, Tensor, Tensor)"))
def _flash_attention_backward(dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p, seed,
                              mask_needs_grad):
    return _backward_impl(dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p, seed,
                          mask_needs_grad)


@_flash_attention_backward.register_fake
def _flash_attention_backward_fake(dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p,
                                   seed, mask_needs_grad):
    dmask = mask.new_empty(mask.shape) if mask_needs_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _forward_setup_context(ctx, inputs, output):
    (q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale, window_left,
     window_right, bottom_right, dropout_p, seed) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, out, lse)
    ctx.problem = (max_seqlen_q, max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p)
    ctx.mask_needs_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]


def _forward_backward(ctx, dout, dlse):
    q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, out, lse = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p) = ctx.problem
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dmask = _flash_attention_backward(
        dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
        window_left, window_right, bottom_right, dropout_p, seed, ctx.mask_needs_grad)
    return (dq, dk, dv, dmask if ctx.mask_needs_grad else None) + (None,) * 11


_flash_attention_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)
