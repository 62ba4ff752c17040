"""Host side: one launcher per pass, from tensors in any of the three layouts to kernel arguments."""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import triton

from llmfast import _backend
from llmfast.ops._arch import multiprocessor_count
from llmfast.ops._spec import launch

from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .common import _dropout_mask_kernel
from .configs import LOG2E, _arch_key, _block_d, _config, autotune_candidates, config_key, gqa_group_split
from .forward import _attn_fwd_kernel


# ----------------------------------------------------------------------------------------------------------------
# Autotuning on a real GPU: with LLMFAST_AUTOTUNE=1, triton.autotune picks among the shipped config and a few
# compile-checked alternatives (configs.AUTOTUNE_CANDIDATES), per shape; otherwise (and always in the interpreter or
# under a forced LLMFAST_CONFIG_ARCH) the static pick stands.
# ----------------------------------------------------------------------------------------------------------------
_AUTOTUNE_KEY = ["Sq", "Sk", "HEAD_D", "HEAD_DV", "IS_VARLEN", "HAS_LEFT", "HAS_RIGHT", "HAS_MASK", "DROPOUT",
                 "SOFTCAP", "ALIBI"]
_autotuners: dict = {}
_picks: dict[str, str] = {}
_do_bench = None  # triton's default timer; tests substitute their own


def autotune_enabled(device: torch.device) -> bool:
    """LLMFAST_AUTOTUNE=1 on a real GPU (never in the interpreter, nor with a forced LLMFAST_CONFIG_ARCH)."""
    return (os.environ.get("LLMFAST_AUTOTUNE", "") == "1" and device.type == "cuda"
            and not _backend.triton_interpreter_enabled() and not os.environ.get("LLMFAST_CONFIG_ARCH"))


def autotune_picks() -> dict[str, str]:
    """The config the autotuner picked at each kernel's latest autotuned launch (``"fwd_d128": "128x64 w8 s2"``)."""
    return dict(_picks)


def _describe(cfg: dict) -> str:
    blocks = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N") if k in cfg)
    return f"{blocks} w{cfg['num_warps']} s{cfg['num_stages']}"


def _tile_launch(kernel, name: str, arch: str, cfg: dict, grid: Callable[[dict], tuple], device: torch.device):
    """(launcher, tile kwargs) for one kernel: the static config, or the autotuner over its candidates."""
    candidates = autotune_candidates(arch, name)
    if len(candidates) > 1 and autotune_enabled(device):
        key = (kernel, name, arch)
        if key not in _autotuners:
            configs = [triton.Config({k: v for k, v in c.items() if k in ("BLOCK_M", "BLOCK_N")},
                                     num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in candidates]
            _autotuners[key] = triton.autotune(configs=configs, key=_AUTOTUNE_KEY, do_bench=_do_bench)(kernel)
        tuner = _autotuners[key]

        def run(*args, **kwargs):
            launch(tuner, grid)(*args, **kwargs)
            best = tuner.best_config
            _picks[name] = _describe(dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages))

        return run, {}
    tile = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N") if k in cfg}
    return launch(kernel, grid(cfg)), dict(tile, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


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


_MAX_BLOCK = 256  # above every BLOCK_M / BLOCK_N a config ships


def _tile_rows_in_32_bits(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a dense copy when a tile of its rows would span 2**31 elements (absurd strides only)."""
    return t.contiguous() if max(abs(s) for s in t.stride()) * _MAX_BLOCK >= 2**31 else t


def _head_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Problem:
    """Sizes and flags shared by the forward and backward launches."""

    def __init__(self, q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                 window_left, window_right, bottom_right, dropout_p, seed, softcap=0.0, alibi_slopes=None):
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
        # Logit soft-capping: s = softcap * tanh(scale * qk / softcap). The kernels take tanh's argument scale
        # (softcap_in) and, as the score scale, softcap * log2(e) in place of scale * log2(e).
        self.softcap = float(softcap)
        self.softcap_in = self.scale / self.softcap if self.softcap > 0 else 0.0
        self.qk_scale = (self.softcap if self.softcap > 0 else self.scale) * LOG2E
        # ALiBi slopes, (H,) or (B, H) float32: a (B, H) view with batch stride 0 for the shared vector.
        self.has_alibi = alibi_slopes is not None
        self.alibi = alibi_slopes if self.has_alibi else q
        self.alibi_stride = alibi_slopes.stride(0) if self.has_alibi and alibi_slopes.dim() == 2 else 0
        # Soft-capping (tanh) and ALiBi take registers like a mask tile: the plain 16-bit tiles spill on sm_80 with
        # them, so they run on the "_extra" configs.
        self.extra = self.has_mask or self.dropout_p > 0 or self.softcap > 0 or self.has_alibi
        self.window = self.window_left >= 0  # a left bound: the forward runs a third loop
        # Head dims that are not multiples of 16 give head strides the launch cannot mark 16-divisible.
        self.unaligned = self.head_d % 16 != 0 or self.head_dv % 16 != 0

    def config(self, kernel: str, arch: str, dtype: torch.dtype) -> tuple[str, dict]:
        """(config key, config) of ``kernel`` for this problem under ``arch``."""
        args = (kernel, arch, max(self.block_d, self.block_dv), dtype, self.extra, self.window, self.unaligned)
        return config_key(*args), _config(*args)

    def flags(self) -> dict:
        return dict(HEAD_D=self.head_d, BLOCK_D=self.block_d, HEAD_DV=self.head_dv, BLOCK_DV=self.block_dv,
                    IS_VARLEN=self.varlen, HAS_LEFT=self.window_left >= 0, HAS_RIGHT=self.window_right >= 0,
                    BOTTOM_RIGHT=self.bottom_right, HAS_MASK=self.has_mask, MASK_IS_BOOL=self.mask_is_bool,
                    DROPOUT=self.dropout_p > 0, WIDE_DROPOUT=self.wide_dropout, FP32_IEEE=self.fp32_ieee,
                    SOFTCAP=self.softcap > 0, ALIBI=self.has_alibi)

    def reverse_m(self) -> bool:
        # Under a causal band (bounded right side) later query blocks see more keys.
        return self.window_right >= 0 and self.window_left < 0


def _forward_impl(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                  window_left, window_right, bottom_right, dropout_p, seed, softcap=0.0, alibi_slopes=None):
    q, k, v = _head_dim_contiguous(q), _head_dim_contiguous(k), _head_dim_contiguous(v)
    pb = _Problem(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                  window_left, window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes)
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = torch.empty(_lse_shape(q, layout), dtype=torch.float32, device=q.device)
    if pb.empty or out.numel() == 0:
        return out, lse.fill_(-math.inf)
    if pb.no_keys:
        return out.zero_(), lse.fill_(-math.inf)
    arch = _arch_key(q.device)
    name, cfg = pb.config("fwd", arch, q.dtype)
    _backend.record_kernel_launch("attention_fwd", cfg)
    run, tile = _tile_launch(_attn_fwd_kernel, name, arch, cfg,
                             lambda meta: (pb.batch * pb.num_heads * triton.cdiv(pb.seqlen_q, meta["BLOCK_M"]),),
                             q.device)
    run(
        q, k, v, out, lse, pb.mask, pb.cu_q, pb.cu_k, pb.alibi,
        *_bhs_strides(q, layout), *_bhs_strides(k, layout), *_bhs_strides(v, layout), *_bhs_strides(out, layout),
        *_lse_strides(lse, layout), *pb.mask_strides,
        pb.num_heads, pb.group_size, pb.seqlen_q, pb.seqlen_k, pb.qk_scale, pb.window_left, pb.window_right,
        pb.dropout_p, pb.seed, pb.softcap_in, pb.alibi_stride,
        REVERSE_M=pb.reverse_m(), **pb.flags(), **tile,
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
                   layout, scale, window_left, window_right, bottom_right, dropout_p, seed, mask_needs_grad,
                   softcap=0.0, alibi_slopes=None, grads=None):
    """dq, dk, dv (and the additive mask's gradient). ``grads``: preallocated (dq, dk, dv), e.g. strided views
    into one packed gradient, which the kernels write through their strides."""
    q, k, v = _head_dim_contiguous(q), _head_dim_contiguous(k), _head_dim_contiguous(v)
    dout, out = _head_dim_contiguous(dout), _head_dim_contiguous(out)
    # The dQ kernel keeps its in-tile row offsets 32-bit (fewer registers): strides so large that one tile's rows
    # span 2**31 elements take a dense copy first.
    q, k, v, dout = (_tile_rows_in_32_bits(t) for t in (q, k, v, dout))
    if mask is not None and max(abs(s) for s in mask.stride()) * _MAX_BLOCK >= 2**31:
        mask = mask.contiguous()
    lse = lse.contiguous()
    pb = _Problem(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, scale,
                  window_left, window_right, bottom_right, dropout_p, seed, softcap, alibi_slopes)
    dq, dk, dv = grads if grads is not None else (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
    dmask = mask.new_zeros(mask.shape) if mask_needs_grad else q.new_empty(0)
    if pb.empty or pb.no_keys:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask

    # Delta (same layout as LSE): one pass over O and dO.
    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    dlse = dlse.contiguous() if has_dlse else lse
    arch = _arch_key(q.device)
    pre = _config("bwd_preprocess", arch, pb.block_dv, q.dtype)
    _backend.record_kernel_launch("attention_bwd_preprocess", pre)
    launch(_attn_bwd_preprocess_kernel, (pb.batch * pb.num_heads, triton.cdiv(pb.seqlen_q, pre["BLOCK_M"])))(
        out, dout, dlse, delta, pb.cu_q, *_bhs_strides(out, layout), *_bhs_strides(dout, layout),
        *_lse_strides(lse, layout), pb.num_heads, pb.seqlen_q,
        HEAD_DV=pb.head_dv, BLOCK_DV=pb.block_dv, BLOCK_M=pre["BLOCK_M"], IS_VARLEN=pb.varlen, HAS_DLSE=has_dlse,
        num_warps=pre["num_warps"], num_stages=pre["num_stages"],
    )

    common = (pb.window_left, pb.window_right, pb.dropout_p, pb.seed, pb.softcap_in, pb.alibi_stride)
    name, cfg = pb.config("bwd_dkdv", arch, q.dtype)
    _backend.record_kernel_launch("attention_bwd_dkdv", cfg)
    # GQA with too few (batch, KV head, key block) programs to fill the GPU: share each group's query heads over
    # `split` programs, which write fp32 partials into a workspace (split, *dk.shape) summed below.
    split = gqa_group_split(pb.batch * pb.num_kv_heads * triton.cdiv(pb.seqlen_k, cfg["BLOCK_N"]), pb.group_size,
                            multiprocessor_count(q.device, arch), 4 * (dk.numel() + dv.numel()))
    if split > 1:
        dk_out, dv_out = (torch.empty((split,) + tuple(t.shape), dtype=torch.float32, device=t.device)
                          for t in (dk, dv))
        dk_slot, dv_slot = dk_out[0], dv_out[0]
        split_strides = (dk_out.stride(0), dv_out.stride(0))
    else:
        dk_out, dv_out = dk_slot, dv_slot = dk, dv
        split_strides = (0, 0)
    run, tile = _tile_launch(
        _attn_bwd_dkdv_kernel, name, arch, cfg,
        lambda meta: (pb.batch * pb.num_kv_heads * split * triton.cdiv(pb.seqlen_k, meta["BLOCK_N"]),), q.device)
    run(
        q, k, v, dout, lse, delta, dk_out, dv_out, pb.mask, pb.cu_q, pb.cu_k, pb.alibi,
        *_bhs_strides(q, layout), *_bhs_strides(k, layout), *_bhs_strides(v, layout),
        *_bhs_strides(dout, layout), *_bhs_strides(dk_slot, layout), *_bhs_strides(dv_slot, layout),
        *_lse_strides(lse, layout), *pb.mask_strides, *split_strides,
        pb.num_heads, pb.num_kv_heads, pb.group_size, split, pb.seqlen_q, pb.seqlen_k, pb.qk_scale, pb.scale,
        *common, **pb.flags(), **tile,
    )
    if split > 1:
        # A fixed-order sum in fp32, rounded once to the gradients' dtype (nearest-even, as the kernel's store).
        dk.copy_(dk_out.sum(0))
        dv.copy_(dv_out.sum(0))

    ds = (torch.zeros((pb.batch, pb.num_heads, pb.seqlen_q, pb.seqlen_k), dtype=torch.float32, device=q.device)
          if mask_needs_grad else lse)
    name, cfg = pb.config("bwd_dq", arch, q.dtype)
    _backend.record_kernel_launch("attention_bwd_dq", cfg)
    run, tile = _tile_launch(_attn_bwd_dq_kernel, name, arch, cfg,
                             lambda meta: (pb.batch * pb.num_heads * triton.cdiv(pb.seqlen_q, meta["BLOCK_M"]),),
                             q.device)
    run(
        q, k, v, dout, lse, delta, dq, ds, pb.mask, pb.cu_q, pb.cu_k, pb.alibi,
        *_bhs_strides(q, layout), *_bhs_strides(k, layout), *_bhs_strides(v, layout),
        *_bhs_strides(dout, layout), *_bhs_strides(dq, layout), *_lse_strides(lse, layout), *pb.mask_strides,
        pb.num_heads, pb.group_size, pb.seqlen_q, pb.seqlen_k, pb.qk_scale, pb.scale, *common,
        REVERSE_M=pb.reverse_m(), STORE_DS=mask_needs_grad, **pb.flags(), **tile,
    )
    if mask_needs_grad:
        dmask = _reduce_to_shape(ds, mask.shape).to(mask.dtype)
    return dq, dk, dv, dmask


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
