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


def _math_attention(qt, kt, vt, scale, softcap, mask, bias, dropout_p):
    """Explicit attention math on (B, H, S, D) tensors for what torch's SDPA cannot express (soft-capping, ALiBi
    with the LSE, the probabilities): scores in float32 (float64 for float64), soft-capped, then ``bias`` and
    ``mask`` (bool: True = attend; or additive). Returns (out, lse, probs, keep); rows without keys give 0."""
    work = torch.float64 if qt.dtype == torch.float64 else torch.float32
    group = qt.shape[-3] // max(kt.shape[-3], 1)
    kt, vt = kt.repeat_interleave(group, dim=-3), vt.repeat_interleave(group, dim=-3)
    scores = (qt.to(work) @ kt.to(work).transpose(-1, -2)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.to(work)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.to(work)
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0).unsqueeze(-1)).masked_fill(empty.unsqueeze(-1), 0.0)
    keep = None
    dropped = probs
    if dropout_p > 0:
        keep = torch.rand_like(probs) >= dropout_p
        dropped = probs * keep / (1.0 - dropout_p)
    out = (dropped @ vt.to(work)).to(vt.dtype)
    return out, lse.to(torch.float64 if work == torch.float64 else torch.float32), probs, keep


def _sdpa_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap=0.0):
    if softcap > 0:
        mask = _combine_masks(attn_mask, _band_mask(query.shape[-2], key.shape[-2], -1, 0, False, query.device)
                              if is_causal else None)
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        return _math_attention(query, key, value, sm_scale, softcap, mask, None, dropout_p)[0]
    if is_causal and attn_mask is not None:
        attn_mask = _combine_masks(attn_mask, _band_mask(query.shape[-2], key.shape[-2], -1, 0, False, query.device))
        is_causal = False
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _alibi_bias(alibi_slopes, seqlen_q, seqlen_k, device):
    """-slope * |i + Sk - Sq - j|: (B or 1, H, Sq, Sk) float32."""
    slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]
    rel = (torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
           - torch.arange(seqlen_k, device=device)[None, :]).abs()
    return -slopes.float()[:, :, None, None] * rel.float()


def _flash_torch(q, k, v, dropout_p, scale, left, right, with_lse, softcap=0.0, alibi_slopes=None,
                 with_probs=False):
    """flash_attn_func semantics on torch; (B, S, H, D) in and out. Returns (out, lse or None, S_dmask or None)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    band = _band_mask(qt.shape[-2], kt.shape[-2], left, right, True, q.device)
    if softcap > 0 or alibi_slopes is not None or with_probs:
        bias = None if alibi_slopes is None else _alibi_bias(alibi_slopes, qt.shape[-2], kt.shape[-2], q.device)
        out, lse, probs, keep = _math_attention(qt, kt, vt, scale, softcap, band, bias, dropout_p)
        if with_probs:
            probs = probs if keep is None else torch.where(keep, probs, -probs)
            probs = probs.to(q.dtype)
        return out.transpose(1, 2), lse if with_lse else None, probs if with_probs else None
    grouped = qt.shape[1] != kt.shape[1]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=band, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=grouped).transpose(1, 2)
    if not with_lse:
        return out, None, None
    group = qt.shape[1] // kt.shape[1]
    scores = (qt.float() @ kt.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    if band is not None:
        scores = scores.masked_fill(~band, -math.inf)
    return out, torch.logsumexp(scores, dim=-1), None


def _flash_varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale, left,
                        right, softcap, alibi_slopes, with_probs):
    """flash_attn_varlen_func on torch, one sequence at a time. Returns (out, lse (H, total_q), S_dmask or None)."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    heads = q.shape[1]
    out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    lse = torch.full((heads, q.shape[0]), -math.inf, dtype=torch.float64 if q.dtype == torch.float64
                     else torch.float32, device=q.device)
    probs = (q.new_zeros(len(bounds_q) - 1, heads, max_seqlen_q, max_seqlen_k) if with_probs else None)
    pieces = []
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:
            pieces.append(out[q0:q1])
            continue
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        piece, piece_lse, piece_probs = _flash_torch(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], dropout_p,
                                                     scale, left, right, True, softcap, slopes, with_probs)
        pieces.append(piece[0])
        lse[:, q0:q1] = piece_lse[0]
        if with_probs:
            probs[b, :, :q1 - q0, :k1 - k0] = piece_probs[0]
    result = torch.cat(pieces) if pieces else out
    return result, lse, probs


def _reference():
    from llmfast.reference import attention as reference  # late: the reference is only needed when selected

    return reference
