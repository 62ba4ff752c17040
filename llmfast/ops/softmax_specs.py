"""Compile-check specs of the softmax family's kernels: every kernel at every tile it can be launched with, per
variant and input dtype, with the launch Triton specializes (``python -m llmfast.compile_check``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from llmfast.ops._spec import KernelSpec, triton_default, triton_signature
from llmfast.ops.softmax import (
    Tile,
    ROW_TILES,
    STRIDED_TILES,
    LOOPED_TILES,
    MAX_SINGLE_PASS_COLS_MASKED,
    MAX_SEGMENTS,
    MASK_NONE,
    MASK_BOOL,
    MASK_ADD,
    _softmax_fwd_kernel,
    _softmax_bwd_kernel,
    _softmax_fwd_stats_kernel,
    _softmax_fwd_looped_kernel,
    _softmax_bwd_stats_kernel,
    _softmax_bwd_looped_kernel,
)


def _layout_ones(kind: str, prefixes: Sequence[str]) -> list[str]:
    """Strides equal to 1 for a layout: the column stride for rows, the row stride for strided tiles."""
    suffix = "_s_col" if kind == "row" else "_s_row"
    return [f"{p}{suffix}" for p in prefixes]


_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "u8": torch.uint8}
# Runtime flags (never specialized: see the kernels' do_not_specialize) at their usual values.
_LAUNCH_INTS = {"causal": 0, "q_len": 1, "zero_empty_rows": 0, "segmented": 1, "n_segments": 4}

# Input dtypes the compile check builds: fp32 (the register-heaviest: 32-bit loads) and bf16 (16-bit loads and
# conversions; fp16 takes the same code path with another conversion instruction).
COMPILE_DTYPES = ("bf16", "fp32")
# (name, LOG, MASK_MODE): the forward variants; backward has softmax and log-softmax only.
_FWD_VARIANTS = (("softmax", False, MASK_NONE), ("log_softmax", True, MASK_NONE),
                 ("masked_softmax_bool", False, MASK_BOOL), ("masked_softmax_add", False, MASK_ADD))
_BWD_VARIANTS = (("softmax", False), ("log_softmax", True))


def compile_specs() -> list[KernelSpec]:
    """Every kernel at every tile it can be launched with, per variant and input dtype, for compile_check."""
    specs: list[KernelSpec] = []

    def add(name: str, fn, kind: str, cfg: str, tile: Tile, t: str, pointers: dict[str, str],
            stride_prefixes: Sequence[str], **constexprs) -> None:
        ones = [o for o in _layout_ones(kind, stride_prefixes) if o in fn.arg_names]
        sig, ones_c = triton_signature(fn, pointers, ("scale",), ones)
        consts = {"BLOCK_R": tile.block_r, "BLOCK_C": tile.block_c, **constexprs, **ones_c}
        # The launch the compile check builds (with Triton's launch specialization): aligned tensors, unit strides
        # where the layout has them, and every other size and stride a multiple of 16 (4096-column rows, a
        # multiple of 16 rows), as in a model's activations.
        launch_args = {}
        for arg, kind in sig.items():
            if kind == "constexpr":
                launch_args[arg] = consts[arg]
            elif kind.startswith("*"):
                launch_args[arg] = _TORCH_DTYPE[kind[1:]]
            else:
                launch_args[arg] = 1.0 if kind == "fp32" else _LAUNCH_INTS.get(arg, 4096)
        # The launches pass num_warps only, so they get Triton's default stages.
        specs.append(KernelSpec(name, fn, sig, consts, f"{cfg}_{t}", num_warps=tile.num_warps,
                                num_stages=triton_default("num_stages"), launch_args=launch_args))

    row_tiles = [("row", n, t) for n, t in ROW_TILES.items()]
    strided_tiles = [("strided", n, t) for n, t in STRIDED_TILES.items()]
    looped = {"looped_row": ("row", LOOPED_TILES["looped_row"]),
              "looped_strided": ("strided", LOOPED_TILES["looped_strided"])}
    for t in COMPILE_DTYPES:
        for variant, log, mask_mode in _FWD_VARIANTS:
            ptrs = {"out_ptr": f"*{t}", "x_ptr": f"*{t}", "mask_ptr": "*u8" if mask_mode == MASK_BOOL else f"*{t}",
                    "max_ptr": "*fp32", "sum_ptr": "*fp32"}
            masked = mask_mode != MASK_NONE
            strides = ("x", "out", "mask") if masked else ("x", "out")
            # Masked inputs take the row tiles only (see STRIDED_TILES), up to MAX_SINGLE_PASS_COLS_MASKED.
            for kind, cfg, tile in row_tiles + ([] if masked else strided_tiles):
                if masked and tile.block_c > MAX_SINGLE_PASS_COLS_MASKED:
                    continue
                add(f"{variant}_fwd", _softmax_fwd_kernel, kind, cfg, tile, t, ptrs, strides, LOG=log,
                    MASK_MODE=mask_mode)
            for cfg, (kind, tile) in looped.items():
                if masked and kind == "strided":
                    continue
                if not log:  # the statistics pass does not depend on LOG
                    add(f"{variant}_fwd_looped_stats", _softmax_fwd_stats_kernel, kind, cfg, tile, t, ptrs, strides,
                        MASK_MODE=mask_mode)
                add(f"{variant}_fwd_looped", _softmax_fwd_looped_kernel, kind, cfg, tile, t, ptrs, strides,
                    LOG=log, MASK_MODE=mask_mode, MAX_SEGS=MAX_SEGMENTS)
        ptrs = {"dx_ptr": f"*{t}", "y_ptr": f"*{t}", "dy_ptr": f"*{t}", "dot_ptr": "*fp32"}
        for variant, log in _BWD_VARIANTS:
            for kind, cfg, tile in row_tiles + strided_tiles:
                add(f"{variant}_bwd", _softmax_bwd_kernel, kind, cfg, tile, t, ptrs, ("dx", "y", "dy"), LOG=log)
            for cfg, (kind, tile) in looped.items():
                add(f"{variant}_bwd_looped_stats", _softmax_bwd_stats_kernel, kind, cfg, tile, t, ptrs,
                    ("dx", "y", "dy"), LOG=log)
                add(f"{variant}_bwd_looped", _softmax_bwd_looped_kernel, kind, cfg, tile, t, ptrs,
                    ("dx", "y", "dy"), LOG=log, MAX_SEGS=MAX_SEGMENTS)
    return specs
