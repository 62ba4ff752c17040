"""The forward kernel: online softmax over BLOCK_N-key tiles, one program per (batch, head, query block)."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (_alibi_slope2, _at64, _cast, _dot, _dropout_keep, _dropout_offsets, _key_range, _load_rows,
                     _scores, _seq_bounds, _softcap)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                    offs_m, seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed, dropout_p,
                    drop_rows, lo, hi, softcap_in, alibi2,
                    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_N: tl.constexpr, EDGE: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, DROPOUT: tl.constexpr,
                    WIDE_DROPOUT: tl.constexpr,
                    FP32_IEEE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(_at64(k_base, offs_n[:, None], stride_kn) + offs_d[None, :], offs_n, seqlen_k, offs_d,
                       HEAD_D, BLOCK_D, EDGE)
        qk = _softcap(_dot(q, tl.trans(k), None, FP32_IEEE), softcap_in, SOFTCAP)
        # mask_base: the pointers to this program's mask rows ([BLOCK_M, 1], see the kernel)
        mask_ptrs = _at64(mask_base, offs_n[None, :], stride_mn)
        mask_ok = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
        s = _scores(qk, qk_scale, mask_ptrs, mask_ok, offs_m[:, None], offs_n[None, :], seqlen_k, diag,
                    window_left, window_right, alibi2, HAS_MASK, MASK_IS_BOOL, EDGE, HAS_LEFT, HAS_RIGHT, ALIBI)
        # Online softmax: rescale what was accumulated under the old running max. A row that has seen no
        # allowed key keeps max -inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            # The normaliser l uses every probability; only the values read through V are dropped.
            keep = _dropout_keep(seed, _dropout_offsets(drop_rows, offs_n, WIDE_DROPOUT), dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_rows(_at64(v_base, offs_n[:, None], stride_vn) + offs_dv[None, :], offs_n, seqlen_k,
                       offs_dv,
                       HEAD_DV, BLOCK_DV, EDGE)
        acc = _dot(_cast(p, v.dtype), v, acc, FP32_IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, CuSeqQ, CuSeqK, Alibi,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, group_size, Sq, Sk, qk_scale, window_left, window_right, dropout_p, seed, softcap_in, stride_ab,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr, FP32_IEEE: tl.constexpr, REVERSE_M: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    # One program per (batch, head, query block), query blocks innermost: programs launched together read the same
    # K/V (one head's), which then stays in L2 (FlashAttention-2's order). A 1-D grid has no 65535 limit.
    n_m = tl.cdiv(Sq, BLOCK_M)
    pid_bh = tl.program_id(0) // n_m
    pid_m = tl.program_id(0) % n_m
    # With a causal band the last query blocks see the most keys: each head launches them first.
    if REVERSE_M:
        pid_m = n_m - 1 - pid_m
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // group_size
    q_start, seqlen_q = _seq_bounds(CuSeqQ, b, Sq, IS_VARLEN)
    k_start, seqlen_k = _seq_bounds(CuSeqK, b, Sk, IS_VARLEN)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:  # varlen: this sequence is shorter than the longest one
        return
    if BOTTOM_RIGHT:
        diag = seqlen_k - seqlen_q
    else:
        diag = seqlen_k * 0

    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    k_base = K + b64 * stride_kb + kv_h.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + kv_h.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    alibi2 = _alibi_slope2(Alibi, b, h, stride_ab, ALIBI)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    mask_base = _at64(Mask + b64 * stride_mb + h.to(tl.int64) * stride_mh, offs_m[:, None], stride_mm)

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(_at64(q_base, offs_m[:, None], stride_qm) + offs_d[None, :], offs_m, seqlen_q, offs_d,
                   HEAD_D, BLOCK_D, True)
    drop_rows = ((b64 * num_heads + h) * Sq + offs_m.to(tl.int64)) * Sk

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    last_m = tl.minimum(m_start + BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = _key_range(m_start, last_m, seqlen_k, diag, window_left, window_right, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    # Left edge of a sliding window, the interior without element masks, then the diagonal / sequence end.
    if HAS_LEFT:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn, offs_m,
            seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed, dropout_p, drop_rows, lo, full_lo,
            softcap_in, alibi2, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_MASK,
            MASK_IS_BOOL, DROPOUT, WIDE_DROPOUT, FP32_IEEE, SOFTCAP, ALIBI)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn, offs_m,
        seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed, dropout_p, drop_rows, full_lo, full_hi,
        softcap_in, alibi2, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, False, HAS_LEFT, HAS_RIGHT, HAS_MASK,
        MASK_IS_BOOL, DROPOUT, WIDE_DROPOUT, FP32_IEEE, SOFTCAP, ALIBI)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn, offs_m,
        seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed, dropout_p, drop_rows, full_hi, hi,
        softcap_in, alibi2, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_MASK,
        MASK_IS_BOOL, DROPOUT, WIDE_DROPOUT, FP32_IEEE, SOFTCAP, ALIBI)

    # Epilogue: normalise, undo dropout's expected shrinkage, and keep the natural-log LSE for the backward pass.
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    o_base = Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    o_ptrs = _at64(o_base, offs_m[:, None], stride_om) + offs_dv[None, :]
    tl.store(o_ptrs, _cast(out, Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DV))
    lse = tl.where(empty_row, -float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    l_ptrs = Lse + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    tl.store(l_ptrs, lse, mask=offs_m < seqlen_q)
