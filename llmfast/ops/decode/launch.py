"""Host side of the Triton path: one launch sequence per call, exposed as the custom op
``llmfast::flash_attn_with_kvcache`` (it mutates ``k_cache`` and ``v_cache``; a fake implementation lets
``torch.compile`` trace it)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from llmfast import _backend
from llmfast.ops._arch import config_arch

from .configs import LOG2E, MAX_SPLITS, _config, _config_name, _row_kind_for
from .kernels import _decode_combine_kernel, _decode_kernel, _kv_append_kernel

# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------
def _max_offset(t: torch.Tensor) -> int:
    """The largest element offset any index of ``t`` reaches from its data pointer."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def _needs_wide(*tensors: torch.Tensor) -> bool:
    return any(t is not None and t.numel() and _max_offset(t) >= 2**31 - 1 for t in tensors)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
            interleaved: bool) -> torch.Tensor:
    """Rotary on the queries (a few rows per step, so plain torch): float32 math, rounded to x's dtype."""
    half = cos.shape[1]
    c = cos.float()[positions].unsqueeze(2)
    s = sin.float()[positions].unsqueeze(2)
    xr = x[..., :2 * half].float()
    x0, x1 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
    o0, o1 = x0 * c - x1 * s, x0 * s + x1 * c
    rotated = torch.stack((o0, o1), dim=-1).flatten(-2) if interleaved else torch.cat((o0, o1), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _kvcache_impl(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, block_table,
                  alibi_slopes, softmax_scale, window_left, window_right, softcap, rotary_interleaved,
                  rotary_q_per_row, num_splits):
    batch, seqlen_q, num_heads, head_d = q.shape
    num_kv_heads = k_cache.shape[2]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    new = 0 if k is None else k.shape[1]
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, num_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(-math.inf)
    block_d = max(16, triton.next_power_of_2(head_d))
    dummy = q  # placeholder for absent pointer arguments (never dereferenced: their flags are off)

    if k is not None and new > 0 and k.numel():
        rotary_dim = 0 if rotary_cos is None else 2 * rotary_cos.shape[1]
        _backend.record_kernel_launch("decode_kv_append", {"rotary_dim": rotary_dim, "paged": paged})
        _kv_append_kernel[(batch * new, num_kv_heads)](
            k, v, k_cache, v_cache, cache_seqlens,
            cache_batch_idx if cache_batch_idx is not None else dummy,
            block_table if paged else dummy,
            rotary_cos if rotary_dim else dummy, rotary_sin if rotary_dim else dummy,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_table.stride(0) if paged else 0,
            rotary_cos.stride(0) if rotary_dim else 0, rotary_sin.stride(0) if rotary_dim else 0,
            new, page_size, capacity, k_cache.shape[0],
            HEAD_D=head_d, BLOCK_D=block_d, ROTARY_DIM=rotary_dim, INTERLEAVED=bool(rotary_interleaved),
            PAGED=paged, HAS_BATCH_IDX=cache_batch_idx is not None, num_warps=1,
        )
    if rotary_cos is not None and k is not None:
        steps = torch.arange(seqlen_q, device=q.device) if rotary_q_per_row else torch.zeros(
            seqlen_q, dtype=torch.long, device=q.device)
        q = _rotate(q, rotary_cos, rotary_sin, cache_seqlens.long()[:, None] + steps, rotary_interleaved)

    group = num_heads // num_kv_heads
    # Group the query rows by KV head, (B * Hk, Sq * group, D), row r = query i * group + head g: the kernel then
    # loads a row block as one affine tile (a view, no copy, when Sq == 1).
    q_rows = q.view(batch, seqlen_q, num_kv_heads, group, head_d).permute(0, 2, 1, 3, 4).reshape(
        batch * num_kv_heads, seqlen_q * group, head_d)
    has_seqlens = cache_seqlens is not None
    seqlens_k = (cache_seqlens + new).to(torch.int32) if has_seqlens else dummy
    arch = config_arch(q.device)
    kind, block_m = _row_kind_for(seqlen_q * group, q.dtype)
    cfg = _config(arch, kind, block_d, q.dtype)
    row_blocks = triton.cdiv(seqlen_q * group, block_m)
    splits = min(max(int(num_splits), 1), MAX_SPLITS)
    has_left, has_right = window_left >= 0, window_right >= 0
    _backend.record_kernel_launch("decode_attention", {
        "arch": arch, "config": _config_name(arch, kind, block_d, q.dtype), "BLOCK_M": block_m, **cfg,
        "num_splits": splits, "row_blocks": row_blocks})
    if splits > 1:
        out_acc = torch.empty((splits, batch, seqlen_q, num_heads, head_d), dtype=torch.float32, device=q.device)
        lse_acc = torch.empty((splits, batch, seqlen_q, num_heads), dtype=torch.float32, device=q.device)
    else:
        out_acc = lse_acc = lse
    has_softcap = softcap > 0
    _decode_kernel[(batch * num_kv_heads, row_blocks, splits)](
        q_rows, k_cache, v_cache, out, lse, out_acc, lse_acc, seqlens_k,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        block_table if paged else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        q_rows.stride(0), q_rows.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        block_table.stride(0) if paged else 0,
        (alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0) if alibi_slopes is not None else 0,
        batch, seqlen_q, num_heads, num_kv_heads, group, capacity, page_size, splits,
        softmax_scale / softcap if has_softcap else softmax_scale * LOG2E,
        softcap * LOG2E if has_softcap else 0.0, window_left, window_right,
        HEAD_D=head_d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], PAGED=paged,
        HAS_SEQLENS=has_seqlens, HAS_BATCH_IDX=cache_batch_idx is not None, HAS_LEFT=has_left,
        HAS_RIGHT=has_right, HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=has_softcap,
        USE_DOT=block_m >= 16, SPLIT=splits > 1, WIDE=_needs_wide(k_cache, v_cache),
        FP32_IEEE=q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _backend.record_kernel_launch("decode_combine", {"num_splits": splits})
        _decode_combine_kernel[(batch * seqlen_q * num_heads,)](
            out_acc, lse_acc, out, lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            batch, seqlen_q, num_heads, splits,
            HEAD_D=head_d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits), num_warps=4,
        )
    return out, lse


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom op: mutates the caches; traced by torch.compile through the fake implementation.
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("llmfast::flash_attn_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
                v: Optional[torch.Tensor], rotary_cos: Optional[torch.Tensor], rotary_sin: Optional[torch.Tensor],
                cache_seqlens: Optional[torch.Tensor], cache_batch_idx: Optional[torch.Tensor],
                block_table: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], softmax_scale: float,
                window_left: int, window_right: int, softcap: float, rotary_interleaved: bool,
                rotary_q_per_row: bool, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _kvcache_impl(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                         block_table, alibi_slopes, softmax_scale, window_left, window_right, softcap,
                         rotary_interleaved, rotary_q_per_row, num_splits)


@_kvcache_op.register_fake
def _kvcache_op_fake(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                     block_table, alibi_slopes, softmax_scale, window_left, window_right, softcap,
                     rotary_interleaved, rotary_q_per_row, num_splits):
    batch, seqlen_q, num_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, num_heads, seqlen_q), dtype=torch.float32)
