"""The public functions: torch SDPA and flash-attn's function set (padded, varlen, qkv- and kv-packed)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from llmfast import _backend, _validation

from .checks import (_check_alibi, _check_bool, _check_cu_seqlens, _check_dropout, _check_head_dims, _check_heads,
                     _check_mask, _check_max_seqlen, _check_qkv, _check_scale, _check_softcap, _check_window)
from .custom_ops import _flash_attention_forward, _flash_attention_packed_forward, _flash_attention_probs
from .torch_paths import _flash_torch, _flash_varlen_torch, _reference, _sdpa_torch


def _draw_seed() -> torch.Tensor:
    # From torch's default CPU generator, so torch.manual_seed reproduces the dropout pattern.
    return torch.randint(0, 2**31 - 1, (1,))


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *, softcap: float = 0.0) -> torch.Tensor:
    """Attention with exactly :func:`torch.nn.functional.scaled_dot_product_attention`'s semantics.

    ``query`` is (..., Hq, Sq, D), ``key`` (..., Hkv, Sk, D) and ``value`` (..., Hkv, Sk, Dv) (2 to 4 dims; the
    same leading dims). ``is_causal`` aligns the causal diagonal top-left (query i sees keys j <= i) even when
    Sq != Sk; with ``attn_mask`` as well, both apply. ``attn_mask`` is a bool (True = attend) or additive float
    mask broadcastable to (..., Hq, Sq, Sk); an additive mask that requires grad receives its gradient.
    ``enable_gqa`` lets Hq be a multiple of Hkv (K/V heads are shared by groups, never copied). Rows with no
    allowed key return 0 (and gradient 0). Dropout draws its seed from torch's default generator. ``softcap > 0``
    (an llmfast extension, keyword-only) soft-caps the scaled scores as ``softcap * tanh(s / softcap)`` before
    the masks, forward and backward in the kernels.
    """
    names = ("query", "key", "value")
    _check_qkv(names, (query, key, value), ndim=(2, 3, 4))
    if not query.dim() == key.dim() == value.dim():
        raise ValueError(f"query, key and value must have the same number of dimensions, got "
                         f"{query.dim()}, {key.dim()} and {value.dim()}")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(f"query, key and value must share the batch dimensions, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key's head dim (last dimension) must equal query's ({query.shape[-1]}), "
                         f"got {key.shape[-1]}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key and value must agree on heads and sequence length, got shapes {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    _check_head_dims("query", query.shape[-1], "value", value.shape[-1])
    enable_gqa = _check_bool("enable_gqa", enable_gqa)
    is_causal = _check_bool("is_causal", is_causal)
    if query.dim() >= 3:
        _check_heads(query.shape[-3], key.shape[-3], allow_grouped=enable_gqa, hint=" unless enable_gqa=True")
    dropout_p = _check_dropout(dropout_p)
    sm_scale = _check_scale("scale", scale, query.shape[-1])
    softcap = _check_softcap(softcap)
    if attn_mask is not None:
        _check_mask(attn_mask, query, tuple(query.shape[:-1]) + (key.shape[-2],))

    impl = _backend.resolve("scaled_dot_product_attention", query)
    if impl == "reference":
        return _reference().scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                         dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                                         enable_gqa=enable_gqa, softcap=softcap)
    if impl == "torch" or query.dtype == torch.float64:
        return _sdpa_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap)

    # The kernels see (B, H, S, D): add the missing leading dims as views.
    extra = 4 - query.dim()
    q4, k4, v4 = (t[(None,) * extra] for t in (query, key, value))
    seed = _draw_seed() if dropout_p > 0 else None
    out, _ = _flash_attention_forward(q4, k4, v4, attn_mask, None, None, 0, 0, "bhsd", sm_scale, -1,
                                      0 if is_causal else -1, False, dropout_p, seed, softcap, None)
    return out[(0,) * extra] if extra else out


# ----------------------------------------------------------------------------------------------------------------
# flash-attn's function set. Every entry validates its tensors, then shares the option checks and the dispatch.
# ----------------------------------------------------------------------------------------------------------------
class _FlashOptions(NamedTuple):
    dropout_p: float
    scale: float
    left: int
    right: int
    softcap: float
    alibi: torch.Tensor | None
    return_probs: bool


def _flash_options(q: torch.Tensor, batch: int, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                   deterministic, return_attn_probs) -> _FlashOptions:
    """The options every flash-attn function shares, validated. ``q`` is a query view ((B, S, H, D) or (T, H,
    D)). ``deterministic`` is accepted and needs nothing: the backward pass never uses atomics, so it is always
    bit-for-bit reproducible."""
    dropout_p = _check_dropout(dropout_p)
    scale = _check_scale("softmax_scale", softmax_scale, q.shape[-1])
    causal = _check_bool("causal", causal)
    left, right = _check_window(window_size)
    softcap = _check_softcap(softcap)
    alibi = _check_alibi(alibi_slopes, batch, q.shape[-2], q)
    _check_bool("deterministic", deterministic)
    return_attn_probs = _check_bool("return_attn_probs", return_attn_probs)
    if causal:
        right = 0
    return _FlashOptions(dropout_p, scale, left, right, softcap, alibi, return_attn_probs)


def _check_padded(names: tuple[str, str, str], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """(B, S, H, D) query, key and value views."""
    _check_qkv(names, (q, k, v), ndim=4)
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"{names[0]}, {names[1]} and {names[2]} must share the batch size, got {q.shape[0]}, "
                         f"{k.shape[0]} and {v.shape[0]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{names[1]} and {names[2]} must agree on batch, sequence length and heads, got shapes "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{names[1]}'s head dim (last dimension) must equal {names[0]}'s ({q.shape[-1]}), "
                         f"got {k.shape[-1]}")
    _check_head_dims(names[0], q.shape[-1], names[2], v.shape[-1])
    _check_heads(q.shape[2], k.shape[2], allow_grouped=True)


def _check_varlen(names: tuple[str, str, str], q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  cu_names: tuple[str, str] = ("cu_seqlens_q", "cu_seqlens_k"),
                  max_names: tuple[str, str] = ("max_seqlen_q", "max_seqlen_k")) -> tuple[int, int]:
    """(total, H, D) query, key and value views and their cu_seqlens; returns the checked max lengths."""
    _check_qkv(names, (q, k, v), ndim=3)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{names[1]} and {names[2]} must agree on tokens and heads, got shapes {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{names[1]}'s head dim (last dimension) must equal {names[0]}'s ({q.shape[-1]}), "
                         f"got {k.shape[-1]}")
    _check_head_dims(names[0], q.shape[-1], names[2], v.shape[-1])
    _check_heads(q.shape[1], k.shape[1], allow_grouped=True)
    longest_q = _check_cu_seqlens(cu_names[0], cu_seqlens_q, q.shape[0], names[0])
    longest_k = _check_cu_seqlens(cu_names[1], cu_seqlens_k, k.shape[0], names[1])
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{cu_names[0]} and {cu_names[1]} must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    _validation.check_same_device(**{names[0]: q, cu_names[0]: cu_seqlens_q, cu_names[1]: cu_seqlens_k})
    max_seqlen_q = _check_max_seqlen(max_names[0], max_seqlen_q, longest_q, cu_names[0])
    max_seqlen_k = _check_max_seqlen(max_names[1], max_seqlen_k, longest_k, cu_names[1])
    return max_seqlen_q, max_seqlen_k


def _check_packed(name: str, t: object, ndim: int, parts: int) -> None:
    """A packed tensor: ``ndim`` dims with ``parts`` (3: qkv, 2: kv) at dim ``ndim - 3``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    layout = {(5, 3): "(batch, seqlen, 3, heads, head_dim)", (5, 2): "(batch, seqlen, 2, heads, head_dim)",
              (4, 3): "(total, 3, heads, head_dim)", (4, 2): "(total, 2, heads, head_dim)"}[(ndim, parts)]
    if t.dim() != ndim or t.shape[ndim - 3] != parts:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


def _flash_dispatch(op: str, q, k, v, opts: _FlashOptions, varlen, packed, reference_call):
    """Run one flash-attn call: ``varlen`` is (cu_q, cu_k, max_q, max_k) or None, ``packed`` (first, kv) when the
    caller passed a packed tensor (q, k, v are then views into it), ``reference_call()`` the reference."""
    impl = _backend.resolve(op, q)
    if impl == "reference":
        return reference_call()
    if impl == "torch" or q.dtype == torch.float64:
        if varlen is None:
            out, lse, probs = _flash_torch(q, k, v, opts.dropout_p, opts.scale, opts.left, opts.right,
                                           opts.return_probs, opts.softcap, opts.alibi, opts.return_probs)
        else:
            out, lse, probs = _flash_varlen_torch(q, k, v, *varlen, opts.dropout_p, opts.scale, opts.left, opts.right,
                                                  opts.softcap, opts.alibi, opts.return_probs)
        return (out, lse, probs) if opts.return_probs else out
    seed = _draw_seed() if opts.dropout_p > 0 else None
    layout = "bshd" if varlen is None else "thd"
    problem = ((None, None, 0, 0) if varlen is None else tuple(varlen)) + (
        layout, opts.scale, opts.left, opts.right, True, opts.dropout_p, seed, opts.softcap, opts.alibi)
    if packed is None:
        out, lse = _flash_attention_forward(q, k, v, None, *problem)
    else:
        out, lse = _flash_attention_packed_forward(*packed, *problem)
    if not opts.return_probs:
        return out
    return out, lse, _flash_attention_probs(q.detach(), k.detach(), lse.detach(), *problem)


_OPTION_DOC = """
    Options (flash-attn's, same order and defaults): ``dropout_p`` (Philox dropout on the probabilities; seeds from
    torch's default generator), ``softmax_scale`` (default ``1 / sqrt(D)``), ``causal`` (diagonal aligned
    bottom-right: query i sees keys j <= i + Sk - Sq), ``window_size=(left, right)`` (a tuple or list; -1:
    unbounded; keys i + Sk - Sq - left <= j <= i + Sk - Sq + right; ``causal`` sets right to 0), ``softcap``
    (> 0: scores become ``softcap * tanh(s / softcap)`` before masking), ``alibi_slopes`` ((H,) or (B, H) float32:
    ``-slope * |i + Sk - Sq - j|`` is added to the scores), ``deterministic`` (accepted; the backward pass never
    uses atomics, so it is always bit-for-bit reproducible) and ``return_attn_probs``: return
    ``(out, softmax_lse, S_dmask)`` with ``softmax_lse`` the natural-log log-sum-exp of the final scores, float32
    (B, H, Sq) ((H, total_q) for varlen), -inf for rows with no allowed key and differentiable, and ``S_dmask``
    the attention probabilities (B, H, Sq, Sk) ((batch, H, max_seqlen_q, max_seqlen_k) for varlen, each sequence
    in its top-left corner) in the inputs' dtype, negated where dropout dropped the entry (flash-attn's encoding),
    not differentiable and materialised in full: for testing at small sizes. All of it runs in the Triton kernels,
    forward and backward. GQA/MQA: H a multiple of Hk.
"""


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] | list[int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_func``: ``q`` (B, Sq, H, D), ``k`` (B, Sk, Hk, D), ``v`` (B, Sk, Hk, Dv), output
    (B, Sq, H, Dv).
    """
    _check_padded(("q", "k", "v"), q, k, v)
    opts = _flash_options(q, q.shape[0], dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                          deterministic, return_attn_probs)
    return _flash_dispatch("flash_attn_func", q, k, v, opts, None, None, lambda: _reference().flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, tuple(window_size), softcap, alibi_slopes, deterministic,
        return_attn_probs))


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] | list[int] = (-1, -1),
                              softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                              deterministic: bool = False, return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_qkvpacked_func``: ``qkv`` (B, S, 3, H, D), output (B, S, H, D). The kernels read
    q, k and v as strided views of ``qkv``, and its gradient is one (B, S, 3, H, D) tensor.
    """
    _check_packed("qkv", qkv, 5, 3)
    q, k, v = qkv.unbind(2)
    _check_padded(("qkv", "qkv", "qkv"), q, k, v)
    opts = _flash_options(q, q.shape[0], dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                          deterministic, return_attn_probs)
    return _flash_dispatch("flash_attn_qkvpacked_func", q, k, v, opts, None, (qkv, None),
                           lambda: _reference().flash_attn_qkvpacked_func(
                               qkv, dropout_p, softmax_scale, causal, tuple(window_size), softcap, alibi_slopes,
                               deterministic, return_attn_probs))


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] | list[int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_kvpacked_func``: ``q`` (B, Sq, H, D), ``kv`` (B, Sk, 2, Hk, D), output
    (B, Sq, H, D). The gradient of ``kv`` is one (B, Sk, 2, Hk, D) tensor.
    """
    _check_packed("kv", kv, 5, 2)
    k, v = kv.unbind(2)
    _check_padded(("q", "kv", "kv"), q, k, v)
    opts = _flash_options(q, q.shape[0], dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                          deterministic, return_attn_probs)
    return _flash_dispatch("flash_attn_kvpacked_func", q, k, v, opts, None, (q, kv),
                           lambda: _reference().flash_attn_kvpacked_func(
                               q, kv, dropout_p, softmax_scale, causal, tuple(window_size), softcap, alibi_slopes,
                               deterministic, return_attn_probs))


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] | list[int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: torch.Tensor | None = None):
    """flash-attn's ``flash_attn_varlen_func``: sequences packed along dim 0, ``q`` (total_q, H, D), ``k`` and
    ``v`` (total_k, Hk, D / Dv); sequence b spans ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` (int32, starting at 0).
    Masking, windows, soft-capping, ALiBi and GQA as :func:`flash_attn_func`, per sequence (causal aligned
    bottom-right per sequence). Dropout offsets use b as the sequence index and ``max_seqlen_q`` /
    ``max_seqlen_k`` as Sq / Sk. ``block_table`` (paged KV caches) is not supported here and must stay None.
    """
    if block_table is not None:
        raise ValueError("block_table (a paged KV cache) is not supported by flash_attn_varlen_func; "
                         "pass block_table=None")
    max_seqlen_q, max_seqlen_k = _check_varlen(("q", "k", "v"), q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                               max_seqlen_k)
    opts = _flash_options(q, cu_seqlens_q.numel() - 1, dropout_p, softmax_scale, causal, window_size, softcap,
                          alibi_slopes, deterministic, return_attn_probs)
    return _flash_dispatch(
        "flash_attn_varlen_func", q, k, v, opts, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), None,
        lambda: _reference().flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            tuple(window_size), softcap, alibi_slopes, deterministic, return_attn_probs))


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                                     window_size: tuple[int, int] | list[int] = (-1, -1), softcap: float = 0.0,
                                     alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                                     return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: ``qkv`` (total, 3, H, D) with the same ``cu_seqlens``
    and ``max_seqlen`` for queries and keys; output (total, H, D), gradient one (total, 3, H, D) tensor.
    """
    _check_packed("qkv", qkv, 4, 3)
    q, k, v = qkv.unbind(1)
    max_seqlen, _ = _check_varlen(("qkv", "qkv", "qkv"), q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  ("cu_seqlens", "cu_seqlens"), ("max_seqlen", "max_seqlen"))
    opts = _flash_options(q, cu_seqlens.numel() - 1, dropout_p, softmax_scale, causal, window_size, softcap,
                          alibi_slopes, deterministic, return_attn_probs)
    return _flash_dispatch(
        "flash_attn_varlen_qkvpacked_func", q, k, v, opts, (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen),
        (qkv, None), lambda: _reference().flash_attn_varlen_qkvpacked_func(
            qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, tuple(window_size), softcap, alibi_slopes,
            deterministic, return_attn_probs))


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                                    window_size: tuple[int, int] | list[int] = (-1, -1), softcap: float = 0.0,
                                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                                    return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: ``q`` (total_q, H, D), ``kv`` (total_k, 2, Hk, D);
    output (total_q, H, D), the gradient of ``kv`` one (total_k, 2, Hk, D) tensor.
    """
    _check_packed("kv", kv, 4, 2)
    k, v = kv.unbind(1)
    max_seqlen_q, max_seqlen_k = _check_varlen(("q", "kv", "kv"), q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                               max_seqlen_k)
    opts = _flash_options(q, cu_seqlens_q.numel() - 1, dropout_p, softmax_scale, causal, window_size, softcap,
                          alibi_slopes, deterministic, return_attn_probs)
    return _flash_dispatch(
        "flash_attn_varlen_kvpacked_func", q, k, v, opts, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
        (q, kv), lambda: _reference().flash_attn_varlen_kvpacked_func(
            q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            tuple(window_size), softcap, alibi_slopes, deterministic, return_attn_probs))


for _fn in (flash_attn_func, flash_attn_qkvpacked_func, flash_attn_kvpacked_func, flash_attn_varlen_func,
            flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func):
    _fn.__doc__ = _fn.__doc__.rstrip() + "\n" + _OPTION_DOC
del _fn
