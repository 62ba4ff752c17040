"""Loss modules: a drop-in ``torch.nn.CrossEntropyLoss`` and the fused linear cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmfast.ops import cross_entropy as ops


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` with torch's constructor (``weight``, ``size_average``, ``ignore_index``,
    ``reduce``, ``reduction``, ``label_smoothing``), computed by :func:`llmfast.cross_entropy`.

    Class-index targets run on llmfast's kernel. Per-class ``weight`` and probability targets (floating
    ``target``) are not what the kernel computes; those calls go to ``torch.nn.functional.cross_entropy``, so the
    module stays a correct drop-in for every argument torch accepts.
    """

    def __init__(self, *args, inplace_backward: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.weight is not None or (isinstance(target, torch.Tensor) and target.is_floating_point()):
            return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                   reduction=self.reduction, label_smoothing=self.label_smoothing)
        return ops.cross_entropy(input, target, ignore_index=self.ignore_index, reduction=self.reduction,
                                 label_smoothing=self.label_smoothing, inplace_backward=self.inplace_backward)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materialising the logits.

    ``forward(hidden, weight, target, bias=None)``: ``weight`` is the output projection (``lm_head.weight``),
    passed in so it can stay owned (and tied) by the model. See :func:`llmfast.fused_linear_cross_entropy`.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.fused_linear_cross_entropy(hidden, weight, target, bias, self.ignore_index, self.reduction,
                                              label_smoothing=self.label_smoothing, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}")
