"""Decode attention tuning: named tile configs per architecture, the row-block kinds, and the split heuristic."""
from __future__ import annotations

import functools

import torch
import triton

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MAX_SPLITS = 128

# ----------------------------------------------------------------------------------------------------------------
# Tuning. Kinds: "m1" runs one query row on the FMA units; "m16" / "m64" use tl.dot with 16 / 64-row blocks
# (2..16 rows, then 17 and more). Head-dim buckets as in attention.py ("d64" serves 1..64, ...).
# "_fp32" entries serve float32 inputs. Every entry compiles without spills at a representative launch's
# specialization (python -m llmfast.compile_check --kernel decode: 90 builds; 56-96 registers for one row, 68-80
# for 16-row blocks, 112-227 for 64-row blocks; the tl.dot kernels' K/V loads are cp.async-pipelined). Chosen by
# sweeping tiles for the first that builds without spills; speed tuning on real GPUs is still to do.
# ----------------------------------------------------------------------------------------------------------------
_COMMON_CONFIGS = {
    "m16_d64": dict(BLOCK_N=64, num_warps=4, num_stages=3),
    "m16_d128": dict(BLOCK_N=64, num_warps=8, num_stages=2),
    "m16_d256": dict(BLOCK_N=32, num_warps=8, num_stages=2),
    "m64_d64": dict(BLOCK_N=64, num_warps=8, num_stages=2),
    "m64_d128": dict(BLOCK_N=32, num_warps=8, num_stages=2),
    "m64_d256": dict(BLOCK_N=16, num_warps=8, num_stages=1),
    "m1_d64_fp32": dict(BLOCK_N=64, num_warps=4, num_stages=2),
    "m1_d128_fp32": dict(BLOCK_N=32, num_warps=4, num_stages=2),
    "m1_d256_fp32": dict(BLOCK_N=16, num_warps=4, num_stages=2),
    "m16_d64_fp32": dict(BLOCK_N=32, num_warps=4, num_stages=1),
    "m16_d128_fp32": dict(BLOCK_N=16, num_warps=4, num_stages=1),
    "m16_d256_fp32": dict(BLOCK_N=16, num_warps=8, num_stages=1),
}
DECODE_CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "sm90": {
        "m1_d64": dict(BLOCK_N=128, num_warps=4, num_stages=2),
        "m1_d128": dict(BLOCK_N=64, num_warps=8, num_stages=2),
        "m1_d256": dict(BLOCK_N=32, num_warps=8, num_stages=2),
        **_COMMON_CONFIGS,
    },
    "sm80": {
        "m1_d64": dict(BLOCK_N=128, num_warps=4, num_stages=2),
        "m1_d128": dict(BLOCK_N=32, num_warps=4, num_stages=2),
        "m1_d256": dict(BLOCK_N=32, num_warps=4, num_stages=2),
        **_COMMON_CONFIGS,
    },
    # The CPU interpreter: 16-key tiles, so short test caches still cross several tiles and several splits.
    "interpreter": {"decode": dict(BLOCK_N=16, num_warps=4, num_stages=1)},
}
_KIND_ROWS = {"m1": 1, "m16": 16, "m64": 64}

# The split heuristic's machine description per architecture (on a real card the SM count is read from it).
SPLIT_HEURISTIC = {
    "sm90": dict(num_sms=132, waves=2, min_tiles_per_split=4),
    "sm80": dict(num_sms=108, waves=2, min_tiles_per_split=4),
    "interpreter": dict(num_sms=4, waves=1, min_tiles_per_split=1),
}


def _head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def _row_kind(rows: int) -> tuple[str, int]:
    """(config kind, BLOCK_M) for a block of ``rows`` = Sq x group query rows sharing one KV head."""
    if rows <= 1:
        return "m1", 1
    if rows <= 16:
        return "m16", 16
    return "m64", 64


def _row_kind_for(rows: int, dtype: torch.dtype) -> tuple[str, int]:
    """:func:`_row_kind`, except that float32 (exact fp32 dots, for tests) stays at 16-row blocks."""
    kind, block_m = _row_kind(rows)
    return ("m16", 16) if dtype == torch.float32 and kind == "m64" else (kind, block_m)


def _config_name(arch: str, kind: str, block_d: int, dtype: torch.dtype) -> str:
    if "decode" in DECODE_CONFIGS[arch]:
        return "decode"
    return f"{kind}_d{_head_dim_bucket(block_d)}" + ("_fp32" if dtype == torch.float32 else "")


def _config(arch: str, kind: str, block_d: int, dtype: torch.dtype) -> dict[str, int]:
    return DECODE_CONFIGS[arch][_config_name(arch, kind, block_d, dtype)]


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(batch: int, kv_heads: int, row_blocks: int, seqlen_k: int, block_n: int,
                      arch: str = "sm90", num_sms: int | None = None) -> int:
    """How many programs share one (batch, KV head, row block)'s key range when ``num_splits=0``.

    Without splitting there are ``batch x kv_heads x row_blocks`` programs; a decoding step at small batch has far
    fewer than the card has SMs, and each streams a long cache alone. So: no split once the grid already covers
    ``waves x num_sms`` programs; otherwise enough splits to reach that, but never so many that a split gets fewer
    than ``min_tiles_per_split`` key tiles of ``block_n`` (each split pays a fixed cost: loading q, writing a
    partial output, its share of the combine), and at most ``MAX_SPLITS``. ``seqlen_k`` is the longest key range
    of the call. The machine description (``SPLIT_HEURISTIC``) is per architecture; ``num_sms`` overrides it (the
    launch passes the card's own count).
    """
    params = SPLIT_HEURISTIC[arch]
    sms = num_sms if num_sms is not None else params["num_sms"]
    programs = max(1, batch * kv_heads * row_blocks)
    target = params["waves"] * sms
    if programs >= target:
        return 1
    tiles = max(1, triton.cdiv(max(seqlen_k, 0), block_n))
    by_length = max(1, tiles // params["min_tiles_per_split"])
    return int(max(1, min(triton.cdiv(target, programs), by_length, MAX_SPLITS)))
