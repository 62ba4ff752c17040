"""Triton FlashAttention.

PLACEHOLDER (attention issue): the public functions below delegate to torch until the kernels land.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmfast.ops._spec import KernelSpec


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    return_attn_probs=False):
    raise NotImplementedError("flash_attn_func lands with the attention issue")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1)):
    raise NotImplementedError("flash_attn_varlen_func lands with the attention issue")


def compile_specs() -> list[KernelSpec]:
    return []
