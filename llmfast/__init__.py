"""llmfast: fast PyTorch Transformers.

Public ops keep the signatures users know (torch's SDPA, flash-attn's ``flash_attn_func``) and dispatch among
backends: see :func:`llmfast.backend`. Modules live in :mod:`llmfast.nn`, the tokenizer in
:mod:`llmfast.tokenizer`, the GPT in :mod:`llmfast.models.gpt`.
"""
from llmfast._backend import backend, get_backend, kernel_launch_counts
from llmfast.ops.attention import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from llmfast.ops.cross_entropy import cross_entropy, fused_linear_cross_entropy
from llmfast.ops.softmax import log_softmax, masked_softmax, softmax

__version__ = "0.1.0"

__all__ = [
    "backend",
    "get_backend",
    "kernel_launch_counts",
    "scaled_dot_product_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "softmax",
    "log_softmax",
    "masked_softmax",
    "cross_entropy",
    "fused_linear_cross_entropy",
]
