"""Triton cross-entropy and fused linear cross-entropy.

PLACEHOLDER (softmax-family issue): the public functions below delegate to torch until the kernels land.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmfast.ops._spec import KernelSpec


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index, reduction=reduction)


def compile_specs() -> list[KernelSpec]:
    return []
