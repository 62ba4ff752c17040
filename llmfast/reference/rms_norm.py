"""Reference RMSNorm: the textbook formula, with Hugging Face LlamaRMSNorm's casting order.

Casting order (the Triton kernels follow it exactly):

1. with ``residual``: ``h = x + residual`` in x's dtype (one rounding), and ``h`` is what gets normalized;
2. ``n = h * rsqrt(mean(h^2, -1) + eps)`` in float32 (float64 for float64 inputs), then cast back to x's dtype;
3. ``y = n * (offset + weight)``, the product taken in float32 (float64 if either side is float64) and rounded
   once to ``torch.promote_types(x.dtype, weight.dtype)``, the dtype Hugging Face's ``weight * n`` gives.

With ``offset=0`` and a weight in x's dtype this is bit for bit ``LlamaRMSNorm`` (a product of two 16-bit floats
is exact in float32), up to the last bit of the fp32 ``rsqrt``, which differs between implementations (a GPU's is
approximate) and can, rarely, flip one rounding of ``n``. ``offset=1`` gives Gemma's ``(1 + weight)``; Gemma itself multiplies before casting ``n``
back, which differs from this order by at most half an ulp of ``n``.

Called on float64 inputs it is the judge of the kernels; on fp16/bf16 inputs it measures the error plain torch
math makes in that dtype (the tests allow the kernels twice that error). It is differentiable by autograd.
"""
from __future__ import annotations

import torch


def _math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *, offset: float = 0.0,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dim; with ``residual`` returns ``(rms_norm(x + residual), x + residual)``."""
    if residual is not None:
        h = x + residual
        return rms_norm(h, weight, eps, offset=offset), h
    xf = x.to(_math_dtype(x.dtype))
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is None:
        return n
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    math = _math_dtype(x.dtype, weight.dtype)
    return (n.to(math) * (weight.to(math) + offset)).to(out_dtype)
