"""Reference gated MLP activations: ``silu(gate) * up`` and ``gelu(gate) * up`` in the input's dtype.

Called on float64 tensors they judge the Triton kernels; on fp16/bf16 tensors they measure the error plain torch
math makes in that dtype (the activation is rounded once, then the product). Differentiable by autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Llama, Mistral, Qwen): ``silu(gate) * up``."""
    return F.silu(gate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GeGLU (Gemma: ``approximate="tanh"``): ``gelu(gate, approximate) * up``."""
    return F.gelu(gate, approximate=approximate) * up
