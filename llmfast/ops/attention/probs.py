"""flash-attn's ``S_dmask``: the attention probabilities, rebuilt from the forward pass's LSE by a kernel that
recomputes the scores exactly as the forward kernel does (soft-capping, ALiBi, causal band / window, sequence
ends) and writes them out, negated where dropout dropped the entry. For testing at small sizes only: it
materialises the (B, H, Sq, Sk) matrix."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmfast import _backend
from llmfast.ops._spec import launch

from .common import (_alibi_slope2, _cast, _dot, _dropout_keep, _dropout_offsets, _load_rows, _scores, _seq_bounds,
                     _softcap)
from .configs import _arch_key

# One config for every GPU: a testing path, so small tiles that build without spills at every head dim.
PROBS_CONFIGS = {
    "gpu": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
    "interpreter": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
}


@triton.jit
def _attn_probs_kernel(
    Q, K, Lse, P, CuSeqQ, CuSeqK, Alibi,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh,
    stride_pb, stride_ph, stride_pm,
    num_heads, group_size, Sq, Sk, qk_scale, window_left, window_right, dropout_p, seed, softcap_in, stride_ab,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr, FP32_IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    # One program per (batch, query head, query block); every key block of the row, the disallowed ones as 0.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
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

    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qm
                   + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_D, BLOCK_D, True)
    lse = tl.load(Lse + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, mask=offs_m < seqlen_q,
                  other=float("inf"))
    lse2 = tl.where(lse == -float("inf"), float("inf"), lse * 1.4426950408889634)
    k_base = K + b64 * stride_kb + kv_h.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    p_base = P + b64 * stride_pb + h64 * stride_ph
    alibi2 = _alibi_slope2(Alibi, b, h, stride_ab, ALIBI)
    drop_rows = ((b64 * num_heads + h) * Sq + offs_m.to(tl.int64)) * Sk
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, seqlen_k, offs_d, HEAD_D,
                       BLOCK_D, True)
        qk = _softcap(_dot(q, tl.trans(k), None, FP32_IEEE), softcap_in, SOFTCAP)
        s = _scores(qk, qk_scale, p_base, False, offs_m[:, None], offs_n[None, :], seqlen_k, diag, window_left,
                    window_right, alibi2, False, False, True, HAS_LEFT, HAS_RIGHT, ALIBI)
        p = tl.math.exp2(s - lse2[:, None])
        if DROPOUT:
            keep = _dropout_keep(seed, _dropout_offsets(drop_rows, offs_n, WIDE_DROPOUT), dropout_p)
            p = tl.where(keep, p, -p)
        tl.store(p_base + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :], _cast(p, P.dtype.element_ty),
                 mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


def _probs_config(device: torch.device) -> dict[str, int]:
    return PROBS_CONFIGS["interpreter" if _arch_key(device) == "interpreter" else "gpu"]


def _probs_impl(q, k, lse, pb) -> torch.Tensor:
    """S_dmask (B, H, Sq, Sk) in q's dtype for the problem ``pb`` (a launch.``_Problem``; varlen: Sq, Sk are the
    max lengths, sequence b in the top-left corner of its slice, zeros elsewhere)."""
    from .launch import _bhs_strides, _lse_strides  # late: launch imports this module's neighbours

    probs = torch.zeros((pb.batch, pb.num_heads, pb.seqlen_q, pb.seqlen_k), dtype=q.dtype, device=q.device)
    if pb.empty or pb.no_keys or probs.numel() == 0:
        return probs
    cfg = _probs_config(q.device)
    flags = pb.flags()
    _backend.record_kernel_launch("attention_probs", cfg)
    launch(_attn_probs_kernel, (pb.batch * pb.num_heads, triton.cdiv(pb.seqlen_q, cfg["BLOCK_M"])))(
        q, k, lse, probs, pb.cu_q, pb.cu_k, pb.alibi,
        *_bhs_strides(q, pb.layout), *_bhs_strides(k, pb.layout), *_lse_strides(lse, pb.layout),
        probs.stride(0), probs.stride(1), probs.stride(2),
        pb.num_heads, pb.group_size, pb.seqlen_q, pb.seqlen_k, pb.qk_scale, pb.window_left, pb.window_right,
        pb.dropout_p, pb.seed, pb.softcap_in, pb.alibi_stride,
        HEAD_D=pb.head_d, BLOCK_D=pb.block_d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        **{name: flags[name] for name in ("IS_VARLEN", "HAS_LEFT", "HAS_RIGHT", "BOTTOM_RIGHT", "DROPOUT",
                                          "WIDE_DROPOUT", "FP32_IEEE", "SOFTCAP", "ALIBI")},
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return probs
