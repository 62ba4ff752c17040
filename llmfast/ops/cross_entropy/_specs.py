"""Compile-check specs of the cross-entropy kernels (``python -m llmfast.compile_check --kernel cross_entropy``).

Each spec is a launch captured from the real launchers (``rows_triton``, ``shard_stats_triton``,
``shard_grad_triton``) called on ``meta`` tensors, so it carries the arguments a GPU launch passes and the compile
check gives them Triton's launch specialization (16-divisible pointers and sizes, arguments equal to 1 as
constants: with a ``mean``/``sum`` gradient the z-loss scale's offset 1 is one).
"""
from __future__ import annotations

import torch

from llmfast.ops._spec import KernelSpec, captured_launches, launch_spec
from llmfast.ops.cross_entropy._kernels import (CE_TILES, LossOptions, pick_ce_tile, rows_triton,
                                                shard_grad_triton, shard_stats_triton)

# The kernel variants the compile check builds: the plain loss, each option alone (with the gradient), all of them
# at once (the most registers, with token scaling), and the forward-only forms. Flags: smoothing, weight, z-loss,
# softcap, argmax, grad.
_FUSED_VARIANTS = {
    "": (False, False, False, False, False, False),
    "_grad": (False, False, False, False, False, True),
    "_grad_smooth": (True, False, False, False, False, True),
    "_grad_weight": (False, True, False, False, False, True),
    "_grad_weight_smooth": (True, True, False, False, False, True),
    "_grad_zloss": (False, False, True, False, False, True),
    "_grad_softcap": (False, False, False, True, False, True),
    "_argmax": (False, False, False, False, True, False),
    "_grad_all": (True, True, True, True, True, True),
    "_all": (True, True, True, True, True, False),
}
# Variants also built with int32 targets (torch accepts both; the target and the unused argmax pointer change type).
_INT32_VARIANTS = ("", "_grad")
# Variants also built with the upstream gradient of reduction="none" (one fp32 scale per row, stride 1, which the
# launch specializes as a constant; no z-loss offset): cross_entropy's and fused_linear_cross_entropy's backward.
_PER_ROW_VARIANTS = ("_grad", "_grad_all")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# The representative launch: 4096 tokens; per tile a vocabulary that picks it (a 1024-class head; Llama 2's 32000,
# or Llama 3's 128256 split over two ranks for the shard kernels, this being rank 1's 64128 columns), contiguous
# logits: every size and stride 16-divisible, as a real model's vocabulary padding makes them.
_ROWS = 4096
_VOCAB = {"v1k": (1024, 1024), "v4k": (32000, 64128)}  # (whole vocabulary, one of two shards)


def _options(smooth: bool, weight: bool, zloss: bool, softcap: bool, argmax: bool, n_classes: int,
             token_scaling: bool = False) -> LossOptions:
    return LossOptions(ignore_index=-100, label_smoothing=0.1 if smooth else 0.0,
                       lse_square_scale=1e-4 if zloss else 0.0, softcap=30.0 if softcap else None,
                       weight=torch.empty(n_classes, device="meta", dtype=torch.float32) if weight else None,
                       track_argmax=argmax, token_scaling=token_scaling)


def _fused_call(dtype: torch.dtype, target_dtype: torch.dtype, n_cols: int, flags: tuple[bool, ...],
                token_scaling: bool, per_row: bool = False) -> None:
    """``cross_entropy``'s launch: the loss of every row, with the gradient scaled by ``mean``'s fp32 pair (or,
    ``per_row``, by reduction="none"'s upstream gradient)."""
    *options, grad = flags
    logits = torch.empty(_ROWS, n_cols, device="meta", dtype=dtype)
    target = torch.empty(_ROWS, device="meta", dtype=target_dtype)
    scale = torch.empty(_ROWS if per_row else 2, device="meta", dtype=torch.float32) if grad else None
    rows_triton(logits, target, _options(*options, n_cols, token_scaling),
                torch.empty_like(logits) if grad else None, scale, per_row)


def _shard_calls(dtype: torch.dtype, n_cols: int) -> None:
    """Both passes over rank 1's vocabulary shard (``process_group=``), every option on."""
    logits = torch.empty(_ROWS, n_cols, device="meta", dtype=dtype)
    target = torch.empty(_ROWS, device="meta", dtype=torch.int64)
    opts = _options(True, True, False, True, True, 2 * n_cols)
    weight_shard = torch.empty(n_cols, device="meta", dtype=torch.float32)
    shard_stats_triton(logits, target, opts, n_cols, weight_shard)
    lse, a, coef_t = (torch.empty(_ROWS, device="meta", dtype=torch.float32) for _ in range(3))
    uni = torch.empty(1, device="meta", dtype=torch.float32)
    shard_grad_triton(logits, torch.empty_like(logits), target, opts, n_cols, weight_shard, lse, a, coef_t, uni)


def compile_specs() -> list[KernelSpec]:
    """The cross-entropy kernels at each vocabulary tile and logits dtype, for the variants above (int64 targets;
    int32 targets for the plain and gradient forms; per-row gradient scales for two), and the two vocabulary-shard
    kernels with all options. The tiles are the same on every architecture, so each spec serves all of them."""
    specs = []
    for cfg, (n_cols, shard_cols) in _VOCAB.items():
        if pick_ce_tile(n_cols)[1] != CE_TILES[cfg] or pick_ce_tile(shard_cols)[1] != CE_TILES[cfg]:
            raise RuntimeError(f"the compile vocabulary for {cfg} does not pick it")
        for dtype, t in _DTYPE_NAMES.items():
            for suffix, flags in _FUSED_VARIANTS.items():
                for target_dtype in (torch.int64, torch.int32) if suffix in _INT32_VARIANTS else (torch.int64,):
                    name = "cross_entropy" + suffix + ("_i32" if target_dtype == torch.int32 else "")
                    calls = captured_launches(
                        lambda: _fused_call(dtype, target_dtype, n_cols, flags, suffix.endswith("all")), "sm90")
                    specs += [launch_spec(name, call, f"{cfg}_{t}") for call in calls]
                if suffix in _PER_ROW_VARIANTS:
                    calls = captured_launches(
                        lambda: _fused_call(dtype, torch.int64, n_cols, flags, suffix.endswith("all"), True), "sm90")
                    specs += [launch_spec(f"cross_entropy{suffix}_per_row", call, f"{cfg}_{t}") for call in calls]
            calls = captured_launches(lambda: _shard_calls(dtype, shard_cols), "sm90")
            for call, kernel in zip(calls, ("cross_entropy_shard_stats", "cross_entropy_shard_grad")):
                specs.append(launch_spec(kernel, call, f"{cfg}_{t}"))
    return specs
