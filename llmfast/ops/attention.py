"""Triton FlashAttention.

PLACEHOLDER (attention issue): the public functions below delegate to torch until the kernels land.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from llmfast import _backend
from llmfast.ops._spec import KernelSpec


@triton.jit
def _dropout_keep(seed, offsets, dropout_p):
    """Philox keep decision shared by every kernel: keep iff uniform(seed, offset) >= dropout_p.

    Offsets are int64 so huge (B, H, Sq, Sk) index spaces do not wrap; below 2**32 they give the same numbers as
    int32 offsets would (Philox's high counter word is then zero).
    """
    return tl.rand(seed, offsets.to(tl.int64)) >= dropout_p


@triton.jit
def _dropout_mask_kernel(keep_ptr, seed, dropout_p, Sq, Sk, BLOCK_N: tl.constexpr):
    # One program per (b, h, i) row: the keep mask of element (b, h, i, j) at offset ((b*H + h)*Sq + i)*Sk + j.
    row = tl.program_id(0).to(tl.int64)
    for start in range(0, Sk, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, row * Sk + cols, dropout_p)
        tl.store(keep_ptr + row * Sk + cols, keep.to(tl.int8), mask=cols < Sk)


def dropout_keep_mask(seed: int, p: float, B: int, H: int, Sq: int, Sk: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The dropout keep mask (B, H, Sq, Sk) bool that the attention kernels apply for ``seed`` and ``p``.

    Element (b, h, i, j) is kept iff ``tl.rand(seed, ((b * H + h) * Sq + i) * Sk + j) >= p`` (H: query heads).
    Runs a small Triton kernel (so it needs CUDA tensors or ``TRITON_INTERPRET=1``), which makes the mask
    bit-identical to the one the forward and backward kernels regenerate.
    """
    keep = torch.empty((B, H, Sq, Sk), dtype=torch.int8, device=device)
    if keep.numel():
        _backend.record_kernel_launch("attention_dropout_mask")
        _dropout_mask_kernel[(B * H * Sq,)](keep, int(seed), float(p), Sq, Sk,
                                            BLOCK_N=min(1024, triton.next_power_of_2(Sk)))
    return keep.bool()


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
