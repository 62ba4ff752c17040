"""Reference cross-entropy and linear cross-entropy: log-softmax materialised, torch's formulas written out.

``loss_i = (1 - eps) * (-log p_i[t_i]) + eps * mean_j(-log p_i[j])`` for non-ignored rows, 0 for ignored ones;
``mean`` divides the sum by the number of non-ignored rows (NaN when there are none, as torch). Computed in the
input's dtype (call with float64 inputs for the judge), differentiable by autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmfast.reference.softmax import log_softmax


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over dim 1 of ``(N, C, d1, ...)`` logits (dim 0 of ``(C,)``) with class-index targets."""
    class_dim = 0 if logits.dim() == 1 else 1
    logp = log_softmax(logits, dim=class_dim).movedim(class_dim, -1)  # (..., C)
    active = target != ignore_index
    safe_target = torch.where(active, target, torch.zeros_like(target)).long()
    nll = -logp.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - label_smoothing) * nll
    if label_smoothing > 0:
        loss = loss + label_smoothing * (-logp.mean(dim=-1))
    loss = torch.where(active, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / active.sum()


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` with the full logits materialised."""
    logits = F.linear(hidden, weight, bias)
    if logits.dim() > 2:
        logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        loss = cross_entropy(logits, target, ignore_index, reduction, label_smoothing)
        return loss.reshape(hidden.shape[:-1]) if reduction == "none" else loss
    return cross_entropy(logits, target, ignore_index, reduction, label_smoothing)
