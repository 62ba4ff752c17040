"""Hugging Face's language-modelling losses computed by llmfast's kernels.

Semantics follow transformers' ``ForCausalLMLoss``: labels are shifted inside (position t predicts label t+1),
``ignore_index=-100``, a mean over the counted tokens, or a sum divided by ``num_items_in_batch`` when the trainer
passes it (gradient accumulation), and the loss in float32 whatever the logits' dtype. The fused variants take the
hidden states and the head's weight, so training never materialises the (tokens x vocab) logits.
"""
from __future__ import annotations

import torch

import llmfast

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels moved one step left (position t is scored against token t+1), the last position ignored."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _finish(loss: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, *, num_items_in_batch=None,
                   ignore_index: int = IGNORE_INDEX, shifted_labels: torch.Tensor | None = None,
                   shift: bool = True) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (``shift=False``: ``ForMaskedLMLoss``) on materialised logits."""
    target = shifted_labels if shifted_labels is not None else (shift_labels(labels, ignore_index) if shift
                                                                 else labels)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    logits = logits.reshape(-1, logits.shape[-1]).float()
    target = target.reshape(-1).to(logits.device)
    loss = llmfast.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    return _finish(loss, num_items_in_batch)


def fused_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor | None, *, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                         shifted_labels: torch.Tensor | None = None, shift: bool = True,
                         softcap: float | None = None) -> torch.Tensor:
    """The same loss from the hidden states and the head's weight (and bias), through the fused kernel."""
    target = shifted_labels if shifted_labels is not None else (shift_labels(labels, ignore_index) if shift
                                                                 else labels)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1).to(hidden.device)
    extra = {"softcap": float(softcap)} if softcap else {}
    loss = llmfast.fused_linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                              reduction=reduction, **extra).float()
    return _finish(loss, num_items_in_batch)
