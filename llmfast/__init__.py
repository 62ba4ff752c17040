"""llmfast: fast PyTorch Transformers.

Public ops keep the signatures users know (torch's SDPA, flash-attn's ``flash_attn_func``) and dispatch among
backends: see :func:`llmfast.backend`. Modules live in :mod:`llmfast.nn`, the tokenizer in
:mod:`llmfast.tokenizer`, the GPT in :mod:`llmfast.models.gpt`.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The ops import torch and Triton (seconds); the tokenizer needs neither. So the public names load on first use
# (PEP 562), and `import llmfast.tokenizer` stays light.
_LAZY = {
    "backend": "llmfast._backend",
    "get_backend": "llmfast._backend",
    "kernel_launch_counts": "llmfast._backend",
    "scaled_dot_product_attention": "llmfast.ops.attention",
    "flash_attn_func": "llmfast.ops.attention",
    "flash_attn_varlen_func": "llmfast.ops.attention",
    "flash_attn_with_kvcache": "llmfast.ops.decode",
    "flash_attn_qkvpacked_func": "llmfast.ops.attention",
    "flash_attn_kvpacked_func": "llmfast.ops.attention",
    "flash_attn_varlen_qkvpacked_func": "llmfast.ops.attention",
    "flash_attn_varlen_kvpacked_func": "llmfast.ops.attention",
    "softmax": "llmfast.ops.softmax",
    "log_softmax": "llmfast.ops.softmax",
    "masked_softmax": "llmfast.ops.softmax",
    "cross_entropy": "llmfast.ops.cross_entropy",
    "fused_linear_cross_entropy": "llmfast.ops.cross_entropy",
    "CrossEntropyOutput": "llmfast.ops.cross_entropy",
    "liger_cross_entropy": "llmfast.ops.cross_entropy",
    "liger_fused_linear_cross_entropy": "llmfast.ops.cross_entropy",
    "liger_rms_norm": "llmfast.liger",
    "liger_layer_norm": "llmfast.liger",
    "liger_rope": "llmfast.liger",
    "liger_swiglu": "llmfast.liger",
    "liger_geglu": "llmfast.liger",
    "liger_softmax": "llmfast.liger",
    "rms_norm": "llmfast.ops.rms_norm",
    "layer_norm": "llmfast.ops.layer_norm",
    "apply_rotary_emb": "llmfast.ops.rotary",
    "apply_rotary_pos_emb": "llmfast.ops.rotary",
    "swiglu": "llmfast.ops.swiglu",
    "geglu": "llmfast.ops.swiglu",
    "warmup": "llmfast._warmup",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "backend",
    "get_backend",
    "kernel_launch_counts",
    "scaled_dot_product_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "softmax",
    "log_softmax",
    "masked_softmax",
    "cross_entropy",
    "fused_linear_cross_entropy",
    "CrossEntropyOutput",
    "liger_cross_entropy",
    "liger_fused_linear_cross_entropy",
    "liger_rms_norm",
    "liger_layer_norm",
    "liger_rope",
    "liger_swiglu",
    "liger_geglu",
    "liger_softmax",
    "rms_norm",
    "layer_norm",
    "apply_rotary_emb",
    "apply_rotary_pos_emb",
    "swiglu",
    "geglu",
    "warmup",
]
