"""Triton softmax, log-softmax and fused scale/mask softmax, forward and backward, along any dim.

Softmax is memory-bound: the kernels aim to read each element once and write it once, with fp32 math whatever the
input dtype. Three shapes of work, all the same few kernels at different tiles:

* **short rows** (up to a few hundred columns): several rows per program, so each program still moves a few
  thousand elements and the launch is not dominated by tiny programs;
* **rows that fit a block** (up to ``MAX_SINGLE_PASS_COLS``): one program holds whole rows in registers, reads
  once, writes once;
* **long rows** (any length beyond that, 10^6 and more): a looped *online* softmax. A program loops over the row
  keeping a running max and a running sum of ``exp(x - max)`` per lane (the sum is rescaled whenever the max
  grows), then loops again to write the output; the second read mostly hits L2, which still holds the row the
  program just read. When there are too few rows to fill the GPU, rows are cut into segments: a first kernel
  writes each segment's (max, sum), a second merges them and normalises its segment.

Rows are addressed through strides, so softmax along a dim that is not the last one runs in place on the
original layout (the "strided" tiles put consecutive rows, which are contiguous in memory, along the tile's first
axis so loads stay coalesced) instead of paying for a transposed copy.

The leading dims of every tensor involved (input, output, mask, gradients) are collapsed into at most three
levels ``(outer, middle, inner)``; a program handles a block of consecutive ``inner`` rows of one
``(outer, middle)`` pair, which is how a broadcast mask such as ``(B, 1, S, S)`` is read without being
materialised.

Special values follow torch: a row of all ``-inf`` gives NaN from ``softmax``/``log_softmax``; in
``masked_softmax`` a row with no finite score after scaling and masking gives zeros (and zero gradient).
float64 inputs are served by torch's native kernels (the Triton kernels compute in fp32).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from llmfast import _backend, _validation
from llmfast.ops._arch import config_arch, multiprocessor_count
from llmfast.ops._spec import KernelSpec
from llmfast.reference import softmax as reference

# ----------------------------------------------------------------------------------------------------------------
# Tuning: every tile the kernels can be launched with is listed here, and ``compile_specs`` builds all of them.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tile:
    """A program's tile: ``block_r`` rows by ``block_c`` columns, on ``num_warps`` warps."""

    block_r: int
    block_c: int
    num_warps: int


# These tiles serve every architecture and the interpreter alike (the tests run the shipped tiles); the config
# arch (llmfast.ops._arch.config_arch, LLMFAST_CONFIG_ARCH) only sets how many programs the looped kernels aim for.
# Rows along the last dim (columns contiguous): several short rows per program (2048 elements), then one row per
# program with more warps as rows grow, 16-32 values per thread. Rows shorter than 16 use the 16-column tile.
# A 32768-column row spills on sm_90 even at 16 or 32 warps, so longer rows take the looped kernels.
MAX_SINGLE_PASS_COLS = 16384
MAX_SINGLE_PASS_COLS_MASKED = 8192  # the mask's loads make ptxas spill at 16384 columns (bf16, sm_90)
ROW_TILES: dict[str, Tile] = {
    "row_c16": Tile(128, 16, 4),
    "row_c32": Tile(64, 32, 4),
    "row_c64": Tile(32, 64, 4),
    "row_c128": Tile(16, 128, 4),
    "row_c256": Tile(8, 256, 4),
    "row_c512": Tile(4, 512, 8),
    "row_c1024": Tile(2, 1024, 8),
    "row_c2048": Tile(1, 2048, 4),
    "row_c4096": Tile(1, 4096, 8),
    "row_c8192": Tile(1, 8192, 8),
    "row_c16384": Tile(1, 16384, 32),
}
# Rows along another dim (columns strided, consecutive rows contiguous): the tile's first axis runs over
# consecutive rows so loads coalesce: 32 rows (a 128-byte line of fp32) up to 128 columns, then 16 and 8 rows
# (a 32-byte sector). With fewer than MIN_STRIDED_ROWS such rows the row tiles serve, columns read by stride;
# so do masked inputs (the mask variants are built for the row tiles only).
MIN_STRIDED_ROWS = 8
MAX_SINGLE_PASS_STRIDED_COLS = 1024
STRIDED_TILES: dict[str, Tile] = {
    "strided_c32": Tile(32, 32, 4),
    "strided_c128": Tile(32, 128, 8),
    "strided_c256": Tile(16, 256, 8),
    "strided_c512": Tile(8, 512, 8),
    "strided_c1024": Tile(8, 1024, 16),
}
# Long rows: the looped online-softmax kernels, a block of columns per iteration.
LOOPED_TILES: dict[str, Tile] = {
    "looped_row": Tile(1, 2048, 8),  # 4096 columns: ptxas spills in the fp32 backward (launch specialization)
    "looped_strided": Tile(32, 128, 8),
}
# Segments per row in the looped kernels: enough programs to fill the GPU, at most MAX_SEGMENTS (a merge block).
MAX_SEGMENTS = 64
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4  # the interpreter runs programs one by one: few segments, but still more than one

# Mask modes (constexpr): scores are x * scale, then a boolean mask (True = keep) or an additive mask.
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------
# Kernels
#
# Runtime flags (causal, zero_empty_rows, segmented, q_len) are excluded from Triton's specialisation of ints equal
# to 1, so each kernel compiles once per tile and dtype: the variants compile_specs lists.
# ----------------------------------------------------------------------------------------------------------------


# Triton's interpreter truncates fp32 -> bf16 where GPUs round to nearest even; under the interpreter the kernels
# round on the bits first (the cast is then exact), so the tests see the values a GPU produces. On a GPU the
# native conversion runs (the emulation would make ptxas spill).
EMULATE_BF16_ROUNDING = tl.constexpr(_backend.triton_interpreter_enabled())


@triton.jit
def cast_out(y, OUT_DTYPE: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even."""
    if EMULATE_BF16_ROUNDING and OUT_DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))  # noqa: PLR0124 (NaN test)
    return y.to(OUT_DTYPE)


@triton.jit
def _program_rows(pid, n_mid, n_inner, BLOCK_R: tl.constexpr):
    """Split a program id into (outer, middle) indices and the block of inner rows it owns."""
    n_row_blocks = tl.cdiv(n_inner, BLOCK_R)
    row_block = pid % n_row_blocks
    outer_mid = pid // n_row_blocks
    mid = (outer_mid % n_mid).to(tl.int64)
    outer = (outer_mid // n_mid).to(tl.int64)
    rows = (row_block * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    return outer, mid, rows


@triton.jit
def _tile_ptrs(ptr, outer, mid, rows, cols, s_outer, s_mid, s_row, s_col):
    """Pointers to a [rows, cols] tile: 64-bit row starts plus 32-bit column offsets (the launcher guarantees
    n_cols * s_col < 2**31), which keeps register use low."""
    return (ptr + (outer * s_outer + mid * s_mid + rows * s_row))[:, None] + (cols * s_col)[None, :]


@triton.jit
def _scores(x_ptrs, mask_ptrs, valid, rows, cols, n_cols, scale, causal, q_len, MASK_MODE: tl.constexpr):
    """The fp32 scores of a tile: x * scale, then the mask and the causal limit; -inf outside the row."""
    s = tl.load(x_ptrs, mask=valid, other=0.0).to(tl.float32) * scale
    if MASK_MODE == 1:
        keep = tl.load(mask_ptrs, mask=valid, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    if MASK_MODE == 2:
        s += tl.load(mask_ptrs, mask=valid, other=0.0).to(tl.float32)
    # causal: key j of query i is visible when j <= i, with i the row's index along dim -2 (rows are row-major
    # over the leading dims, so that index is the row number modulo the query length).
    last_visible = tl.where(causal != 0, rows % q_len, n_cols)
    visible = cols[None, :] <= last_visible[:, None]
    return tl.where(valid & visible, s, float("-inf"))


@triton.jit(do_not_specialize=["causal", "q_len", "zero_empty_rows"])
def _softmax_fwd_kernel(
    out_ptr, x_ptr, mask_ptr,
    n_mid, n_inner, n_cols,
    x_s_outer, x_s_mid, x_s_row, x_s_col,
    out_s_outer, out_s_mid, out_s_row, out_s_col,
    mask_s_outer, mask_s_mid, mask_s_row, mask_s_col,
    scale, causal, q_len, zero_empty_rows,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, LOG: tl.constexpr, MASK_MODE: tl.constexpr,
):
    """Whole rows in one tile: read once, reduce max and sum in registers, write once."""
    outer, mid, rows = _program_rows(tl.program_id(0), n_mid, n_inner, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    valid = (rows < n_inner)[:, None] & (cols < n_cols)[None, :]
    x_ptrs = _tile_ptrs(x_ptr, outer, mid, rows, cols, x_s_outer, x_s_mid, x_s_row, x_s_col)
    mask_ptrs = _tile_ptrs(mask_ptr, outer, mid, rows, cols, mask_s_outer, mask_s_mid, mask_s_row, mask_s_col)
    s = _scores(x_ptrs, mask_ptrs, valid, rows, cols, n_cols, scale, causal, q_len, MASK_MODE)

    # Subtracting the row max keeps exp() in range; a row of all -inf gives NaN here, as in torch.
    row_max = tl.max(s, axis=1)
    shifted = s - row_max[:, None]
    e = tl.exp(shifted)
    row_sum = tl.sum(e, axis=1)
    if LOG:
        y = shifted - tl.log(row_sum)[:, None]
    else:
        y = e * (1.0 / row_sum)[:, None]
    # masked_softmax: rows with nothing left to attend to give zeros instead of NaN.
    empty = (row_max == float("-inf")) & (zero_empty_rows != 0)
    y = tl.where(empty[:, None], 0.0, y)
    out_ptrs = _tile_ptrs(out_ptr, outer, mid, rows, cols, out_s_outer, out_s_mid, out_s_row, out_s_col)
    tl.store(out_ptrs, cast_out(y, out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _softmax_bwd_kernel(
    dx_ptr, y_ptr, dy_ptr,
    n_mid, n_inner, n_cols,
    dx_s_outer, dx_s_mid, dx_s_row, dx_s_col,
    y_s_outer, y_s_mid, y_s_row, y_s_col,
    dy_s_outer, dy_s_mid, dy_s_row, dy_s_col,
    scale,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, LOG: tl.constexpr,
):
    """Whole rows in one tile. softmax: dx = y * (dy - sum(dy * y)); log-softmax: dx = dy - exp(y) * sum(dy)."""
    outer, mid, rows = _program_rows(tl.program_id(0), n_mid, n_inner, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    valid = (rows < n_inner)[:, None] & (cols < n_cols)[None, :]
    y_ptrs = _tile_ptrs(y_ptr, outer, mid, rows, cols, y_s_outer, y_s_mid, y_s_row, y_s_col)
    dy_ptrs = _tile_ptrs(dy_ptr, outer, mid, rows, cols, dy_s_outer, dy_s_mid, dy_s_row, dy_s_col)
    y = tl.load(y_ptrs, mask=valid, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptrs, mask=valid, other=0.0).to(tl.float32)
    if LOG:
        dx = dy - tl.exp(y) * tl.sum(dy, axis=1)[:, None]
    else:
        dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
    dx_ptrs = _tile_ptrs(dx_ptr, outer, mid, rows, cols, dx_s_outer, dx_s_mid, dx_s_row, dx_s_col)
    tl.store(dx_ptrs, cast_out(dx * scale, dx_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _segment_program(pid, n_segments, n_mid, n_inner, BLOCK_R: tl.constexpr):
    """Looped kernels: a program owns one segment of a block of rows; also returns the rows' flat ids."""
    segment = pid % n_segments
    outer, mid, rows = _program_rows(pid // n_segments, n_mid, n_inner, BLOCK_R)
    flat_rows = (outer * n_mid + mid) * n_inner + rows
    return segment, outer, mid, rows, flat_rows


@triton.jit
def _online_stats(x_ptr, mask_ptr, outer, mid, rows, row_ok, col_start, length, n_cols,
                  x_s_outer, x_s_mid, x_s_row, x_s_col, mask_s_outer, mask_s_mid, mask_s_row, mask_s_col,
                  scale, causal, q_len, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MASK_MODE: tl.constexpr):
    """Online softmax statistics of columns [col_start, col_start + length): max and sum(exp(s - max)), one read.

    Each lane keeps its own running max and sum (the sum is rescaled when the max grows), so there is no
    cross-lane reduction inside the loop and loads stream; lanes are merged once at the end.
    """
    run_max = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for start in range(0, length, BLOCK_C):
        cols = col_start + start + tl.arange(0, BLOCK_C)
        valid = row_ok[:, None] & (cols < n_cols)[None, :]
        x_ptrs = _tile_ptrs(x_ptr, outer, mid, rows, cols, x_s_outer, x_s_mid, x_s_row, x_s_col)
        mask_ptrs = _tile_ptrs(mask_ptr, outer, mid, rows, cols, mask_s_outer, mask_s_mid, mask_s_row, mask_s_col)
        s = _scores(x_ptrs, mask_ptrs, valid, rows, cols, n_cols, scale, causal, q_len, MASK_MODE)
        new_max = tl.maximum(run_max, s, propagate_nan=tl.PropagateNan.ALL)  # NaN must stick
        # A lane that has seen only -inf keeps sum 0 (exp(-inf - -inf) would be NaN).
        seen = new_max != float("-inf")
        run_sum = tl.where(seen, run_sum * tl.exp(run_max - new_max) + tl.exp(s - new_max), 0.0)
        run_max = new_max
    row_max = tl.max(run_max, axis=1)
    lane_weight = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_max - row_max[:, None]))
    return row_max, tl.sum(run_sum * lane_weight, axis=1)


@triton.jit(do_not_specialize=["causal", "q_len"])
def _softmax_fwd_stats_kernel(
    max_ptr, sum_ptr, x_ptr, mask_ptr,
    n_mid, n_inner, n_cols, n_segments, segment_len,
    x_s_outer, x_s_mid, x_s_row, x_s_col,
    mask_s_outer, mask_s_mid, mask_s_row, mask_s_col,
    scale, causal, q_len,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MASK_MODE: tl.constexpr,
):
    """Long rows split into segments, first pass: each segment's (max, sum) into a small fp32 buffer."""
    segment, outer, mid, rows, flat_rows = _segment_program(tl.program_id(0), n_segments, n_mid, n_inner, BLOCK_R)
    row_ok = rows < n_inner
    seg_max, seg_sum = _online_stats(
        x_ptr, mask_ptr, outer, mid, rows, row_ok, segment * segment_len, segment_len, n_cols,
        x_s_outer, x_s_mid, x_s_row, x_s_col, mask_s_outer, mask_s_mid, mask_s_row, mask_s_col,
        scale, causal, q_len, BLOCK_R, BLOCK_C, MASK_MODE)
    stat_off = flat_rows * n_segments + segment
    tl.store(max_ptr + stat_off, seg_max, mask=row_ok)
    tl.store(sum_ptr + stat_off, seg_sum, mask=row_ok)


@triton.jit
def _merge_segment_stats(max_ptr, sum_ptr, flat_rows, row_ok, n_segments, MAX_SEGS: tl.constexpr):
    """Merge the per-segment (max, sum) pairs of each row into the row's max and sum."""
    segs = tl.arange(0, MAX_SEGS)
    ok = row_ok[:, None] & (segs < n_segments)[None, :]
    off = flat_rows[:, None] * n_segments + segs[None, :]
    seg_max = tl.load(max_ptr + off, mask=ok, other=float("-inf"))
    seg_sum = tl.load(sum_ptr + off, mask=ok, other=0.0)
    row_max = tl.max(seg_max, axis=1)
    weight = tl.where(seg_max == float("-inf"), 0.0, tl.exp(seg_max - row_max[:, None]))
    return row_max, tl.sum(seg_sum * weight, axis=1)


@triton.jit(do_not_specialize=["causal", "q_len", "zero_empty_rows", "segmented"])
def _softmax_fwd_looped_kernel(
    out_ptr, x_ptr, mask_ptr, max_ptr, sum_ptr,
    n_mid, n_inner, n_cols, n_segments, segment_len,
    x_s_outer, x_s_mid, x_s_row, x_s_col,
    out_s_outer, out_s_mid, out_s_row, out_s_col,
    mask_s_outer, mask_s_mid, mask_s_row, mask_s_col,
    scale, causal, q_len, zero_empty_rows,
    segmented,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, LOG: tl.constexpr, MASK_MODE: tl.constexpr,
    MAX_SEGS: tl.constexpr,
):
    """Looped online softmax for long rows: get the row's (max, sum), then loop again to write the output.

    ``segmented == 0``: one program per row block loops over the whole row twice; the second read comes from
    L2, which still holds the row the program just read. ``segmented != 0`` (few rows): the statistics come
    from ``_softmax_fwd_stats_kernel`` and this program writes only its segment.
    """
    segment, outer, mid, rows, flat_rows = _segment_program(tl.program_id(0), n_segments, n_mid, n_inner, BLOCK_R)
    row_ok = rows < n_inner
    if segmented != 0:
        row_max, row_sum = _merge_segment_stats(max_ptr, sum_ptr, flat_rows, row_ok, n_segments, MAX_SEGS)
    else:
        row_max, row_sum = _online_stats(
            x_ptr, mask_ptr, outer, mid, rows, row_ok, 0, n_cols, n_cols,
            x_s_outer, x_s_mid, x_s_row, x_s_col, mask_s_outer, mask_s_mid, mask_s_row, mask_s_col,
            scale, causal, q_len, BLOCK_R, BLOCK_C, MASK_MODE)
    # All -inf row: row_max = -inf and row_sum = 0, so the output is NaN as in torch (or 0 for masked_softmax).
    log_sum = tl.log(row_sum)
    inv_sum = 1.0 / row_sum
    empty = (row_max == float("-inf")) & (zero_empty_rows != 0)
    seg_start = segment * segment_len
    for start in range(0, segment_len, BLOCK_C):
        cols = seg_start + start + tl.arange(0, BLOCK_C)
        valid = row_ok[:, None] & (cols < n_cols)[None, :]
        x_ptrs = _tile_ptrs(x_ptr, outer, mid, rows, cols, x_s_outer, x_s_mid, x_s_row, x_s_col)
        mask_ptrs = _tile_ptrs(mask_ptr, outer, mid, rows, cols, mask_s_outer, mask_s_mid, mask_s_row, mask_s_col)
        s = _scores(x_ptrs, mask_ptrs, valid, rows, cols, n_cols, scale, causal, q_len, MASK_MODE)
        shifted = s - row_max[:, None]
        if LOG:
            y = shifted - log_sum[:, None]
        else:
            y = tl.exp(shifted) * inv_sum[:, None]
        y = tl.where(empty[:, None], 0.0, y)
        out_ptrs = _tile_ptrs(out_ptr, outer, mid, rows, cols, out_s_outer, out_s_mid, out_s_row, out_s_col)
        tl.store(out_ptrs, cast_out(y, out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _partial_dot(y_ptr, dy_ptr, outer, mid, rows, row_ok, col_start, length, n_cols,
                 y_s_outer, y_s_mid, y_s_row, y_s_col, dy_s_outer, dy_s_mid, dy_s_row, dy_s_col,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, LOG: tl.constexpr):
    """sum(dy * y) (softmax) or sum(dy) (log-softmax) over columns [col_start, col_start + length)."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for start in range(0, length, BLOCK_C):
        cols = col_start + start + tl.arange(0, BLOCK_C)
        valid = row_ok[:, None] & (cols < n_cols)[None, :]
        dy = tl.load(_tile_ptrs(dy_ptr, outer, mid, rows, cols, dy_s_outer, dy_s_mid, dy_s_row, dy_s_col),
                     mask=valid, other=0.0).to(tl.float32)
        if LOG:
            acc += dy
        else:
            y = tl.load(_tile_ptrs(y_ptr, outer, mid, rows, cols, y_s_outer, y_s_mid, y_s_row, y_s_col),
                        mask=valid, other=0.0).to(tl.float32)
            acc += dy * y
    return tl.sum(acc, axis=1)


@triton.jit
def _softmax_bwd_stats_kernel(
    dot_ptr, y_ptr, dy_ptr,
    n_mid, n_inner, n_cols, n_segments, segment_len,
    y_s_outer, y_s_mid, y_s_row, y_s_col,
    dy_s_outer, dy_s_mid, dy_s_row, dy_s_col,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, LOG: tl.constexpr,
):
    """Backward, long rows split into segments, first pass: each segment's partial sum into a buffer."""
    segment, outer, mid, rows, flat_rows = _segment_program(tl.program_id(0), n_segments, n_mid, n_inner, BLOCK_R)
    row_ok = rows < n_inner
    dot = _partial_dot(y_ptr, dy_ptr, outer, mid, rows, row_ok, segment * segment_len, segment_len, n_cols,
                       y_s_outer, y_s_mid, y_s_row, y_s_col, dy_s_outer, dy_s_mid, dy_s_row, dy_s_col,
                       BLOCK_R, BLOCK_C, LOG)
    tl.store(dot_ptr + flat_rows * n_segments + segment, dot, mask=row_ok)


@triton.jit(do_not_specialize=["segmented"])
def _softmax_bwd_looped_kernel(
    dx_ptr, y_ptr, dy_ptr, dot_ptr,
    n_mid, n_inner, n_cols, n_segments, segment_len,
    dx_s_outer, dx_s_mid, dx_s_row, dx_s_col,
    y_s_outer, y_s_mid, y_s_row, y_s_col,
    dy_s_outer, dy_s_mid, dy_s_row, dy_s_col,
    scale,
    segmented,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, LOG: tl.constexpr, MAX_SEGS: tl.constexpr,
):
    """Backward for long rows: the row's sum (looped here, or merged from the segments), then dx."""
    segment, outer, mid, rows, flat_rows = _segment_program(tl.program_id(0), n_segments, n_mid, n_inner, BLOCK_R)
    row_ok = rows < n_inner
    if segmented != 0:
        segs = tl.arange(0, MAX_SEGS)
        ok = row_ok[:, None] & (segs < n_segments)[None, :]
        dot = tl.sum(tl.load(dot_ptr + flat_rows[:, None] * n_segments + segs[None, :], mask=ok, other=0.0), axis=1)
    else:
        dot = _partial_dot(y_ptr, dy_ptr, outer, mid, rows, row_ok, 0, n_cols, n_cols,
                           y_s_outer, y_s_mid, y_s_row, y_s_col, dy_s_outer, dy_s_mid, dy_s_row, dy_s_col,
                           BLOCK_R, BLOCK_C, LOG)
    seg_start = segment * segment_len
    for start in range(0, segment_len, BLOCK_C):
        cols = seg_start + start + tl.arange(0, BLOCK_C)
        valid = row_ok[:, None] & (cols < n_cols)[None, :]
        y = tl.load(_tile_ptrs(y_ptr, outer, mid, rows, cols, y_s_outer, y_s_mid, y_s_row, y_s_col),
                    mask=valid, other=0.0).to(tl.float32)
        dy = tl.load(_tile_ptrs(dy_ptr, outer, mid, rows, cols, dy_s_outer, dy_s_mid, dy_s_row, dy_s_col),
                     mask=valid, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * dot[:, None]
        else:
            dx = y * (dy - dot[:, None])
        dx_ptrs = _tile_ptrs(dx_ptr, outer, mid, rows, cols, dx_s_outer, dx_s_mid, dx_s_row, dx_s_col)
        tl.store(dx_ptrs, cast_out(dx * scale, dx_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------------------------
# Launch planning: collapse the leading dims, pick a tile, pick segments
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Rows:
    """Leading dims collapsed into (outer, mid, inner) levels; ``strides[i]`` is tensor i's (outer, mid, inner, col)."""

    n_outer: int
    n_mid: int
    n_inner: int
    n_cols: int
    strides: list[tuple[int, int, int, int]]


def _collapse_rows(tensors: Sequence[torch.Tensor]) -> _Rows | None:
    """Merge the leading dims of same-shaped tensors (reduction dim last) into at most 3 levels, or None.

    Returns None when that needs more levels or a column stride too large for 32-bit offsets.
    Two adjacent dims merge when every tensor steps through them as through one dim (stride of the outer one =
    stride of the inner one x its size), so broadcast (stride-0) dims merge only with other broadcast dims.
    """
    shape = tensors[0].shape
    levels: list[tuple[int, list[int]]] = []
    for d in range(len(shape) - 1):
        size = shape[d]
        if size == 1:
            continue
        strides = [t.stride(d) for t in tensors]
        if levels and all(prev == cur * size for prev, cur in zip(levels[-1][1], strides)):
            levels[-1] = (levels[-1][0] * size, strides)
        else:
            levels.append((size, strides))
    if len(levels) > 3:
        return None
    if any((shape[-1] - 1) * abs(t.stride(-1)) >= 2**31 for t in tensors):
        return None  # the kernels' column offsets are 32-bit
    while len(levels) < 3:
        levels.insert(0, (1, [0] * len(tensors)))
    per_tensor = [
        (levels[0][1][i], levels[1][1][i], levels[2][1][i], t.stride(-1) if t.shape[-1] != 1 else 1)
        for i, t in enumerate(tensors)
    ]
    return _Rows(levels[0][0], levels[1][0], levels[2][0], shape[-1], per_tensor)


def pick_tile(n_cols: int, strided: bool, masked: bool = False) -> tuple[str, Tile, bool]:
    """The tile for rows of ``n_cols``: (config name, tile, looped). ``strided``: consecutive rows, not columns,
    are contiguous (and no mask is read); ``masked``: a mask tensor is read along with x."""
    if strided:
        if n_cols <= MAX_SINGLE_PASS_STRIDED_COLS:
            width = triton.next_power_of_2(n_cols)
            name = next(n for n, t in STRIDED_TILES.items() if t.block_c >= width)
            return name, STRIDED_TILES[name], False
        return "looped_strided", LOOPED_TILES["looped_strided"], True
    if n_cols <= (MAX_SINGLE_PASS_COLS_MASKED if masked else MAX_SINGLE_PASS_COLS):
        name = f"row_c{max(16, triton.next_power_of_2(n_cols))}"
        return name, ROW_TILES[name], False
    return "looped_row", LOOPED_TILES["looped_row"], True


def target_programs(device: torch.device) -> int:
    """Programs the looped kernels aim for on ``device``: PROGRAMS_PER_SM per SM of the config arch's card
    (``LLMFAST_CONFIG_ARCH`` forces one), INTERPRETER_PROGRAMS in the interpreter."""
    sms = multiprocessor_count(device, config_arch(device))
    return INTERPRETER_PROGRAMS if sms is None else PROGRAMS_PER_SM * sms


def _segments(n_row_programs: int, n_cols: int, block_c: int, device: torch.device) -> tuple[int, int]:
    """(segments per row, columns per segment) for the looped kernels: enough programs to fill the device."""
    target = target_programs(device)
    n_blocks = triton.cdiv(n_cols, block_c)
    wanted = min(MAX_SEGMENTS, n_blocks, max(1, triton.cdiv(target, n_row_programs)))
    segment_len = triton.cdiv(n_blocks, wanted) * block_c
    return triton.cdiv(n_cols, segment_len), segment_len


def _is_strided(rows: _Rows, tensor: int) -> bool:
    """Use the strided tiles when the rows, not the columns, are the contiguous direction of ``tensor``."""
    _, _, s_row, s_col = rows.strides[tensor]
    return s_col != 1 and rows.n_cols > 1 and s_row == 1 and rows.n_inner >= MIN_STRIDED_ROWS


def _grid_rows(rows: _Rows, tile: Tile) -> int:
    return rows.n_outer * rows.n_mid * triton.cdiv(rows.n_inner, tile.block_r)


def _launch_config(tile: Tile, n_segments: int = 1) -> dict[str, int]:
    return {"BLOCK_R": tile.block_r, "BLOCK_C": tile.block_c, "num_warps": tile.num_warps, "segments": n_segments}


def _as_kernel_arg(t: torch.Tensor) -> torch.Tensor:
    # Triton loads booleans as bytes; viewing the mask as uint8 costs nothing.
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _run_forward(x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None, *, op: str, log: bool,
                 scale: float, causal: bool, q_len: int, zero_empty_rows: bool) -> None:
    """Launch the forward kernels on views with the reduction dim last (``mask`` already expanded to x)."""
    tensors = [x, out] + ([mask] if mask is not None else [])
    rows = _collapse_rows(tensors)
    assert rows is not None, "caller makes the tensors collapsible"
    mask_mode = MASK_NONE if mask is None else MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
    mask_arg = _as_kernel_arg(mask) if mask is not None else x
    mask_strides = rows.strides[2] if mask is not None else (0, 0, 0, 0)
    _, tile, looped = pick_tile(rows.n_cols, mask is None and _is_strided(rows, 0), masked=mask is not None)
    row_programs = _grid_rows(rows, tile)
    common = {"scale": float(scale), "causal": int(causal), "q_len": max(1, q_len)}
    if not looped:
        _backend.record_kernel_launch(f"{op}_fwd", _launch_config(tile))
        _softmax_fwd_kernel[(row_programs,)](
            out, x, mask_arg, rows.n_mid, rows.n_inner, rows.n_cols,
            *rows.strides[0], *rows.strides[1], *mask_strides, **common, zero_empty_rows=int(zero_empty_rows),
            BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, LOG=log, MASK_MODE=mask_mode, num_warps=tile.num_warps)
        return
    n_segments, segment_len = _segments(row_programs, rows.n_cols, tile.block_c, x.device)
    grid = (row_programs * n_segments,)
    seg_max = seg_sum = x  # placeholders: with one segment the looped kernel gathers its own statistics
    if n_segments > 1:
        seg_max = torch.empty(rows.n_outer * rows.n_mid * rows.n_inner * n_segments, device=x.device,
                              dtype=torch.float32)
        seg_sum = torch.empty_like(seg_max)
        _backend.record_kernel_launch(f"{op}_fwd_looped_stats", _launch_config(tile, n_segments))
        _softmax_fwd_stats_kernel[grid](
            seg_max, seg_sum, x, mask_arg, rows.n_mid, rows.n_inner, rows.n_cols, n_segments, segment_len,
            *rows.strides[0], *mask_strides, **common,
            BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, MASK_MODE=mask_mode, num_warps=tile.num_warps)
    _backend.record_kernel_launch(f"{op}_fwd_looped", _launch_config(tile, n_segments))
    _softmax_fwd_looped_kernel[grid](
        out, x, mask_arg, seg_max, seg_sum, rows.n_mid, rows.n_inner, rows.n_cols, n_segments, segment_len,
        *rows.strides[0], *rows.strides[1], *mask_strides, **common, zero_empty_rows=int(zero_empty_rows),
        segmented=int(n_segments > 1), BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, LOG=log, MASK_MODE=mask_mode,
        MAX_SEGS=MAX_SEGMENTS, num_warps=tile.num_warps)


def _run_backward(y: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, *, op: str, log: bool, scale: float) -> None:
    """Launch the backward kernels on views with the reduction dim last."""
    rows = _collapse_rows([dx, y, dy])
    assert rows is not None, "caller makes the tensors collapsible"
    # Tile chosen on y's layout (the saved output has the input's layout).
    _, tile, looped = pick_tile(rows.n_cols, _is_strided(rows, 1))
    row_programs = _grid_rows(rows, tile)
    if not looped:
        _backend.record_kernel_launch(f"{op}_bwd", _launch_config(tile))
        _softmax_bwd_kernel[(row_programs,)](
            dx, y, dy, rows.n_mid, rows.n_inner, rows.n_cols, *rows.strides[0], *rows.strides[1], *rows.strides[2],
            float(scale), BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, LOG=log, num_warps=tile.num_warps)
        return
    n_segments, segment_len = _segments(row_programs, rows.n_cols, tile.block_c, y.device)
    grid = (row_programs * n_segments,)
    dot = y  # placeholder: with one segment the looped kernel computes its own sum
    if n_segments > 1:
        dot = torch.empty(rows.n_outer * rows.n_mid * rows.n_inner * n_segments, device=y.device,
                          dtype=torch.float32)
        _backend.record_kernel_launch(f"{op}_bwd_looped_stats", _launch_config(tile, n_segments))
        _softmax_bwd_stats_kernel[grid](
            dot, y, dy, rows.n_mid, rows.n_inner, rows.n_cols, n_segments, segment_len, *rows.strides[1],
            *rows.strides[2], BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, LOG=log, num_warps=tile.num_warps)
    _backend.record_kernel_launch(f"{op}_bwd_looped", _launch_config(tile, n_segments))
    _softmax_bwd_looped_kernel[grid](
        dx, y, dy, dot, rows.n_mid, rows.n_inner, rows.n_cols, n_segments, segment_len, *rows.strides[0],
        *rows.strides[1], *rows.strides[2], float(scale), int(n_segments > 1), BLOCK_R=tile.block_r,
        BLOCK_C=tile.block_c, LOG=log, MAX_SEGS=MAX_SEGMENTS, num_warps=tile.num_warps)


def _last(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A view of ``t`` with ``dim`` moved last (no copy)."""
    return t.movedim(dim, -1) if dim != t.dim() - 1 else t


def _forward(x: torch.Tensor, dim: int, mask: torch.Tensor | None, *, op: str, log: bool, scale: float = 1.0,
             causal: bool = False, zero_empty_rows: bool = False) -> torch.Tensor:
    """Allocate the output in x's layout and run the forward kernels along ``dim``."""
    kw = {"op": op, "log": log, "scale": scale, "causal": causal, "q_len": x.shape[-2] if causal else 1,
          "zero_empty_rows": zero_empty_rows}
    out = torch.empty_like(x)
    mask = mask.expand(x.shape) if mask is not None else None
    views = [_last(t, dim) for t in (x, out, mask) if t is not None]
    if _collapse_rows(views) is not None:
        _run_forward(*views[:2], views[2] if mask is not None else None, **kw)
        return out
    # Unusual strides (more than three levels of leading dims, or 32-bit column offsets could overflow): dense
    # copies with the softmax dim innermost always collapse.
    xv = _last(x, dim).contiguous()
    mv = _last(mask, dim).contiguous() if mask is not None else None
    ov = torch.empty_like(xv)
    _run_forward(xv, ov, mv, **kw)
    return ov.movedim(-1, dim)


def _backward(y: torch.Tensor, dy: torch.Tensor, dim: int, *, op: str, log: bool, scale: float = 1.0
              ) -> torch.Tensor:
    """dx for the saved output ``y`` (in x's layout) and the incoming gradient ``dy`` (any strides)."""
    dx = torch.empty_like(y)
    views = [_last(t, dim) for t in (y, dy, dx)]
    if _collapse_rows(views[::-1]) is not None:
        _run_backward(*views, op=op, log=log, scale=scale)
        return dx
    yv, dyv = _last(y, dim).contiguous(), _last(dy, dim).contiguous()
    dxv = torch.empty_like(yv)
    _run_backward(yv, dyv, dxv, op=op, log=log, scale=scale)
    return dxv.movedim(-1, dim)


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


class _SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
        op = "log_softmax" if log else "softmax"
        y = _forward(x, dim, None, op=op, log=log)
        ctx.save_for_backward(y)
        ctx.dim, ctx.log, ctx.op = dim, log, op
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        return _backward(y, dy, ctx.dim, op=ctx.op, log=ctx.log), None, None


class _MaskedSoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool, dim: int
                ) -> torch.Tensor:
        y = _forward(x, dim, mask, op="masked_softmax", log=False, scale=scale, causal=causal, zero_empty_rows=True)
        ctx.save_for_backward(y)
        ctx.dim, ctx.scale = dim, scale
        ctx.mask_shape = mask.shape if mask is not None else None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            # An additive mask (e.g. a learned bias) gets d(score) summed over its broadcast dims; x gets scale x it.
            d_scores = _backward(y, dy, ctx.dim, op="masked_softmax", log=False, scale=1.0)
            dx = d_scores * ctx.scale if ctx.needs_input_grad[0] else None
            return dx, d_scores.sum_to_size(ctx.mask_shape), None, None, None
        dx = _backward(y, dy, ctx.dim, op="masked_softmax", log=False, scale=ctx.scale)
        return dx, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _use_torch(x: torch.Tensor) -> bool:
    # The kernels cover fp16/bf16/fp32; float64 and empty tensors are served by torch exactly.
    return x.dtype == torch.float64 or x.numel() == 0


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``, same semantics as ``torch.softmax`` (a row of all ``-inf`` gives NaN).

    fp16/bf16/fp32 inputs are computed in fp32 and returned in the input dtype; differentiable.
    """
    _validation.check_tensor("x", x, dtypes=_validation.FLOAT_DTYPES)
    dim = _validation.normalize_dim(dim, x.dim())
    impl = _backend.resolve("softmax", x)
    if impl == "reference":
        return reference.softmax(x, dim)
    if impl == "torch" or _use_torch(x):
        return torch.softmax(x, dim)
    if x.dim() == 0:
        return _SoftmaxFunction.apply(x.reshape(1), 0, False).reshape(())
    return _SoftmaxFunction.apply(x, dim, False)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Log-softmax along ``dim``, same semantics as ``torch.log_softmax``; fp32 math, output in x's dtype."""
    _validation.check_tensor("x", x, dtypes=_validation.FLOAT_DTYPES)
    dim = _validation.normalize_dim(dim, x.dim())
    impl = _backend.resolve("log_softmax", x)
    if impl == "reference":
        return reference.log_softmax(x, dim)
    if impl == "torch" or _use_torch(x):
        return torch.log_softmax(x, dim)
    if x.dim() == 0:
        return _SoftmaxFunction.apply(x.reshape(1), 0, True).reshape(())
    return _SoftmaxFunction.apply(x, dim, True)


def _check_mask(mask: object, x: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be a bool tensor (True = keep) or a floating additive mask, "
                        f"got dtype {str(mask.dtype).replace('torch.', '')}")
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"mask must be broadcastable to x's shape {tuple(x.shape)}, got shape {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask must be on x's device ({x.device}), got {mask.device}")
    return mask


def _causal_keep(x: torch.Tensor) -> torch.Tensor:
    """Boolean (S_q, S_k) mask keeping key j for query i when j <= i (top-left aligned)."""
    q_len, k_len = x.shape[-2], x.shape[-1]
    return torch.ones(q_len, k_len, dtype=torch.bool, device=x.device).tril()


def masked_softmax(x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0, causal: bool = False,
                   dim: int = -1) -> torch.Tensor:
    """Fused ``softmax(x * scale + mask)`` along ``dim``.

    Args:
        x: scores, fp16/bf16/fp32 (fp64 through torch).
        mask: ``None``, a bool tensor (True = keep, False = drop) or a floating tensor added to the scaled scores
            (``-inf`` drops); broadcastable to ``x``. An additive mask that requires grad gets its gradient.
        scale: multiplies ``x`` before the mask is applied.
        causal: additionally drop key ``j`` for query ``i`` when ``j > i``, where ``i`` indexes dim -2 and ``j``
            dim -1 of ``x`` (top-left aligned, as ``torch``'s ``is_causal``).
        dim: the softmax dim.

    Rows with no finite score left after scaling and masking give **zeros** (not NaN as ``torch.softmax``
    would), and a zero gradient: a fully padded query attends to nothing.
    """
    _validation.check_tensor("x", x, dtypes=_validation.FLOAT_DTYPES)
    dim = _validation.normalize_dim(dim, x.dim())
    mask = _check_mask(mask, x)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and x.dim() < 2:
        raise ValueError(f"causal=True needs x with at least 2 dims (queries, keys), got shape {tuple(x.shape)}")
    impl = _backend.resolve("masked_softmax", x)
    if impl == "reference":
        return reference.masked_softmax(x, mask, scale, causal, dim)
    if impl == "torch" or _use_torch(x):
        return _masked_softmax_torch(x, mask, scale, causal, dim)
    if causal and dim != x.dim() - 1:
        # The kernel's causal limit is along the softmax row; for another dim, fold it into the mask.
        keep = _causal_keep(x)
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = torch.where(keep, mask, float("-inf"))
        causal = False
    if x.dim() == 0:
        return _MaskedSoftmaxFunction.apply(x.reshape(1), None if mask is None else mask.reshape(1), float(scale),
                                            causal, 0).reshape(())
    return _MaskedSoftmaxFunction.apply(x, mask, float(scale), causal, dim)


def _masked_softmax_torch(x: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool, dim: int
                          ) -> torch.Tensor:
    """torch-native path (CPU ``auto``): torch's fused ops, fp32 math for low-precision inputs."""
    s = x.float() * scale if x.dtype in (torch.float16, torch.bfloat16) else x * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if causal:
        s = s.masked_fill(~_causal_keep(x), float("-inf"))
    empty = (s == float("-inf")).all(dim=dim, keepdim=True)
    y = torch.softmax(s.masked_fill(empty, 0.0), dim).masked_fill(empty, 0.0)
    return y.to(x.dtype)


def compile_specs() -> list[KernelSpec]:
    """The shipped kernels and tiles for compile_check (built in :mod:`llmfast.ops.softmax_specs`)."""
    from llmfast.ops.softmax_specs import compile_specs as build

    return build()
