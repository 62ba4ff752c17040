"""Named tile configs per architecture, and the config a launch picks (by ``config_arch``, head-dim bucket,
dtype and features)."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import triton

from llmfast.ops._arch import config_arch

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256

# ----------------------------------------------------------------------------------------------------------------
# Tuning: named configs per architecture, one per kernel, head-dim bucket (the padded head dim: "d64" serves head
# dims 1..64, "d128" 65..128, "d256" 129..256) and kind of input: 16-bit inputs without extras, 16-bit inputs with
# an attn_mask, dropout, softcap or ALiBi ("_extra": mask tiles, Philox, tanh need registers: smaller tiles), and fp32
# inputs ("_fp32": exact fp32 dots run on the FMA units, which need much smaller tiles). BLOCK_M counts query rows,
# BLOCK_N key rows. Every entry is the largest tile found that ``python -m llmfast.compile_check`` builds without
# register spills (Triton 3.9, ptxas from its wheel) *with the specialization a launch gets* (16-divisible pointers
# and strides: vectorized loads, cp.async pipelining); candidates are compared with
# ``python -m llmfast.ops.attention.tune``. Refinements, where a tile that fits the common case spills:
# ``_window`` (a sliding window's left bound: the forward's third loop) and ``_unaligned`` (head dims that are not
# multiples of 16: scalar loads). Speed on real GPUs is triton.autotune's (AUTOTUNE_CANDIDATES, LLMFAST_AUTOTUNE=1).
# On sm_90 the 16-bit kernels use wgmma, except the entries marked ``mma_sync``: at head dim 256 (and the forward
# with extras) wgmma's 64-row tiles spill, so they run 16/32-row tiles on mma.sync instead.
# ----------------------------------------------------------------------------------------------------------------
ATTENTION_CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "sm90": {
        "fwd_d64": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "fwd_d128": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "fwd_d256": dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1),
        "fwd_d256_unaligned": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1, mma_sync=True),
        "fwd_d64_extra": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d128_extra": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d256_extra": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1, mma_sync=True),
        "fwd_d64_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "fwd_d128_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "fwd_d256_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1),
        "bwd_preprocess_d64": dict(BLOCK_M=64, num_warps=8, num_stages=1),
        "bwd_preprocess_d128": dict(BLOCK_M=32, num_warps=4, num_stages=1),
        "bwd_preprocess_d256": dict(BLOCK_M=32, num_warps=8, num_stages=1),
        "bwd_dkdv_d64": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
        "bwd_dkdv_d64_unaligned": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
        "bwd_dkdv_d128": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
        "bwd_dkdv_d128_unaligned": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dkdv_d256": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1, mma_sync=True),
        "bwd_dkdv_d64_extra": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
        "bwd_dkdv_d128_extra": dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dkdv_d256_extra": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1, mma_sync=True),
        "bwd_dkdv_d64_fp32": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
        "bwd_dkdv_d128_fp32": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
        "bwd_dkdv_d256_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq_d64": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dq_d128": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dq_d128_unaligned": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "bwd_dq_d256": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, mma_sync=True),
        "bwd_dq_d256_window": dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1, mma_sync=True),
        "bwd_dq_d64_extra": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
        "bwd_dq_d128_extra": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "bwd_dq_d256_extra": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1, mma_sync=True),
        "bwd_dq_d64_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq_d128_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq_d256_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
    },
    "sm80": {
        "fwd_d64": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "fwd_d64_unaligned": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
        "fwd_d128": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "fwd_d128_window": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d128_unaligned": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d256": dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1),
        "fwd_d256_unaligned": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1),
        "fwd_d64_extra": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d128_extra": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "fwd_d256_extra": dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1),
        "fwd_d64_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "fwd_d128_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "fwd_d256_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1),
        "bwd_preprocess_d64": dict(BLOCK_M=64, num_warps=8, num_stages=1),
        "bwd_preprocess_d128": dict(BLOCK_M=32, num_warps=4, num_stages=1),
        "bwd_preprocess_d256": dict(BLOCK_M=32, num_warps=8, num_stages=1),
        "bwd_dkdv_d64": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
        "bwd_dkdv_d64_unaligned": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1),
        "bwd_dkdv_d128": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dkdv_d128_unaligned": dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dkdv_d256": dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1),
        "bwd_dkdv_d64_extra": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1),
        "bwd_dkdv_d128_extra": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2),
        "bwd_dkdv_d256_extra": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1),
        "bwd_dkdv_d64_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1),
        "bwd_dkdv_d128_fp32": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
        "bwd_dkdv_d256_fp32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=2),
        "bwd_dq_d64": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dq_d64_unaligned": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
        "bwd_dq_d128": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
        "bwd_dq_d128_unaligned": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "bwd_dq_d256": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1),
        "bwd_dq_d64_extra": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "bwd_dq_d128_extra": dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2),
        "bwd_dq_d256_extra": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq_d64_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_dq_d128_fp32": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
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


# Where a GPU is present and LLMFAST_AUTOTUNE=1, triton.autotune picks per shape among the shipped config and these
# alternatives (each one compile-checked like the shipped ones: see specs.py); elsewhere the static pick stands.
AUTOTUNE_CANDIDATES: dict[str, dict[str, list[dict[str, int]]]] = {
    "sm90": {
        "fwd_d128": [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)],
    },
    "sm80": {
        "fwd_d64": [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)],
    },
}


def autotune_candidates(arch: str, name: str) -> list[dict[str, int]]:
    """The shipped config ``name`` of ``arch`` first, then its autotuning alternatives (none: a static pick)."""
    shipped = ATTENTION_CONFIGS[arch].get(name)
    if shipped is None:
        return []
    return [shipped] + AUTOTUNE_CANDIDATES.get(arch, {}).get(name, [])


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


def config_key(kernel: str, arch: str, block_d: int, dtype: torch.dtype, extra: bool = False,
               window: bool = False, unaligned: bool = False) -> str:
    """The key of the config a launch uses in ``ATTENTION_CONFIGS[arch]``: ``_config_name``'s, refined where the
    arch ships a variant: ``<name>_window`` for a sliding window's left bound (a third loop over the window's left
    edge, so more live registers), ``<name>_unaligned`` for head dims that are not multiples of 16 (the launch gets
    no 16-divisibility on the head strides: scalar loads, one address per element, no cp.async). The interpreter's
    per-kernel entry there."""
    configs = ATTENTION_CONFIGS[arch]
    if kernel in configs:
        return kernel
    name = _config_name(kernel, block_d, dtype, extra)
    for suffix, wanted in (("_window", window), ("_unaligned", unaligned)):
        if wanted and name + suffix in configs:
            return name + suffix
    return name


def _config(kernel: str, arch: str, block_d: int, dtype: torch.dtype, extra: bool = False,
            window: bool = False, unaligned: bool = False) -> dict[str, int]:
    """The named config of ``kernel`` ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq") for ``arch``
    ("sm80", "sm90" or "interpreter"): by head-dim bucket, fp32 or 16-bit inputs, ``extra`` features (an
    attn_mask tile or dropout's Philox rounds need registers, so they get smaller tiles) and a sliding
    window's left bound or an unaligned head dim (see :func:`config_key`)."""
    return ATTENTION_CONFIGS[arch][config_key(kernel, arch, block_d, dtype, extra, window, unaligned)]


def _block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; other head dims are padded with masked (zero) lanes.
    return max(16, triton.next_power_of_2(head_dim))


# ----------------------------------------------------------------------------------------------------------------
# GQA in the dK/dV pass: one program per (batch, KV head, key block) sums the gradients of all the query heads of
# its KV head's group. With few KV heads and a small batch that grid leaves most SMs idle while each program works
# group_size times longer (32 query heads on 4 KV heads, batch 1, 2048 keys in 128-row blocks: 4 x 16 = 64
# programs of 8 query heads each on 132 SMs; split in 2, 128 programs of 4 heads).
# Then ``group_split`` programs share one group's query heads per key block, each writes an fp32 partial dK/dV
# (a workspace of group_split x the gradients' size) and the host sums the partials: no atomics, deterministic.
# ----------------------------------------------------------------------------------------------------------------
# The workspace never exceeds this (it is small anyway: splitting only happens when the un-split grid has fewer
# programs than the GPU has SMs, i.e. fewer than ~132 key blocks of 16-128 rows per (batch, KV head) in all).
GQA_SPLIT_MAX_WORKSPACE_BYTES = 128 << 20

_forced_gqa_split: contextvars.ContextVar[int | None] = contextvars.ContextVar("llmfast_gqa_split", default=None)


@contextlib.contextmanager
def forced_gqa_split(split: int) -> Iterator[None]:
    """dK/dV launches inside share each GQA group over ``split`` programs (capped at the group size) whatever the
    heuristic would pick: tests and the compile check reach the split path on small shapes this way."""
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"split must be a positive int, got {split!r}")
    token = _forced_gqa_split.set(split)
    try:
        yield
    finally:
        _forced_gqa_split.reset(token)


def gqa_group_split(programs: int, group_size: int, sms: int | None, split_bytes: int) -> int:
    """How many programs share one KV head's query heads per key block in the dK/dV pass (1: no split).

    ``programs``: the un-split grid (batch x KV heads x key blocks); ``sms``: the SMs to fill (None: the CPU
    interpreter, never split unless forced); ``split_bytes``: the fp32 workspace one more share costs. Splits only
    when the un-split grid is smaller than one wave, and then picks the split with the least estimated time,
    counted as waves (one program per SM: the dK/dV tiles take most of an SM's registers) x query heads per
    program; ties go to the smaller split (less workspace, a cheaper sum). A split over twice the one that just
    fills the GPU never pays, nor one whose workspace would pass ``GQA_SPLIT_MAX_WORKSPACE_BYTES``."""
    forced = _forced_gqa_split.get()
    if forced is not None:
        return max(1, min(forced, group_size))
    if sms is None or group_size <= 1 or programs <= 0 or programs >= sms:
        return 1
    limit = min(group_size, 2 * triton.cdiv(sms, programs), GQA_SPLIT_MAX_WORKSPACE_BYTES // max(split_bytes, 1))
    best, best_cost = 1, group_size  # un-split: one wave of group_size heads each
    for split in range(2, limit + 1):
        cost = triton.cdiv(programs * split, sms) * triton.cdiv(group_size, split)
        if cost < best_cost:
            best, best_cost = split, cost
    return best
