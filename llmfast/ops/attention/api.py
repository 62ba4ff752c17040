"""The public functions: torch SDPA, flash-attn's ``flash_attn_func`` and ``flash_attn_varlen_func``."""
from __future__ import annotations

import torch

from llmfast import _backend, _validation

from .checks import (_check_bool, _check_cu_seqlens, _check_dropout, _check_head_dims, _check_heads, _check_mask,
                     _check_max_seqlen, _check_qkv, _check_scale, _check_window)
from .custom_ops import _flash_attention_forward
from .torch_paths import _flash_torch, _reference, _sdpa_torch


def _draw_seed() -> torch.Tensor:
    # From torch's default CPU generator, so torch.manual_seed reproduces the dropout pattern.
    return torch.randint(0, 2**31 - 1, (1,))


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Attention with exactly :func:`torch.nn.functional.scaled_dot_product_attention`'s semantics.

    ``query`` is (..., Hq, Sq, D), ``key`` (..., Hkv, Sk, D) and ``value`` (..., Hkv, Sk, Dv) (2 to 4 dims; the
    same leading dims). ``is_causal`` aligns the causal diagonal top-left (query i sees keys j <= i) even when
    Sq != Sk; with ``attn_mask`` as well, both apply. ``attn_mask`` is a bool (True = attend) or additive float
    mask broadcastable to (..., Hq, Sq, Sk); an additive mask that requires grad receives its gradient.
    ``enable_gqa`` lets Hq be a multiple of Hkv (K/V heads are shared by groups, never copied). Rows with no
    allowed key return 0 (and gradient 0). Dropout draws its seed from torch's default generator.
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
    if attn_mask is not None:
        _check_mask(attn_mask, query, tuple(query.shape[:-1]) + (key.shape[-2],))

    impl = _backend.resolve("scaled_dot_product_attention", query)
    if impl == "reference":
        return _reference().scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                         dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                                         enable_gqa=enable_gqa)
    if impl == "torch" or query.dtype == torch.float64:
        return _sdpa_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    # The kernels see (B, H, S, D): add the missing leading dims as views.
    extra = 4 - query.dim()
    q4, k4, v4 = (t[(None,) * extra] for t in (query, key, value))
    seed = _draw_seed() if dropout_p > 0 else None
    out, _ = _flash_attention_forward(q4, k4, v4, attn_mask, None, None, 0, 0, "bhsd", sm_scale, -1,
                                      0 if is_causal else -1, False, dropout_p, seed)
    return out[(0,) * extra] if extra else out


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), return_attn_probs: bool = False):
    """Attention with flash-attn's ``flash_attn_func`` semantics: ``q`` (B, Sq, Hq, D), ``k`` (B, Sk, Hkv, D),
    ``v`` (B, Sk, Hkv, Dv), output (B, Sq, Hq, Dv).

    ``causal`` aligns the diagonal bottom-right (query i sees keys j <= i + Sk - Sq). ``window_size=(left, right)``
    (-1: unbounded) lets query i see keys ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``; ``causal`` sets
    right to 0. Hq must be a multiple of Hkv (GQA/MQA). With ``return_attn_probs=True`` returns
    ``(out, softmax_lse, None)``: ``softmax_lse`` is the natural-log log-sum-exp of the scaled scores, float32
    (B, Hq, Sq), -inf for rows with no allowed key, and differentiable; the attention probabilities themselves
    are not materialised (None).
    """
    names = ("q", "k", "v")
    _check_qkv(names, (q, k, v), ndim=4)
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"q, k and v must share the batch size, got {q.shape[0]}, {k.shape[0]} and {v.shape[0]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree on batch, sequence length and heads, got shapes {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim (last dimension) must equal q's ({q.shape[-1]}), got {k.shape[-1]}")
    _check_head_dims("q", q.shape[-1], "v", v.shape[-1])
    _check_heads(q.shape[2], k.shape[2], allow_grouped=True)
    dropout_p = _check_dropout(dropout_p)
    sm_scale = _check_scale("softmax_scale", softmax_scale, q.shape[-1])
    causal = _check_bool("causal", causal)
    left, right = _check_window(window_size)
    return_attn_probs = _check_bool("return_attn_probs", return_attn_probs)
    if causal:
        right = 0

    impl = _backend.resolve("flash_attn_func", q)
    if impl == "reference":
        return _reference().flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                            causal=causal, window_size=tuple(window_size),
                                            return_attn_probs=return_attn_probs)
    if impl == "torch" or q.dtype == torch.float64:
        out, lse = _flash_torch(q, k, v, dropout_p, sm_scale, left, right, return_attn_probs)
    else:
        seed = _draw_seed() if dropout_p > 0 else None
        out, lse = _flash_attention_forward(q, k, v, None, None, None, 0, 0, "bshd", sm_scale, left, right, True,
                                            dropout_p, seed)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func``: sequences packed along dim 0, ``q`` (total_q, Hq, D), ``k`` and
    ``v`` (total_k, Hkv, D / Dv); sequence b spans ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` (int32, starting at 0).
    Masking, windows and GQA as :func:`flash_attn_func`, per sequence (causal aligned bottom-right per sequence).
    Dropout offsets use b as the sequence index and ``max_seqlen_q`` / ``max_seqlen_k`` as Sq / Sk.
    """
    names = ("q", "k", "v")
    _check_qkv(names, (q, k, v), ndim=3)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree on tokens and heads, got shapes {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim (last dimension) must equal q's ({q.shape[-1]}), got {k.shape[-1]}")
    _check_head_dims("q", q.shape[-1], "v", v.shape[-1])
    _check_heads(q.shape[1], k.shape[1], allow_grouped=True)
    longest_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q")
    longest_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    _validation.check_same_device(q=q, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, longest_q, "cu_seqlens_q")
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, longest_k, "cu_seqlens_k")
    dropout_p = _check_dropout(dropout_p)
    sm_scale = _check_scale("softmax_scale", softmax_scale, q.shape[-1])
    causal = _check_bool("causal", causal)
    left, right = _check_window(window_size)
    if causal:
        right = 0

    impl = _backend.resolve("flash_attn_varlen_func", q)
    if impl == "reference":
        return _reference().flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                   dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                                                   window_size=tuple(window_size))
    if impl == "torch" or q.dtype == torch.float64:
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        pieces = []
        for b in range(len(bounds_q) - 1):
            qs, ks = q[bounds_q[b]:bounds_q[b + 1]], k[bounds_k[b]:bounds_k[b + 1]]
            vs = v[bounds_k[b]:bounds_k[b + 1]]
            if qs.shape[0] == 0:
                continue
            if ks.shape[0] == 0:
                pieces.append(qs.new_zeros(qs.shape[:-1] + (v.shape[-1],)))
                continue
            out, _ = _flash_torch(qs[None], ks[None], vs[None], dropout_p, sm_scale, left, right, False)
            pieces.append(out[0])
        return torch.cat(pieces) if pieces else q.new_empty(q.shape[:-1] + (v.shape[-1],))
    seed = _draw_seed() if dropout_p > 0 else None
    out, _ = _flash_attention_forward(q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "thd",
                                      sm_scale, left, right, True, dropout_p, seed)
    return out
