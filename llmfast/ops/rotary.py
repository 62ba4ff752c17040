"""Triton rotary position embeddings: flash-attn's ``apply_rotary_emb`` and Hugging Face's ``apply_rotary_pos_emb``.

Both conventions run one kernel, ``_rotary_kernel``. Every tensor it touches is addressed as (batch, seq, head,
channel) through its strides, so q laid out (B, H, S, D) as Hugging Face keeps it, (B, S, H, D) as flash-attn
does, or any transposed view, is read where it lies with no copy. One program owns one token and a block of
``BLOCK_H`` heads: it reads the token's cos/sin once and applies them to every head of the block, pairs of
``BLOCK_K`` channels at a time. Channels past the rotary dim are copied through (nothing at all when in place).

For ``apply_rotary_pos_emb`` the program grid spans the head blocks of q and then those of k (GQA: k may have
fewer heads), so both tensors are rotated in one launch. Rotations are computed in fp32, rounded once.

Backward is the rotation by ``-theta`` of the incoming gradient (the same kernel with ``conjugate`` set): nothing
but cos/sin (and the positions) is saved. cos/sin are constants to the kernels, as in flash-attn: when they
require a gradient the call takes the differentiable reference path instead.

Positions: ``s + offset`` (an int), ``s + seqlen_offsets[b]`` (a (B,) tensor) or ``position_ids[b, s]``. Every
position is checked against the cos/sin table on the host before a launch (a tensor costs one device sync) and
masked again inside the kernel, so no position can read outside the table.

The Triton path is exposed as the custom ops ``llmfast::rotary_emb``, ``llmfast::rotary_emb_`` (in place) and
``llmfast::rotary_pos_emb`` with fake implementations, so ``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from llmfast import _backend, _validation
from llmfast.ops._arch import config_arch
from llmfast.ops._spec import KernelSpec, captured_launches, launch, launch_spec
from llmfast.ops.softmax import cast_out
from llmfast.reference import rotary as reference

# ----------------------------------------------------------------------------------------------------------------
# Tuning: BLOCK_H heads x BLOCK_K rotated pairs per program (per loop step), by the padded half rotary dim.
# About 512 pairs (1024 elements read and written per step) per program on 4 warps: memory-bound, so the tiles
# only need enough bytes in flight; rotary dims beyond 2 x 64 loop over the channel blocks.
# ----------------------------------------------------------------------------------------------------------------
_GPU_CONFIGS = {
    "k16": dict(BLOCK_H=32, BLOCK_K=16, num_warps=4),
    "k32": dict(BLOCK_H=16, BLOCK_K=32, num_warps=4),
    "k64": dict(BLOCK_H=8, BLOCK_K=64, num_warps=4),
}
ROTARY_CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "sm90": _GPU_CONFIGS,
    "sm80": _GPU_CONFIGS,
    # The interpreter: tiny tiles, so test shapes cross several head and channel blocks.
    "interpreter": {"k4": dict(BLOCK_H=2, BLOCK_K=4, num_warps=1)},
}

# How a token's position is found (a runtime argument, so it does not multiply the compiled variants).
POS_OFFSET, POS_OFFSETS_TENSOR, POS_IDS = 0, 1, 2


def pick_config(half: int, device: torch.device) -> tuple[str, dict[str, int]]:
    """The (name, config) a launch with ``half`` rotated pairs per head uses on ``device``."""
    configs = ROTARY_CONFIGS[config_arch(device)]
    if len(configs) == 1:
        return next(iter(configs.items()))
    name = "k16" if half <= 16 else "k32" if half <= 32 else "k64"
    return name, configs[name]


# ----------------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(x_ptr, o_ptr, b, s, h0, n_heads, half, pass_end,
                  x_sb, x_ss, x_sh, x_sd, o_sb, o_ss, o_sh, o_sd,
                  cos_row, sin_row, c_sd, cos_cols, conjugate,
                  BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, INTERLEAVED: tl.constexpr,
                  COS_FULL: tl.constexpr):
    """Rotate heads [h0, h0 + BLOCK_H) of one token; copy channels [2 * half, pass_end) through. The row starts
    are 64-bit (``b`` and ``s`` arrive as int64); channel offsets are 32-bit (``_launch`` guarantees they fit)."""
    heads = h0 + tl.arange(0, BLOCK_H)
    h_ok = heads < n_heads
    x_row = x_ptr + (b * x_sb + s * x_ss + heads.to(tl.int64) * x_sh)
    o_row = o_ptr + (b * o_sb + s * o_ss + heads.to(tl.int64) * o_sh)
    for k0 in range(0, half, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        j_ok = j < half
        c_ok = j < cos_cols
        c1 = tl.load(cos_row + j * c_sd, mask=c_ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + j * c_sd, mask=c_ok, other=0.0).to(tl.float32)
        if COS_FULL:
            # Hugging Face's tables hold D channels (duplicated halves); its formula reads both halves.
            c2 = tl.load(cos_row + (j + half) * c_sd, mask=c_ok, other=0.0).to(tl.float32)
            s2 = tl.load(sin_row + (j + half) * c_sd, mask=c_ok, other=0.0).to(tl.float32)
        else:
            c2 = c1
            s2 = s1
        # out1 = x1 c1 - x2 sa, out2 = x2 c2 + x1 sb. Forward: (sa, sb) = (s1, s2). The transpose (backward,
        # the rotation by -theta): (sa, sb) = (-s2, -s1).
        if conjugate != 0:
            sa = -s2
            sb = -s1
        else:
            sa = s1
            sb = s2
        if INTERLEAVED:
            d1 = 2 * j
            d2 = 2 * j + 1
        else:
            d1 = j
            d2 = j + half
        m = h_ok[:, None] & j_ok[None, :]
        x1 = tl.load(x_row[:, None] + (d1 * x_sd)[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_row[:, None] + (d2 * x_sd)[None, :], mask=m, other=0.0).to(tl.float32)
        out1 = x1 * c1[None, :] - x2 * sa[None, :]
        out2 = x2 * c2[None, :] + x1 * sb[None, :]
        tl.store(o_row[:, None] + (d1 * o_sd)[None, :], cast_out(out1, o_ptr.dtype.element_ty), mask=m)
        tl.store(o_row[:, None] + (d2 * o_sd)[None, :], cast_out(out2, o_ptr.dtype.element_ty), mask=m)
    for p0 in range(2 * half, pass_end, BLOCK_K):
        d = p0 + tl.arange(0, BLOCK_K)
        m = h_ok[:, None] & (d < pass_end)[None, :]
        v = tl.load(x_row[:, None] + (d * x_sd)[None, :], mask=m, other=0.0)
        tl.store(o_row[:, None] + (d * o_sd)[None, :], v.to(o_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["seqlen", "n_heads_q", "n_q_blocks", "n_heads_k", "pass_end_q", "pass_end_k", "offset", "pos_mode",
                               "conjugate", "pos_sb", "pos_ss", "c_sb"])
def _rotary_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr,
    seqlen, n_heads_q, n_heads_k, n_q_blocks, half, pass_end_q, pass_end_k, n_pos,
    q_sb, q_ss, q_sh, q_sd, qo_sb, qo_ss, qo_sh, qo_sd,
    k_sb, k_ss, k_sh, k_sd, ko_sb, ko_ss, ko_sh, ko_sd,
    c_sb, c_sp, c_sd, pos_sb, pos_ss,
    offset, pos_mode, conjugate,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, INTERLEAVED: tl.constexpr, COS_FULL: tl.constexpr,
):
    """Grid (tokens, head blocks of q then of k). cos/sin element (b, p, c) sits at b*c_sb + p*c_sp + c*c_sd."""
    token = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = token // seqlen
    s = token % seqlen
    if pos_mode == 2:
        pos = tl.load(pos_ptr + b * pos_sb + s * pos_ss).to(tl.int64)
    elif pos_mode == 1:
        pos = s + tl.load(pos_ptr + b * pos_sb).to(tl.int64)
    else:
        pos = s + offset
    # The host already checked every position; masking here as well keeps a bad one from ever reading outside.
    # (cos_cols = 0 turns every cos/sin load of an out-of-range position off.)
    cos_cols = tl.where((pos >= 0) & (pos < n_pos), half, 0)
    cos_row = cos_ptr + (b * c_sb + pos * c_sp)
    sin_row = sin_ptr + (b * c_sb + pos * c_sp)
    if hb < n_q_blocks:
        _rotate_heads(q_ptr, qo_ptr, b, s, hb * BLOCK_H, n_heads_q, half, pass_end_q,
                      q_sb, q_ss, q_sh, q_sd, qo_sb, qo_ss, qo_sh, qo_sd,
                      cos_row, sin_row, c_sd, cos_cols, conjugate, BLOCK_H, BLOCK_K, INTERLEAVED, COS_FULL)
    else:
        _rotate_heads(k_ptr, ko_ptr, b, s, (hb - n_q_blocks) * BLOCK_H, n_heads_k, half, pass_end_k,
                      k_sb, k_ss, k_sh, k_sd, ko_sb, ko_ss, ko_sh, ko_sd,
                      cos_row, sin_row, c_sd, cos_cols, conjugate, BLOCK_H, BLOCK_K, INTERLEAVED, COS_FULL)


# ----------------------------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------------------------


def _launch(pairs: list[tuple[torch.Tensor, torch.Tensor]], cos: torch.Tensor, sin: torch.Tensor,
            cos_batch_stride: int, positions: torch.Tensor | None, pos_mode: int, offset: int, n_pos: int,
            half: int, *, interleaved: bool, cos_full: bool, conjugate: bool, name: str) -> None:
    """Rotate each (src, dst) pair, both (B, S, H, D) views; ``cos``/``sin`` rows are (position, channel)."""
    (q, qo), (k, ko) = pairs[0], pairs[-1]
    batch, seqlen = q.shape[0], q.shape[1]
    if batch * seqlen == 0 or q.shape[2] + (k.shape[2] if len(pairs) == 2 else 0) == 0:
        return
    if not all(_channels_fit(t) for t in (q, qo, k, ko, cos, sin)):
        _launch_dense(pairs, cos, sin, cos_batch_stride, positions, pos_mode, offset, n_pos, half,
                      interleaved=interleaved, cos_full=cos_full, conjugate=conjugate, name=name)
        return
    cfg_name, cfg = pick_config(half, q.device)
    n_q_blocks = triton.cdiv(q.shape[2], cfg["BLOCK_H"])
    n_k_blocks = triton.cdiv(k.shape[2], cfg["BLOCK_H"]) if len(pairs) == 2 else 0
    # In place, the channels past the rotary dim already hold their values: skip the copy.
    pass_end_q = 2 * half if qo.data_ptr() == q.data_ptr() else q.shape[3]
    pass_end_k = 2 * half if ko.data_ptr() == k.data_ptr() else k.shape[3]
    if positions is None:  # an unread placeholder, int64 like real positions so the kernel compiles once
        positions = torch.empty(1, dtype=torch.int64, device=q.device)
    pos_strides = (positions.stride(0), positions.stride(1) if positions.dim() == 2 else 0)
    _backend.record_kernel_launch(name, {"config": cfg_name, **cfg})
    launch(_rotary_kernel, (batch * seqlen, n_q_blocks + n_k_blocks))(
        q, qo, k, ko, cos, sin, positions,
        seqlen, q.shape[2], k.shape[2], n_q_blocks, half, pass_end_q, pass_end_k, n_pos,
        *q.stride(), *qo.stride(), *k.stride(), *ko.stride(),
        cos_batch_stride, cos.stride(-2), cos.stride(-1), *pos_strides,
        offset, pos_mode, int(conjugate),
        BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K"], INTERLEAVED=interleaved, COS_FULL=cos_full,
        num_warps=cfg["num_warps"],
    )


def _channels_fit(t: torch.Tensor) -> bool:
    """Whether ``t``'s channel offsets (channel index x channel stride) fit the kernel's 32-bit arithmetic, which
    keeps its inner loop cheap; token, batch and head offsets are 64-bit."""
    return (t.shape[-1] - 1) * abs(t.stride(-1)) < 2**31


def _launch_dense(pairs: list[tuple[torch.Tensor, torch.Tensor]], cos: torch.Tensor, sin: torch.Tensor,
                  cos_batch_stride: int, positions: torch.Tensor | None, pos_mode: int, offset: int, n_pos: int,
                  half: int, **flags) -> None:
    """:func:`_launch` for tensors whose channels lie 2**31 or more elements apart (the channel dim outermost in a
    huge tensor, a transposed table): rotate dense copies of those, then write the results back."""
    if not (_channels_fit(cos) and _channels_fit(sin)):
        cos, sin = cos.contiguous(), sin.contiguous()
        cos_batch_stride = cos.stride(0) if cos_batch_stride else 0
    dense_pairs, write_back = [], []
    for src, dst in pairs:
        if _channels_fit(src) and _channels_fit(dst):
            dense_pairs.append((src, dst))
            continue
        dense_src = src if _channels_fit(src) else src.contiguous()
        if dst.data_ptr() == src.data_ptr():  # in place: rotate the copy in place
            dense_dst = dense_src
        else:
            dense_dst = dst if _channels_fit(dst) else torch.empty_like(dense_src)
        dense_pairs.append((dense_src, dense_dst))
        if dense_dst is not dst:
            write_back.append((dst, dense_dst))
    _launch(dense_pairs, cos, sin, cos_batch_stride, positions, pos_mode, offset, n_pos, half, **flags)
    for dst, dense_dst in write_back:
        dst.copy_(dense_dst)


def _check_positions(positions: torch.Tensor, extra: int, n_pos: int, what: str) -> None:
    """Every ``positions + extra`` must index a row of the cos/sin table (costs one sync on a GPU)."""
    if positions.numel() == 0:
        return
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0:
        raise ValueError(f"{what} must be non-negative, got a minimum of {lo}")
    if hi + extra > n_pos:
        raise ValueError(f"cos/sin have {n_pos} positions but {what} asks for position {hi + extra - 1} "
                         f"(max {what} {hi} + {extra}); cos/sin must have at least {hi + extra} rows")


def _flash_launch(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  seqlen_offsets: torch.Tensor | None, offset: int, interleaved: bool, conjugate: bool) -> None:
    if seqlen_offsets is not None:
        _check_positions(seqlen_offsets, x.shape[1], cos.shape[0], "seqlen_offsets")
        seqlen_offsets = seqlen_offsets.to(torch.int64)
    _launch([(x, out)], cos, sin, 0, seqlen_offsets, POS_OFFSETS_TENSOR if seqlen_offsets is not None else POS_OFFSET,
            offset, cos.shape[0], cos.shape[1], interleaved=interleaved, cos_full=False, conjugate=conjugate,
            name="rotary_bwd" if conjugate else "rotary_fwd")


def _hf_tables(cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None, batch: int, seqlen: int
               ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None, int]:
    """(cos, sin as (B' or 1, P, D) views, batch stride, position ids or None, number of positions)."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        if position_ids is None:
            return cos, sin, 0, None, cos.shape[1]
        _check_positions(position_ids, 1, cos.shape[1], "position_ids")
        # (S,) or (1, S) ids serve every sequence: a stride-0 batch dim.
        ids = position_ids.to(torch.int64).reshape(-1, seqlen).expand(batch, seqlen)
        return cos, sin, 0, ids, cos.shape[1]
    if cos.shape[1] == 1 and seqlen > 1:  # one angle broadcast over the sequence, as torch broadcasting does
        cos, sin = cos.expand(-1, seqlen, -1), sin.expand(-1, seqlen, -1)
    return cos, sin, cos.stride(0) if cos.shape[0] > 1 else 0, None, cos.shape[1]


def _hf_launch(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, position_ids: torch.Tensor | None, unsqueeze_dim: int, conjugate: bool) -> None:
    # View everything as (B, S, H, D): with unsqueeze_dim 1 the tensors are (B, H, S, D).
    views = [t.transpose(1, 2) if unsqueeze_dim == 1 else t for t in (q, q_out, k, k_out)]
    cos, sin, cos_batch_stride, ids, n_pos = _hf_tables(cos, sin, position_ids, *views[0].shape[:2])
    _launch([(views[0], views[1]), (views[2], views[3])], cos, sin, cos_batch_stride, ids,
            POS_IDS if ids is not None else POS_OFFSET, 0, n_pos, cos.shape[-1] // 2, interleaved=False,
            cos_full=True, conjugate=conjugate, name="rotary_qk_bwd" if conjugate else "rotary_qk_fwd")


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, traced through their fake implementations) and autograd
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("llmfast::rotary_emb", mutates_args=())
def _rotary_emb_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlen_offsets: Optional[torch.Tensor],
                   offset: int, interleaved: bool, conjugate: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    _flash_launch(x, out, cos, sin, seqlen_offsets, offset, interleaved, conjugate)
    return out


@_rotary_emb_op.register_fake
def _(x, cos, sin, seqlen_offsets, offset, interleaved, conjugate):
    return torch.empty_like(x)


@torch.library.custom_op("llmfast::rotary_emb_", mutates_args=("x",))
def _rotary_emb_inplace_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           seqlen_offsets: Optional[torch.Tensor], offset: int, interleaved: bool,
                           conjugate: bool) -> None:
    # Each program reads a pair of channels before writing it back: rotating in place is safe.
    _flash_launch(x, x, cos, sin, seqlen_offsets, offset, interleaved, conjugate)


@_rotary_emb_inplace_op.register_fake
def _(x, cos, sin, seqlen_offsets, offset, interleaved, conjugate):
    return None


@torch.library.custom_op("llmfast::rotary_pos_emb", mutates_args=())
def _rotary_pos_emb_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       position_ids: Optional[torch.Tensor], unsqueeze_dim: int, conjugate: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _hf_launch(q, k, q_out, k_out, cos, sin, position_ids, unsqueeze_dim, conjugate)
    return q_out, k_out


@_rotary_pos_emb_op.register_fake
def _(q, k, cos, sin, position_ids, unsqueeze_dim, conjugate):
    return torch.empty_like(q), torch.empty_like(k)


class _RotaryEmbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlen_offsets: torch.Tensor | None,
                offset: int, interleaved: bool, inplace: bool) -> torch.Tensor:
        if inplace:
            _rotary_emb_inplace_op(x, cos, sin, seqlen_offsets, offset, interleaved, False)
            ctx.mark_dirty(x)
            out = x
        else:
            out = _rotary_emb_op(x, cos, sin, seqlen_offsets, offset, interleaved, False)
        ctx.save_for_backward(cos, sin, seqlen_offsets)
        ctx.offset, ctx.interleaved = offset, interleaved
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor):
        cos, sin, seqlen_offsets = ctx.saved_tensors
        dx = _rotary_emb_op(dout, cos, sin, seqlen_offsets, ctx.offset, ctx.interleaved, True)
        return dx, None, None, None, None, None, None


class _RotaryPosEmbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None, unsqueeze_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.unsqueeze_dim = unsqueeze_dim
        return _rotary_pos_emb_op(q, k, cos, sin, position_ids, unsqueeze_dim, False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = _rotary_pos_emb_op(dq_out, dk_out, cos, sin, position_ids, ctx.unsqueeze_dim, True)
        return dq, dk, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_tables(cos: object, sin: object, ndim: tuple[int, ...], like: torch.Tensor) -> None:
    _validation.check_tensor("cos", cos, ndim=ndim, dtypes=_validation.FLOAT_DTYPES)
    _validation.check_tensor("sin", sin, ndim=ndim, dtypes=_validation.FLOAT_DTYPES)
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"cos and sin must share one dtype, got {cos.dtype} and {sin.dtype}")
    _validation.check_same_device(x=like, cos=cos, sin=sin)


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_flash_args(x: object, cos: object, sin: object, interleaved: object, inplace: object,
                      seqlen_offsets: object) -> None:
    _validation.check_tensor("x", x, ndim=4, dtypes=_validation.FLOAT_DTYPES)
    _check_tables(cos, sin, (2,), x)
    _check_flag("interleaved", interleaved)
    _check_flag("inplace", inplace)
    batch, seqlen, _, head_dim = x.shape
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim == 0:
        raise ValueError(f"cos/sin must have at least one column (rotary_dim / 2), got shape {tuple(cos.shape)}")
    if rotary_dim > head_dim:
        raise ValueError(f"rotary_dim = 2 * cos.shape[1] = {rotary_dim} exceeds the head dim x.shape[-1] = "
                         f"{head_dim}; cos/sin must be (seqlen, rotary_dim / 2) with rotary_dim <= head dim")
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.dtype not in _INT_DTYPES:
            raise TypeError(f"seqlen_offsets must be an int or an integer tensor, got dtype {seqlen_offsets.dtype}")
        if tuple(seqlen_offsets.shape) != (batch,):
            raise ValueError(f"seqlen_offsets must have shape (batch,) = ({batch},), got {tuple(seqlen_offsets.shape)}")
        _validation.check_same_device(x=x, seqlen_offsets=seqlen_offsets)
    elif isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, int):
        raise TypeError(f"seqlen_offsets must be an int or a (batch,) integer tensor, got "
                        f"{type(seqlen_offsets).__name__}")
    elif seqlen_offsets < 0:
        raise ValueError(f"seqlen_offsets must be non-negative, got {seqlen_offsets}")
    elif seqlen_offsets + seqlen > cos.shape[0]:
        raise ValueError(f"cos/sin have {cos.shape[0]} positions but seqlen_offsets + seqlen = {seqlen_offsets} + "
                         f"{seqlen} = {seqlen_offsets + seqlen} are asked for")


def _check_hf_args(q: object, k: object, cos: object, sin: object, position_ids: object,
                   unsqueeze_dim: object) -> int:
    """Validate and return unsqueeze_dim normalised to 1 ((B, H, S, D) tensors) or 2 ((B, S, H, D))."""
    _validation.check_tensor("q", q, ndim=4, dtypes=_validation.FLOAT_DTYPES)
    _validation.check_tensor("k", k, ndim=4, dtypes=_validation.FLOAT_DTYPES)
    _validation.check_same_device(q=q, k=k)
    _check_tables(cos, sin, (2, 3), q)
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int) or unsqueeze_dim not in (1, 2, -3, -2):
        raise ValueError(f"unsqueeze_dim must be 1 (q, k laid out (B, H, S, D)) or 2 ((B, S, H, D)), "
                         f"got {unsqueeze_dim!r}")
    dim = {1: 1, 2: 2, -3: 1, -2: 2}[unsqueeze_dim]  # unsqueezing 3-d cos at -3 / -2 is the same as at 1 / 2
    seq_dim = 2 if dim == 1 else 1
    batch, seqlen, head_dim = q.shape[0], q.shape[seq_dim], q.shape[-1]
    if k.shape[0] != batch or k.shape[seq_dim] != seqlen or k.shape[-1] != head_dim:
        raise ValueError(f"k must match q in batch, sequence length and head dim (heads may differ), got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2:
        raise ValueError(f"the rotary dim cos.shape[-1] must be even, got {rotary_dim}")
    if rotary_dim == 0 or rotary_dim > head_dim:
        raise ValueError(f"the rotary dim cos.shape[-1] must be in 2..{head_dim} (the head dim), got {rotary_dim}")
    if cos.dim() == 3:
        if cos.shape[0] not in (1, batch) or cos.shape[1] not in (1, seqlen):
            raise ValueError(f"cos/sin (batch, seqlen, dim) must broadcast to batch {batch} and seqlen {seqlen}, "
                             f"got {tuple(cos.shape)}")
        return dim
    if position_ids is None:
        if cos.shape[0] < seqlen:
            raise ValueError(f"cos/sin have {cos.shape[0]} positions but the sequence has {seqlen} tokens")
        return dim
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"position_ids must be an integer tensor, got "
                        f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
    if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != seqlen or (
            position_ids.dim() == 2 and position_ids.shape[0] not in (1, batch)):
        raise ValueError(f"position_ids must be (batch, seqlen) = ({batch}, {seqlen}), (1, seqlen) or (seqlen,), "
                         f"got {tuple(position_ids.shape)}")
    _validation.check_same_device(q=q, position_ids=position_ids)
    return dim


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _needs_table_grad(*tables: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tables)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                     inplace: bool = False, seqlen_offsets: int | torch.Tensor = 0) -> torch.Tensor:
    """Rotary embedding with flash-attn's semantics (``flash_attn.layers.rotary.apply_rotary_emb``).

    Args:
        x: (batch, seqlen, nheads, headdim), fp16/bf16/fp32 (fp64 through torch).
        cos, sin: (seqlen_rotary, rotary_dim / 2), any floating dtype. Channels past ``rotary_dim`` pass through.
        interleaved: rotate pairs (0, 1), (2, 3), ... (GPT-J) instead of the two halves (GPT-NeoX).
        inplace: write the result into ``x`` and return it.
        seqlen_offsets: int, or a (batch,) integer tensor: token ``s`` of sequence ``b`` takes position
            ``s + offset`` (decoding with a KV cache). ``offset + seqlen`` must not exceed ``seqlen_rotary``.

    Returns (batch, seqlen, nheads, headdim) in x's dtype. Differentiable in ``x``; gradients for cos/sin (if
    they require one) come from the reference path.
    """
    _check_flash_args(x, cos, sin, interleaved, inplace, seqlen_offsets)
    impl = _backend.resolve("apply_rotary_emb", x)
    if (impl != "triton" or x.dtype not in _KERNEL_DTYPES or x.numel() == 0 or _needs_table_grad(cos, sin)):
        # The kernel path checks tensor positions inside its custom op. Under torch.compile this data-dependent
        # check would break the graph; torch's own indexing then bounds-checks the reference's gather.
        if isinstance(seqlen_offsets, torch.Tensor) and not torch.compiler.is_compiling():
            _check_positions(seqlen_offsets, x.shape[1], cos.shape[0], "seqlen_offsets")
        return reference.apply_rotary_emb(x, cos, sin, interleaved, inplace, seqlen_offsets)
    offsets_tensor = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
    offset = 0 if offsets_tensor is not None else int(seqlen_offsets)
    return _RotaryEmbFunction.apply(x, cos, sin, offsets_tensor, offset, interleaved, inplace)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         position_ids: torch.Tensor | None = None, unsqueeze_dim: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k with Hugging Face's semantics (``transformers``' ``apply_rotary_pos_emb``).

    Args:
        q: (batch, heads, seqlen, head_dim) for ``unsqueeze_dim=1`` or (batch, seqlen, heads, head_dim) for 2.
        k: the same layout; may have fewer heads (grouped-query attention).
        cos, sin: (batch or 1, seqlen, rotary_dim) as Hugging Face's rotary modules return them (the two halves
            duplicated), or a 2-d (positions, rotary_dim) table: indexed by ``position_ids`` when given, else
            its first ``seqlen`` rows. ``rotary_dim`` is usually the head dim; if smaller, the remaining
            channels pass through.
        position_ids: only used with a 2-d table ((batch, seqlen), (1, seqlen) or (seqlen,) integers); ignored
            with 3-d cos/sin, as in current ``transformers``.
        unsqueeze_dim: where the heads dim is (1 or 2), as in ``transformers``.

    Returns ``(q_embed, k_embed)`` in q's and k's dtypes: ``t * cos + rotate_half(t) * sin``, both tensors in one
    kernel launch (one more for their gradients).
    """
    dim = _check_hf_args(q, k, cos, sin, position_ids, unsqueeze_dim)
    ids = position_ids if cos.dim() == 2 else None
    impl = _backend.resolve("apply_rotary_pos_emb", q)
    if (impl != "triton" or q.dtype not in _KERNEL_DTYPES or k.dtype not in _KERNEL_DTYPES
            or _needs_table_grad(cos, sin)):
        if ids is not None and not torch.compiler.is_compiling():  # as in apply_rotary_emb
            _check_positions(ids, 1, cos.shape[0], "position_ids")
        return reference.apply_rotary_pos_emb(q, k, cos, sin, ids, dim)
    return _RotaryPosEmbFunction.apply(q, k, cos, sin, ids, dim)


# ----------------------------------------------------------------------------------------------------------------
# Compile check
# ----------------------------------------------------------------------------------------------------------------

COMPILE_DTYPES = (torch.bfloat16, torch.float32)
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# (variant, INTERLEAVED, COS_FULL): flash-attn halves, flash-attn interleaved, Hugging Face (full-width tables).
_VARIANTS = (("rotary", False, False), ("rotary_interleaved", True, False), ("rotary_qk", False, True))
# The representative launch: a batch of 2 sequences of 1024 tokens, 32 query and 8 key/value heads, full rotary
# on a head dim of twice the config's pairs (k64: head dim 128), contiguous tensors (flash-attn's (B, S, H, D),
# Hugging Face's (B, H, S, D) with (B, S, D) tables): every size and stride 16-divisible, channel strides 1.
_BATCH, _SEQLEN, _HEADS_Q, _HEADS_K = 2, 1024, 32, 8
_CONFIG_PAIRS = {"k16": 16, "k32": 32, "k64": 64}


def _compile_call(variant: str, interleaved: bool, dtype: torch.dtype, cos_dtype: torch.dtype, half: int) -> None:
    """One forward call of ``variant`` through the launch code, on ``meta`` tensors (backward launches the same
    kernel with another runtime ``conjugate``, the same binary)."""
    meta = dict(device="meta", dtype=dtype)
    head_dim = 2 * half
    if variant == "rotary_qk":
        q = torch.empty(_BATCH, _HEADS_Q, _SEQLEN, head_dim, **meta)
        k = torch.empty(_BATCH, _HEADS_K, _SEQLEN, head_dim, **meta)
        cos, sin = (torch.empty(_BATCH, _SEQLEN, head_dim, device="meta", dtype=cos_dtype) for _ in range(2))
        _hf_launch(q, k, torch.empty_like(q), torch.empty_like(k), cos, sin, None, 1, False)
    else:
        x = torch.empty(_BATCH, _SEQLEN, _HEADS_Q, head_dim, **meta)
        cos, sin = (torch.empty(_SEQLEN, half, device="meta", dtype=cos_dtype) for _ in range(2))
        _flash_launch(x, torch.empty_like(x), cos, sin, None, 0, interleaved, False)


def compile_specs() -> list[KernelSpec]:
    """The rotary kernel at every shipped tile, per variant, x dtype (cos/sin fp32, and x's dtype for the
    Hugging Face variant whose tables come in the model's dtype) and architecture, each captured from the launch
    code with the arguments it passes."""
    specs: list[KernelSpec] = []
    for arch in ("sm80", "sm90"):
        arch_num = 80 if arch == "sm80" else 90
        for cfg_name, cfg in ROTARY_CONFIGS[arch].items():
            half = _CONFIG_PAIRS[cfg_name]
            for variant, interleaved, cos_full in _VARIANTS:
                for dtype in COMPILE_DTYPES:
                    t = _DTYPE_NAMES[dtype]
                    for cos_dtype in sorted({torch.float32, dtype} if cos_full else {torch.float32}, key=str):
                        calls = captured_launches(
                            lambda: _compile_call(variant, interleaved, dtype, cos_dtype, half), arch)
                        for call in calls:
                            if call.launch_args()["BLOCK_K"] != cfg["BLOCK_K"]:
                                raise RuntimeError(f"rotary with {half} pairs did not launch config {cfg_name}")
                            specs.append(launch_spec(variant, call, f"{cfg_name}_{t}_cos{_DTYPE_NAMES[cos_dtype]}",
                                                     arches=(arch_num,)))
    return specs
