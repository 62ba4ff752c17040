"""Ahead-of-time compile check (``python -m llmfast.compile_check``): every named config of every architecture,
at the dtypes and feature sets it serves."""
from __future__ import annotations

import inspect
import re

import torch

from llmfast.ops._spec import KernelSpec

from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .configs import ATTENTION_CONFIGS
from .forward import _attn_fwd_kernel

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_POINTER_TYPES = {  # pointer arguments: "io" = the input dtype, else a fixed element type
    "Q": "io", "K": "io", "V": "io", "Out": "io", "DOut": "io", "DQ": "io", "DK": "io", "DV": "io",
    "Mask": "io", "Lse": "fp32", "Delta": "fp32", "DLse": "fp32", "DS": "fp32", "CuSeqQ": "i32", "CuSeqK": "i32",
}
_FLOAT_ARGS = ("qk_scale", "sm_scale", "dropout_p")

# Feature sets compiled for each config: "causal" is the common case; "window_mask" adds every optional feature
# but dropout (a two-sided window, an additive mask, the mask gradient); "window_mask_dropout" adds dropout too,
# for the configs that serve it.
_SPEC_VARIANTS = {
    "causal": dict(IS_VARLEN=False, HAS_LEFT=False, HAS_RIGHT=True, BOTTOM_RIGHT=True, HAS_MASK=False,
                   MASK_IS_BOOL=False, DROPOUT=False, REVERSE_M=True, STORE_DS=False),
    "window": dict(IS_VARLEN=True, HAS_LEFT=True, HAS_RIGHT=True, BOTTOM_RIGHT=True, HAS_MASK=False,
                   MASK_IS_BOOL=False, DROPOUT=False, REVERSE_M=False, STORE_DS=False),
    "window_mask": dict(IS_VARLEN=False, HAS_LEFT=True, HAS_RIGHT=True, BOTTOM_RIGHT=True, HAS_MASK=True,
                        MASK_IS_BOOL=False, DROPOUT=False, REVERSE_M=False, STORE_DS=True),
    "window_mask_dropout": dict(IS_VARLEN=False, HAS_LEFT=True, HAS_RIGHT=True, BOTTOM_RIGHT=True, HAS_MASK=True,
                                MASK_IS_BOOL=False, DROPOUT=True, REVERSE_M=False, STORE_DS=True),
}
# (dtype, variant) pairs compiled for each kind of config entry.
_SPEC_CASES = {
    "": ((torch.float16, "causal"), (torch.bfloat16, "causal"), (torch.float16, "window")),
    "_extra": ((torch.float16, "window_mask"), (torch.bfloat16, "window_mask_dropout")),
    "_fp32": ((torch.float32, "causal"), (torch.float32, "window_mask_dropout")),
    "preprocess": ((torch.float16, "causal"), (torch.float32, "causal")),
}
_SPEC_KERNELS = {
    "fwd": ("attention_fwd", _attn_fwd_kernel),
    "bwd_preprocess": ("attention_bwd_preprocess", _attn_bwd_preprocess_kernel),
    "bwd_dkdv": ("attention_bwd_dkdv", _attn_bwd_dkdv_kernel),
    "bwd_dq": ("attention_bwd_dq", _attn_bwd_dq_kernel),
}


def _spec(kernel_name: str, fn, dtype: torch.dtype, config_name: str, cfg: dict, arch: int, block_d: int,
          variant: str) -> KernelSpec:
    io = _TRITON_DTYPE[dtype]
    # Read the Python signature (works for JIT and interpreted kernels alike): constexprs are annotated.
    params = inspect.signature(fn.fn).parameters
    constexpr_names = [n for n, p in params.items() if "constexpr" in str(p.annotation)]
    signature = {}
    for name in params:
        if name in constexpr_names:
            continue
        if name in _POINTER_TYPES:
            kind = _POINTER_TYPES[name]
            signature[name] = f"*{io}" if kind == "io" else f"*{kind}"
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    values = dict(_SPEC_VARIANTS[variant], WIDE_DROPOUT=False, HEAD_D=block_d, BLOCK_D=block_d, HEAD_DV=block_d,
                  BLOCK_DV=block_d,
                  FP32_IEEE=dtype == torch.float32, HAS_DLSE=False,
                  **{k: v for k, v in cfg.items() if k.startswith("BLOCK_")})
    constexprs = {name: values[name] for name in constexpr_names}
    label = config_name if config_name.endswith(f"_{io}") else f"{config_name}_{io}"
    return KernelSpec(kernel_name, fn, signature, constexprs, f"{label}_{variant}",
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], arches=(arch,),
                      expect_mma=(dtype != torch.float32 and kernel_name != "attention_bwd_preprocess"
                                  and not cfg.get("mma_sync", False)))


def compile_specs() -> list[KernelSpec]:
    """Every named config of every GPU architecture, at the dtypes and feature sets it serves."""
    specs = []
    for arch_key, arch in (("sm80", 80), ("sm90", 90)):
        for config_name, cfg in ATTENTION_CONFIGS[arch_key].items():
            kernel_key, bucket, suffix = re.fullmatch(r"(\w+?)_d(\d+)(_fp32|_extra)?", config_name).groups()
            kernel_name, fn = _SPEC_KERNELS[kernel_key]
            cases = _SPEC_CASES["preprocess" if kernel_key == "bwd_preprocess" else suffix or ""]
            for dtype, variant in cases:
                specs.append(_spec(kernel_name, fn, dtype, config_name, cfg, arch, int(bucket),
                                   variant))
    return specs
