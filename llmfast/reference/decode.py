"""Reference for decoding with a key/value cache: flash-attn's ``flash_attn_with_kvcache`` in plain PyTorch.

The judge of :mod:`llmfast.ops.decode` and its baseline in the benchmarks. Same signature and semantics:

* ``q`` is ``(B, Sq, H, D)``. The cache is contiguous, ``(B_cache, L, Hk, D)``, addressed through
  ``cache_batch_idx`` (row ``b`` of the batch uses cache row ``cache_batch_idx[b]``, default ``b``), or paged,
  ``(num_blocks, page_size, Hk, D)``, where position ``j`` of sequence ``b`` lives in page
  ``block_table[b, j // page_size]`` at slot ``j % page_size``.
* ``k``/``v`` ``(B, S_new, Hk, D)``, if given, are written *in place* into the cache at positions
  ``cache_seqlens[b] .. cache_seqlens[b] + S_new - 1`` (``k`` after rotary), and attention then sees
  ``cache_seqlens[b] + S_new`` keys. Without ``k``, it sees ``cache_seqlens[b]`` keys (the whole cache when
  ``cache_seqlens`` is None).
* Rotary (``rotary_cos``/``rotary_sin`` ``(seqlen_ro, rotary_dim / 2)``, only with ``k``): the first
  ``rotary_dim`` dims of ``k`` token ``t`` are rotated at position ``cache_seqlens + t``; those of ``q`` row
  ``i`` at ``cache_seqlens + i`` when causal or windowed, else every row at ``cache_seqlens``. Pairs are
  ``(2p, 2p + 1)`` when ``rotary_interleaved`` else ``(p, p + rotary_dim / 2)``; math in float32 (float64 for
  float64 inputs), result rounded to the input dtype.
* Scores: ``s = q k^T * softmax_scale``; with ``softcap > 0``, ``s = softcap * tanh(s / softcap)``; with
  ``alibi_slopes`` ``(H,)`` or ``(B, H)``, ``s -= slope * |i + Sk - Sq - j|``. Causal and windows are aligned
  bottom-right per sequence (``Sk`` = that sequence's key count): key ``j`` is allowed for query ``i`` iff
  ``i + Sk - Sq - left <= j <= i + Sk - Sq + right`` (``causal`` sets right = 0; -1 is unbounded).
* Returns ``out`` ``(B, Sq, H, D)`` and, with ``return_softmax_lse``, the natural-log ``logsumexp`` of the
  final scores ``(B, H, Sq)`` (float32; float64 for float64 inputs). Rows with no allowed key give 0 and
  LSE ``-inf``.

Computation runs in the inputs' dtype like an unfused model (the LSE in float32), so the reference on float16
inputs measures what that dtype costs and on float64 inputs gives the truth.
"""
from __future__ import annotations

import math

import torch

__all__ = ["flash_attn_with_kvcache", "apply_rotary", "cache_positions"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[1]`` dims of ``x`` ``(B, S, H, D)`` at ``positions`` ``(B, S)``.

    Math in float32 (float64 for float64 ``x``), result in ``x.dtype``; the other dims pass through unchanged.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = cos.shape[1]
    rot = 2 * half
    c = cos.to(compute)[positions.long()].unsqueeze(2)  # (B, S, 1, rot / 2)
    s = sin.to(compute)[positions.long()].unsqueeze(2)
    xr = x[..., :rot].to(compute)
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
    else:
        x0, x1 = xr[..., :half], xr[..., half:]
    o0 = x0 * c - x1 * s
    o1 = x0 * s + x1 * c
    rotated = torch.stack((o0, o1), dim=-1).flatten(-2) if interleaved else torch.cat((o0, o1), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rot:]), dim=-1)


def cache_positions(batch: int, capacity: int, block_table: torch.Tensor | None,
                    cache_batch_idx: torch.Tensor | None, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, slot)`` long tensors ``(B, capacity)``: where position ``j`` of sequence ``b`` lives in the cache
    (row = cache batch row or page, slot = position in it)."""
    j = torch.arange(capacity)
    if block_table is not None:
        bt = block_table.long().cpu()
        return bt[:, j // page_size], (j % page_size).expand(batch, capacity)
    rows = cache_batch_idx.long().cpu() if cache_batch_idx is not None else torch.arange(batch)
    return rows[:, None].expand(batch, capacity), j.expand(batch, capacity)


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                            cache_seqlens: int | torch.Tensor | None = None,
                            cache_batch_idx: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: torch.Tensor | None = None,
                            num_splits: int = 0, return_softmax_lse: bool = False):
    """flash-attn's ``flash_attn_with_kvcache`` (see the module docstring); ``num_splits`` changes nothing here."""
    del num_splits  # a scheduling choice of the kernels, not part of the math
    batch, seqlen_q, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when k and v are appended")
        base = torch.full((batch,), capacity, dtype=torch.long)
    elif isinstance(cache_seqlens, int):
        base = torch.full((batch,), cache_seqlens, dtype=torch.long)
    else:
        base = cache_seqlens.long().cpu()
    new = 0 if k is None else k.shape[1]
    seqlens_k = base + new
    if batch and (int(seqlens_k.max()) > capacity or int(base.min()) < 0):
        raise ValueError(f"cache holds {capacity} positions per sequence; cache_seqlens + new tokens needs "
                         f"{int(seqlens_k.max())}")
    rows, slots = cache_positions(batch, capacity, block_table, cache_batch_idx, page_size)
    device = q.device

    if k is not None:
        positions = base[:, None] + torch.arange(new)  # (B, S_new)
        if rotary_cos is not None:
            k = apply_rotary(k, rotary_cos, rotary_sin, positions.to(device), rotary_interleaved)
        b_idx = torch.arange(batch)[:, None].expand(batch, new)
        r, s = rows[b_idx, positions], slots[b_idx, positions]
        k_cache[r.to(device), s.to(device)] = k.to(k_cache.dtype)
        v_cache[r.to(device), s.to(device)] = v.to(v_cache.dtype)

    left, right = window_size
    if causal:
        right = 0
    if rotary_cos is not None and k is not None:
        if causal or left >= 0 or right >= 0:
            q_pos = base[:, None] + torch.arange(seqlen_q)
        else:
            q_pos = base[:, None].expand(batch, seqlen_q)
        q = apply_rotary(q, rotary_cos, rotary_sin, q_pos.to(device), rotary_interleaved)

    # Gather every sequence's keys and values into (B, Hk, capacity, D). Positions past a sequence's length are
    # masked below, so unused block-table entries (which may hold anything) are clamped just to gather.
    rows = rows.clamp(0, k_cache.shape[0] - 1).to(device)
    keys = k_cache[rows, slots.to(device)].permute(0, 2, 1, 3)
    values = v_cache[rows, slots.to(device)].permute(0, 2, 1, 3)
    group = heads // kv_heads
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    qh = q.permute(0, 2, 1, 3)  # (B, H, Sq, D)

    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    scores = (qh @ keys.transpose(-2, -1)) * scale  # (B, H, Sq, capacity), in the inputs' dtype
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(seqlen_q, device=device)[None, :, None]
    j = torch.arange(capacity, device=device)[None, None, :]
    diag = (seqlens_k.to(device) - seqlen_q)[:, None, None]  # (B, 1, 1)
    rel = i + diag - j                                       # (B, Sq, capacity): query's position minus key's
    if alibi_slopes is not None:
        slopes = alibi_slopes.expand(batch, heads) if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(
            batch, heads)
        bias = -slopes.to(scores.dtype)[:, :, None, None] * rel.abs()[:, None].to(scores.dtype)
        scores = scores + bias
    allowed = j < seqlens_k.to(device)[:, None, None]
    if right >= 0:
        allowed = allowed & (-rel <= right)
    if left >= 0:
        allowed = allowed & (rel <= left)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    empty_row = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty_row, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty_row, 0.0)
    out = (probs.to(values.dtype) @ values).permute(0, 2, 1, 3)
    if not return_softmax_lse:
        return out
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(scores.to(lse_dtype), dim=-1, keepdim=True).masked_fill(empty_row, float("-inf"))
    return out, lse.squeeze(-1)
