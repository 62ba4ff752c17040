"""llmfast: fast PyTorch Transformers.

Public ops keep the signatures users know (torch's SDPA, flash-attn's ``flash_attn_func``) and dispatch among
backends: see :func:`llmfast.backend`.
"""
from llmfast._backend import backend, get_backend, kernel_launch_counts
from llmfast.ops.softmax import softmax

__version__ = "0.1.0"

__all__ = ["backend", "get_backend", "kernel_launch_counts", "softmax"]
