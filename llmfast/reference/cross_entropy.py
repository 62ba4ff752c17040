"""Reference cross-entropy and linear cross-entropy: log-softmax materialised, torch's and Liger-Kernel's formulas
written out. Signatures are those of :func:`llmfast.cross_entropy` and :func:`llmfast.fused_linear_cross_entropy`.

With ``y = softcap * tanh(x / softcap)`` (or ``y = x``), ``logp = log_softmax(y)``, class weights ``w`` (or ones),
smoothing ``eps`` over ``C`` classes, for a non-ignored row with target ``t``:

* ``ce = (1 - eps) * w[t] * (-logp[t]) + eps / C * sum_j w[j] * (-logp[j])``  (torch's ``F.cross_entropy``)
* ``z = lse_square_scale * logsumexp(y) ** 2``  (PaLM's z-loss, Liger-Kernel's ``lse_square_scale``)
* the row's loss is ``ce + z``; ignored rows give 0.

``mean`` is ``sum(ce) / sum(w[t]) + sum(z) / n_valid`` (torch divides by the targets' total weight, Liger the
z-loss by the number of non-ignored rows; NaN when every row is ignored, as torch). ``z_loss`` (returned for
logging, no gradient) is ``z`` reduced the same way; ``token_accuracy`` is ``argmax(y) == t`` per row (0 for ignored
rows), averaged over non-ignored rows unless ``reduction="none"``; ``predicted_tokens`` is ``argmax(y)`` per row,
-1 for ignored rows. Computed in the input's dtype (call with float64 inputs for the judge), differentiable by
autograd.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from llmfast.reference.softmax import log_softmax


@dataclasses.dataclass
class CrossEntropyOutput:
    """What the cross-entropy functions return when any ``return_*`` flag is set (Liger-Kernel's
    ``CrossEntropyOutput``). Iterating yields ``loss`` and then the fields that were asked for, in this order, so
    ``loss, z_loss = cross_entropy(..., return_z_loss=True)`` also works as in Liger-Kernel's older releases."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None

    def __iter__(self):
        yield self.loss
        for value in (self.z_loss, self.token_accuracy, self.predicted_tokens):
            if value is not None:
                yield value


def legacy_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """torch's deprecated ``size_average`` / ``reduce`` arguments mapped to ``reduction``, as torch maps them."""
    if size_average is None and reduce is None:
        return reduction
    from torch.nn import _reduction

    return _reduction.legacy_get_string(size_average, reduce)


def softcapped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100, reduce: bool | None = None,
                  reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                  softcap: float | None = None, return_z_loss: bool = False, return_token_accuracy: bool = False,
                  return_predicted_tokens: bool = False, *, token_scaling: bool = False):
    """Cross-entropy over dim 1 of ``(N, C, d1, ...)`` logits (dim 0 of ``(C,)``) with class-index targets.

    ``token_scaling`` (the fused linear variant's ``use_token_scaling``) multiplies each row's loss terms by the
    target's probability ``softmax(y)[t]``, detached (a constant for autograd), as Liger-Kernel does."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    class_dim = 0 if input.dim() == 1 else 1
    y = softcapped(input.movedim(class_dim, -1), softcap)  # (..., C)
    n_classes = y.shape[-1]
    logp = log_softmax(y, dim=-1)
    lse = torch.logsumexp(y, dim=-1)
    active = target != ignore_index
    safe_target = torch.where(active, target, torch.zeros_like(target)).long()
    nll = -logp.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    p_t = (-nll).exp().detach() if token_scaling else None
    w_t = weight.to(y.dtype)[safe_target] if weight is not None else None
    if w_t is not None:
        nll = nll * w_t
    ce = (1.0 - label_smoothing) * nll
    if label_smoothing > 0:
        smooth = -(logp * weight.to(y.dtype)).sum(dim=-1) if weight is not None else -logp.sum(dim=-1)
        ce = ce + label_smoothing / n_classes * smooth
    zero = torch.zeros_like(ce)
    ce = torch.where(active, ce, zero)
    # (no z term at all when its scale is 0: lse**2 overflows 16-bit dtypes, and 0 * inf is NaN)
    z = torch.where(active, lse_square_scale * lse * lse, zero) if lse_square_scale != 0 else zero
    if p_t is not None:
        ce, z = ce * p_t, z * p_t
    n_valid = active.sum()
    total_weight = torch.where(active, w_t, zero).sum() if w_t is not None else n_valid
    if reduction == "none":
        loss, z_out = ce + z, z
    elif reduction == "sum":
        loss, z_out = ce.sum() + z.sum(), z.sum()
    else:
        loss, z_out = ce.sum() / total_weight + z.sum() / n_valid, z.sum() / n_valid
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return loss
    out = CrossEntropyOutput(loss)
    if return_z_loss:
        out.z_loss = z_out.detach()
    if return_token_accuracy or return_predicted_tokens:
        pred = torch.where(active, y.detach().argmax(dim=-1), torch.full_like(safe_target, -1))
        if return_token_accuracy:
            hit = ((pred == target) & active).to(torch.float32)
            out.token_accuracy = hit if reduction == "none" else hit.sum() / n_valid
        if return_predicted_tokens:
            out.predicted_tokens = pred
    return out


def fused_linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ce_weight: torch.Tensor | None = None,
                               ignore_index: int = -100, lse_square_scale: float = 0.0,
                               label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
                               return_z_loss: bool = False, accum_dtype: torch.dtype | None = None,
                               use_token_scaling: bool = False, return_token_accuracy: bool = False,
                               return_predicted_tokens: bool = False):
    """``cross_entropy(input @ weight.T + bias, target)`` with the full logits materialised.

    16-bit logits are upcast to float32 before the loss, as Hugging Face's causal-LM loss does, so the loss comes
    back in float32. ``accum_dtype`` only matters to the chunked implementation (the reference's gradients come
    from autograd).
    """
    del accum_dtype
    logits = F.linear(input, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    out = cross_entropy(logits, flat_target, ce_weight, None, ignore_index, None, reduction, label_smoothing,
                        lse_square_scale, softcap, return_z_loss, return_token_accuracy, return_predicted_tokens,
                        token_scaling=use_token_scaling)
    shape = tuple(target.shape)

    def fix(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.reshape(shape) if t is not None and t.dim() == 1 and shape != (t.shape[0],) else t

    if isinstance(out, CrossEntropyOutput):
        if reduction == "none":
            out.loss, out.z_loss, out.token_accuracy = fix(out.loss), fix(out.z_loss), fix(out.token_accuracy)
        out.predicted_tokens = fix(out.predicted_tokens)
        return out
    return fix(out) if reduction == "none" else out
