"""torch-native paths (backend "torch" or "auto" where Triton cannot run, and float64), with the kernels'
semantics."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _band_mask(seqlen_q: int, seqlen_k: int, left: int, right: int, bottom_right: bool,
               device: torch.device) -> torch.Tensor | None:
    """Bool (Sq, Sk) mask of key j allowed for query i under a causal band / sliding window, None if unbounded."""
    if left < 0 and right < 0:
        return None
    diag = seqlen_k - seqlen_q if bottom_right else 0
    rel = (torch.arange(seqlen_k, device=device)[None, :] - torch.arange(seqlen_q, device=device)[:, None] - diag)
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        allowed &= rel <= right
    if left >= 0:
        allowed &= rel >= -left
    return allowed


def _combine_masks(attn_mask: torch.Tensor | None, band: torch.Tensor | None) -> torch.Tensor | None:
    if band is None or attn_mask is None:
        return attn_mask if band is None else band
    if attn_mask.dtype == torch.bool:
        return attn_mask & band
    return attn_mask.masked_fill(~band, -math.inf)


def _sdpa_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    if is_causal and attn_mask is not None:
        attn_mask = _combine_masks(attn_mask, _band_mask(query.shape[-2], key.shape[-2], -1, 0, False, query.device))
        is_causal = False
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _flash_torch(q, k, v, dropout_p, scale, left, right, with_lse):
    """flash_attn_func semantics on torch's SDPA; (B, S, H, D) in and out."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    band = _band_mask(qt.shape[-2], kt.shape[-2], left, right, True, q.device)
    grouped = qt.shape[1] != kt.shape[1]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=band, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=grouped).transpose(1, 2)
    if not with_lse:
        return out, None
    group = qt.shape[1] // kt.shape[1]
    scores = (qt.float() @ kt.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    if band is not None:
        scores = scores.masked_fill(~band, -math.inf)
    return out, torch.logsumexp(scores, dim=-1)


def _reference():
    from llmfast.reference import attention as reference  # late: the reference is only needed when selected

    return reference
