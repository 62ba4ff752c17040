"""Loss modules: a drop-in ``torch.nn.CrossEntropyLoss`` with Liger-Kernel's options, and the fused linear
cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmfast.ops import cross_entropy as ops


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` with torch's constructor (``weight``, ``size_average``, ``ignore_index``,
    ``reduce``, ``reduction``, ``label_smoothing``) plus Liger-Kernel's ``LigerCrossEntropyLoss`` options as
    keywords (``lse_square_scale``, ``softcap``, ``return_z_loss``, ``return_token_accuracy``,
    ``return_predicted_tokens``), computed by :func:`llmfast.cross_entropy`; any ``return_*`` flag makes
    ``forward`` return a :class:`llmfast.CrossEntropyOutput`.

    Class-index targets (with or without per-class ``weight``) run on llmfast's kernel. Probability targets
    (floating ``target``) are not what the kernel computes; those calls go to ``torch.nn.functional.cross_entropy``
    (and raise if a Liger-only option is set), so the module stays a correct drop-in for every argument torch
    accepts.
    """

    def __init__(self, *args, lse_square_scale: float = 0.0, softcap: float | None = None,
                 return_z_loss: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False, inplace_backward: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens
        self.inplace_backward = inplace_backward

    def _liger_options(self) -> dict:
        return {"lse_square_scale": self.lse_square_scale, "softcap": self.softcap,
                "return_z_loss": self.return_z_loss, "return_token_accuracy": self.return_token_accuracy,
                "return_predicted_tokens": self.return_predicted_tokens}

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            if self.lse_square_scale or self.softcap is not None or self.return_z_loss or \
                    self.return_token_accuracy or self.return_predicted_tokens:
                raise ValueError("CrossEntropyLoss: lse_square_scale, softcap and the return_* options need "
                                 "class-index targets, got a floating (probability) target")
            return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                   reduction=self.reduction, label_smoothing=self.label_smoothing)
        return ops.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                                 reduction=self.reduction, label_smoothing=self.label_smoothing,
                                 inplace_backward=self.inplace_backward, **self._liger_options())

    def extra_repr(self) -> str:
        extras = [f"{k}={v!r}" for k, v in self._liger_options().items()
                  if v not in (0.0, None, False)]
        return ", ".join(extras)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materialising the logits.

    The constructor takes Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` options (``ce_weight``,
    ``ignore_index``, ``lse_square_scale``, ``label_smoothing``, ``reduction``, ``softcap``, ``return_z_loss``,
    ``accum_dtype``, ``use_token_scaling``, ``return_token_accuracy``, ``return_predicted_tokens``; pass them by
    keyword) plus ``chunk_size``. ``forward(hidden, weight, target, bias=None)``: ``weight`` is the output
    projection (``lm_head.weight``), passed in so it can stay owned (and tied) by the model. Note the order:
    Liger-Kernel's module takes ``forward(lin_weight, _input, ...)``. See :func:`llmfast.fused_linear_cross_entropy`.
    """

    def __init__(self, ce_weight: torch.Tensor | None = None, ignore_index: int = -100,
                 lse_square_scale: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
                 softcap: float | None = None, return_z_loss: bool = False, accum_dtype: torch.dtype | None = None,
                 use_token_scaling: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False, chunk_size: int | None = None) -> None:
        super().__init__()
        if isinstance(ce_weight, int) and not isinstance(ce_weight, bool):
            raise TypeError(f"ce_weight must be a (V,) float tensor or None, got int {ce_weight}; pass ignore_index "
                            "by keyword")
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.lse_square_scale = lse_square_scale
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.accum_dtype = accum_dtype
        self.use_token_scaling = use_token_scaling
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None):
        return ops.fused_linear_cross_entropy(
            hidden, weight, target, bias, self.ce_weight, self.ignore_index, self.lse_square_scale,
            self.label_smoothing, self.reduction, self.softcap, self.return_z_loss, self.accum_dtype,
            self.use_token_scaling, self.return_token_accuracy, self.return_predicted_tokens,
            chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        text = (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}")
        for name in ("lse_square_scale", "softcap", "return_z_loss", "accum_dtype", "return_token_accuracy",
                     "return_predicted_tokens"):
            value = getattr(self, name)
            if value not in (0.0, None, False):
                text += f", {name}={value!r}"
        return text


class LigerCrossEntropyLoss(torch.nn.Module):
    """Liger-Kernel's ``LigerCrossEntropyLoss`` (same constructor, positional order included, and
    ``forward(_input, target)``) on :func:`llmfast.cross_entropy`: code written against Liger-Kernel changes only
    its import. Returns the loss, or a :class:`llmfast.CrossEntropyOutput` when a ``return_*`` flag is set."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100, lse_square_scale: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
                 return_z_loss: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False) -> None:
        super().__init__()
        self.weight = weight
        self.ignore_index = ignore_index
        self.lse_square_scale = lse_square_scale
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens

    def forward(self, _input: torch.Tensor, target: torch.Tensor):
        return ops.cross_entropy(_input, target, self.weight, ignore_index=self.ignore_index,
                                 reduction=self.reduction, label_smoothing=self.label_smoothing,
                                 lse_square_scale=self.lse_square_scale, softcap=self.softcap,
                                 return_z_loss=self.return_z_loss, return_token_accuracy=self.return_token_accuracy,
                                 return_predicted_tokens=self.return_predicted_tokens)


class LigerFusedLinearCrossEntropyLoss(FusedLinearCrossEntropyLoss):
    """Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``: the constructor of :class:`FusedLinearCrossEntropyLoss`
    with Liger's ``forward(lin_weight, _input, target, bias=None)`` argument order."""

    def forward(self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None):
        return super().forward(_input, lin_weight, target, bias)
