"""Causal multi-head self-attention over llmfast's public attention op, with a key/value cache for generation, and
flash-attn's FlashSelfAttention / FlashCrossAttention modules."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import llmfast


class KVCache:
    """Keys and values one attention layer has seen so far, for decoding a token at a time.

    The buffers are allocated once for ``max_len`` positions, so each step writes its new keys in place instead of
    concatenating (which would copy the whole history every token). The cache is for inference, under
    ``torch.no_grad()``.
    """

    def __init__(self, batch_size: int, n_head: int, head_dim: int, max_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k`` and ``v`` (B, H, T, D) after the cached positions; return every key and value so far."""
        start, end = self.length, self.length + k.shape[2]
        if k.shape[0] != self.keys.shape[0]:
            raise ValueError(f"kv_cache was made for batch size {self.keys.shape[0]}, got a batch of {k.shape[0]}")
        if end > self.max_len:
            raise ValueError(f"kv_cache holds {self.max_len} positions; it has {start} and got {k.shape[2]} more")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


@dataclass
class LayerCache:
    """One layer's view of a :class:`StaticKVCache`: keys/values (B, max_len, Hk, D) and the sequence lengths."""

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor
    prefill: bool


class StaticKVCache:
    """Preallocated keys and values for every layer, in flash-attn's layout (B, max_len, Hk, D), and the number of
    valid positions of each sequence (``seqlens``, (B,) int32). Allocated once: a decoding step writes one
    position per sequence in place and never copies the history."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, kv_heads: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layers, batch_size, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prefill = True

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i], self.seqlens, self.prefill)


def causal_attention_args(q_len: int, k_len: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for SDPA when the queries are the last ``q_len`` of ``k_len`` positions.

    SDPA's ``is_causal`` aligns the mask to the top-left corner (query i sees keys 0..i), which is the right
    mask only when there are as many queries as keys. With a cache the queries sit at the end (bottom-right
    alignment, flash-attn's convention): one new query sees every key and needs no mask; a chunk of several
    queries after cached keys needs the mask built explicitly.
    """
    if q_len == k_len:
        return None, True
    if q_len == 1:
        return None, False
    # Query i sits at position (k_len - q_len) + i, so it may attend to keys j <= i + (k_len - q_len).
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
    return mask, False


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position attends only to itself and earlier positions.

    One fused linear layer produces queries, keys and values; attention runs through
    :func:`llmfast.scaled_dot_product_attention`, so it uses llmfast's fused kernel where one serves.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if n_head < 1 or n_embd < 1:
            raise ValueError(f"n_embd and n_head must be positive, got n_embd={n_embd} and n_head={n_head}")
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd must be a multiple of n_head, got n_embd={n_embd} and n_head={n_head}")
        self.n_embd = n_embd
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | LayerCache | None = None) -> torch.Tensor:
        """Attend over ``x`` (B, T, C); with ``kv_cache``, also over the positions cached before it.

        A :class:`LayerCache` (from a :class:`StaticKVCache`) selects the generation path: a prefill runs
        :func:`llmfast.flash_attn_func` (the full-sequence kernel) over ``x`` and stores its keys and values; a
        decoding step runs :func:`llmfast.flash_attn_with_kvcache`, which appends them at ``seqlens`` in place.
        """
        if isinstance(kv_cache, LayerCache):
            return self._forward_static(x, kv_cache)
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim) tensors.
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        attn_mask, is_causal = causal_attention_args(T, k.shape[2], x.device)
        y = llmfast.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 dropout_p=self.dropout if self.training else 0.0)
        # Heads back side by side: (B, n_head, T, head_dim) -> (B, T, C).
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _forward_static(self, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        B, T, C = x.shape
        # flash-attn's (B, T, heads, head_dim) layout: views of the fused projection, no transposes.
        q, k, v = (t.view(B, T, self.n_head, self.head_dim) for t in self.c_attn(x).split(self.n_embd, dim=2))
        if cache.prefill:
            # Right-padded prompts: causal attention keeps every real token away from the padding after it.
            y = llmfast.flash_attn_func(q, k, v, causal=True)
            cache.k[:, :T] = k
            cache.v[:, :T] = v
        else:
            y = llmfast.flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=cache.seqlens, causal=True)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))

    def extra_repr(self) -> str:
        return f"n_embd={self.n_embd}, n_head={self.n_head}, dropout={self.dropout}"


class _FlashAttentionBase(nn.Module):
    """Shared constructor of flash-attn's ``FlashSelfAttention`` / ``FlashCrossAttention`` (same arguments, same
    order, same defaults; ``softcap`` is an llmfast extension, keyword-only)."""

    def __init__(self, causal: bool = False, softmax_scale: float | None = None, attention_dropout: float = 0.0,
                 window_size: tuple[int, int] | list[int] = (-1, -1), alibi_slopes: torch.Tensor | None = None,
                 deterministic: bool = False, *, softcap: float = 0.0) -> None:
        super().__init__()
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)
        # A buffer, as in flash-attn: it follows the module across .to(device) and is not saved in the state dict.
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.window_size = tuple(window_size) if isinstance(window_size, (tuple, list)) else window_size
        self.deterministic = deterministic
        self.softcap = softcap

    def _options(self, causal: bool | None) -> dict:
        if causal is not None and not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool or None, got {type(causal).__name__}")
        slopes = self.alibi_slopes
        if slopes is not None and slopes.dtype != torch.float32:
            slopes = slopes.float()  # flash-attn's modules cast the slopes too
        return dict(dropout_p=self.drop.p if self.training else 0.0, softmax_scale=self.softmax_scale,
                    causal=self.causal if causal is None else causal, window_size=self.window_size,
                    softcap=self.softcap, alibi_slopes=slopes, deterministic=self.deterministic)

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, softmax_scale={self.softmax_scale}, attention_dropout={self.drop.p}, "
                f"window_size={self.window_size}")


class FlashSelfAttention(_FlashAttentionBase):
    """flash-attn's ``FlashSelfAttention``: softmax attention over packed ``qkv``, through llmfast's kernels.

    ``attention_dropout`` applies in training mode only; ``alibi_slopes`` ((H,) or (B, H)) is kept as a
    non-persistent buffer.
    """

    def forward(self, qkv: torch.Tensor, causal: bool | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """``qkv`` (B, S, 3, H, D), or (total, 3, H, D) with ``cu_seqlens`` (B + 1,) int32 and ``max_seqlen``.
        ``causal`` overrides the constructor's when given. Returns (B, S, H, D) or (total, H, D)."""
        options = self._options(causal)
        if cu_seqlens is None:
            if max_seqlen is not None:
                raise ValueError("max_seqlen is only used with cu_seqlens (a varlen batch); got cu_seqlens=None")
            return llmfast.flash_attn_qkvpacked_func(qkv, **options)
        if max_seqlen is None:
            raise ValueError("max_seqlen (the longest sequence in cu_seqlens) is required with cu_seqlens")
        return llmfast.flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, **options)


class FlashCrossAttention(_FlashAttentionBase):
    """flash-attn's ``FlashCrossAttention``: queries ``q`` attend over packed keys/values ``kv``, through
    llmfast's kernels (GQA/MQA when kv has fewer heads)."""

    def __init__(self, causal: bool = False, softmax_scale: float | None = None, attention_dropout: float = 0.0,
                 alibi_slopes: torch.Tensor | None = None, window_size: tuple[int, int] | list[int] = (-1, -1),
                 deterministic: bool = False, *, softcap: float = 0.0) -> None:
        # flash-attn's FlashCrossAttention takes alibi_slopes before window_size (FlashSelfAttention the other
        # way round): the same order here, so positional calls bind the same way.
        super().__init__(causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic,
                         softcap=softcap)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, causal: bool | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int | None = None) -> torch.Tensor:
        """``q`` (B, Sq, H, D) and ``kv`` (B, Sk, 2, Hk, D); or varlen ``q`` (total_q, H, D), ``kv`` (total_k, 2, Hk,
        D) with ``cu_seqlens`` / ``max_seqlen`` for the queries and ``cu_seqlens_k`` / ``max_seqlen_k`` for the
        keys. ``causal`` overrides the constructor's when given."""
        options = self._options(causal)
        varlen_args = {"max_seqlen": max_seqlen, "cu_seqlens_k": cu_seqlens_k, "max_seqlen_k": max_seqlen_k}
        if cu_seqlens is None:
            given = [name for name, value in varlen_args.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply with cu_seqlens (a varlen batch); got "
                                 f"cu_seqlens=None")
            return llmfast.flash_attn_kvpacked_func(q, kv, **options)
        missing = [name for name, value in varlen_args.items() if value is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} required with cu_seqlens (a varlen batch)")
        return llmfast.flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
                                                       **options)
