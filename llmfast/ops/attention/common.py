"""Device helpers shared by the forward and backward kernels: dropout, casts, dots, tile loads, sequence
bounds, the key/query ranges of a causal band or window, and score masking."""
from __future__ import annotations

import triton
import triton.language as tl

from llmfast import _backend


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


# ``row * stride`` passes 2**31 with long sequences times many heads, or a (Sq, Sk) mask: row offsets are computed
# in 64 bits, in one of two forms whichever compiles with fewer registers where it is used (compile_check decides):
@triton.jit
def _at(base, start, offs, stride):
    """Pointers ``base + offs * stride`` to the rows ``offs`` of a tile that starts at row ``start``: the tile's
    start in 64 bits (one scalar), the offsets inside the tile in 32 bits. For tiles loaded once."""
    return (base + tl.cast(start, tl.int64) * stride) + (offs - start) * stride


@triton.jit
def _at64(base, offs, stride):
    """Pointers ``base + offs * stride`` with the offsets in 64 bits. For the tiles of a loop: the form above would
    let the compiler hoist the loop-invariant in-tile offsets out of the loop and keep them live in registers."""
    return base + offs.to(tl.int64) * stride


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
def _tanh(x):
    """tanh in fp32 to a few ulps on every backend (libdevice is not available in the interpreter).

    ``1 - 2 / (exp(2x) + 1)`` saturates cleanly (exp2 overflowing to inf gives 1, underflowing to 0 gives -1) but
    loses relative accuracy near 0 to cancellation, so small arguments take the Taylor series instead (at
    |x| < 0.25 its first omitted term is below 1e-8 relative)."""
    e = tl.math.exp2(x * 2.8853900817779268)  # exp(2x)
    big = 1.0 - 2.0 / (e + 1.0)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                    + x2 * 0.021869488536155203))))
    return tl.where(tl.abs(x) < 0.25, small, big)


@triton.jit
def _alibi_slope2(Alibi, b, h, stride_ab, ALIBI: tl.constexpr):
    """ALiBi slope of (batch b, query head h) times log2(e) (scores are in base 2); 0 without ALiBi. The slopes
    are (B, H) float32 with ``stride_ab`` 0 for a shared (H,) vector."""
    if ALIBI:
        slope = tl.load(Alibi + b.to(tl.int64) * stride_ab + h) * 1.4426950408889634
    else:
        slope = 0.0
    return slope


@triton.jit
def _softcap(qk, softcap_in, SOFTCAP: tl.constexpr):
    """``tanh(qk * scale / softcap)`` under logit soft-capping (the caller's score scale is then softcap * log2(e)
    instead of scale * log2(e)); ``qk`` unchanged otherwise."""
    if SOFTCAP:
        qk = _tanh(qk * softcap_in)
    return qk


@triton.jit
def _scores(qk, qk_scale, mask_ptrs, mask_ok, rows, cols, seqlen_k, diag, window_left, window_right, alibi2,
            HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, EDGE: tl.constexpr, HAS_LEFT: tl.constexpr,
            HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr, ALIBI_INT: tl.constexpr = False):
    """Scaled scores in base 2 with every disallowed element at -inf. ``rows``/``cols`` are broadcastable index
    tensors shaped like ``qk`` (query index, key index), so the same code serves S and its transpose. ALiBi adds
    ``-slope * |i + diag - j|`` (``alibi2``: the slope times log2(e); flash-attn's bottom-right ``diag``). The
    distance is formed in float (the index vectors convert once) or, with ``ALIBI_INT``, in int32: both exact, and
    which one ptxas allocates without spills differs per kernel (the compile check decides)."""
    s = qk * qk_scale
    if ALIBI:
        if ALIBI_INT:
            s -= alibi2 * tl.abs(rows + diag - cols).to(tl.float32)
        else:
            s -= alibi2 * tl.abs((rows + diag).to(tl.float32) - cols.to(tl.float32))
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
