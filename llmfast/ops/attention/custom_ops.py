"""torch.library custom ops ``llmfast::flash_attention_forward`` / ``_backward`` with fake implementations and
autograd, so torch.compile traces through the kernels without graph breaks."""
from __future__ import annotations

import torch

from .launch import _Problem, _backward_impl, _forward_impl, _head_dim_contiguous, _heads_and_len, _lse_shape
from .probs import _probs_impl

_PROBLEM_ARGS = ("Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, str layout, "
                 "float scale, int window_left, int window_right, bool bottom_right, float dropout_p, Tensor? seed, "
                 "float softcap, Tensor? alibi_slopes")


@torch.library.custom_op(
    "llmfast::flash_attention_forward", mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, Tensor? mask, {_PROBLEM_ARGS}) -> (Tensor, Tensor)")
def _flash_attention_forward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                             window_left, window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes):
    return _forward_impl(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                         window_left, window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes)


@_flash_attention_forward.register_fake
def _flash_attention_forward_fake(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout,
                                  scale, window_left, window_right, bottom_right, dropout_p, seed, softcap,
                                  alibi_slopes):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = q.new_empty(_lse_shape(q, layout), dtype=torch.float32)
    return out, lse


@torch.library.custom_op(
    "llmfast::flash_attention_backward", mutates_args=(),
    schema=(f"(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
            f"{_PROBLEM_ARGS}, bool mask_needs_grad) -> (Tensor, Tensor, Tensor, Tensor)"))
def _flash_attention_backward(dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p, seed,
                              softcap, alibi_slopes, mask_needs_grad):
    return _backward_impl(dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p, seed,
                          mask_needs_grad, softcap, alibi_slopes)


@_flash_attention_backward.register_fake
def _flash_attention_backward_fake(dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p,
                                   seed, softcap, alibi_slopes, mask_needs_grad):
    dmask = mask.new_empty(mask.shape) if mask_needs_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _forward_setup_context(ctx, inputs, output):
    (q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale, window_left,
     window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, alibi_slopes, out, lse)
    ctx.problem = (max_seqlen_q, max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p,
                   softcap)
    ctx.mask_needs_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]


def _forward_backward(ctx, dout, dlse):
    q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, alibi_slopes, out, lse = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p,
     softcap) = ctx.problem
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dmask = _flash_attention_backward(
        dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
        window_left, window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes, ctx.mask_needs_grad)
    return (dq, dk, dv, dmask if ctx.mask_needs_grad else None) + (None,) * 13


_flash_attention_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Packed inputs (flash-attn's qkvpacked / kvpacked functions): one op takes the packed tensor itself, so its
# gradient is one packed tensor that the backward kernels write through strided views (no per-part gradients
# to stack, no copies of the inputs: the kernels read q, k, v as strided views of the packed tensor).
# ``first`` is qkv (B, S, 3, H, D) / (T, 3, H, D) when ``kv`` is None, else q, with kv (B, S, 2, Hk, D) / (T, 2,
# Hk, D).
# ----------------------------------------------------------------------------------------------------------------
def _pack_dim(layout: str) -> int:
    return 1 if layout == "thd" else 2


def _unpack(first, kv, layout):
    dim = _pack_dim(layout)
    if kv is None:
        return first.unbind(dim)
    k, v = kv.unbind(dim)
    return first, k, v


def _packed_grads(first, kv, layout):
    """Fresh packed gradients and the (dq, dk, dv) views into them."""
    dim = _pack_dim(layout)
    d_first = first.new_empty(first.shape)
    if kv is None:
        return d_first, first.new_empty(0), d_first.unbind(dim)
    d_kv = kv.new_empty(kv.shape)
    return d_first, d_kv, (d_first, *d_kv.unbind(dim))


@torch.library.custom_op(
    "llmfast::flash_attention_packed_forward", mutates_args=(),
    schema=f"(Tensor first, Tensor? kv, {_PROBLEM_ARGS}) -> (Tensor, Tensor)")
def _flash_attention_packed_forward(first, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout,
                                    scale, window_left, window_right, bottom_right, dropout_p, seed, softcap,
                                    alibi_slopes):
    q, k, v = _unpack(first, kv, layout)
    return _forward_impl(q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                         window_left, window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes)


@_flash_attention_packed_forward.register_fake
def _flash_attention_packed_forward_fake(first, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout,
                                         scale, window_left, window_right, bottom_right, dropout_p, seed, softcap,
                                         alibi_slopes):
    q, _, v = _unpack(first, kv, layout)
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return out, q.new_empty(_lse_shape(q, layout), dtype=torch.float32)


@torch.library.custom_op(
    "llmfast::flash_attention_packed_backward", mutates_args=(),
    schema=(f"(Tensor dout, Tensor? dlse, Tensor first, Tensor? kv, Tensor out, Tensor lse, {_PROBLEM_ARGS}) "
            f"-> (Tensor, Tensor)"))
def _flash_attention_packed_backward(dout, dlse, first, kv, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p,
                                     seed, softcap, alibi_slopes):
    q, k, v = _unpack(first, kv, layout)
    d_first, d_kv, grads = _packed_grads(first, kv, layout)
    _backward_impl(dout, dlse, q, k, v, out, lse, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   layout, scale, window_left, window_right, bottom_right, dropout_p, seed, False, softcap,
                   alibi_slopes, grads=grads)
    return d_first, d_kv


@_flash_attention_packed_backward.register_fake
def _flash_attention_packed_backward_fake(dout, dlse, first, kv, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, layout, scale, window_left, window_right, bottom_right,
                                          dropout_p, seed, softcap, alibi_slopes):
    return first.new_empty(first.shape), (first.new_empty(0) if kv is None else kv.new_empty(kv.shape))


def _packed_setup_context(ctx, inputs, output):
    first, kv, cu_seqlens_q, cu_seqlens_k, seed, alibi_slopes = (inputs[0], inputs[1], inputs[2], inputs[3],
                                                                 inputs[12], inputs[14])
    out, lse = output
    ctx.save_for_backward(first, kv, cu_seqlens_q, cu_seqlens_k, seed, alibi_slopes, out, lse)
    ctx.problem = inputs[4:12] + (inputs[13],)  # max_seqlen_q .. dropout_p, softcap


def _packed_backward(ctx, dout, dlse):
    first, kv, cu_seqlens_q, cu_seqlens_k, seed, alibi_slopes, out, lse = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p,
     softcap) = ctx.problem
    if dout is None:
        dout = torch.zeros_like(out)
    d_first, d_kv = _flash_attention_packed_backward(
        dout, dlse, first, kv, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
        window_left, window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes)
    return (d_first, d_kv if kv is not None else None) + (None,) * 13


_flash_attention_packed_forward.register_autograd(_packed_backward, setup_context=_packed_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# S_dmask (return_attn_probs=True): not differentiable, as in flash-attn.
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "llmfast::flash_attention_probs", mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor lse, {_PROBLEM_ARGS}) -> Tensor")
def _flash_attention_probs(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                           window_left, window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes):
    q, k = _head_dim_contiguous(q), _head_dim_contiguous(k)
    pb = _Problem(q, k, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale, window_left,
                  window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes)
    return _probs_impl(q, k, lse.contiguous(), pb)


@_flash_attention_probs.register_fake
def _flash_attention_probs_fake(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                                window_left, window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes):
    heads, seqlen_q = _heads_and_len(q, layout)
    _, seqlen_k = _heads_and_len(k, layout)
    if layout == "thd":
        batch, seqlen_q, seqlen_k = cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k
    else:
        batch = q.shape[0]
    return q.new_empty((batch, heads, seqlen_q, seqlen_k))
