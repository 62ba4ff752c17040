"""The decode kernels: in-place append (with rotary), split-KV partial attention, and the split combine."""
from __future__ import annotations

import triton
import triton.language as tl

from llmfast.ops.attention.common import _cast, _dot

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
