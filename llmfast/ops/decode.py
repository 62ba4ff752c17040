"""Triton decode attention over a key/value cache: flash-attn's ``flash_attn_with_kvcache``.

One decoding step has a handful of query rows against a long cache, so the work is reading K and V once, as fast
as memory allows. The kernels:

* ``_kv_append_kernel``: writes the new ``k``/``v`` tokens into the cache in place at ``cache_seqlens`` (contiguous
  or paged), rotating ``k`` first when rotary tables are given. One program per (token, KV head).
* ``_decode_kernel`` (split-KV partial attention): one program per (batch, KV head, block of query rows, split).
  The rows of a block are the ``Sq x group`` query rows that share one KV head (row ``r`` is query position
  ``r // group``, query head ``kv_head * group + r % group``), so each K/V tile is loaded once for the whole GQA
  group. Each split streams its share of the key range through an online softmax and writes a partial output and
  its log-sum-exp (or, with one split, the final output). A single row (MHA decoding) runs on the FMA units (a
  keys x dims product reduced over dims); two rows or more (GQA groups x speculative tokens) run on the tensor
  cores with ``tl.dot`` in 16- or 64-row blocks (a few padded rows cost nothing in a memory-bound step).
  Causal / sliding windows (bottom-right per sequence), softcap and ALiBi are
  applied to the scores; paged caches are addressed per key through ``block_table``.
* ``_decode_combine_kernel``: merges the splits' partial outputs, weighting each by ``exp(lse_split - lse)``.

``num_splits=0`` picks the split count in :func:`choose_num_splits` (the one heuristic). Offsets into the cache
are 64-bit when the cache spans 2**31 elements or more (``WIDE``), 32-bit otherwise. Tiles are named configs per
architecture (``DECODE_CONFIGS``), all compiled by ``python -m llmfast.compile_check`` via :func:`compile_specs`.

The Triton path is the custom op ``llmfast::flash_attn_with_kvcache`` (it declares that it mutates ``k_cache``
and ``v_cache``), with a fake implementation so ``torch.compile`` traces it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import numbers
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from llmfast import _backend, _validation
from llmfast.ops._arch import config_arch
from llmfast.ops._spec import KernelSpec
from llmfast.ops.attention.common import _cast, _dot

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MAX_SPLITS = 128

# ----------------------------------------------------------------------------------------------------------------
# Tuning. Kinds: "m1" runs one query row on the FMA units; "m16" / "m64" use tl.dot with 16 / 64-row blocks
# (2..16 rows, then 17 and more). Head-dim buckets as in attention.py ("d64" serves 1..64, ...).
# "_fp32" entries serve float32 inputs. Every entry compiles without spills at a representative launch's
# specialization (python -m llmfast.compile_check --kernel decode: 90 builds; 56-96 registers for one row, 68-80
# for 16-row blocks, 112-227 for 64-row blocks; the tl.dot kernels' K/V loads are cp.async-pipelined). Chosen by
# sweeping tiles for the first that builds without spills; speed tuning on real GPUs is still to do.
# ----------------------------------------------------------------------------------------------------------------
_COMMON_CONFIGS = {
    "m16_d64": dict(BLOCK_N=64, num_warps=4, num_stages=3),
    "m16_d128": dict(BLOCK_N=64, num_warps=8, num_stages=2),
    "m16_d256": dict(BLOCK_N=32, num_warps=8, num_stages=2),
    "m64_d64": dict(BLOCK_N=64, num_warps=8, num_stages=2),
    "m64_d128": dict(BLOCK_N=32, num_warps=8, num_stages=2),
    "m64_d256": dict(BLOCK_N=16, num_warps=8, num_stages=1),
    "m1_d64_fp32": dict(BLOCK_N=64, num_warps=4, num_stages=2),
    "m1_d128_fp32": dict(BLOCK_N=32, num_warps=4, num_stages=2),
    "m1_d256_fp32": dict(BLOCK_N=16, num_warps=4, num_stages=2),
    "m16_d64_fp32": dict(BLOCK_N=32, num_warps=4, num_stages=1),
    "m16_d128_fp32": dict(BLOCK_N=16, num_warps=4, num_stages=1),
    "m16_d256_fp32": dict(BLOCK_N=16, num_warps=8, num_stages=1),
}
DECODE_CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "sm90": {
        "m1_d64": dict(BLOCK_N=128, num_warps=4, num_stages=2),
        "m1_d128": dict(BLOCK_N=64, num_warps=8, num_stages=2),
        "m1_d256": dict(BLOCK_N=32, num_warps=8, num_stages=2),
        **_COMMON_CONFIGS,
    },
    "sm80": {
        "m1_d64": dict(BLOCK_N=128, num_warps=4, num_stages=2),
        "m1_d128": dict(BLOCK_N=32, num_warps=4, num_stages=2),
        "m1_d256": dict(BLOCK_N=32, num_warps=4, num_stages=2),
        **_COMMON_CONFIGS,
    },
    # The CPU interpreter: 16-key tiles, so short test caches still cross several tiles and several splits.
    "interpreter": {"decode": dict(BLOCK_N=16, num_warps=4, num_stages=1)},
}
_KIND_ROWS = {"m1": 1, "m16": 16, "m64": 64}

# The split heuristic's machine description per architecture (on a real card the SM count is read from it).
SPLIT_HEURISTIC = {
    "sm90": dict(num_sms=132, waves=2, min_tiles_per_split=4),
    "sm80": dict(num_sms=108, waves=2, min_tiles_per_split=4),
    "interpreter": dict(num_sms=4, waves=1, min_tiles_per_split=1),
}


def _head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def _row_kind(rows: int) -> tuple[str, int]:
    """(config kind, BLOCK_M) for a block of ``rows`` = Sq x group query rows sharing one KV head."""
    if rows <= 1:
        return "m1", 1
    if rows <= 16:
        return "m16", 16
    return "m64", 64


def _row_kind_for(rows: int, dtype: torch.dtype) -> tuple[str, int]:
    """:func:`_row_kind`, except that float32 (exact fp32 dots, for tests) stays at 16-row blocks."""
    kind, block_m = _row_kind(rows)
    return ("m16", 16) if dtype == torch.float32 and kind == "m64" else (kind, block_m)


def _config_name(arch: str, kind: str, block_d: int, dtype: torch.dtype) -> str:
    if "decode" in DECODE_CONFIGS[arch]:
        return "decode"
    return f"{kind}_d{_head_dim_bucket(block_d)}" + ("_fp32" if dtype == torch.float32 else "")


def _config(arch: str, kind: str, block_d: int, dtype: torch.dtype) -> dict[str, int]:
    return DECODE_CONFIGS[arch][_config_name(arch, kind, block_d, dtype)]


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(batch: int, kv_heads: int, row_blocks: int, seqlen_k: int, block_n: int,
                      arch: str = "sm90", num_sms: int | None = None) -> int:
    """How many programs share one (batch, KV head, row block)'s key range when ``num_splits=0``.

    Without splitting there are ``batch x kv_heads x row_blocks`` programs; a decoding step at small batch has far
    fewer than the card has SMs, and each streams a long cache alone. So: no split once the grid already covers
    ``waves x num_sms`` programs; otherwise enough splits to reach that, but never so many that a split gets fewer
    than ``min_tiles_per_split`` key tiles of ``block_n`` (each split pays a fixed cost: loading q, writing a
    partial output, its share of the combine), and at most ``MAX_SPLITS``. ``seqlen_k`` is the longest key range
    of the call. The machine description (``SPLIT_HEURISTIC``) is per architecture; ``num_sms`` overrides it (the
    launch passes the card's own count).
    """
    params = SPLIT_HEURISTIC[arch]
    sms = num_sms if num_sms is not None else params["num_sms"]
    programs = max(1, batch * kv_heads * row_blocks)
    target = params["waves"] * sms
    if programs >= target:
        return 1
    tiles = max(1, triton.cdiv(max(seqlen_k, 0), block_n))
    by_length = max(1, tiles // params["min_tiles_per_split"])
    return int(max(1, min(triton.cdiv(target, programs), by_length, MAX_SPLITS)))


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # tanh from exp2, saturating cleanly: exp2 overflows to inf for large |x| and the formula gives +-1.
    e = tl.math.exp2(x * (2.0 * 1.4426950408889634))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _kv_append_kernel(
    KNew, VNew, K, V, CacheSeqlens, BatchIdx, BlockTable, Cos, Sin,
    stride_knb, stride_knt, stride_knh, stride_vnb, stride_vnt, stride_vnh,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_btb, stride_cos, stride_sin,
    seqlen_new, page_size, capacity, num_blocks,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = pid // seqlen_new
    t = pid % seqlen_new
    pos = tl.load(CacheSeqlens + b) + t
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    # The host checked every position and page; the kernel re-checks (per lane, so the masks stay vectors) so that
    # it can never write out of bounds.
    pos_v = pos + offs_d * 0
    ok = (pos_v >= 0) & (pos_v < capacity)
    if PAGED:
        page = tl.load(BlockTable + b64 * stride_btb + pos_v // page_size, mask=ok, other=0)
        ok = ok & (page >= 0) & (page < num_blocks)
        slot = (pos % page_size).to(tl.int64)
        k_row = K + page.to(tl.int64) * stride_kb + slot * stride_kn + kvh * stride_kh
        v_row = V + page.to(tl.int64) * stride_vb + slot * stride_vn + kvh * stride_vh
    else:
        if HAS_BATCH_IDX:
            row = tl.load(BatchIdx + b).to(tl.int64)
        else:
            row = b64
        k_row = K + row * stride_kb + pos.to(tl.int64) * stride_kn + kvh * stride_kh
        v_row = V + row * stride_vb + pos.to(tl.int64) * stride_vn + kvh * stride_vh
    d_ok = offs_d < HEAD_D
    k_src = KNew + b64 * stride_knb + t.to(tl.int64) * stride_knt + kvh * stride_knh
    x = tl.load(k_src + offs_d, mask=d_ok, other=0.0)
    if ROTARY_DIM > 0:
        # Element d of a rotated pair (x0, x1) becomes x0 cos - x1 sin (first) or x0 sin + x1 cos (second).
        HALF: tl.constexpr = ROTARY_DIM // 2
        in_rot = offs_d < ROTARY_DIM
        if INTERLEAVED:
            partner = offs_d ^ 1
            pair = offs_d // 2
            second = (offs_d % 2) == 1
        else:
            partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
            pair = offs_d % HALF
            second = offs_d >= HALF
        xp = tl.load(k_src + partner, mask=in_rot, other=0.0).to(tl.float32)
        pos64 = pos.to(tl.int64)
        c = tl.load(Cos + pos64 * stride_cos + pair, mask=in_rot & ok, other=1.0).to(tl.float32)
        s = tl.load(Sin + pos64 * stride_sin + pair, mask=in_rot & ok, other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        rotated = tl.where(second, xf * c + xp * s, xf * c - xp * s)
        x = tl.where(in_rot, _cast(rotated, K.dtype.element_ty), x.to(K.dtype.element_ty))
    tl.store(k_row + offs_d, x.to(K.dtype.element_ty), mask=d_ok & ok)
    v_src = VNew + b64 * stride_vnb + t.to(tl.int64) * stride_vnt + kvh * stride_vnh
    tl.store(v_row + offs_d, tl.load(v_src + offs_d, mask=d_ok, other=0.0), mask=d_ok & ok)


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Lse, OutAcc, LseAcc, SeqLensK, BatchIdx, BlockTable, Alibi,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lh, stride_btb, stride_ab,
    batch, seqlen_q, num_heads, num_kv_heads, group_size, fixed_seqlen_k, page_size, num_splits,
    qk_scale, softcap2, window_left, window_right,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_DOT: tl.constexpr,
    SPLIT: tl.constexpr, WIDE: tl.constexpr, FP32_IEEE: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bk // num_kv_heads
    kvh = pid_bk % num_kv_heads
    b64 = b.to(tl.int64)
    if HAS_SEQLENS:
        # Never past the cache (fixed_seqlen_k is its capacity), even for lengths the host did not check.
        seqlen_k = tl.minimum(tl.load(SeqLensK + b), fixed_seqlen_k)
    else:
        seqlen_k = fixed_seqlen_k + b * 0
    diag = seqlen_k - seqlen_q  # bottom-right alignment: query i sits at key position i + diag

    n_rows = seqlen_q * group_size
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    qi = rows // group_size
    h = kvh * group_size + rows % group_size
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D

    # The keys any row of this block may see, then this split's share of them (whole tiles).
    i_lo = m_start // group_size
    i_hi = (tl.minimum(m_start + BLOCK_M, n_rows) - 1) // group_size
    lo = seqlen_k * 0
    hi = seqlen_k
    if HAS_RIGHT:
        hi = tl.minimum(i_hi + diag + window_right + 1, seqlen_k)
    if HAS_LEFT:
        lo = tl.maximum(i_lo + diag - window_left, 0)
    hi = tl.maximum(hi, lo)
    per_split = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    s_lo = tl.minimum(lo + pid_s * per_split, hi)
    s_hi = tl.minimum(s_lo + per_split, hi)

    # q arrives grouped by KV head, (B * Hk, Sq * group, D): the rows of a block are one affine range.
    q = tl.load(Q + pid_bk.to(tl.int64) * stride_qb + rows[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if not USE_DOT:
        qf = q.to(tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b64 * stride_ab + h, mask=row_ok, other=0.0) * 1.4426950408889634
    if PAGED:
        bt_base = BlockTable + b64 * stride_btb
        k_base = K + kvh.to(tl.int64) * stride_kh
        v_base = V + kvh.to(tl.int64) * stride_vh
    else:
        if HAS_BATCH_IDX:
            cache_row = tl.load(BatchIdx + b).to(tl.int64)
        else:
            cache_row = b64
        k_base = K + cache_row * stride_kb + kvh.to(tl.int64) * stride_kh
        v_base = V + cache_row * stride_vb + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(s_lo, s_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < s_hi
        if PAGED:
            page = tl.load(bt_base + offs_n // page_size, mask=key_ok, other=0)
            slot = offs_n % page_size
            if WIDE:
                page = page.to(tl.int64)
            k_off = page * stride_kb + slot * stride_kn
            v_off = page * stride_vb + slot * stride_vn
        else:
            if WIDE:
                k_off = offs_n.to(tl.int64) * stride_kn
                v_off = offs_n.to(tl.int64) * stride_vn
            else:
                k_off = offs_n * stride_kn
                v_off = offs_n * stride_vn
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if USE_DOT:
            qk = _dot(q, tl.trans(k), None, FP32_IEEE)
        else:
            # One query row: a (keys x dims) product reduced over dims on the FMA units.
            qk = tl.reshape(tl.sum(k.to(tl.float32) * qf, 1), [1, BLOCK_N])
        # Scores in base 2: softcap (softcap * tanh(s * scale / softcap)), then ALiBi, then the masks.
        if HAS_SOFTCAP:
            s = _tanh(qk * qk_scale) * softcap2
        else:
            s = qk * qk_scale
        if HAS_ALIBI:
            dist = tl.abs(qi[:, None] + diag - offs_n[None, :]).to(tl.float32)
            s = s - slope2[:, None] * dist
        allowed = key_ok[None, :] & row_ok[:, None]
        if HAS_RIGHT:
            allowed = allowed & (offs_n[None, :] <= qi[:, None] + (diag + window_right))
        if HAS_LEFT:
            allowed = allowed & (offs_n[None, :] >= qi[:, None] + (diag - window_left))
        s = tl.where(allowed, s, -float("inf"))
        # Online softmax; a row that has seen no allowed key keeps max -inf and subtracts 0 (exp2 gives 0).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if USE_DOT:
            acc = _dot(_cast(p, v.dtype), v, acc, FP32_IEEE)
        else:
            acc += tl.reshape(tl.sum(tl.reshape(p, [BLOCK_N, 1]) * v.to(tl.float32), 0), [1, BLOCK_D])
        m_i = m_new

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty_row, -float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    if SPLIT:
        # Partials laid out (split, batch, Sq, H[, D]) in float32, for the combine kernel.
        # 64-bit only in the scalar base: per-row offsets stay 32-bit (half the registers).
        part0 = (pid_s * batch + b).to(tl.int64) * seqlen_q * num_heads
        part = qi * num_heads + h
        tl.store(OutAcc + part0 * HEAD_D + (part[:, None] * HEAD_D + offs_d[None, :]), out,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LseAcc + part0 + part, lse, mask=row_ok)
    else:
        o_ptrs = Out + b64 * stride_ob + qi[:, None] * stride_om + h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, _cast(out, Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + b64 * stride_lb + h * stride_lh + qi, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    OutAcc, LseAcc, Out, Lse, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
    batch, seqlen_q, num_heads, num_splits,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per output row (b, i, h): out = sum_s exp(lse_s - lse) out_s, lse = log sum_s exp(lse_s).
    row = tl.program_id(0)
    h = row % num_heads
    bi = row // num_heads
    i = bi % seqlen_q
    b = bi // seqlen_q
    split_stride = (batch * seqlen_q * num_heads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    lse_s = tl.load(LseAcc + offs_s.to(tl.int64) * split_stride + row, mask=offs_s < num_splits,
                    other=-float("inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    total = tl.sum(tl.exp(lse_s - m_safe), 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        part = s * split_stride + row
        weight = tl.exp(tl.load(LseAcc + part) - m_safe)
        acc += weight * tl.load(OutAcc + part * HEAD_D + offs_d, mask=d_ok, other=0.0)
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)
    b64 = b.to(tl.int64)
    tl.store(Out + b64 * stride_ob + i * stride_om + h * stride_oh + offs_d, _cast(out, Out.dtype.element_ty),
             mask=d_ok)
    tl.store(Lse + b64 * stride_lb + h * stride_lh + i, tl.where(empty, -float("inf"), m_safe + tl.log(total)))


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


# ----------------------------------------------------------------------------------------------------------------
# Validation: every failure names the argument, what it got and what it accepts.
# ----------------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_index_tensor(name: str, t: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {_dtype_name(t.dtype)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")
    return t


def _check_number(name: str, value: object, accepts: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number ({accepts}), got {type(value).__name__}")
    if not ok(float(value)):
        raise ValueError(f"{name} must be {accepts}, got {value}")
    return float(value)


class _Call:
    """The validated arguments of one call, in the form the kernels take."""

    def __init__(self, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                 block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
                 num_splits, return_softmax_lse):
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            _validation.check_tensor(name, t, ndim=4, dtypes=_DTYPES)
        _validation.check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
        _validation.check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
        batch, seqlen_q, heads, head_d = q.shape
        if not 1 <= head_d <= MAX_HEAD_DIM:
            raise ValueError(f"q has head dim (last dimension) {head_d}; accepted head dims are 1..{MAX_HEAD_DIM}")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                             f"{tuple(v_cache.shape)}")
        if k_cache.shape[-1] != head_d:
            raise ValueError(f"k_cache's head dim (last dimension) must equal q's ({head_d}), got "
                             f"{k_cache.shape[-1]}")
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.stride(-1) != 1 and t.shape[-1] > 1:
                raise ValueError(f"{name} must be contiguous in its last dimension (it is updated in place), got "
                                 f"strides {t.stride()}")
        kv_heads = k_cache.shape[2]
        if kv_heads == 0 or heads % kv_heads:
            raise ValueError(f"q's heads ({heads}) must be a multiple of the cache's key/value heads ({kv_heads})")
        self.paged = block_table is not None
        if self.paged:
            if cache_batch_idx is not None:
                raise ValueError("cache_batch_idx cannot be combined with block_table (a paged cache is addressed "
                                 "through the block table alone)")
            if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 \
                    or block_table.shape[0] != batch:
                got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table)
                raise ValueError(f"block_table must be (batch={batch}, max_blocks) int32, got {got}")
            _check_index_tensor("block_table", block_table, tuple(block_table.shape), q.device)
            self.page_size = k_cache.shape[1]
            self.capacity = block_table.shape[1] * self.page_size
        else:
            self.page_size = 1
            self.capacity = k_cache.shape[1]
            if cache_batch_idx is not None:
                _check_index_tensor("cache_batch_idx", cache_batch_idx, (batch,), q.device)
            elif k_cache.shape[0] != batch:
                raise ValueError(f"k_cache has {k_cache.shape[0]} sequences but q has batch {batch}; pass "
                                 "cache_batch_idx to pick cache rows")
        if (k is None) != (v is None):
            raise ValueError("k and v must be given together (new keys and values to append) or both be None")
        self.new = 0
        if k is not None:
            want = (batch, k.shape[1], kv_heads, head_d)
            for name, t in (("k", k), ("v", v)):
                _validation.check_tensor(name, t, ndim=4)
                if tuple(t.shape) != want:
                    raise ValueError(f"{name} must have shape (batch, seqlen_new, kv_heads, head_dim) = {want}, "
                                     f"got {tuple(t.shape)}")
            self.new = k.shape[1]
            if cache_seqlens is None:
                raise ValueError("cache_seqlens is required when k and v are appended (it says where they go)")
        if cache_seqlens is None:
            self.seqlens = None
        elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
            if cache_seqlens < 0:
                raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
            self.seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
        elif isinstance(cache_seqlens, torch.Tensor):
            # The kernels index the small index tensors densely: strided ones are copied (a few bytes).
            self.seqlens = _check_index_tensor("cache_seqlens", cache_seqlens, (batch,), q.device).contiguous()
        else:
            raise TypeError(f"cache_seqlens must be an int, a (batch,) int32 tensor or None, got "
                            f"{type(cache_seqlens).__name__}")
        if (rotary_cos is None) != (rotary_sin is None):
            raise ValueError("rotary_cos and rotary_sin must be given together or both be None")
        if rotary_cos is not None:
            if k is None:
                raise ValueError("rotary_cos/rotary_sin need k and v: rotary is applied to the appended keys and "
                                 "to q at their positions")
            for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
                _validation.check_tensor(name, t, ndim=2, dtypes=_DTYPES)
                _validation.check_same_device(q=q, **{name: t})
            if rotary_cos.shape != rotary_sin.shape:
                raise ValueError(f"rotary_cos and rotary_sin must have the same shape, got "
                                 f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
            if not 1 <= 2 * rotary_cos.shape[1] <= head_d:
                raise ValueError(f"rotary_cos must be (seqlen_ro, rotary_dim / 2) with rotary_dim <= head dim "
                                 f"{head_d}, got shape {tuple(rotary_cos.shape)}")
            if rotary_cos.stride(1) != 1 or rotary_sin.stride(1) != 1:
                rotary_cos, rotary_sin = rotary_cos.contiguous(), rotary_sin.contiguous()
        if not isinstance(rotary_interleaved, bool):
            raise TypeError(f"rotary_interleaved must be a bool, got {type(rotary_interleaved).__name__}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        ok = (isinstance(window_size, (tuple, list)) and len(window_size) == 2
              and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size))
        if not ok:
            raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), "
                             f"got {window_size!r}")
        self.left, self.right = int(window_size[0]), int(window_size[1])
        if causal:
            self.right = 0
        self.scale = (1.0 / math.sqrt(head_d) if softmax_scale is None else
                      _check_number("softmax_scale", softmax_scale, "a finite float or None", math.isfinite))
        self.softcap = _check_number("softcap", softcap, "a finite number >= 0 (0: off)",
                                     lambda x: math.isfinite(x) and x >= 0)
        if alibi_slopes is not None:
            _validation.check_tensor("alibi_slopes", alibi_slopes, ndim=(1, 2), dtypes=(torch.float32,))
            _validation.check_same_device(q=q, alibi_slopes=alibi_slopes)
            if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
                raise ValueError(f"alibi_slopes must have shape (nheads,) = ({heads},) or (batch, nheads) = "
                                 f"({batch}, {heads}), got {tuple(alibi_slopes.shape)}")
            if alibi_slopes.stride(-1) != 1:
                alibi_slopes = alibi_slopes.contiguous()
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits:
            raise ValueError(f"num_splits must be an int >= 0 (0: chosen by a heuristic), got {num_splits!r}")
        if not isinstance(return_softmax_lse, bool):
            raise TypeError(f"return_softmax_lse must be a bool, got {type(return_softmax_lse).__name__}")
        self.rotary_cos, self.rotary_sin, self.alibi = rotary_cos, rotary_sin, alibi_slopes
        self.block_table = block_table.contiguous() if block_table is not None else None
        self.batch_idx = cache_batch_idx.contiguous() if cache_batch_idx is not None else None
        self.rotary_q_per_row = causal or self.left >= 0 or self.right >= 0
        self.longest = self._check_values(batch, k_cache, cache_batch_idx, block_table)

    def _check_values(self, batch, k_cache, cache_batch_idx, block_table) -> int:
        """Bounds that need the index tensors' values (one device sync): returns the longest key range."""
        self.shortest = 0  # unknown: the torch path then takes its general branch
        if torch.compiler.is_compiling():
            return self.capacity  # reading the tensors would break the graph; the kernels still mask
        known = _KNOWN_LENGTHS.get()
        if known is not None and cache_batch_idx is None and block_table is None:
            # The caller vouched for the lengths (see known_cache_lengths): no device sync.
            self.shortest = known[0]
            return min(known[1], self.capacity)
        if self.seqlens is None:
            lengths = torch.full((batch,), self.capacity, dtype=torch.long)
        else:
            base = self.seqlens.cpu().long()
            if batch and int(base.min()) < 0:
                raise ValueError(f"cache_seqlens must be >= 0, got {base.tolist()}")
            lengths = base + self.new
            if batch and int(lengths.max()) > self.capacity:
                worst = int(lengths.argmax())
                what = (f"cache_seqlens[{worst}] = {int(base[worst])} plus {self.new} new tokens"
                        if self.new else f"cache_seqlens[{worst}] = {int(base[worst])}")
                raise ValueError(f"the cache is too short: {what} needs {int(lengths[worst])} positions, the "
                                 f"cache holds {self.capacity} per sequence")
            if self.rotary_cos is not None:
                steps = max(self.new, 1)
                need = int((base + steps).max()) if batch else 0
                if need > self.rotary_cos.shape[0]:
                    raise ValueError(f"rotary_cos/rotary_sin have {self.rotary_cos.shape[0]} positions, the "
                                     f"appended tokens reach position {need - 1}")
        if cache_batch_idx is not None and batch:
            rows = cache_batch_idx.cpu()
            if int(rows.min()) < 0 or int(rows.max()) >= k_cache.shape[0]:
                raise ValueError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]}), got {rows.tolist()}")
        if block_table is not None and batch:
            pages_used = (lengths + self.page_size - 1) // self.page_size
            table = block_table.cpu().long()
            used = torch.arange(table.shape[1])[None, :] < pages_used[:, None]
            bad = used & ((table < 0) | (table >= k_cache.shape[0]))
            if bool(bad.any()):
                b, p = (int(x) for x in bad.nonzero()[0])
                raise ValueError(f"block_table[{b}, {p}] = {int(table[b, p])} is not a block of the paged cache "
                                 f"(num_blocks = {k_cache.shape[0]}, accepted 0..{k_cache.shape[0] - 1})")
        self.shortest = int(lengths.min()) if batch else 0
        return int(lengths.max()) if batch else 0


def _kvcache_torch(q, k_cache, v_cache, k, v, call: _Call, cache_batch_idx, block_table, rotary_interleaved,
                   need_lse):
    """The torch-native path (backend "auto" off CUDA, and float64): the same semantics in a few batched torch
    ops over the longest key range of the call only; returns (out, lse or None). Plain attention (no softcap,
    ALiBi or LSE, every row with a key) runs torch's SDPA kernel; the rest float32 math (float64 for float64)."""
    batch, seqlen_q, heads, head_d = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    device = q.device
    base = call.seqlens.long() if call.seqlens is not None else None
    rows_of_batch = (cache_batch_idx.long() if cache_batch_idx is not None
                     else torch.arange(batch, device=device))
    if k is not None and call.new:
        pos = base[:, None] + torch.arange(call.new, device=device)
        if call.rotary_cos is not None:
            k = _rotate(k, call.rotary_cos, call.rotary_sin, pos, rotary_interleaved)
        if call.paged:
            rows, slots = block_table.long().gather(1, pos // call.page_size), pos % call.page_size
        else:
            rows, slots = rows_of_batch[:, None].expand(-1, call.new), pos
        k_cache[rows, slots] = k.to(k_cache.dtype)
        v_cache[rows, slots] = v.to(v_cache.dtype)
    if call.rotary_cos is not None and k is not None:
        steps = (torch.arange(seqlen_q, device=device) if call.rotary_q_per_row
                 else torch.zeros(seqlen_q, dtype=torch.long, device=device))
        q = _rotate(q, call.rotary_cos, call.rotary_sin, base[:, None] + steps, rotary_interleaved)

    length = min(max(call.longest, 0), call.capacity)
    if call.paged:
        pages = triton.cdiv(length, call.page_size)
        # Pages past a sequence's own length may hold anything: clamped just to gather (masked below).
        table = block_table[:, :pages].long().clamp(0, k_cache.shape[0] - 1)
        keys = k_cache[table].flatten(1, 2)[:, :length]
        values = v_cache[table].flatten(1, 2)[:, :length]
    elif cache_batch_idx is not None:
        keys, values = k_cache[rows_of_batch, :length], v_cache[rows_of_batch, :length]
    else:
        keys, values = k_cache[:, :length], v_cache[:, :length]  # views: nothing copied
    seqlens_k = (base + call.new) if base is not None else torch.full((batch,), call.capacity, device=device)
    i = torch.arange(seqlen_q, device=device)[None, :, None]
    j = torch.arange(length, device=device)[None, None, :]
    rel = i + (seqlens_k - seqlen_q)[:, None, None] - j  # (B, Sq, L): the query's position minus the key's
    allowed = j < seqlens_k[:, None, None]
    if call.right >= 0:
        allowed = allowed & (rel >= -call.right)
    if call.left >= 0:
        allowed = allowed & (rel <= call.left)
    if call.softcap == 0 and call.alibi is None and not need_lse and call.shortest >= seqlen_q:
        # Every query row sees at least its own diagonal key, so SDPA never meets an empty row.
        mask = None if bool(allowed.all()) else allowed[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=call.scale,
            enable_gqa=group > 1)
        return out.transpose(1, 2), None
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # GQA without repeating K/V: the (group x Sq) rows of each KV head against its (L, D) keys, batched matmuls.
    qg = q.to(compute).view(batch, seqlen_q, kv_heads, group, head_d).permute(0, 2, 3, 1, 4).reshape(
        batch, kv_heads, group * seqlen_q, head_d)
    scores = (qg @ keys.to(compute).permute(0, 2, 3, 1)).view(batch, kv_heads, group, seqlen_q, length)
    scores = scores * call.scale
    if call.softcap > 0:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    if call.alibi is not None:
        slopes = call.alibi.to(compute).expand(batch, heads).reshape(batch, kv_heads, group, 1, 1)
        scores = scores - slopes * rel.abs()[:, None, None].to(compute)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # empty rows: all zeros
    out = probs.view(batch, kv_heads, group * seqlen_q, length) @ values.to(compute).permute(0, 2, 1, 3)
    out = out.view(batch, kv_heads, group, seqlen_q, head_d).permute(0, 3, 1, 2, 4).reshape(
        batch, seqlen_q, heads, head_d).to(q.dtype)
    lse = lse.reshape(batch, heads, seqlen_q).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


_KNOWN_LENGTHS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "llmfast_known_cache_lengths", default=None)


@contextlib.contextmanager
def known_cache_lengths(shortest: int, longest: int) -> Iterator[None]:
    """Inside, :func:`flash_attn_with_kvcache` trusts that every sequence's key range (``cache_seqlens`` plus the
    new tokens) lies in ``[shortest, longest]`` and fits the cache, and skips the host-side checks that read
    ``cache_seqlens`` back (a device sync per call, so per layer and token in a generation loop). For callers that
    track the lengths on the host, like :func:`llmfast.models.generation.generate`. Calls with ``block_table`` or
    ``cache_batch_idx`` still check those. The kernels never read or write past the cache either way: a wrong
    promise gives wrong attention, not a stray memory access.
    """
    token = _KNOWN_LENGTHS.set((int(shortest), int(longest)))
    try:
        yield
    finally:
        _KNOWN_LENGTHS.reset(token)


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                            cache_seqlens: int | torch.Tensor | None = None,
                            cache_batch_idx: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: torch.Tensor | None = None,
                            num_splits: int = 0, return_softmax_lse: bool = False):
    """Attention of ``q`` over a key/value cache, with flash-attn's ``flash_attn_with_kvcache`` semantics.

    ``q`` (B, Sq, H, D); the cache is ``k_cache``/``v_cache`` (B_cache, L, Hk, D), rows picked by
    ``cache_batch_idx`` (B,) int32 (default: row b), or paged (num_blocks, page_size, Hk, D) with ``block_table``
    (B, max_blocks) int32 (position j of sequence b in page ``block_table[b, j // page_size]``). ``k``/``v``
    (B, S_new, Hk, D), if given, are written into the cache *in place* at ``cache_seqlens`` (an int or a (B,)
    int32 tensor, 0 allowed), ``k`` rotated first when ``rotary_cos``/``rotary_sin`` (seqlen_ro, rotary_dim / 2)
    are given; ``q`` is rotated at ``cache_seqlens + i`` (causal or windowed) or ``cache_seqlens``. Attention
    then covers ``cache_seqlens + S_new`` keys per sequence (the whole cache when ``cache_seqlens`` is None).
    ``causal`` and ``window_size`` align bottom-right (Sq > 1 for speculative decoding / chunked prefill);
    ``softcap > 0`` caps scores as ``softcap * tanh(s / softcap)``; ``alibi_slopes`` (H,) or (B, H) float32 adds
    ``-slope * |i + Sk - Sq - j|``. GQA/MQA: H a multiple of Hk. ``num_splits`` splits the key range across
    programs (0: :func:`choose_num_splits` decides). Returns ``out`` (B, Sq, H, D), and with
    ``return_softmax_lse`` also the natural-log LSE (B, H, Sq) float32 (-inf, and output 0, for rows with no key).

    A cache too short for ``cache_seqlens + S_new``, a block table entry outside the cache, or a
    ``cache_batch_idx`` outside it raises ``ValueError``; nothing is ever written past the cache.
    """
    call = _Call(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, block_table,
                 softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                 return_softmax_lse)
    impl = _backend.resolve("flash_attn_with_kvcache", q)
    if impl == "torch" or (impl == "triton" and q.dtype == torch.float64):
        out, lse = _kvcache_torch(q, k_cache, v_cache, k, v, call, call.batch_idx, call.block_table,
                                  rotary_interleaved, return_softmax_lse)
        return (out, lse) if return_softmax_lse else out
    if impl == "reference":
        from llmfast.reference import decode as reference  # late: only needed when selected

        result = reference.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, call.rotary_cos, call.rotary_sin,
            call.seqlens if call.seqlens is not None else None, cache_batch_idx, block_table, call.scale, causal,
            window_size, call.softcap, rotary_interleaved, call.alibi, num_splits, return_softmax_lse)
        return result
    batch, seqlen_q, heads, head_d = q.shape
    group = heads // k_cache.shape[2]
    splits = num_splits
    if splits == 0:
        arch = config_arch(q.device)
        kind, block_m = _row_kind_for(seqlen_q * group, q.dtype)
        block_n = _config(arch, kind, max(16, triton.next_power_of_2(head_d)), q.dtype)["BLOCK_N"]
        sms = _cuda_sm_count(q.device.index or 0) if (q.device.type == "cuda" and arch != "interpreter") else None
        splits = choose_num_splits(batch, k_cache.shape[2], triton.cdiv(seqlen_q * group, block_m), call.longest,
                                   block_n, arch, sms)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k is None or k.stride(-1) == 1 else k.contiguous()
    v = v if v is None or v.stride(-1) == 1 else v.contiguous()
    out, lse = _kvcache_op(q, k_cache, v_cache, k, v, call.rotary_cos, call.rotary_sin, call.seqlens,
                           call.batch_idx, call.block_table, call.alibi, call.scale, call.left, call.right,
                           call.softcap, rotary_interleaved, call.rotary_q_per_row, splits)
    return (out, lse) if return_softmax_lse else out


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (python -m llmfast.compile_check --kernel decode)
# ----------------------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INDEX_POINTERS = ("SeqLensK", "BatchIdx", "BlockTable", "CacheSeqlens")
_FLOAT_POINTERS = ("Lse", "OutAcc", "LseAcc", "Alibi")
_FLOAT_SCALARS = ("qk_scale", "softcap2")

# Feature sets compiled for every decode config: the plain contiguous single-split step, and everything at once
# (paged cache, split-KV, a two-sided window, ALiBi, softcap, 64-bit offsets).
_VARIANTS = {
    "plain": dict(PAGED=False, HAS_SEQLENS=True, HAS_BATCH_IDX=False, HAS_LEFT=False, HAS_RIGHT=False,
                  HAS_ALIBI=False, HAS_SOFTCAP=False, SPLIT=False, WIDE=False),
    "paged_all": dict(PAGED=True, HAS_SEQLENS=True, HAS_BATCH_IDX=False, HAS_LEFT=True, HAS_RIGHT=True,
                      HAS_ALIBI=True, HAS_SOFTCAP=True, SPLIT=True, WIDE=True),
    "batchidx_causal_split": dict(PAGED=False, HAS_SEQLENS=True, HAS_BATCH_IDX=True, HAS_LEFT=False,
                                  HAS_RIGHT=True, HAS_ALIBI=False, HAS_SOFTCAP=False, SPLIT=True, WIDE=False),
}


_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "i32": torch.int32}
# Representative problem per row kind (batch 8, 4096 cached positions): what a real launch passes, so the compile
# check specializes the kernel as Triton's launcher would (16-divisible strides, arguments equal to 1 as constants).
_LAUNCH_SHAPES = {"m1": dict(seqlen_q=1, num_heads=8, num_kv_heads=8),
                  "m16": dict(seqlen_q=4, num_heads=32, num_kv_heads=8),
                  "m64": dict(seqlen_q=8, num_heads=64, num_kv_heads=8)}
_BATCH, _LENGTH, _PAGE, _SPLITS = 8, 4096, 256, 4


def _launch_args(fn, io: str, ints: dict, constexprs: dict, cos: str = "fp32") -> dict:
    """Every argument of ``fn`` at a representative launch: pointers as torch dtypes (aligned tensors), the
    integers from ``ints``, the float scalars, the constexprs."""
    args = {}
    for name, param in inspect.signature(fn.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            args[name] = constexprs[name]
        elif name in _INDEX_POINTERS:
            args[name] = torch.int32
        elif name in _FLOAT_POINTERS:
            args[name] = torch.float32
        elif name in ("Cos", "Sin"):
            args[name] = _TORCH_DTYPE[cos]
        elif name[0].isupper():
            args[name] = _TORCH_DTYPE[io]
        elif name in _FLOAT_SCALARS:
            args[name] = 0.125
        else:
            args[name] = ints[name]
    return args


def _decode_ints(kind: str, block_d: int, variant: dict) -> dict:
    shape = _LAUNCH_SHAPES[kind]
    sq, heads, kv_heads = shape["seqlen_q"], shape["num_heads"], shape["num_kv_heads"]
    group = heads // kv_heads
    rows = _PAGE if variant["PAGED"] else _LENGTH
    return dict(stride_qb=sq * group * block_d, stride_qm=block_d,
                stride_kb=rows * kv_heads * block_d, stride_kn=kv_heads * block_d, stride_kh=block_d,
                stride_vb=rows * kv_heads * block_d, stride_vn=kv_heads * block_d, stride_vh=block_d,
                stride_ob=sq * heads * block_d, stride_om=heads * block_d, stride_oh=block_d,
                stride_lb=heads * sq, stride_lh=sq, stride_btb=_LENGTH // _PAGE,
                stride_ab=heads if variant["HAS_ALIBI"] else 0, batch=_BATCH, seqlen_q=sq, num_heads=heads,
                num_kv_heads=kv_heads, group_size=group, fixed_seqlen_k=_LENGTH,
                page_size=_PAGE if variant["PAGED"] else 1, num_splits=_SPLITS if variant["SPLIT"] else 1,
                window_left=256, window_right=0)


def compile_specs() -> list[KernelSpec]:
    """Every decode config of every GPU architecture (16-bit in three feature sets, fp32 in one), the combine
    kernel per head-dim bucket, and the append kernel with and without rotary, each at a representative launch."""
    specs = []
    for arch_key, arch in (("sm80", 80), ("sm90", 90)):
        for name, cfg in DECODE_CONFIGS[arch_key].items():
            kind, bucket = name.split("_")[:2]
            fp32 = name.endswith("_fp32")
            block_d = int(bucket[1:])
            block_m = _KIND_ROWS[kind]
            cases = ((torch.float32, "batchidx_causal_split"),) if fp32 else (
                (torch.float16, "plain"), (torch.bfloat16, "paged_all"), (torch.float16, "batchidx_causal_split"))
            for dtype, variant in cases:
                io = _TRITON_DTYPE[dtype]
                values = dict(_VARIANTS[variant], HEAD_D=block_d, BLOCK_D=block_d, BLOCK_M=block_m,
                              BLOCK_N=cfg["BLOCK_N"], USE_DOT=block_m >= 16, FP32_IEEE=fp32)
                # sm_90 runs 64-row dots on wgmma; 16-row blocks are below wgmma's tile and use mma.sync.
                matrix = None if block_m < 16 else "fma" if fp32 else "tensor" if block_m >= 64 else "mma"
                label = f"{name}_{variant}" if fp32 else f"{name}_{io}_{variant}"
                specs.append(KernelSpec(
                    "decode_attention", _decode_kernel, config=label,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], arches=(arch,), matrix=matrix,
                    launch_args=_launch_args(_decode_kernel, io, _decode_ints(kind, block_d, _VARIANTS[variant]),
                                             values)))
        for block_d in (64, 128, 256):
            for dtype in (torch.float16, torch.bfloat16):
                io = _TRITON_DTYPE[dtype]
                heads = 32
                ints = dict(stride_ob=heads * block_d, stride_om=heads * block_d, stride_oh=block_d,
                            stride_lb=heads, stride_lh=1, batch=_BATCH, seqlen_q=1, num_heads=heads,
                            num_splits=16)
                values = dict(HEAD_D=block_d, BLOCK_D=block_d, BLOCK_S=MAX_SPLITS)
                specs.append(KernelSpec(
                    "decode_combine", _decode_combine_kernel, config=f"d{block_d}_{io}_s{MAX_SPLITS}", num_warps=4,
                    num_stages=1, arches=(arch,),
                    launch_args=_launch_args(_decode_combine_kernel, io, ints, values)))
            for rotary, paged in ((0, False), (block_d, True)):
                io = "bf16"
                kv_heads = 8
                rows = _PAGE if paged else _LENGTH
                ints = dict(stride_knb=kv_heads * block_d, stride_knt=kv_heads * block_d, stride_knh=block_d,
                            stride_vnb=kv_heads * block_d, stride_vnt=kv_heads * block_d, stride_vnh=block_d,
                            stride_kb=rows * kv_heads * block_d, stride_kn=kv_heads * block_d, stride_kh=block_d,
                            stride_vb=rows * kv_heads * block_d, stride_vn=kv_heads * block_d, stride_vh=block_d,
                            stride_btb=_LENGTH // _PAGE, stride_cos=max(rotary // 2, 1),
                            stride_sin=max(rotary // 2, 1), seqlen_new=1, page_size=_PAGE if paged else 1,
                            capacity=_LENGTH, num_blocks=_BATCH * _LENGTH // _PAGE)
                values = dict(HEAD_D=block_d, BLOCK_D=block_d, ROTARY_DIM=rotary, INTERLEAVED=False, PAGED=paged,
                              HAS_BATCH_IDX=not paged)
                specs.append(KernelSpec(
                    "decode_kv_append", _kv_append_kernel,
                    config=f"d{block_d}_{io}_{'paged_rotary' if rotary else 'plain'}", num_warps=1, num_stages=1,
                    arches=(arch,), launch_args=_launch_args(_kv_append_kernel, io, ints, values, cos=io)))
    return specs
