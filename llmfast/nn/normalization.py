"""Norm layers: ``RMSNorm`` laid out like Hugging Face's LlamaRMSNorm, and a drop-in ``torch.nn.LayerNorm``."""
from __future__ import annotations

import torch

from llmfast.ops import layer_norm as ln_ops
from llmfast.ops import rms_norm as rms_ops


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim, computed by :func:`llmfast.rms_norm`.

    State as Hugging Face's ``LlamaRMSNorm``: one parameter ``weight`` of shape ``(hidden_size,)`` and the
    attribute ``variance_epsilon`` (also readable as ``eps``), so its checkpoints load unchanged. ``offset=1.0``
    gives Gemma's ``(1 + weight)`` (weights then start at zero, as Gemma's do): in general the weight starts at
    ``1 - offset`` so a fresh layer scales by one.

    ``forward(hidden_states, residual=None)``: with ``residual``, returns ``(rms_norm(hidden_states + residual),
    hidden_states + residual)`` from one fused pass (the pre-norm block's add and norm).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.variance_epsilon = rms_ops._norm.check_number("eps", eps, minimum=0.0)
        self.offset = rms_ops._norm.check_number("offset", offset)
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def reset_parameters(self) -> None:
        torch.nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None and residual.dtype != hidden_states.dtype \
                and torch.is_autocast_enabled(hidden_states.device.type):
            # Under autocast a block's output is 16-bit while the residual stream stays fp32; unfused, their sum
            # would promote to fp32, so the fused add does the same.
            wide = torch.promote_types(residual.dtype, hidden_states.dtype)
            hidden_states, residual = hidden_states.to(wide), residual.to(wide)
        return rms_ops.rms_norm(hidden_states, self.weight, self.variance_epsilon, offset=self.offset,
                                residual=residual)

    def extra_repr(self) -> str:
        text = f"{self.hidden_size}, eps={self.variance_epsilon}"
        return text + (f", offset={self.offset}" if self.offset else "")


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm(normalized_shape, eps, elementwise_affine, bias)`` (same constructor, parameters and
    state dict) computed by :func:`llmfast.layer_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ln_ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
