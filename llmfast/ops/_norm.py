"""Triton kernels shared by RMSNorm and LayerNorm (forward and backward), and how they are launched.

Both norms reduce each row of a ``(rows, N)`` view (N = the normalized size) to one or two statistics and rescale
the row; they are memory-bound, so the kernels aim to read each element once and write it once, with fp32 math
whatever the input dtype. One set of kernels serves both, picked by the constexpr ``RMS``:

* RMSNorm:   ``n = x * rstd``, ``rstd = 1 / sqrt(mean(x^2) + eps)``, ``y = n * (offset + w)``, optionally with
  ``h = x + residual`` computed first (and written out) in the same pass.
* LayerNorm: ``n = (x - mean) * rstd``, ``rstd = 1 / sqrt(var + eps)`` (biased variance), ``y = n * w + b``.

Two shapes of work:

* **rows that fit a block** (up to 16384 columns forward and 8192 backward on GPUs): a program holds ``BLOCK_R`` whole
  rows in registers (several rows per program for short rows, so each program still moves a few thousand
  elements), reads once, writes once.
* **longer rows** (any length; tested to 128k and beyond): one program per row loops over the row twice, the
  first pass gathering the statistics (LayerNorm: sums of the deviations from the mean of the row's first block,
  so a large mean does not cancel the variance away), the second writing the output; the second read mostly
  hits L2, which still holds the row the program just read.

Backward: ``dx = rstd * (g*dy - n * mean(g*dy*n) [- mean(g*dy)])`` with ``g = offset + w``. The weight and bias
gradients are sums over rows: a fixed grid of programs (a few per SM) walks the rows with a stride, each program
accumulating ``dy * n`` (and ``dy``) in fp32 for its own rows, and writes one partial row into a
``(programs, N)`` fp32 buffer that torch then sums over the programs. No atomics: the result is the same bits on
every run.

The saved statistics are one fp32 ``rstd`` (and ``mean``) per row; backward recomputes ``n`` from the saved input.
Every launch's tiles come from ``NORM_CONFIGS[config_arch(device)]``, the one place they are named.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from llmfast import _backend, _validation
from llmfast.ops._arch import config_arch
from llmfast.ops._spec import KernelSpec, captured_launches, launch, launch_spec
from llmfast.ops.softmax import cast_out

# ----------------------------------------------------------------------------------------------------------------
# Tuning: every tile a kernel can be launched with is named here, and compile_specs builds all of them.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tile:
    """A program's tile: ``block_r`` rows by ``block_c`` columns, on ``num_warps`` warps.

    ``programs_per_sm`` (backward tiles): how many of these programs an SM holds at once, set by their registers
    (65536 per SM; the counts compile_check reports), which sizes the persistent backward grid.
    """

    block_r: int
    block_c: int
    num_warps: int
    programs_per_sm: int = 1


@dataclasses.dataclass(frozen=True)
class NormConfigs:
    """One architecture's launch configs.

    ``fwd_tiles``/``bwd_tiles``: single-pass tiles keyed ``c<width>`` (the row length rounded up to a power of
    two, at least 16), up to ``max_single_pass`` / ``max_single_pass_bwd`` columns; ``looped``: the tile of the
    looped kernels (one row per program, ``block_c`` columns per iteration) forward and backward.
    """

    fwd_tiles: dict[str, Tile]
    bwd_tiles: dict[str, Tile]
    looped: Tile
    max_single_pass: int
    max_single_pass_bwd: int


def _tiles(entries: Sequence[tuple[int, ...]]) -> dict[str, Tile]:
    return {f"c{entry[1]}": Tile(*entry) for entry in entries}


# GPUs: short rows several to a program (2048 elements per program up to 1024 columns), then one row per program
# with more warps as rows grow (8-32 values per thread). The backward keeps x, dy, the weight and the fp32
# weight-gradient accumulator live: at 16384 columns that is 128 fp32 values per thread even on 16 warps, which
# spills (32 warps cap a thread at 64 registers), so backward rows beyond 8192 columns take the looped kernel.
# Checked spill-free on sm_80 and sm_90 by compile_check; speed tuning on real GPUs is still to do.
# Rows of 64 columns or fewer (backward: 128) run on 8 warps: with several short rows per thread, ptxas spilled a
# few bytes at 4. 8192 columns run on 32 warps (8 values a thread, about 30 registers): on 16 warps ptxas gave the
# fp32 RMSNorm 32 registers and spilled 16 bytes on sm_80 (compile_check, with the launch's specialization).
_GPU_FWD = _tiles([(128, 16, 8), (64, 32, 8), (32, 64, 8), (16, 128, 4), (8, 256, 4), (4, 512, 4), (2, 1024, 4),
                   (1, 2048, 4), (1, 4096, 8), (1, 8192, 32), (1, 16384, 16)])
# The backward grid is persistent (each program walks many rows), so it is sized to what fits on the GPU at once:
# (rows, columns, warps, programs per SM), the last from the registers a thread needs (65536 per SM) in the
# launch compile_check builds (aligned rows, Triton's launch specialization, 3 stages): at most 48 up to 128
# columns on 8 warps, 80 for 256-1024 columns on 4 warps, 80-96 (RMSNorm) and 118-128 (LayerNorm, two
# accumulators) at 2048 on 4 warps, 80-106 and 117-128 at 4096 on 8 warps, 106-128 at 8192 on 16 warps, 63-80 in
# the looped kernel. Where LayerNorm fits fewer (4 at 2048), its extra programs only queue; so do those of
# unaligned rows, which vectorise nothing and need more.
_GPU_BWD = _tiles([(64, 16, 8, 4), (32, 32, 8, 4), (16, 64, 8, 4), (8, 128, 8, 4), (4, 256, 4, 6), (2, 512, 4, 6),
                   (1, 1024, 4, 6), (1, 2048, 4, 5), (1, 4096, 8, 2), (1, 8192, 16, 1)])
_GPU = NormConfigs(fwd_tiles=_GPU_FWD, bwd_tiles=_GPU_BWD, looped=Tile(1, 4096, 8, 3), max_single_pass=16384,
                   max_single_pass_bwd=8192)
NORM_CONFIGS: dict[str, NormConfigs] = {
    "sm90": _GPU,
    "sm80": _GPU,
    # The CPU interpreter: the same small tiles, but rows beyond 1024 columns already take the looped kernels
    # (in 512-column steps), so tests reach the looped path at small sizes; few backward programs, still > 1.
    "interpreter": NormConfigs(fwd_tiles={k: v for k, v in _GPU_FWD.items() if v.block_c <= 1024},
                               bwd_tiles={k: v for k, v in _GPU_BWD.items() if v.block_c <= 1024},
                               looped=Tile(1, 512, 4), max_single_pass=1024, max_single_pass_bwd=1024),
}
INTERPRETER_BWD_PROGRAMS = 3  # the interpreter runs programs one by one: few, but several rows each


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, rows, cols, s_row, s_col, valid):
    """fp32 values of a [rows, cols] tile: 64-bit row starts plus 32-bit column offsets (the launcher guarantees
    N * s_col < 2**31), which keeps register use low."""
    return tl.load((ptr + rows * s_row)[:, None] + (cols * s_col)[None, :], mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _residual_sum(x, r, h_ptr, rows, cols, n_cols, valid, X_DTYPE: tl.constexpr):
    """h = x + residual rounded to x's dtype (torch's add in that dtype), stored; returns it as fp32."""
    h = cast_out(x + r, X_DTYPE)
    tl.store((h_ptr + rows * n_cols)[:, None] + cols[None, :], h, mask=valid)
    return h.to(tl.float32)


@triton.jit
def _scale_shift(n, w_ptr, b_ptr, cols, col_ok, offset, X_DTYPE: tl.constexpr, RMS: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The output in fp32 from the normalized values ``n``.

    RMSNorm follows Hugging Face's LlamaRMSNorm: ``n`` is rounded to x's dtype first, then multiplied by
    ``offset + w`` in fp32 (exact for 16-bit operands) and rounded once to the output dtype by the caller.
    LayerNorm keeps fp32 to the end, as torch's kernels do.
    """
    if RMS:
        n = cast_out(n, X_DTYPE).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        n = n * (w + offset)[None, :]
    if HAS_BIAS:
        n += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return n


@triton.jit
def _norm_fwd_kernel(
    y_ptr, h_ptr, x_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    n_rows, n_cols,
    x_s_row, x_s_col, r_s_row, r_s_col,
    eps, offset,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Whole rows in one tile: read once, reduce in registers, write once (y and h are contiguous rows)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    valid = row_ok[:, None] & col_ok[None, :]
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    x = _load_tile(x_ptr, rows, cols, x_s_row, x_s_col, valid)
    if HAS_RESIDUAL:
        r = _load_tile(r_ptr, rows, cols, r_s_row, r_s_col, valid)
        x = _residual_sum(x, r, h_ptr, rows, cols, n_cols, valid, X_DTYPE)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / n_cols
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        xc = tl.where(valid, x - mean[:, None], 0.0)  # padding lanes must not add to the variance
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    y = _scale_shift(xc * rstd[:, None], w_ptr, b_ptr, cols, col_ok, offset, X_DTYPE, RMS, HAS_WEIGHT, HAS_BIAS)
    tl.store((y_ptr + rows * n_cols)[:, None] + cols[None, :], cast_out(y, y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _norm_fwd_looped_kernel(
    y_ptr, h_ptr, x_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    n_rows, n_cols,
    x_s_row, x_s_col, r_s_row, r_s_col,
    eps, offset,
    BLOCK_C: tl.constexpr, RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Rows longer than a block: one program per row, a statistics pass then an output pass."""
    rows = tl.program_id(0).to(tl.int64) + tl.zeros([1], tl.int64)  # a [1]-row tile, so the helpers serve both
    lanes = tl.arange(0, BLOCK_C)
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    # Pass 1. Each lane keeps its own sums (no cross-lane reduction inside the loop, so loads stream); they are
    # merged once at the end. LayerNorm sums the deviations from a shift, the mean of the row's first block:
    # close to the row's mean, so x - shift is exact and small, and the variance E[d^2] - E[d]^2 does not cancel
    # even when the mean dwarfs the spread (E[x^2] - E[x]^2 in fp32 would lose every digit).
    tl.static_assert(RMS or not HAS_RESIDUAL, "the residual is fused into RMSNorm only")
    shift = tl.zeros([1], tl.float32)
    if not RMS:
        first = lanes < n_cols
        x0 = _load_tile(x_ptr, rows, lanes, x_s_row, x_s_col, first[None, :])
        shift = tl.sum(x0, axis=1) / tl.minimum(n_cols, BLOCK_C)
    acc_d = tl.zeros([1, BLOCK_C], tl.float32)
    acc_sq = tl.zeros([1, BLOCK_C], tl.float32)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + lanes
        col_ok = cols < n_cols
        valid = col_ok[None, :]
        x = _load_tile(x_ptr, rows, cols, x_s_row, x_s_col, valid)
        if HAS_RESIDUAL:
            r = _load_tile(r_ptr, rows, cols, r_s_row, r_s_col, valid)
            x = _residual_sum(x, r, h_ptr, rows, cols, n_cols, valid, X_DTYPE)
        d = tl.where(valid, x - shift[:, None], 0.0)
        acc_d += d
        acc_sq += d * d
    mean_d = tl.zeros([1], tl.float32)
    if not RMS:
        mean_d = tl.sum(acc_d, axis=1) / n_cols
        tl.store(mean_ptr + rows, shift + mean_d)
    var = tl.maximum(tl.sum(acc_sq, axis=1) / n_cols - mean_d * mean_d, 0.0)
    rstd = tl.rsqrt(var + eps)
    tl.store(rstd_ptr + rows, rstd)
    # Pass 2: normalize and write. With a residual, h is recomputed from x and residual (same rounding) rather
    # than re-read from the h this program just wrote.
    for start in range(0, n_cols, BLOCK_C):
        cols = start + lanes
        col_ok = cols < n_cols
        valid = col_ok[None, :]
        x = _load_tile(x_ptr, rows, cols, x_s_row, x_s_col, valid)
        if HAS_RESIDUAL:
            r = _load_tile(r_ptr, rows, cols, r_s_row, r_s_col, valid)
            x = cast_out(x + r, X_DTYPE).to(tl.float32)
        n = (x - shift[:, None] - mean_d[:, None]) * rstd[:, None]
        y = _scale_shift(n, w_ptr, b_ptr, cols, col_ok, offset, X_DTYPE, RMS, HAS_WEIGHT, HAS_BIAS)
        tl.store((y_ptr + rows * n_cols)[:, None] + cols[None, :], cast_out(y, y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _dx_tile(x, dy, w, mean, rstd, valid, n_cols, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """(dx, n) of a tile of whole rows, in fp32."""
    if RMS:
        n = x * rstd[:, None]
    else:
        n = tl.where(valid, (x - mean[:, None]) * rstd[:, None], 0.0)
    gdy = dy * w if HAS_WEIGHT else dy
    c1 = tl.sum(n * gdy, axis=1) / n_cols
    if RMS:
        dx = (gdy - n * c1[:, None]) * rstd[:, None]
    else:
        c2 = tl.sum(gdy, axis=1) / n_cols
        dx = (gdy - n * c1[:, None] - c2[:, None]) * rstd[:, None]
    return dx, n


@triton.jit
def _norm_bwd_kernel(
    dx_ptr, dw_ptr, db_ptr, x_ptr, dy_ptr, dh_ptr, w_ptr, mean_ptr, rstd_ptr,
    n_rows, n_cols,
    x_s_row, x_s_col, dy_s_row, dy_s_col, dh_s_row, dh_s_col,
    offset,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
):
    """Whole rows in one tile; program p takes row blocks p, p + P, p + 2P, ... and writes its partial dw/db row.

    ``dh`` (RMSNorm with a residual) is the gradient reaching h directly; it adds to dx, which is also the
    residual's gradient.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    # The weight (offset added) is re-read per row block, an L1 hit, rather than held across the loop: a quarter
    # fewer registers at 2048-4096 columns, so more programs fit on an SM. At 8192 columns holding it spills less.
    HOLD_W: tl.constexpr = BLOCK_C >= 8192
    w_held = tl.zeros([BLOCK_C], tl.float32)
    if HAS_WEIGHT and HOLD_W:
        w_held = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    db_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for block in range(pid, tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)):
        rows = (block * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < n_rows
        valid = row_ok[:, None] & col_ok[None, :]
        x = _load_tile(x_ptr, rows, cols, x_s_row, x_s_col, valid)
        dy = _load_tile(dy_ptr, rows, cols, dy_s_row, dy_s_col, valid)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        mean = rstd
        if not RMS:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        w = w_held
        if HAS_WEIGHT and not HOLD_W:
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        dx, n = _dx_tile(x, dy, w[None, :], mean, rstd, valid, n_cols, RMS, HAS_WEIGHT)
        if HAS_DH:
            dx += _load_tile(dh_ptr, rows, cols, dh_s_row, dh_s_col, valid)
        tl.store((dx_ptr + rows * n_cols)[:, None] + cols[None, :], cast_out(dx, dx_ptr.dtype.element_ty),
                 mask=valid)
        if COMPUTE_DW:
            dw_acc += dy * n
        if COMPUTE_DB:
            db_acc += dy
    if COMPUTE_DW:
        tl.store(dw_ptr + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if COMPUTE_DB:
        tl.store(db_ptr + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _norm_bwd_looped_kernel(
    dx_ptr, dw_ptr, db_ptr, x_ptr, dy_ptr, dh_ptr, w_ptr, mean_ptr, rstd_ptr,
    n_rows, n_cols,
    x_s_row, x_s_col, dy_s_row, dy_s_col, dh_s_row, dh_s_col,
    offset,
    BLOCK_C: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
):
    """Rows longer than a block: program p takes rows p, p + P, ...; per row a pass for the two row sums, then a
    pass writing dx and adding dy * n (and dy) into the program's own partial row of dw (db), which starts zeroed
    and which no other program touches."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_C)
    for row in range(pid, n_rows, tl.num_programs(0)):
        rows = tl.zeros([1], tl.int64) + row
        rstd = tl.load(rstd_ptr + rows)
        mean = tl.zeros([1], tl.float32)
        if not RMS:
            mean = tl.load(mean_ptr + rows)
        acc_ngdy = tl.zeros([1, BLOCK_C], tl.float32)
        acc_gdy = tl.zeros([1, BLOCK_C], tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + lanes
            col_ok = cols < n_cols
            valid = col_ok[None, :]
            x = _load_tile(x_ptr, rows, cols, x_s_row, x_s_col, valid)
            dy = _load_tile(dy_ptr, rows, cols, dy_s_row, dy_s_col, valid)
            if HAS_WEIGHT:
                dy = dy * (tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset)[None, :]
            n = tl.where(valid, (x - mean[:, None]) * rstd[:, None], 0.0)
            acc_ngdy += n * dy
            acc_gdy += dy
        c1 = tl.sum(acc_ngdy, axis=1) / n_cols
        c2 = tl.zeros([1], tl.float32)
        if not RMS:
            c2 = tl.sum(acc_gdy, axis=1) / n_cols
        for start in range(0, n_cols, BLOCK_C):
            cols = start + lanes
            col_ok = cols < n_cols
            valid = col_ok[None, :]
            x = _load_tile(x_ptr, rows, cols, x_s_row, x_s_col, valid)
            dy = _load_tile(dy_ptr, rows, cols, dy_s_row, dy_s_col, valid)
            gdy = dy
            if HAS_WEIGHT:
                gdy = dy * (tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset)[None, :]
            n = tl.where(valid, (x - mean[:, None]) * rstd[:, None], 0.0)
            dx = (gdy - n * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DH:
                dx += _load_tile(dh_ptr, rows, cols, dh_s_row, dh_s_col, valid)
            tl.store((dx_ptr + rows * n_cols)[:, None] + cols[None, :], cast_out(dx, dx_ptr.dtype.element_ty),
                     mask=valid)
            if COMPUTE_DW:
                dw_ptrs = dw_ptr + pid * n_cols + cols[None, :]
                tl.store(dw_ptrs, tl.load(dw_ptrs, mask=valid, other=0.0) + dy * n, mask=valid)
            if COMPUTE_DB:
                db_ptrs = db_ptr + pid * n_cols + cols[None, :]
                tl.store(db_ptrs, tl.load(db_ptrs, mask=valid, other=0.0) + dy, mask=valid)


# ----------------------------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------------------------


def as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t`` as a ``(rows, n_cols)`` view when its strides allow (any strides within a row, leading dims that
    merge into one), else a contiguous copy; also a copy when 32-bit column offsets could overflow."""
    try:
        rows = t.view(-1, n_cols)
    except RuntimeError:
        rows = t.reshape(-1, n_cols)  # leading dims that do not merge: reshape copies
    if (n_cols - 1) * abs(rows.stride(1)) >= 2**31:
        rows = rows.contiguous()
    return rows


def _col_stride(t: torch.Tensor) -> int:
    return t.stride(1) if t.shape[1] != 1 else 1


def _configs(device: torch.device) -> NormConfigs:
    return NORM_CONFIGS[config_arch(device)]


def pick_tile(n_cols: int, configs: NormConfigs, backward: bool) -> tuple[str, Tile, bool]:
    """(config name, tile, looped) for rows of ``n_cols``."""
    if n_cols > (configs.max_single_pass_bwd if backward else configs.max_single_pass):
        return "looped", configs.looped, True
    name = f"c{max(16, triton.next_power_of_2(n_cols))}"
    return name, (configs.bwd_tiles if backward else configs.fwd_tiles)[name], False


def _launch_record(arch: str, name: str, tile: Tile) -> dict[str, object]:
    return {"arch": arch, "config": name, "BLOCK_R": tile.block_r, "BLOCK_C": tile.block_c,
            "num_warps": tile.num_warps}


def forward(op: str, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            residual: torch.Tensor | None, n_cols: int, eps: float, offset: float, out_dtype: torch.dtype,
            rms: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Run the forward kernels on rows of ``n_cols``: returns ``(y, h, mean, rstd)`` with y, h in x's shape
    (contiguous), ``h`` only with a residual, ``mean`` only for LayerNorm, both statistics fp32 ``(rows,)``."""
    xr = as_rows(x, n_cols)
    # The kernels index the weight and bias as one dense vector of n_cols.
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    n_rows = xr.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty_like(rstd)
    rr = as_rows(residual, n_cols) if residual is not None else xr
    arch = config_arch(x.device)
    name, tile, looped = pick_tile(n_cols, NORM_CONFIGS[arch], backward=False)
    record = _launch_record(arch, name, tile)
    args = (y, h if h is not None else y, xr, rr, weight if weight is not None else xr,
            bias if bias is not None else xr, mean if mean is not None else rstd, rstd,
            n_rows, n_cols, xr.stride(0), _col_stride(xr), rr.stride(0), _col_stride(rr), float(eps), float(offset))
    flags = dict(RMS=rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None)
    if looped:
        _backend.record_kernel_launch(f"{op}_fwd_looped", record)
        launch(_norm_fwd_looped_kernel, (n_rows,))(*args, BLOCK_C=tile.block_c, **flags, num_warps=tile.num_warps)
    else:
        _backend.record_kernel_launch(f"{op}_fwd", record)
        launch(_norm_fwd_kernel, (triton.cdiv(n_rows, tile.block_r),))(
            *args, BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, **flags, num_warps=tile.num_warps)
    return y, h, mean, rstd


def _bwd_programs(n_units: int, n_cols: int, tile: Tile, device: torch.device) -> int:
    """The persistent backward grid: a full GPU's worth of programs, never more than there are row blocks, and
    few enough that every partial dw/db row starts below 2**31 elements (the kernels offset them by pid * n_cols
    in 32 bits, which keeps their loops lean; only rows of millions of columns meet this cap)."""
    if device.type != "cuda" or _backend.triton_interpreter_enabled():
        programs = min(n_units, INTERPRETER_BWD_PROGRAMS)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = min(n_units, tile.programs_per_sm * sms)
    return max(1, min(programs, 2**31 // max(1, n_cols)))


def backward(op: str, dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor | None,
             mean: torch.Tensor | None, rstd: torch.Tensor, n_cols: int, offset: float, weight_needs_grad: bool,
             bias_needs_grad: bool, rms: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dx (x's shape and dtype, contiguous) and the fp32 sums of ``dy * n`` and ``dy`` over rows (``(n_cols,)``,
    None when not asked for). ``x`` is the saved input (h for RMSNorm with a residual), ``dh`` the gradient
    reaching h directly."""
    xr, dyr = as_rows(x, n_cols), as_rows(dy, n_cols)
    weight = weight.contiguous() if weight is not None else None
    dhr = as_rows(dh, n_cols) if dh is not None else dyr
    n_rows = xr.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    arch = config_arch(x.device)
    configs = NORM_CONFIGS[arch]
    name, tile, looped = pick_tile(n_cols, configs, backward=True)
    programs = _bwd_programs(n_rows if looped else triton.cdiv(n_rows, tile.block_r), n_cols, tile, x.device)
    record = {**_launch_record(arch, name, tile), "programs": programs}
    # The looped kernel adds into its partial rows, so they start at zero; the single-pass one writes them whole.
    alloc = torch.zeros if looped else torch.empty
    dw = alloc((programs, n_cols), dtype=torch.float32, device=x.device) if weight_needs_grad else None
    db = alloc((programs, n_cols), dtype=torch.float32, device=x.device) if bias_needs_grad else None
    args = (dx, dw if dw is not None else rstd, db if db is not None else rstd, xr, dyr, dhr,
            weight if weight is not None else xr, mean if mean is not None else rstd, rstd,
            n_rows, n_cols, xr.stride(0), _col_stride(xr), dyr.stride(0), _col_stride(dyr),
            dhr.stride(0), _col_stride(dhr), float(offset))
    flags = dict(RMS=rms, HAS_WEIGHT=weight is not None, HAS_DH=dh is not None, COMPUTE_DW=dw is not None,
                 COMPUTE_DB=db is not None)
    if looped:
        _backend.record_kernel_launch(f"{op}_bwd_looped", record)
        launch(_norm_bwd_looped_kernel, (programs,))(*args, BLOCK_C=tile.block_c, **flags, num_warps=tile.num_warps)
    else:
        _backend.record_kernel_launch(f"{op}_bwd", record)
        launch(_norm_bwd_kernel, (programs,))(*args, BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, **flags,
                                              num_warps=tile.num_warps)
    # Summing the partial rows in a fixed order keeps the weight gradient deterministic.
    return dx, (dw.sum(0) if dw is not None else None), (db.sum(0) if db is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# Validation shared by both norms: every failure names the argument, what it got and what it accepts.
# ----------------------------------------------------------------------------------------------------------------

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_number(name: str, value: object, *, minimum: float | None = None) -> float:
    """A real number (not a bool), finite, at least ``minimum``; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_param(name: str, value: object, x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """An optional floating parameter tensor of exactly ``shape`` on x's device."""
    if value is None:
        return
    _validation.check_tensor(name, value, dtypes=_validation.FLOAT_DTYPES)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got shape {tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"{name} must be on x's device ({x.device}), got {value.device}")


def uses_torch(*tensors: torch.Tensor | None) -> bool:
    """Inputs the kernels do not take (float64 anywhere, nothing to normalize) go to torch's math instead."""
    present = [t for t in tensors if t is not None]
    return any(t.dtype not in KERNEL_DTYPES for t in present) or present[0].numel() == 0


# ----------------------------------------------------------------------------------------------------------------
# Compile check
# ----------------------------------------------------------------------------------------------------------------

# Input dtypes compile_check builds: fp32 (32-bit loads, the register-heaviest) and bf16 (16-bit loads and
# conversions; fp16 takes the same code path with another conversion instruction).
COMPILE_DTYPES = ("bf16", "fp32")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The representative launch: 4096 rows (a batch of sequences: a multiple of 16) of contiguous, aligned rows whose
# width is the tile's (a power of two, so 16-divisible like a model's hidden size); the looped kernels at twice the
# widest single-pass row.
COMPILE_ROWS = 4096
_FLAGS = ("HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS", "HAS_DH", "COMPUTE_DW", "COMPUTE_DB")
_GPU_ARCHES = {"sm80": 80, "sm90": 90}


def compile_specs_for(op: str, fwd_hosts: Sequence[Callable[[torch.Tensor], object]],
                      bwd_hosts: Sequence[Callable[[torch.Tensor], object]], *,
                      dtypes: Sequence[str] = COMPILE_DTYPES, suffix: str = "") -> list[KernelSpec]:
    """Every forward/backward kernel at every tile of every GPU architecture, per variant and input dtype, each
    built from the launch the op's own code makes: a host function gets a ``meta`` input ``x`` of
    ``(COMPILE_ROWS, width)`` and calls the op's forward (backward) implementation on it, whose kernel launch is
    captured (``llmfast.ops._spec.capture_launches``) with its arguments, so the compile check gives it Triton's
    launch specialization. Kernel names carry the variant's flags (and ``suffix``); architectures sharing one
    config table compile once for all of them."""
    specs: list[KernelSpec] = []
    groups: dict[int, list[str]] = {}
    for name in _GPU_ARCHES:
        groups.setdefault(id(NORM_CONFIGS[name]), []).append(name)
    for names in groups.values():
        configs = NORM_CONFIGS[names[0]]
        only = None if len(names) == len(_GPU_ARCHES) else tuple(_GPU_ARCHES[n] for n in names)
        for kind, hosts, tiles, widest in (("fwd", fwd_hosts, configs.fwd_tiles, configs.max_single_pass),
                                           ("bwd", bwd_hosts, configs.bwd_tiles, configs.max_single_pass_bwd)):
            widths = {cfg: (tile, tile.block_c) for cfg, tile in tiles.items()}
            widths["looped"] = (configs.looped, 2 * widest)
            for t in dtypes:
                for host in hosts:
                    for cfg, (tile, n_cols) in widths.items():
                        x = torch.empty(COMPILE_ROWS, n_cols, dtype=_TORCH_DTYPES[t], device="meta")
                        for call in captured_launches(lambda: host(x), names[0]):
                            args = call.launch_args()
                            if args["BLOCK_C"] != tile.block_c or call.option("num_warps") != tile.num_warps:
                                raise AssertionError(f"{op} {kind} at {n_cols} columns did not launch tile {cfg}")
                            flags = "".join(f"_{k.lower().replace('has_', '').replace('compute_', '')}"
                                            for k in _FLAGS if args.get(k))
                            specs.append(launch_spec(f"{op}_{kind}{flags}{suffix}", call, f"{cfg}_{t}",
                                                     arches=only))
    return specs
