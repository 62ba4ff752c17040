"""Ahead-of-time compile check (``python -m llmfast.compile_check --kernel decode``): every config of every
architecture at a representative launch."""
from __future__ import annotations

import inspect

import torch

from llmfast.ops._spec import KernelSpec

from .configs import DECODE_CONFIGS, MAX_SPLITS, _KIND_ROWS
from .kernels import _decode_combine_kernel, _decode_kernel, _kv_append_kernel

# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (python -m llmfast.compile_check --kernel decode)
# ----------------------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INDEX_POINTERS = ("SeqLensK", "BatchIdx", "BlockTable", "CacheSeqlens")
_FLOAT_POINTERS = ("Lse", "OutAcc", "LseAcc", "Alibi")
_FLOAT_SCALARS = ("qk_scale", "softcap2")

# Feature sets compiled for every decode config: the plain contiguous single-split step, and everything at once
# (paged cache, split-KV, a two-sided window, ALiBi, softcap, 64-bit offsets).
_VARIANTS = {
    "plain": dict(PAGED=False, HAS_SEQLENS=True, HAS_BATCH_IDX=False, HAS_LEFT=False, HAS_RIGHT=False,
                  HAS_ALIBI=False, HAS_SOFTCAP=False, SPLIT=False, WIDE=False),
    "paged_all": dict(PAGED=True, HAS_SEQLENS=True, HAS_BATCH_IDX=False, HAS_LEFT=True, HAS_RIGHT=True,
                      HAS_ALIBI=True, HAS_SOFTCAP=True, SPLIT=True, WIDE=True),
    "batchidx_causal_split": dict(PAGED=False, HAS_SEQLENS=True, HAS_BATCH_IDX=True, HAS_LEFT=False,
                                  HAS_RIGHT=True, HAS_ALIBI=False, HAS_SOFTCAP=False, SPLIT=True, WIDE=False),
}


_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "i32": torch.int32}
# Representative problem per row kind (batch 8, 4096 cached positions): what a real launch passes, so the compile
# check specializes the kernel as Triton's launcher would (16-divisible strides, arguments equal to 1 as constants).
_LAUNCH_SHAPES = {"m1": dict(seqlen_q=1, num_heads=8, num_kv_heads=8),
                  "m16": dict(seqlen_q=4, num_heads=32, num_kv_heads=8),
                  "m64": dict(seqlen_q=8, num_heads=64, num_kv_heads=8)}
_BATCH, _LENGTH, _PAGE, _SPLITS = 8, 4096, 256, 4


def _launch_args(fn, io: str, ints: dict, constexprs: dict, cos: str = "fp32") -> dict:
    """Every argument of ``fn`` at a representative launch: pointers as torch dtypes (aligned tensors), the
    integers from ``ints``, the float scalars, the constexprs."""
    args = {}
    for name, param in inspect.signature(fn.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            args[name] = constexprs[name]
        elif name in _INDEX_POINTERS:
            args[name] = torch.int32
        elif name in _FLOAT_POINTERS:
            args[name] = torch.float32
        elif name in ("Cos", "Sin"):
            args[name] = _TORCH_DTYPE[cos]
        elif name[0].isupper():
            args[name] = _TORCH_DTYPE[io]
        elif name in _FLOAT_SCALARS:
            args[name] = 0.125
        else:
            args[name] = ints[name]
    return args


def _decode_ints(kind: str, block_d: int, variant: dict) -> dict:
    shape = _LAUNCH_SHAPES[kind]
    sq, heads, kv_heads = shape["seqlen_q"], shape["num_heads"], shape["num_kv_heads"]
    group = heads // kv_heads
    rows = _PAGE if variant["PAGED"] else _LENGTH
    return dict(stride_qb=sq * group * block_d, stride_qm=block_d,
                stride_kb=rows * kv_heads * block_d, stride_kn=kv_heads * block_d, stride_kh=block_d,
                stride_vb=rows * kv_heads * block_d, stride_vn=kv_heads * block_d, stride_vh=block_d,
                stride_ob=sq * heads * block_d, stride_om=heads * block_d, stride_oh=block_d,
                stride_lb=heads * sq, stride_lh=sq, stride_btb=_LENGTH // _PAGE,
                stride_ab=heads if variant["HAS_ALIBI"] else 0, batch=_BATCH, seqlen_q=sq, num_heads=heads,
                num_kv_heads=kv_heads, group_size=group, fixed_seqlen_k=_LENGTH,
                page_size=_PAGE if variant["PAGED"] else 1, num_splits=_SPLITS if variant["SPLIT"] else 1,
                window_left=256, window_right=0)


def compile_specs() -> list[KernelSpec]:
    """Every decode config of every GPU architecture (16-bit in three feature sets, fp32 in one), the combine
    kernel per head-dim bucket, and the append kernel with and without rotary, each at a representative launch."""
    specs = []
    for arch_key, arch in (("sm80", 80), ("sm90", 90)):
        for name, cfg in DECODE_CONFIGS[arch_key].items():
            kind, bucket = name.split("_")[:2]
            fp32 = name.endswith("_fp32")
            block_d = int(bucket[1:])
            block_m = _KIND_ROWS[kind]
            cases = ((torch.float32, "batchidx_causal_split"),) if fp32 else (
                (torch.float16, "plain"), (torch.bfloat16, "paged_all"), (torch.float16, "batchidx_causal_split"))
            for dtype, variant in cases:
                io = _TRITON_DTYPE[dtype]
                values = dict(_VARIANTS[variant], HEAD_D=block_d, BLOCK_D=block_d, BLOCK_M=block_m,
                              BLOCK_N=cfg["BLOCK_N"], USE_DOT=block_m >= 16, FP32_IEEE=fp32)
                # sm_90 runs 64-row dots on wgmma; 16-row blocks are below wgmma's tile and use mma.sync.
                matrix = None if block_m < 16 else "fma" if fp32 else "tensor" if block_m >= 64 else "mma"
                label = f"{name}_{variant}" if fp32 else f"{name}_{io}_{variant}"
                specs.append(KernelSpec(
                    "decode_attention", _decode_kernel, config=label,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], arches=(arch,), matrix=matrix,
                    launch_args=_launch_args(_decode_kernel, io, _decode_ints(kind, block_d, _VARIANTS[variant]),
                                             values)))
        for block_d in (64, 128, 256):
            for dtype in (torch.float16, torch.bfloat16):
                io = _TRITON_DTYPE[dtype]
                heads = 32
                ints = dict(stride_ob=heads * block_d, stride_om=heads * block_d, stride_oh=block_d,
                            stride_lb=heads, stride_lh=1, batch=_BATCH, seqlen_q=1, num_heads=heads,
                            num_splits=16)
                values = dict(HEAD_D=block_d, BLOCK_D=block_d, BLOCK_S=MAX_SPLITS)
                specs.append(KernelSpec(
                    "decode_combine", _decode_combine_kernel, config=f"d{block_d}_{io}_s{MAX_SPLITS}", num_warps=4,
                    num_stages=1, arches=(arch,),
                    launch_args=_launch_args(_decode_combine_kernel, io, ints, values)))
            for rotary, paged in ((0, False), (block_d, True)):
                io = "bf16"
                kv_heads = 8
                rows = _PAGE if paged else _LENGTH
                ints = dict(stride_knb=kv_heads * block_d, stride_knt=kv_heads * block_d, stride_knh=block_d,
                            stride_vnb=kv_heads * block_d, stride_vnt=kv_heads * block_d, stride_vnh=block_d,
                            stride_kb=rows * kv_heads * block_d, stride_kn=kv_heads * block_d, stride_kh=block_d,
                            stride_vb=rows * kv_heads * block_d, stride_vn=kv_heads * block_d, stride_vh=block_d,
                            stride_btb=_LENGTH // _PAGE, stride_cos=max(rotary // 2, 1),
                            stride_sin=max(rotary // 2, 1), seqlen_new=1, page_size=_PAGE if paged else 1,
                            capacity=_LENGTH, num_blocks=_BATCH * _LENGTH // _PAGE)
                values = dict(HEAD_D=block_d, BLOCK_D=block_d, ROTARY_DIM=rotary, INTERLEAVED=False, PAGED=paged,
                              HAS_BATCH_IDX=not paged)
                specs.append(KernelSpec(
                    "decode_kv_append", _kv_append_kernel,
                    config=f"d{block_d}_{io}_{'paged_rotary' if rotary else 'plain'}", num_warps=1, num_stages=1,
                    arches=(arch,), launch_args=_launch_args(_kv_append_kernel, io, ints, values, cos=io)))
    return specs
