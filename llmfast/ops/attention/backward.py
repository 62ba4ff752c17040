"""The backward kernels (FlashAttention-2 style, no atomics): delta preprocessing, dK/dV per key block (and per
share of a GQA group, see ``group_split``), dQ per query block."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (_alibi_slope2, _at, _at64, _band, _cast, _dot, _dropout_keep, _dropout_offsets, _key_range,
                     _load_rows, _query_range, _scores, _seq_bounds, _softcap)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DOut, DLse, Delta, CuSeqQ,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
    num_heads, Sq,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax-Jacobian term, computed once per row instead of per
    # key block. An incoming gradient on LSE adds dlse_i * P_ij to dS_ij, i.e. it just lowers delta.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, seqlen_q = _seq_bounds(CuSeqQ, b, Sq, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    # 64-bit offsets only in the scalar base pointers; the tile offsets stay 32-bit (half the registers).
    b64, h64, row0 = b.to(tl.int64), h.to(tl.int64), q_start.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_base = Out + b64 * stride_ob + h64 * stride_oh + row0 * stride_om
    do_base = DOut + b64 * stride_dob + h64 * stride_doh + row0 * stride_dom
    o = _load_rows(_at64(o_base, offs_m[:, None], stride_om) + offs_dv[None, :], offs_m, seqlen_q, offs_dv,
                   HEAD_DV, BLOCK_DV, True)
    do = _load_rows(_at64(do_base, offs_m[:, None], stride_dom) + offs_dv[None, :], offs_m, seqlen_q,
                    offs_dv, HEAD_DV, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    l_off = b64 * stride_lb + h64 * stride_lh + row0 + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + l_off, mask=offs_m < seqlen_q, other=0.0)
    tl.store(Delta + l_off, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_scores(qk, qk_scale, mask_ptrs, rows, cols, seqlen_q, seqlen_k, diag, window_left,
                window_right, band_edge, alibi2, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr, ALIBI_INT: tl.constexpr):
    """_scores() for the backward loops, which see the tile either way round (``rows``/``cols``: broadcastable query
    and key indices). The band applies only where ``band_edge`` (a runtime flag: one loop body for edge and interior
    blocks keeps the register pressure down). Also returns which elements lie inside the (Sq, Sk) problem."""
    in_bounds = (rows < seqlen_q) & (cols < seqlen_k)
    s = _scores(qk, qk_scale, mask_ptrs, in_bounds, rows, cols, seqlen_k, diag,
                window_left, window_right, alibi2, HAS_MASK, MASK_IS_BOOL, False, HAS_LEFT, HAS_RIGHT, ALIBI,
                ALIBI_INT)
    if band_edge:
        s = _band(s, rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
    return s, in_bounds


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base,
                         stride_qm, stride_dom, stride_mm, stride_mn, offs_n, seqlen_q, seqlen_k, diag,
                         window_left, window_right, qk_scale, seed, dropout_p, drop_base, Sk,
                         lo, full_lo, full_hi, hi, softcap_in, alibi2,
                         HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
                         BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
                         MASK_IS_BOOL: tl.constexpr, DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr,
                         FP32_IEEE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    # Works on the transposed problem (keys x queries) so dK and dV accumulate with plain row-major dots.
    # One loop over the query blocks in [lo, hi); only those outside [full_lo, full_hi) take the band mask (a
    # runtime branch: a single loop body keeps the register pressure of the backward pass down).
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(_at64(q_base, offs_m[:, None], stride_qm) + offs_d[None, :], offs_m, seqlen_q,
                       offs_d, HEAD_D, BLOCK_D, True)
        do = _load_rows(_at64(do_base, offs_m[:, None], stride_dom) + offs_dv[None, :], offs_m, seqlen_q,
                        offs_dv, HEAD_DV, BLOCK_DV, True)
        lse = tl.load(lse_base + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        # Rows with no allowed key stored LSE = -inf, rows past the end read +inf: either way P comes out 0.
        lse2 = tl.where(lse == -float("inf"), float("inf"), lse * 1.4426950408889634)
        # Under soft-capping qk_t holds t = tanh(scale * qk / softcap), kept for the chain rule below.
        qk_t = _softcap(_dot(k, tl.trans(q), None, FP32_IEEE), softcap_in, SOFTCAP)
        # mask_base: pointers to this program's mask columns ([BLOCK_N, 1], see the kernel)
        s_t, _ = _bwd_scores(qk_t, qk_scale, _at64(mask_base, offs_m[None, :], stride_mm), offs_m[None, :],
                             offs_n[:, None], seqlen_q, seqlen_k, diag, window_left, window_right,
                             (start_m < full_lo) | (start_m >= full_hi), alibi2, HAS_MASK, MASK_IS_BOOL, HAS_LEFT,
                             HAS_RIGHT, ALIBI, True)
        p_t = tl.math.exp2(s_t - lse2[None, :])
        dp_t = _dot(v, tl.trans(do), None, FP32_IEEE)
        if DROPOUT:
            inv_keep = 1.0 / (1.0 - dropout_p)
            # Transposed tile: keys are rows here, so take the offsets of the (queries x keys) tile and flip.
            keep = tl.trans(_dropout_keep(seed, _dropout_offsets((drop_base + offs_m.to(tl.int64)) * Sk, offs_n,
                                                                 WIDE_DROPOUT), dropout_p))
            p_drop_t = tl.where(keep, p_t * inv_keep, 0.0)
            dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
        else:
            p_drop_t = p_t
        dv = _dot(_cast(p_drop_t, do.dtype), do, dv, FP32_IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - qk_t * qk_t)  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
        dk = _dot(_cast(ds_t, q.dtype), q, dk, FP32_IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, Mask, CuSeqQ, CuSeqK, Alibi,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_mb, stride_mh, stride_mm, stride_mn, stride_dks, stride_dvs,
    num_heads, num_kv_heads, group_size, group_split, Sq, Sk, qk_scale, sm_scale, window_left, window_right,
    dropout_p, seed, softcap_in, stride_ab,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr, FP32_IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    # Programs ordered (batch, KV head, split, key block), key blocks innermost: programs launched together read
    # the same query heads' Q and dO (L2 reuse). With group_split > 1 the query heads of one KV head's group are
    # shared out over group_split programs per key block (a grid of few KV heads fills the GPU): each sums its own
    # heads into its slice (stride_dks / stride_dvs apart) of an fp32 workspace that the host then sums; no
    # atomics, so the result stays deterministic. group_split == 1: DK/DV are the gradients, strides 0.
    n_n = tl.cdiv(Sk, BLOCK_N)
    pid_bhs = tl.program_id(0) // n_n
    pid_n = tl.program_id(0) % n_n
    split = pid_bhs % group_split
    pid_bh = pid_bhs // group_split
    b = pid_bh // num_kv_heads
    kv_h = pid_bh % num_kv_heads
    q_start, seqlen_q = _seq_bounds(CuSeqQ, b, Sq, IS_VARLEN)
    k_start, seqlen_k = _seq_bounds(CuSeqK, b, Sk, IS_VARLEN)
    n_start = pid_n * BLOCK_N
    if n_start >= seqlen_k:
        return
    if BOTTOM_RIGHT:
        diag = seqlen_k - seqlen_q
    else:
        diag = seqlen_k * 0

    b64 = b.to(tl.int64)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_h64, k_row0 = kv_h.to(tl.int64), k_start.to(tl.int64)
    k = _load_rows(_at64(K + b64 * stride_kb + kv_h64 * stride_kh + k_row0 * stride_kn, offs_n[:, None],
                       stride_kn) + offs_d[None, :], offs_n, seqlen_k, offs_d, HEAD_D, BLOCK_D, True)
    v = _load_rows(_at64(V + b64 * stride_vb + kv_h64 * stride_vh + k_row0 * stride_vn, offs_n[:, None],
                       stride_vn) + offs_dv[None, :], offs_n, seqlen_k, offs_dv, HEAD_DV, BLOCK_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    last_n = tl.minimum(n_start + BLOCK_N, seqlen_k) - 1
    lo, full_lo, full_hi, hi = _query_range(n_start, last_n, seqlen_q, diag, window_left, window_right, BLOCK_M,
                                            HAS_LEFT, HAS_RIGHT)
    # Every query head of this program's share of the group adds into the same dK/dV registers: GQA without
    # atomics. The shares [g_lo, g_hi) differ by at most one head when group_split does not divide group_size.
    g_lo = split * group_size // group_split
    g_hi = (split + 1) * group_size // group_split
    for g in range(g_lo, g_hi):
        h = kv_h * group_size + g
        q_row0 = q_start.to(tl.int64)
        q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_row0 * stride_qm
        do_base = DOut + b64 * stride_dob + h.to(tl.int64) * stride_doh + q_row0 * stride_dom
        lse_base = Lse + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_row0
        delta_base = Delta + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_row0
        mask_base = _at64(Mask + b64 * stride_mb + h.to(tl.int64) * stride_mh, offs_n[:, None], stride_mn)
        drop_base = (b64 * num_heads + h) * Sq
        alibi2 = _alibi_slope2(Alibi, b, h, stride_ab, ALIBI)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, stride_qm, stride_dom,
            stride_mm, stride_mn, offs_n, seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed,
            dropout_p, drop_base, Sk, lo, full_lo, full_hi, hi, softcap_in, alibi2, HEAD_D, BLOCK_D, HEAD_DV,
            BLOCK_DV, BLOCK_M, HAS_LEFT, HAS_RIGHT, HAS_MASK, MASK_IS_BOOL, DROPOUT, WIDE_DROPOUT, FP32_IEEE,
            SOFTCAP, ALIBI)

    dk = dk * sm_scale
    row_ok = offs_n[:, None] < seqlen_k
    split64 = split.to(tl.int64)
    dk_base = DK + split64 * stride_dks + b64 * stride_dkb + kv_h64 * stride_dkh + k_row0 * stride_dkn
    dv_base = DV + split64 * stride_dvs + b64 * stride_dvb + kv_h64 * stride_dvh + k_row0 * stride_dvn
    tl.store(_at64(dk_base, offs_n[:, None], stride_dkn) + offs_d[None, :], _cast(dk, DK.dtype.element_ty),
             mask=row_ok & (offs_d[None, :] < HEAD_D))
    tl.store(_at64(dv_base, offs_n[:, None], stride_dvn) + offs_dv[None, :], _cast(dv, DV.dtype.element_ty),
             mask=row_ok & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mask_base, ds_base, stride_kn, stride_vn,
                       stride_mm, stride_mn, offs_m, seqlen_q, seqlen_k, diag, window_left, window_right,
                       qk_scale, seed, dropout_p, drop_rows, Sk, lo, full_lo, full_hi, hi, softcap_in, alibi2,
                       HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr,
                       HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                       DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr, FP32_IEEE: tl.constexpr,
                       STORE_DS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    # One loop with a runtime branch for the edge blocks, as in _attn_bwd_dkdv_inner.
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(_at(k_base, start_n, offs_n[:, None], stride_kn) + offs_d[None, :], offs_n, seqlen_k,
                       offs_d, HEAD_D, BLOCK_D, True)
        v = _load_rows(_at(v_base, start_n, offs_n[:, None], stride_vn) + offs_dv[None, :], offs_n, seqlen_k,
                       offs_dv, HEAD_DV, BLOCK_DV, True)
        qk = _softcap(_dot(q, tl.trans(k), None, FP32_IEEE), softcap_in, SOFTCAP)
        # mask_base: pointers to this program's mask rows ([BLOCK_M, 1], see the kernel)
        s, in_bounds = _bwd_scores(qk, qk_scale, _at(mask_base, start_n, offs_n[None, :], stride_mn),
                                   offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag, window_left,
                                   window_right, (start_n < full_lo) | (start_n >= full_hi), alibi2, HAS_MASK,
                                   MASK_IS_BOOL, HAS_LEFT, HAS_RIGHT, ALIBI, False)
        p = tl.math.exp2(s - lse2[:, None])
        if SOFTCAP and not STORE_DS:
            p = p * (1.0 - qk * qk)  # tanh' folded in early: t dies before the dP dot (registers)
        dp = _dot(do, tl.trans(v), None, FP32_IEEE)
        if DROPOUT:
            keep = _dropout_keep(seed, _dropout_offsets(drop_rows, offs_n, WIDE_DROPOUT), dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if STORE_DS:
            # dS is also the gradient of an additive attn_mask: written only when the mask needs it.
            tl.store(ds_base + offs_m[:, None].to(tl.int64) * Sk + offs_n[None, :], ds, mask=in_bounds)
        if SOFTCAP and STORE_DS:
            ds = ds * (1.0 - qk * qk)  # the mask's gradient above is taken after the cap, without tanh'
        dq = _dot(_cast(ds, k.dtype), k, dq, FP32_IEEE)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, DS, Mask, CuSeqQ, CuSeqK, Alibi,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, group_size, Sq, Sk, qk_scale, sm_scale, window_left, window_right, dropout_p, seed, softcap_in,
    stride_ab,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr, FP32_IEEE: tl.constexpr, REVERSE_M: tl.constexpr,
    STORE_DS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    # Query blocks innermost, as in the forward kernel: programs launched together share one head's K/V in L2.
    n_m = tl.cdiv(Sq, BLOCK_M)
    pid_bh = tl.program_id(0) // n_m
    pid_m = tl.program_id(0) % n_m
    if REVERSE_M:
        pid_m = n_m - 1 - pid_m
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // group_size
    q_start, seqlen_q = _seq_bounds(CuSeqQ, b, Sq, IS_VARLEN)
    k_start, seqlen_k = _seq_bounds(CuSeqK, b, Sk, IS_VARLEN)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return
    if BOTTOM_RIGHT:
        diag = seqlen_k - seqlen_q
    else:
        diag = seqlen_k * 0

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_row0 = q_start.to(tl.int64)
    q = _load_rows(_at(Q + b64 * stride_qb + h64 * stride_qh + q_row0 * stride_qm, m_start, offs_m[:, None],
                       stride_qm) + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_D, BLOCK_D, True)
    do = _load_rows(_at(DOut + b64 * stride_dob + h64 * stride_doh + q_row0 * stride_dom, m_start, offs_m[:, None],
                        stride_dom) + offs_dv[None, :], offs_m, seqlen_q, offs_dv, HEAD_DV, BLOCK_DV, True)
    l_off = b64 * stride_lb + h64 * stride_lh + q_row0 + offs_m
    lse = tl.load(Lse + l_off, mask=offs_m < seqlen_q, other=float("inf"))
    lse2 = tl.where(lse == -float("inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + l_off, mask=offs_m < seqlen_q, other=0.0)

    k_base = K + b64 * stride_kb + kv_h.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + kv_h.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_base = _at(Mask + b64 * stride_mb + h64 * stride_mh, m_start, offs_m[:, None], stride_mm)
    ds_base = DS + (b64 * num_heads + h64) * Sq * Sk
    alibi2 = _alibi_slope2(Alibi, b, h, stride_ab, ALIBI)
    drop_rows = ((b64 * num_heads + h) * Sq + offs_m.to(tl.int64)) * Sk
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    last_m = tl.minimum(m_start + BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = _key_range(m_start, last_m, seqlen_k, diag, window_left, window_right, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, ds_base, stride_kn, stride_vn, stride_mm, stride_mn,
        offs_m, seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed, dropout_p, drop_rows, Sk,
        lo, full_lo, full_hi, hi, softcap_in, alibi2, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, HAS_LEFT,
        HAS_RIGHT, HAS_MASK, MASK_IS_BOOL, DROPOUT, WIDE_DROPOUT, FP32_IEEE, STORE_DS, SOFTCAP, ALIBI)

    dq = dq * sm_scale
    dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + q_row0 * stride_dqm
    tl.store(_at(dq_base, m_start, offs_m[:, None], stride_dqm) + offs_d[None, :], _cast(dq, DQ.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_D))
