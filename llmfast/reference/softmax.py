"""Reference softmax, log-softmax and masked softmax: the textbook max-subtracted formulas, in the input's dtype.

Called on float64 inputs they are the judge of the Triton kernels; called on fp16/bf16 inputs they measure the
error plain torch math makes in that dtype (the tests allow the kernels twice that error). They are
differentiable by autograd (``torch.autograd.gradcheck`` checks them in ``tests/test_reference_softmax.py``).
"""
from __future__ import annotations

import torch


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum(exp(x - max)) along ``dim``. A row of all -inf gives NaN, as torch.softmax does."""
    shifted = x - x.amax(dim=dim, keepdim=True)
    e = torch.exp(shifted)
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """(x - max) - log(sum(exp(x - max))) along ``dim``."""
    shifted = x - x.amax(dim=dim, keepdim=True)
    return shifted - torch.log(torch.exp(shifted).sum(dim=dim, keepdim=True))


def masked_scores(x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0, causal: bool = False
                  ) -> torch.Tensor:
    """x * scale, then the mask (bool: False -> -inf; floating: added), then the causal limit (j > i -> -inf)."""
    s = x * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if causal:
        q_len, k_len = x.shape[-2], x.shape[-1]
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=x.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    return s


def masked_softmax(x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0, causal: bool = False,
                   dim: int = -1) -> torch.Tensor:
    """softmax(masked_scores(...)) along ``dim``; a row with no finite score gives zeros (and zero gradient)."""
    s = masked_scores(x, mask, scale, causal)
    row_max = s.amax(dim=dim, keepdim=True)
    # Shift an empty row by 0 instead of -inf so exp() gives exact zeros (no NaN, also in the gradient).
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    total = e.sum(dim=dim, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)
