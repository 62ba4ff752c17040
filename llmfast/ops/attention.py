"""Triton FlashAttention (forward and backward) behind torch's SDPA and flash-attn's function signatures.

Forward (``_attn_fwd_kernel``): one program per (batch, query head, block of BLOCK_M query rows). It streams
BLOCK_N-key tiles of K and V through an online softmax (running max ``m``, running sum ``l``, rescaled
accumulator), works in base 2 with the softmax scale folded into one multiplier, and saves the log-sum-exp of each
row so the backward pass can rebuild the probabilities without storing them.

Backward (FlashAttention-2 style, no atomics, hence deterministic):

* ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` (minus the incoming LSE gradient, if any).
* ``_attn_bwd_dkdv_kernel``: one program per (batch, KV head, key block); it recomputes ``P`` for every query
  block of every query head of its GQA group, so grouped K/V gradients are summed in registers, not with atomics.
* ``_attn_bwd_dq_kernel``: one program per (batch, query head, query block); recomputes ``P`` again for ``dQ``.

Every kernel takes the same masking description: the key range ``[start, end)`` allowed for a query row comes
from the causal diagonal / sliding window (``HAS_LEFT``, ``HAS_RIGHT``, aligned top-left or bottom-right), the
sequence lengths (fixed, or per sequence from ``cu_seqlens`` for varlen batches) and an optional boolean or additive
mask broadcast through stride-0 dimensions and loaded tile by tile. Blocks wholly outside the allowed band are
never visited; blocks wholly inside it run without any element masking; only the blocks on the band's edges pay
for it (the forward pass runs separate loops for the left edge, the interior and the diagonal / sequence end; the
backward kernels, tighter on registers, run one loop with a runtime branch for edge blocks). Under a causal band
the query blocks with the most keys are launched first. Rows with no allowed key produce output 0, LSE ``-inf``
and gradient 0.

Tiles, warps and pipeline stages are named configs per architecture (``ATTENTION_CONFIGS``), picked at launch by
``torch.cuda.get_device_capability()``, head dim, dtype and features, and all compiled by
``python -m llmfast.compile_check`` (through :func:`compile_specs`).

Dropout uses Triton's Philox (``tl.rand``) at offset ``((b * H + h) * Sq + i) * Sk + j`` and is regenerated, not
stored, in the backward pass (:func:`dropout_keep_mask` materialises the same mask for the reference).

The Triton path is exposed to PyTorch as the custom ops ``llmfast::flash_attention_forward`` and
``llmfast::flash_attention_backward`` (with fake implementations and a registered autograd formula), so
``torch.compile(fullgraph=True)`` traces through them without graph breaks.
"""
from __future__ import annotations

import inspect
import math
import numbers
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmfast import _backend, _validation
from llmfast.ops._arch import config_arch
from llmfast.ops._spec import KernelSpec

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256

# ----------------------------------------------------------------------------------------------------------------
# Tuning: named configs per architecture, one per kernel, head-dim bucket (the padded head dim: "d64" serves head
# dims 1..64, "d128" 65..128, "d256" 129..256) and kind of input: 16-bit inputs without extras, 16-bit inputs with
# an attn_mask or dropout ("_extra": the mask tile and Philox rounds need registers, so smaller tiles), and fp32
# inputs ("_fp32": exact fp32 dots run on the FMA units, which need much smaller tiles). BLOCK_M counts query rows,
# BLOCK_N key rows. Every entry is the largest tile found that ``python -m llmfast.compile_check`` builds without
# register spills (Triton 3.9, ptxas from its wheel); speed tuning on real GPUs is still to do.
# On sm_90 the 16-bit kernels use wgmma, except the entries marked ``mma_sync``: at head dim 256 (and the forward
# with extras) wgmma's 64-row tiles spill, so they run 16/32-row tiles on mma.sync instead.
# ----------------------------------------------------------------------------------------------------------------
ATTENTION_CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "sm90": {
        "fwd_d64": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "fwd_d128": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d256": dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1),
        "fwd_d64_extra": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d128_extra": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d256_extra": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1, mma_sync=True),
        "fwd_d64_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "fwd_d128_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "fwd_d256_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1),
        "bwd_preprocess_d64": dict(BLOCK_M=64, num_warps=4, num_stages=1),
        "bwd_preprocess_d128": dict(BLOCK_M=32, num_warps=4, num_stages=1),
        "bwd_preprocess_d256": dict(BLOCK_M=32, num_warps=8, num_stages=1),
        "bwd_dkdv_d64": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
        "bwd_dkdv_d128": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dkdv_d256": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1, mma_sync=True),
        "bwd_dkdv_d64_extra": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
        "bwd_dkdv_d128_extra": dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dkdv_d256_extra": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1, mma_sync=True),
        "bwd_dkdv_d64_fp32": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
        "bwd_dkdv_d128_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dkdv_d256_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq_d64": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dq_d128": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dq_d256": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1, mma_sync=True),
        "bwd_dq_d64_extra": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
        "bwd_dq_d128_extra": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "bwd_dq_d256_extra": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1, mma_sync=True),
        "bwd_dq_d64_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq_d128_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq_d256_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
    },
    "sm80": {
        "fwd_d64": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
        "fwd_d128": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d256": dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1),
        "fwd_d64_extra": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d128_extra": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d256_extra": dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1),
        "fwd_d64_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "fwd_d128_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "fwd_d256_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=2),
        "bwd_preprocess_d64": dict(BLOCK_M=64, num_warps=4, num_stages=1),
        "bwd_preprocess_d128": dict(BLOCK_M=32, num_warps=4, num_stages=1),
        "bwd_preprocess_d256": dict(BLOCK_M=32, num_warps=8, num_stages=1),
        "bwd_dkdv_d64": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1),
        "bwd_dkdv_d128": dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dkdv_d256": dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1),
        "bwd_dkdv_d64_extra": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1),
        "bwd_dkdv_d128_extra": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2),
        "bwd_dkdv_d256_extra": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1),
        "bwd_dkdv_d64_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1),
        "bwd_dkdv_d128_fp32": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
        "bwd_dkdv_d256_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=2),
        "bwd_dq_d64": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
        "bwd_dq_d128": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "bwd_dq_d256": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1),
        "bwd_dq_d64_extra": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "bwd_dq_d128_extra": dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2),
        "bwd_dq_d256_extra": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1),
        "bwd_dq_d64_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq_d128_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq_d256_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
    },
    # The CPU interpreter: small tiles, so short test sequences still cross several blocks.
    "interpreter": {
        "fwd": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_preprocess": dict(BLOCK_M=16, num_warps=4, num_stages=1),
        "bwd_dkdv": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
    },
}


def _arch_key(device: torch.device) -> str:
    return config_arch(device)


def _head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def _config_name(kernel: str, block_d: int, dtype: torch.dtype, extra: bool) -> str:
    """``<kernel>_d<bucket>[_fp32|_extra]``; the preprocess kernel only depends on the head dim."""
    name = f"{kernel}_d{_head_dim_bucket(block_d)}"
    if kernel == "bwd_preprocess":
        return name
    if dtype == torch.float32:
        return name + "_fp32"
    return name + "_extra" if extra else name


def _config(kernel: str, arch: str, block_d: int, dtype: torch.dtype, extra: bool = False) -> dict[str, int]:
    """The named config of ``kernel`` ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq") for ``arch``
    ("sm80", "sm90" or "interpreter"): by head-dim bucket, fp32 or 16-bit inputs, and ``extra`` features (an
    attn_mask tile or dropout's Philox rounds need registers, so they get smaller tiles)."""
    configs = ATTENTION_CONFIGS[arch]
    return configs[kernel] if kernel in configs else configs[_config_name(kernel, block_d, dtype, extra)]


def _block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; other head dims are padded with masked (zero) lanes.
    return max(16, triton.next_power_of_2(head_dim))


# ----------------------------------------------------------------------------------------------------------------
# Small device helpers shared by the kernels.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _dropout_keep(seed, offsets, dropout_p):
    """Philox keep decision shared by every kernel: keep iff uniform(seed, offset) >= dropout_p.

    ``offsets`` may be int64 or uint32: Philox's counter is (low word, high word), and a uint32 offset gives the
    same numbers as the int64 one whenever the high word is 0, so kernels use the cheaper uint32 offsets unless
    the (B, H, Sq, Sk) index space reaches 2**32 (``WIDE_DROPOUT``).
    """
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _dropout_offsets(row_base, cols, WIDE_DROPOUT: tl.constexpr):
    """Philox offsets ``row_base[i] + cols[j]`` of a (rows x cols) tile; ``row_base`` is int64."""
    if WIDE_DROPOUT:
        offsets = row_base[:, None] + cols[None, :]
    else:
        offsets = row_base.to(tl.uint32)[:, None] + cols.to(tl.uint32)[None, :]
    return offsets


@triton.jit
def _dropout_mask_kernel(keep_ptr, seed, dropout_p, Sq, Sk, BLOCK_N: tl.constexpr):
    # One program per (b, h, i) row: the keep mask of element (b, h, i, j) at offset ((b*H + h)*Sq + i)*Sk + j.
    row = tl.program_id(0).to(tl.int64)
    for start in range(0, Sk, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, row * Sk + cols.to(tl.int64), dropout_p)
        tl.store(keep_ptr + row * Sk + cols, keep.to(tl.int8), mask=cols < Sk)


# Two workarounds for Triton's CPU interpreter, compiled out on GPUs: it multiplies bf16 tiles as their raw uint16
# bits, so there bf16 dots go through fp32 (exact: a bf16 x bf16 product fits in fp32, and the tensor cores
# accumulate in fp32 too); and it rounds fp32 -> bf16 toward zero, so there ``_cast`` rounds to nearest-even by hand
# as the GPU conversion does.
_INTERPRETER_BF16_FIX = tl.constexpr(_backend.triton_interpreter_enabled())


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` for fp32 ``x``, rounding to nearest-even on every backend."""
    if _INTERPRETER_BF16_FIX and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _dot(a, b, acc, FP32_IEEE: tl.constexpr):
    # fp32 inputs multiply exactly ("ieee") unless the caller allowed TF32; fp16/bf16 go to the tensor cores.
    if _INTERPRETER_BF16_FIX and a.dtype == tl.bfloat16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32_IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _load_rows(ptrs, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows x cols) tile; rows past ``n_rows`` and padded head-dim lanes read 0."""
    if CHECK_ROWS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
    elif N_COLS == BLOCK_COLS:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return x


@triton.jit
def _seq_bounds(cu_seqlens, b, fixed_len, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence ``b``: from ``cu_seqlens`` for varlen batches, else (0, fixed_len)."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens + b)
        length = tl.load(cu_seqlens + b + 1) - start
    else:
        start = b * 0
        length = fixed_len + b * 0
    return start, length


@triton.jit
def _key_range(m_start, last_m, seqlen_k, diag, window_left, window_right, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks that the query rows [m_start, last_m] see, split as [lo, full_lo) edge, [full_lo, full_hi)
    interior (no element masking needed), [full_hi, hi) edge. Query i sees key j iff
    i + diag - window_left <= j <= i + diag + window_right (each side only when bounded) and j < seqlen_k."""
    lo = m_start * 0
    hi = seqlen_k + m_start * 0
    full_lo = lo
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = (tl.maximum(m_start + diag - window_left, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last_m + diag - window_left, 0), BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(last_m + diag + window_right + 1, seqlen_k)
        full_hi = (tl.minimum(tl.maximum(m_start + diag + window_right + 1, 0), seqlen_k) // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(n_start, last_n, seqlen_q, diag, window_left, window_right, BLOCK_M: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see the keys [n_start, last_n]: the transpose of :func:`_key_range`
    (j - diag - window_right <= i <= j - diag + window_left, i < seqlen_q)."""
    lo = n_start * 0
    hi = seqlen_q + n_start * 0
    full_lo = lo
    full_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        lo = (tl.maximum(n_start - diag - window_right, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(last_n - diag - window_right, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(last_n - diag + window_left + 1, seqlen_q)
        full_hi = (tl.minimum(tl.maximum(n_start - diag + window_left + 1, 0), seqlen_q) // BLOCK_M) * BLOCK_M
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _scores(qk, qk_scale, mask_ptrs, mask_ok, rows, cols, seqlen_k, diag, window_left, window_right,
            HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, EDGE: tl.constexpr, HAS_LEFT: tl.constexpr,
            HAS_RIGHT: tl.constexpr):
    """Scaled scores in base 2 with every disallowed element at -inf. ``rows``/``cols`` are broadcastable index
    tensors shaped like ``qk`` (query index, key index), so the same code serves S and its transpose."""
    s = qk * qk_scale
    if HAS_MASK:
        if MASK_IS_BOOL:
            allowed_by_mask = tl.load(mask_ptrs, mask=mask_ok, other=0)
            s = tl.where(allowed_by_mask != 0, s, -float("inf"))
        else:
            s += tl.load(mask_ptrs, mask=mask_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    if EDGE:
        s = _band(s, rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
    return s


@triton.jit
def _band(s, rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT: tl.constexpr,
          HAS_RIGHT: tl.constexpr):
    """-inf outside the causal band / sliding window and past the last key."""
    allowed = cols < seqlen_k
    if HAS_RIGHT:
        allowed = allowed & (cols <= rows + (diag + window_right))
    if HAS_LEFT:
        allowed = allowed & (cols >= rows + (diag - window_left))
    return tl.where(allowed, s, -float("inf"))


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                    offs_m, seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed, dropout_p,
                    drop_rows, lo, hi,
                    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_N: tl.constexpr, EDGE: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, DROPOUT: tl.constexpr,
                    WIDE_DROPOUT: tl.constexpr,
                    FP32_IEEE: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, seqlen_k, offs_d,
                       HEAD_D, BLOCK_D, EDGE)
        qk = _dot(q, tl.trans(k), None, FP32_IEEE)
        mask_ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        mask_ok = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
        s = _scores(qk, qk_scale, mask_ptrs, mask_ok, offs_m[:, None], offs_n[None, :], seqlen_k, diag,
                    window_left, window_right, HAS_MASK, MASK_IS_BOOL, EDGE, HAS_LEFT, HAS_RIGHT)
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
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n, seqlen_k, offs_dv,
                       HEAD_DV, BLOCK_DV, EDGE)
        acc = _dot(_cast(p, v.dtype), v, acc, FP32_IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, CuSeqQ, CuSeqK,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, group_size, Sq, Sk, qk_scale, window_left, window_right, dropout_p, seed,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr, FP32_IEEE: tl.constexpr, REVERSE_M: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    # With a causal band the last query blocks see the most keys: launch them first (longest work first).
    if REVERSE_M:
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        pid_m = tl.program_id(1)
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
    mask_base = Mask + b64 * stride_mb + h.to(tl.int64) * stride_mh

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d,
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
            HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_MASK, MASK_IS_BOOL,
            DROPOUT, WIDE_DROPOUT, FP32_IEEE)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn, offs_m,
        seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed, dropout_p, drop_rows, full_lo, full_hi,
        HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, False, HAS_LEFT, HAS_RIGHT, HAS_MASK, MASK_IS_BOOL,
        DROPOUT, WIDE_DROPOUT, FP32_IEEE)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn, offs_m,
        seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed, dropout_p, drop_rows, full_hi, hi,
        HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_MASK, MASK_IS_BOOL,
        DROPOUT, WIDE_DROPOUT, FP32_IEEE)

    # Epilogue: normalise, undo dropout's expected shrinkage, and keep the natural-log LSE for the backward pass.
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    o_base = Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, _cast(out, Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DV))
    lse = tl.where(empty_row, -float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    l_ptrs = Lse + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    tl.store(l_ptrs, lse, mask=offs_m < seqlen_q)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
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
    o = _load_rows(o_base + offs_m[:, None] * stride_om + offs_dv[None, :], offs_m, seqlen_q, offs_dv, HEAD_DV,
                   BLOCK_DV, True)
    do = _load_rows(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :], offs_m, seqlen_q, offs_dv, HEAD_DV,
                    BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    l_off = b64 * stride_lb + h64 * stride_lh + row0 + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + l_off, mask=offs_m < seqlen_q, other=0.0)
    tl.store(Delta + l_off, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_scores(qk, qk_scale, mask_base, stride_mm, stride_mn, rows, cols, seqlen_q, seqlen_k, diag, window_left,
                window_right, band_edge, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr):
    """_scores() for the backward loops, which see the tile either way round (``rows``/``cols``: broadcastable query
    and key indices). The band applies only where ``band_edge`` (a runtime flag: one loop body for edge and interior
    blocks keeps the register pressure down). Also returns which elements lie inside the (Sq, Sk) problem."""
    in_bounds = (rows < seqlen_q) & (cols < seqlen_k)
    s = _scores(qk, qk_scale, mask_base + rows * stride_mm + cols * stride_mn, in_bounds, rows, cols, seqlen_k, diag,
                window_left, window_right, HAS_MASK, MASK_IS_BOOL, False, HAS_LEFT, HAS_RIGHT)
    if band_edge:
        s = _band(s, rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
    return s, in_bounds


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base,
                         stride_qm, stride_dom, stride_mm, stride_mn, offs_n, seqlen_q, seqlen_k, diag,
                         window_left, window_right, qk_scale, seed, dropout_p, drop_base, Sk,
                         lo, full_lo, full_hi, hi,
                         HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
                         BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
                         MASK_IS_BOOL: tl.constexpr, DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr,
                         FP32_IEEE: tl.constexpr):
    # Works on the transposed problem (keys x queries) so dK and dV accumulate with plain row-major dots.
    # One loop over the query blocks in [lo, hi); only those outside [full_lo, full_hi) take the band mask (a
    # runtime branch: a single loop body keeps the register pressure of the backward pass down).
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d,
                       HEAD_D, BLOCK_D, True)
        do = _load_rows(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :], offs_m, seqlen_q, offs_dv,
                        HEAD_DV, BLOCK_DV, True)
        lse = tl.load(lse_base + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        # Rows with no allowed key stored LSE = -inf, rows past the end read +inf: either way P comes out 0.
        lse2 = tl.where(lse == -float("inf"), float("inf"), lse * 1.4426950408889634)
        qk_t = _dot(k, tl.trans(q), None, FP32_IEEE)
        s_t, _ = _bwd_scores(qk_t, qk_scale, mask_base, stride_mm, stride_mn, offs_m[None, :], offs_n[:, None],
                             seqlen_q, seqlen_k, diag, window_left, window_right,
                             (start_m < full_lo) | (start_m >= full_hi), HAS_MASK, MASK_IS_BOOL, HAS_LEFT, HAS_RIGHT)
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
        dk = _dot(_cast(ds_t, q.dtype), q, dk, FP32_IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, Mask, CuSeqQ, CuSeqK,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, num_kv_heads, group_size, Sq, Sk, qk_scale, sm_scale, window_left, window_right, dropout_p, seed,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr, FP32_IEEE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
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
    k = _load_rows(K + b64 * stride_kb + kv_h64 * stride_kh + k_row0 * stride_kn
                   + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, seqlen_k, offs_d, HEAD_D, BLOCK_D, True)
    v = _load_rows(V + b64 * stride_vb + kv_h64 * stride_vh + k_row0 * stride_vn
                   + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n, seqlen_k, offs_dv, HEAD_DV, BLOCK_DV,
                   True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    last_n = tl.minimum(n_start + BLOCK_N, seqlen_k) - 1
    lo, full_lo, full_hi, hi = _query_range(n_start, last_n, seqlen_q, diag, window_left, window_right, BLOCK_M,
                                            HAS_LEFT, HAS_RIGHT)
    # Every query head of this KV head's group adds into the same dK/dV registers: GQA without atomics.
    for g in range(0, group_size):
        h = kv_h * group_size + g
        q_row0 = q_start.to(tl.int64)
        q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_row0 * stride_qm
        do_base = DOut + b64 * stride_dob + h.to(tl.int64) * stride_doh + q_row0 * stride_dom
        lse_base = Lse + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_row0
        delta_base = Delta + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_row0
        mask_base = Mask + b64 * stride_mb + h.to(tl.int64) * stride_mh
        drop_base = (b64 * num_heads + h) * Sq
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, stride_qm, stride_dom,
            stride_mm, stride_mn, offs_n, seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed,
            dropout_p, drop_base, Sk, lo, full_lo, full_hi, hi, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M,
            HAS_LEFT, HAS_RIGHT, HAS_MASK, MASK_IS_BOOL, DROPOUT, WIDE_DROPOUT, FP32_IEEE)

    dk = dk * sm_scale
    row_ok = offs_n[:, None] < seqlen_k
    dk_base = DK + b64 * stride_dkb + kv_h64 * stride_dkh + k_row0 * stride_dkn
    dv_base = DV + b64 * stride_dvb + kv_h64 * stride_dvh + k_row0 * stride_dvn
    tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], _cast(dk, DK.dtype.element_ty),
             mask=row_ok & (offs_d[None, :] < HEAD_D))
    tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_dv[None, :], _cast(dv, DV.dtype.element_ty),
             mask=row_ok & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mask_base, ds_base, stride_kn, stride_vn,
                       stride_mm, stride_mn, offs_m, seqlen_q, seqlen_k, diag, window_left, window_right,
                       qk_scale, seed, dropout_p, drop_rows, Sk, lo, full_lo, full_hi, hi,
                       HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr,
                       HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                       DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr, FP32_IEEE: tl.constexpr,
                       STORE_DS: tl.constexpr):
    # One loop with a runtime branch for the edge blocks, as in _attn_bwd_dkdv_inner.
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, seqlen_k, offs_d,
                       HEAD_D, BLOCK_D, True)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n, seqlen_k, offs_dv,
                       HEAD_DV, BLOCK_DV, True)
        qk = _dot(q, tl.trans(k), None, FP32_IEEE)
        s, in_bounds = _bwd_scores(qk, qk_scale, mask_base, stride_mm, stride_mn, offs_m[:, None], offs_n[None, :],
                                   seqlen_q, seqlen_k, diag, window_left, window_right,
                                   (start_n < full_lo) | (start_n >= full_hi), HAS_MASK, MASK_IS_BOOL, HAS_LEFT,
                                   HAS_RIGHT)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), None, FP32_IEEE)
        if DROPOUT:
            keep = _dropout_keep(seed, _dropout_offsets(drop_rows, offs_n, WIDE_DROPOUT), dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if STORE_DS:
            # dS is also the gradient of an additive attn_mask: written only when the mask needs it.
            tl.store(ds_base + offs_m[:, None].to(tl.int64) * Sk + offs_n[None, :], ds, mask=in_bounds)
        dq = _dot(_cast(ds, k.dtype), k, dq, FP32_IEEE)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, DS, Mask, CuSeqQ, CuSeqK,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, group_size, Sq, Sk, qk_scale, sm_scale, window_left, window_right, dropout_p, seed,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr, WIDE_DROPOUT: tl.constexpr, FP32_IEEE: tl.constexpr, REVERSE_M: tl.constexpr,
    STORE_DS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    if REVERSE_M:
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
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

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_row0 = q_start.to(tl.int64)
    q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh + q_row0 * stride_qm
                   + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_D, BLOCK_D, True)
    do = _load_rows(DOut + b64 * stride_dob + h64 * stride_doh + q_row0 * stride_dom
                    + offs_m[:, None] * stride_dom + offs_dv[None, :], offs_m, seqlen_q, offs_dv, HEAD_DV, BLOCK_DV,
                    True)
    l_off = b64 * stride_lb + h64 * stride_lh + q_row0 + offs_m
    lse = tl.load(Lse + l_off, mask=offs_m < seqlen_q, other=float("inf"))
    lse2 = tl.where(lse == -float("inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + l_off, mask=offs_m < seqlen_q, other=0.0)

    k_base = K + b64 * stride_kb + kv_h.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + kv_h.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_base = Mask + b64 * stride_mb + h64 * stride_mh
    ds_base = DS + (b64 * num_heads + h64) * Sq * Sk
    drop_rows = ((b64 * num_heads + h) * Sq + offs_m.to(tl.int64)) * Sk
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    last_m = tl.minimum(m_start + BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = _key_range(m_start, last_m, seqlen_k, diag, window_left, window_right, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, ds_base, stride_kn, stride_vn, stride_mm, stride_mn,
        offs_m, seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, seed, dropout_p, drop_rows, Sk,
        lo, full_lo, full_hi, hi, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_MASK,
        MASK_IS_BOOL, DROPOUT, WIDE_DROPOUT, FP32_IEEE, STORE_DS)

    dq = dq * sm_scale
    dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + q_row0 * stride_dqm
    tl.store(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :], _cast(dq, DQ.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_D))


# ----------------------------------------------------------------------------------------------------------------
# Host side: one launcher per pass. Tensors arrive in one of three layouts, described to the kernels by strides
# (the head dim must be contiguous): "bhsd" (torch SDPA), "bshd" (flash-attn), "thd" (flash-attn varlen: tokens of
# all sequences packed along dim 0, batch stride 0 and per-sequence offsets from cu_seqlens).
# ----------------------------------------------------------------------------------------------------------------
def _bhs_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    if layout == "bhsd":
        return t.stride(0), t.stride(1), t.stride(2)
    if layout == "bshd":
        return t.stride(0), t.stride(2), t.stride(1)
    return 0, t.stride(1), t.stride(0)


def _heads_and_len(t: torch.Tensor, layout: str) -> tuple[int, int]:
    if layout == "bhsd":
        return t.shape[1], t.shape[2]
    if layout == "bshd":
        return t.shape[2], t.shape[1]
    return t.shape[1], t.shape[0]


def _lse_shape(q: torch.Tensor, layout: str) -> tuple[int, ...]:
    """LSE is (B, H, Sq) for padded layouts and (H, total_q) for varlen batches (flash-attn's conventions)."""
    heads, length = _heads_and_len(q, layout)
    return (heads, length) if layout == "thd" else (q.shape[0], heads, length)


def _lse_strides(lse: torch.Tensor, layout: str) -> tuple[int, int]:
    return (0, lse.stride(0)) if layout == "thd" else (lse.stride(0), lse.stride(1))


def _head_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Problem:
    """Sizes and flags shared by the forward and backward launches."""

    def __init__(self, q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                 window_left, window_right, bottom_right, dropout_p, seed):
        self.layout = layout
        self.varlen = layout == "thd"
        self.num_heads, self.seqlen_q = _heads_and_len(q, layout)
        self.num_kv_heads, self.seqlen_k = _heads_and_len(k, layout)
        if self.varlen:
            self.batch = cu_seqlens_q.numel() - 1
            self.seqlen_q, self.seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
        else:
            self.batch = q.shape[0]
        self.group_size = self.num_heads // max(self.num_kv_heads, 1)
        self.head_d, self.head_dv = q.shape[-1], v.shape[-1]
        self.block_d, self.block_dv = _block_d(self.head_d), _block_d(self.head_dv)
        self.scale = float(scale)
        self.window_left, self.window_right = int(window_left), int(window_right)
        self.bottom_right = bool(bottom_right)
        self.dropout_p = float(dropout_p)
        self.seed = int(seed.item()) if (seed is not None and self.dropout_p > 0) else 0
        self.wide_dropout = self.batch * self.num_heads * self.seqlen_q * self.seqlen_k >= 2**32
        self.fp32_ieee = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        self.empty = self.batch == 0 or self.num_heads == 0 or self.seqlen_q == 0 or q.numel() == 0
        self.no_keys = self.seqlen_k == 0 or k.numel() == 0
        # Placeholders for absent pointer arguments (never dereferenced: their constexpr flags are off).
        self.cu_q = cu_seqlens_q if self.varlen else q
        self.cu_k = cu_seqlens_k if self.varlen else q
        if mask is None:
            self.mask, self.mask_strides, self.mask_is_bool = q, (0, 0, 0, 0), False
        else:
            # Broadcast through stride-0 dimensions: the mask is never materialised at (B, H, Sq, Sk).
            expanded = mask.expand(self.batch, self.num_heads, self.seqlen_q, self.seqlen_k)
            self.mask_is_bool = expanded.dtype == torch.bool
            self.mask = expanded.view(torch.uint8) if self.mask_is_bool else expanded
            self.mask_strides = tuple(self.mask.stride())
        self.has_mask = mask is not None
        self.extra = self.has_mask or self.dropout_p > 0

    def flags(self) -> dict:
        return dict(HEAD_D=self.head_d, BLOCK_D=self.block_d, HEAD_DV=self.head_dv, BLOCK_DV=self.block_dv,
                    IS_VARLEN=self.varlen, HAS_LEFT=self.window_left >= 0, HAS_RIGHT=self.window_right >= 0,
                    BOTTOM_RIGHT=self.bottom_right, HAS_MASK=self.has_mask, MASK_IS_BOOL=self.mask_is_bool,
                    DROPOUT=self.dropout_p > 0, WIDE_DROPOUT=self.wide_dropout, FP32_IEEE=self.fp32_ieee)

    def reverse_m(self) -> bool:
        # Under a causal band (bounded right side) later query blocks see more keys.
        return self.window_right >= 0 and self.window_left < 0


def _forward_impl(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                  window_left, window_right, bottom_right, dropout_p, seed):
    q, k, v = _head_dim_contiguous(q), _head_dim_contiguous(k), _head_dim_contiguous(v)
    pb = _Problem(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                  window_left, window_right, bottom_right, dropout_p, seed)
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = torch.empty(_lse_shape(q, layout), dtype=torch.float32, device=q.device)
    if pb.empty or out.numel() == 0:
        return out, lse.fill_(-math.inf)
    if pb.no_keys:
        return out.zero_(), lse.fill_(-math.inf)
    cfg = _config("fwd", _arch_key(q.device), max(pb.block_d, pb.block_dv), q.dtype, pb.extra)
    grid = (pb.batch * pb.num_heads, triton.cdiv(pb.seqlen_q, cfg["BLOCK_M"]))
    _backend.record_kernel_launch("attention_fwd")
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, pb.mask, pb.cu_q, pb.cu_k,
        *_bhs_strides(q, layout), *_bhs_strides(k, layout), *_bhs_strides(v, layout), *_bhs_strides(out, layout),
        *_lse_strides(lse, layout), *pb.mask_strides,
        pb.num_heads, pb.group_size, pb.seqlen_q, pb.seqlen_k, pb.scale * LOG2E, pb.window_left, pb.window_right,
        pb.dropout_p, pb.seed,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], REVERSE_M=pb.reverse_m(), **pb.flags(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def _reduce_to_shape(full: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a (B, H, Sq, Sk) gradient back over the dimensions a mask of ``shape`` was broadcast along."""
    padded = (1,) * (full.dim() - len(shape)) + tuple(shape)
    dims = [d for d, (n, m) in enumerate(zip(full.shape, padded)) if m == 1 and n != 1]
    if dims:
        full = full.sum(dim=dims, keepdim=True)
    return full.reshape(shape)


def _backward_impl(dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   layout, scale, window_left, window_right, bottom_right, dropout_p, seed, mask_needs_grad):
    q, k, v = _head_dim_contiguous(q), _head_dim_contiguous(k), _head_dim_contiguous(v)
    dout, out = _head_dim_contiguous(dout), _head_dim_contiguous(out)
    lse = lse.contiguous()
    pb = _Problem(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                  window_left, window_right, bottom_right, dropout_p, seed)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    dmask = mask.new_zeros(mask.shape) if mask_needs_grad else q.new_empty(0)
    if pb.empty or pb.no_keys:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask

    # Delta (same layout as LSE): one pass over O and dO.
    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    dlse = dlse.contiguous() if has_dlse else lse
    arch = _arch_key(q.device)
    pre = _config("bwd_preprocess", arch, pb.block_dv, q.dtype)
    _backend.record_kernel_launch("attention_bwd_preprocess")
    _attn_bwd_preprocess_kernel[(pb.batch * pb.num_heads, triton.cdiv(pb.seqlen_q, pre["BLOCK_M"]))](
        out, dout, dlse, delta, pb.cu_q, *_bhs_strides(out, layout), *_bhs_strides(dout, layout),
        *_lse_strides(lse, layout), pb.num_heads, pb.seqlen_q,
        HEAD_DV=pb.head_dv, BLOCK_DV=pb.block_dv, BLOCK_M=pre["BLOCK_M"], IS_VARLEN=pb.varlen, HAS_DLSE=has_dlse,
        num_warps=pre["num_warps"], num_stages=pre["num_stages"],
    )

    common = (pb.window_left, pb.window_right, pb.dropout_p, pb.seed)
    cfg = _config("bwd_dkdv", arch, max(pb.block_d, pb.block_dv), q.dtype, pb.extra)
    _backend.record_kernel_launch("attention_bwd_dkdv")
    _attn_bwd_dkdv_kernel[(pb.batch * pb.num_kv_heads, triton.cdiv(pb.seqlen_k, cfg["BLOCK_N"]))](
        q, k, v, dout, lse, delta, dk, dv, pb.mask, pb.cu_q, pb.cu_k,
        *_bhs_strides(q, layout), *_bhs_strides(k, layout), *_bhs_strides(v, layout),
        *_bhs_strides(dout, layout), *_bhs_strides(dk, layout), *_bhs_strides(dv, layout),
        *_lse_strides(lse, layout), *pb.mask_strides,
        pb.num_heads, pb.num_kv_heads, pb.group_size, pb.seqlen_q, pb.seqlen_k, pb.scale * LOG2E, pb.scale,
        *common,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **pb.flags(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )

    ds = (torch.zeros((pb.batch, pb.num_heads, pb.seqlen_q, pb.seqlen_k), dtype=torch.float32, device=q.device)
          if mask_needs_grad else lse)
    cfg = _config("bwd_dq", arch, max(pb.block_d, pb.block_dv), q.dtype, pb.extra)
    _backend.record_kernel_launch("attention_bwd_dq")
    _attn_bwd_dq_kernel[(pb.batch * pb.num_heads, triton.cdiv(pb.seqlen_q, cfg["BLOCK_M"]))](
        q, k, v, dout, lse, delta, dq, ds, pb.mask, pb.cu_q, pb.cu_k,
        *_bhs_strides(q, layout), *_bhs_strides(k, layout), *_bhs_strides(v, layout),
        *_bhs_strides(dout, layout), *_bhs_strides(dq, layout), *_lse_strides(lse, layout), *pb.mask_strides,
        pb.num_heads, pb.group_size, pb.seqlen_q, pb.seqlen_k, pb.scale * LOG2E, pb.scale, *common,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], REVERSE_M=pb.reverse_m(), STORE_DS=mask_needs_grad,
        **pb.flags(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if mask_needs_grad:
        dmask = _reduce_to_shape(ds, mask.shape).to(mask.dtype)
    return dq, dk, dv, dmask


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (traced through their fake implementations), with autograd.
# ----------------------------------------------------------------------------------------------------------------
_PROBLEM_ARGS = ("Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, str layout, "
                 "float scale, int window_left, int window_right, bool bottom_right, float dropout_p, Tensor? seed")


@torch.library.custom_op(
    "llmfast::flash_attention_forward", mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, Tensor? mask, {_PROBLEM_ARGS}) -> (Tensor, Tensor)")
def _flash_attention_forward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                             window_left, window_right, bottom_right, dropout_p, seed):
    return _forward_impl(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                         window_left, window_right, bottom_right, dropout_p, seed)


@_flash_attention_forward.register_fake
def _flash_attention_forward_fake(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout,
                                  scale, window_left, window_right, bottom_right, dropout_p, seed):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = q.new_empty(_lse_shape(q, layout), dtype=torch.float32)
    return out, lse


@torch.library.custom_op(
    "llmfast::flash_attention_backward", mutates_args=(),
    schema=(f"(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
            f"{_PROBLEM_ARGS}, bool mask_needs_grad) -> (Tensor, Tensor, Tensor, Tensor)"))
def _flash_attention_backward(dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p, seed,
                              mask_needs_grad):
    return _backward_impl(dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p, seed,
                          mask_needs_grad)


@_flash_attention_backward.register_fake
def _flash_attention_backward_fake(dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p,
                                   seed, mask_needs_grad):
    dmask = mask.new_empty(mask.shape) if mask_needs_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _forward_setup_context(ctx, inputs, output):
    (q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale, window_left,
     window_right, bottom_right, dropout_p, seed) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, out, lse)
    ctx.problem = (max_seqlen_q, max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p)
    ctx.mask_needs_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]


def _forward_backward(ctx, dout, dlse):
    q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, out, lse = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, layout, scale, window_left, window_right, bottom_right, dropout_p) = ctx.problem
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dmask = _flash_attention_backward(
        dout, dlse, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
        window_left, window_right, bottom_right, dropout_p, seed, ctx.mask_needs_grad)
    return (dq, dk, dv, dmask if ctx.mask_needs_grad else None) + (None,) * 11


_flash_attention_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


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


def _draw_seed() -> torch.Tensor:
    # From torch's default CPU generator, so torch.manual_seed reproduces the dropout pattern.
    return torch.randint(0, 2**31 - 1, (1,))


# ----------------------------------------------------------------------------------------------------------------
# Validation: every failure names the argument, what it got and what it accepts.
# ----------------------------------------------------------------------------------------------------------------
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_qkv(names: Sequence[str], tensors: Sequence[torch.Tensor], ndim) -> None:
    for name, t in zip(names, tensors):
        _validation.check_tensor(name, t, ndim=ndim, dtypes=_ATTENTION_DTYPES)
    _validation.check_same_dtype(**dict(zip(names, tensors)))
    _validation.check_same_device(**dict(zip(names, tensors)))


def _check_head_dims(q_name: str, head_dim: int, v_name: str, head_dim_v: int) -> None:
    for name, d in ((q_name, head_dim), (v_name, head_dim_v)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} has head dim (last dimension) {d}; accepted head dims are 1..{MAX_HEAD_DIM}")


def _check_heads(q_heads: int, kv_heads: int, *, allow_grouped: bool, hint: str = "") -> None:
    if q_heads == kv_heads:
        return
    if not allow_grouped:
        raise ValueError(f"query has {q_heads} heads but key/value have {kv_heads}; equal head counts are "
                         f"accepted{hint}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads}) for "
                         f"grouped-query attention")


def _check_dropout(dropout_p: object) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _check_scale(name: str, scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"{name} must be finite, got {scale}")
    return float(scale)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_window(window_size: object) -> tuple[int, int]:
    ok = (isinstance(window_size, (tuple, list)) and len(window_size) == 2
          and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size))
    if not ok:
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), "
                         f"got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def _check_mask(attn_mask: object, query: torch.Tensor, target: tuple[int, ...]) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    accepted = (torch.bool, query.dtype, torch.float32)
    if attn_mask.dtype not in accepted:
        names = ", ".join(sorted({str(d).replace("torch.", "") for d in accepted}))
        raise TypeError(f"attn_mask must have dtype in ({names}), got {str(attn_mask.dtype).replace('torch.', '')}")
    _validation.check_same_device(query=query, attn_mask=attn_mask)
    try:
        ok = attn_mask.dim() <= len(target) and torch.broadcast_shapes(attn_mask.shape, target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to the attention "
                         f"scores' shape {tuple(target)} (batch..., heads, Sq, Sk)")


def _check_cu_seqlens(name: str, cu: object, total: int, total_name: str) -> int:
    """Validate a cu_seqlens tensor; returns the longest sequence it describes."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if torch.compiler.is_compiling():
        return -1  # the value checks below would read the tensor and break the graph
    values = cu.cpu()
    lengths = values[1:] - values[:-1]
    if int(values[0]) != 0 or bool((lengths < 0).any()):
        raise ValueError(f"{name} must start at 0 and never decrease, got {values.tolist()}")
    if int(values[-1]) != total:
        raise ValueError(f"{name} must end at the number of packed tokens in {total_name} ({total}), "
                         f"got {int(values[-1])}")
    return int(lengths.max())


def _check_max_seqlen(name: str, value: object, longest: int, cu_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < max(longest, 0):
        raise ValueError(f"{name} must be >= the longest sequence in {cu_name} ({longest}), got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# torch-native paths (backend "auto" where Triton cannot run, and float64): same semantics as the kernels.
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Attention with exactly :func:`torch.nn.functional.scaled_dot_product_attention`'s semantics.

    ``query`` is (..., Hq, Sq, D), ``key`` (..., Hkv, Sk, D) and ``value`` (..., Hkv, Sk, Dv) (2 to 4 dims; the
    same leading dims). ``is_causal`` aligns the causal diagonal top-left (query i sees keys j <= i) even when
    Sq != Sk; with ``attn_mask`` as well, both apply. ``attn_mask`` is a bool (True = attend) or additive float
    mask broadcastable to (..., Hq, Sq, Sk); an additive mask that requires grad receives its gradient.
    ``enable_gqa`` lets Hq be a multiple of Hkv (K/V heads are shared by groups, never copied). Rows with no
    allowed key return 0 (and gradient 0). Dropout draws its seed from torch's default generator.
    """
    names = ("query", "key", "value")
    _check_qkv(names, (query, key, value), ndim=(2, 3, 4))
    if not query.dim() == key.dim() == value.dim():
        raise ValueError(f"query, key and value must have the same number of dimensions, got "
                         f"{query.dim()}, {key.dim()} and {value.dim()}")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(f"query, key and value must share the batch dimensions, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key's head dim (last dimension) must equal query's ({query.shape[-1]}), "
                         f"got {key.shape[-1]}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key and value must agree on heads and sequence length, got shapes {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    _check_head_dims("query", query.shape[-1], "value", value.shape[-1])
    enable_gqa = _check_bool("enable_gqa", enable_gqa)
    is_causal = _check_bool("is_causal", is_causal)
    if query.dim() >= 3:
        _check_heads(query.shape[-3], key.shape[-3], allow_grouped=enable_gqa, hint=" unless enable_gqa=True")
    dropout_p = _check_dropout(dropout_p)
    sm_scale = _check_scale("scale", scale, query.shape[-1])
    if attn_mask is not None:
        _check_mask(attn_mask, query, tuple(query.shape[:-1]) + (key.shape[-2],))

    impl = _backend.resolve("scaled_dot_product_attention", query)
    if impl == "reference":
        return _reference().scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                         dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                                         enable_gqa=enable_gqa)
    if impl == "torch" or query.dtype == torch.float64:
        return _sdpa_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    # The kernels see (B, H, S, D): add the missing leading dims as views.
    extra = 4 - query.dim()
    q4, k4, v4 = (t[(None,) * extra] for t in (query, key, value))
    seed = _draw_seed() if dropout_p > 0 else None
    out, _ = _flash_attention_forward(q4, k4, v4, attn_mask, None, None, 0, 0, "bhsd", sm_scale, -1,
                                      0 if is_causal else -1, False, dropout_p, seed)
    return out[(0,) * extra] if extra else out


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), return_attn_probs: bool = False):
    """Attention with flash-attn's ``flash_attn_func`` semantics: ``q`` (B, Sq, Hq, D), ``k`` (B, Sk, Hkv, D),
    ``v`` (B, Sk, Hkv, Dv), output (B, Sq, Hq, Dv).

    ``causal`` aligns the diagonal bottom-right (query i sees keys j <= i + Sk - Sq). ``window_size=(left, right)``
    (-1: unbounded) lets query i see keys ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``; ``causal`` sets
    right to 0. Hq must be a multiple of Hkv (GQA/MQA). With ``return_attn_probs=True`` returns
    ``(out, softmax_lse, None)``: ``softmax_lse`` is the natural-log log-sum-exp of the scaled scores, float32
    (B, Hq, Sq), -inf for rows with no allowed key, and differentiable; the attention probabilities themselves
    are not materialised (None).
    """
    names = ("q", "k", "v")
    _check_qkv(names, (q, k, v), ndim=4)
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"q, k and v must share the batch size, got {q.shape[0]}, {k.shape[0]} and {v.shape[0]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree on batch, sequence length and heads, got shapes {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim (last dimension) must equal q's ({q.shape[-1]}), got {k.shape[-1]}")
    _check_head_dims("q", q.shape[-1], "v", v.shape[-1])
    _check_heads(q.shape[2], k.shape[2], allow_grouped=True)
    dropout_p = _check_dropout(dropout_p)
    sm_scale = _check_scale("softmax_scale", softmax_scale, q.shape[-1])
    causal = _check_bool("causal", causal)
    left, right = _check_window(window_size)
    return_attn_probs = _check_bool("return_attn_probs", return_attn_probs)
    if causal:
        right = 0

    impl = _backend.resolve("flash_attn_func", q)
    if impl == "reference":
        return _reference().flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                            causal=causal, window_size=tuple(window_size),
                                            return_attn_probs=return_attn_probs)
    if impl == "torch" or q.dtype == torch.float64:
        out, lse = _flash_torch(q, k, v, dropout_p, sm_scale, left, right, return_attn_probs)
    else:
        seed = _draw_seed() if dropout_p > 0 else None
        out, lse = _flash_attention_forward(q, k, v, None, None, None, 0, 0, "bshd", sm_scale, left, right, True,
                                            dropout_p, seed)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func``: sequences packed along dim 0, ``q`` (total_q, Hq, D), ``k`` and
    ``v`` (total_k, Hkv, D / Dv); sequence b spans ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` (int32, starting at 0).
    Masking, windows and GQA as :func:`flash_attn_func`, per sequence (causal aligned bottom-right per sequence).
    Dropout offsets use b as the sequence index and ``max_seqlen_q`` / ``max_seqlen_k`` as Sq / Sk.
    """
    names = ("q", "k", "v")
    _check_qkv(names, (q, k, v), ndim=3)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree on tokens and heads, got shapes {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim (last dimension) must equal q's ({q.shape[-1]}), got {k.shape[-1]}")
    _check_head_dims("q", q.shape[-1], "v", v.shape[-1])
    _check_heads(q.shape[1], k.shape[1], allow_grouped=True)
    longest_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q")
    longest_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    _validation.check_same_device(q=q, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, longest_q, "cu_seqlens_q")
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, longest_k, "cu_seqlens_k")
    dropout_p = _check_dropout(dropout_p)
    sm_scale = _check_scale("softmax_scale", softmax_scale, q.shape[-1])
    causal = _check_bool("causal", causal)
    left, right = _check_window(window_size)
    if causal:
        right = 0

    impl = _backend.resolve("flash_attn_varlen_func", q)
    if impl == "reference":
        return _reference().flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                   dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                                                   window_size=tuple(window_size))
    if impl == "torch" or q.dtype == torch.float64:
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        pieces = []
        for b in range(len(bounds_q) - 1):
            qs, ks = q[bounds_q[b]:bounds_q[b + 1]], k[bounds_k[b]:bounds_k[b + 1]]
            vs = v[bounds_k[b]:bounds_k[b + 1]]
            if qs.shape[0] == 0:
                continue
            if ks.shape[0] == 0:
                pieces.append(qs.new_zeros(qs.shape[:-1] + (v.shape[-1],)))
                continue
            out, _ = _flash_torch(qs[None], ks[None], vs[None], dropout_p, sm_scale, left, right, False)
            pieces.append(out[0])
        return torch.cat(pieces) if pieces else q.new_empty(q.shape[:-1] + (v.shape[-1],))
    seed = _draw_seed() if dropout_p > 0 else None
    out, _ = _flash_attention_forward(q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "thd",
                                      sm_scale, left, right, True, dropout_p, seed)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (python -m llmfast.compile_check): every named config of every architecture.
# ----------------------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_POINTER_TYPES = {  # pointer arguments: "io" = the input dtype, else a fixed element type
    "Q": "io", "K": "io", "V": "io", "Out": "io", "DOut": "io", "DQ": "io", "DK": "io", "DV": "io",
    "Mask": "io", "Lse": "fp32", "Delta": "fp32", "DLse": "fp32", "DS": "fp32", "CuSeqQ": "i32", "CuSeqK": "i32",
}
_FLOAT_ARGS = ("qk_scale", "sm_scale", "dropout_p")

# Feature sets compiled for each config: "causal" is the common case; "window_mask" adds every optional feature
# but dropout (a two-sided window, an additive mask, the mask gradient); "window_mask_dropout" adds dropout too,
# for the configs that serve it.
_SPEC_VARIANTS = {
    "causal": dict(IS_VARLEN=False, HAS_LEFT=False, HAS_RIGHT=True, BOTTOM_RIGHT=True, HAS_MASK=False,
                   MASK_IS_BOOL=False, DROPOUT=False, REVERSE_M=True, STORE_DS=False),
    "window": dict(IS_VARLEN=True, HAS_LEFT=True, HAS_RIGHT=True, BOTTOM_RIGHT=True, HAS_MASK=False,
                   MASK_IS_BOOL=False, DROPOUT=False, REVERSE_M=False, STORE_DS=False),
    "window_mask": dict(IS_VARLEN=False, HAS_LEFT=True, HAS_RIGHT=True, BOTTOM_RIGHT=True, HAS_MASK=True,
                        MASK_IS_BOOL=False, DROPOUT=False, REVERSE_M=False, STORE_DS=True),
    "window_mask_dropout": dict(IS_VARLEN=False, HAS_LEFT=True, HAS_RIGHT=True, BOTTOM_RIGHT=True, HAS_MASK=True,
                                MASK_IS_BOOL=False, DROPOUT=True, REVERSE_M=False, STORE_DS=True),
}
# (dtype, variant) pairs compiled for each kind of config entry.
_SPEC_CASES = {
    "": ((torch.float16, "causal"), (torch.bfloat16, "causal"), (torch.float16, "window")),
    "_extra": ((torch.float16, "window_mask"), (torch.bfloat16, "window_mask_dropout")),
    "_fp32": ((torch.float32, "causal"), (torch.float32, "window_mask_dropout")),
    "preprocess": ((torch.float16, "causal"), (torch.float32, "causal")),
}
_SPEC_KERNELS = {
    "fwd": ("attention_fwd", "_attn_fwd_kernel"),
    "bwd_preprocess": ("attention_bwd_preprocess", "_attn_bwd_preprocess_kernel"),
    "bwd_dkdv": ("attention_bwd_dkdv", "_attn_bwd_dkdv_kernel"),
    "bwd_dq": ("attention_bwd_dq", "_attn_bwd_dq_kernel"),
}


def _spec(kernel_name: str, fn, dtype: torch.dtype, config_name: str, cfg: dict, arch: int, block_d: int,
          variant: str) -> KernelSpec:
    io = _TRITON_DTYPE[dtype]
    # Read the Python signature (works for JIT and interpreted kernels alike): constexprs are annotated.
    params = inspect.signature(fn.fn).parameters
    constexpr_names = [n for n, p in params.items() if "constexpr" in str(p.annotation)]
    signature = {}
    for name in params:
        if name in constexpr_names:
            continue
        if name in _POINTER_TYPES:
            kind = _POINTER_TYPES[name]
            signature[name] = f"*{io}" if kind == "io" else f"*{kind}"
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    values = dict(_SPEC_VARIANTS[variant], WIDE_DROPOUT=False, HEAD_D=block_d, BLOCK_D=block_d, HEAD_DV=block_d,
                  BLOCK_DV=block_d,
                  FP32_IEEE=dtype == torch.float32, HAS_DLSE=False,
                  **{k: v for k, v in cfg.items() if k.startswith("BLOCK_")})
    constexprs = {name: values[name] for name in constexpr_names}
    label = config_name if config_name.endswith(f"_{io}") else f"{config_name}_{io}"
    return KernelSpec(kernel_name, fn, signature, constexprs, f"{label}_{variant}",
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], arches=(arch,),
                      expect_mma=(dtype != torch.float32 and kernel_name != "attention_bwd_preprocess"
                                  and not cfg.get("mma_sync", False)))


def compile_specs() -> list[KernelSpec]:
    """Every named config of every GPU architecture, at the dtypes and feature sets it serves."""
    specs = []
    for arch_key, arch in (("sm80", 80), ("sm90", 90)):
        for config_name, cfg in ATTENTION_CONFIGS[arch_key].items():
            kernel_key, bucket, suffix = re.fullmatch(r"(\w+?)_d(\d+)(_fp32|_extra)?", config_name).groups()
            kernel_name, fn_name = _SPEC_KERNELS[kernel_key]
            cases = _SPEC_CASES["preprocess" if kernel_key == "bwd_preprocess" else suffix or ""]
            for dtype, variant in cases:
                specs.append(_spec(kernel_name, globals()[fn_name], dtype, config_name, cfg, arch, int(bucket),
                                   variant))
    return specs
