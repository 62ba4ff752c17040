"""Reference LayerNorm: ``torch.nn.functional.layer_norm``'s semantics, written out.

Over the trailing ``normalized_shape`` dims: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased
variance, all in float32 (float64 when any input is float64) and rounded once to x's dtype, as torch's kernels do.

Called on float64 inputs it is the judge of the Triton kernels; on fp16/bf16 inputs it measures the error plain
torch math makes in that dtype. It is differentiable by autograd.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def layer_norm(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last ``len(normalized_shape)`` dims of ``x``."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    dtypes = [t.dtype for t in (x, weight, bias) if t is not None]
    math = torch.float64 if torch.float64 in dtypes else torch.float32
    xf = x.to(math)
    mean = xf.mean(dims, keepdim=True)
    xc = xf - mean
    y = xc * torch.rsqrt(xc.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(math)
    if bias is not None:
        y = y + bias.to(math)
    return y.to(x.dtype)
