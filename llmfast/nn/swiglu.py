"""Gated feed-forward layers laid out as Llama's and Gemma's MLPs, so Hugging Face state dicts load unchanged."""
from __future__ import annotations

import torch
from torch import nn

from llmfast.ops import swiglu as ops


class SwiGLUMLP(nn.Module):
    """Llama / Mistral / Qwen MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the product fused.

    Submodules ``gate_proj``, ``up_proj`` (hidden -> intermediate) and ``down_proj`` (intermediate -> hidden) are
    named as in ``transformers``' ``LlamaMLP``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class GeGLUMLP(nn.Module):
    """Gemma MLP: ``down_proj(gelu(gate_proj(x), approximate) * up_proj(x))`` with the product fused.

    ``approximate="tanh"`` is Gemma's ``gelu_pytorch_tanh``; ``"none"`` the exact erf GELU.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, approximate: str = "tanh",
                 bias: bool = False) -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.hidden_size, self.intermediate_size, self.approximate = hidden_size, intermediate_size, approximate
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.geglu(self.gate_proj(x), self.up_proj(x), self.approximate))
