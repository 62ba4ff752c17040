"""llmfast attention behind Hugging Face's attention interface (``attn_implementation="llmfast"``).

Transformers calls ``fn(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)`` with
(B, H, S, D) tensors (key/value with the model's KV heads, so GQA needs no ``repeat_kv``) and expects
``(attn_output (B, S, H, D), attn_weights)`` back. The mask comes from the mask function registered under the same
name: Hugging Face's SDPA mask (a 4-D boolean "keep" mask, or ``None`` when plain causal or full attention is enough).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

import llmfast

IMPLEMENTATION = "llmfast"


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    # Hugging Face's sliding window of w lets query i see keys i-w+1 .. i: w-1 keys to the left.
    if sliding_window is None or sliding_window <= 0:
        return (-1, -1)
    left = int(sliding_window) - 1
    return (left, 0) if causal else (left, left)


def _inference(*tensors: torch.Tensor | float) -> bool:
    """No gradient is wanted and no dropout applies: the decode kernel (forward only) may serve."""
    *tensors, dropout = tensors
    return not dropout and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def llmfast_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, is_causal: bool | None = None,
                              sliding_window: int | None = None, softcap: float | None = None,
                              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for a Hugging Face model: (B, H, S, D) in, (B, S, H, D) out; never materialises the weights."""
    if kwargs.get("output_attentions", False):
        warnings.warn("llmfast attention does not return attention weights (output_attentions=True is ignored)",
                      stacklevel=2)
    if kwargs.get("position_bias") is not None:
        raise ValueError("llmfast attention: position_bias (T5-style relative bias) is not supported; "
                         "use attn_implementation='eager' or 'sdpa' for this model")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    softcap = float(softcap) if softcap else 0.0

    if attention_mask is None and q_len == 1 and _inference(query, key, value, dropout):
        # A cached decoding step (no padding): the split-KV decode kernel reads the cache once per KV head, for all
        # the query heads that share it, with the key length split across programs.
        out = llmfast.flash_attn_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                              cache_seqlens=kv_len, softmax_scale=scaling, causal=True,
                                              window_size=_window(sliding_window, True), softcap=softcap)
        return out, None

    if attention_mask is None:
        causal = bool(is_causal) and q_len > 1
        if causal and kv_len > q_len:
            # Only a prefill into an empty static cache reaches here without a mask (Hugging Face skips the mask
            # only when it is plain causal): the keys past the prompt are empty slots, aligned top-left.
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        extra = {"softcap": softcap} if softcap else {}
        out = llmfast.flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                      dropout_p=dropout, softmax_scale=scaling, causal=causal,
                                      window_size=_window(sliding_window, causal), **extra)
        return out, None

    # A padding/causal/sliding mask built by the mask function: (B or 1, 1, Sq, Sk), True = attend (or additive).
    if attention_mask.dim() == 4 and attention_mask.shape[-1] != kv_len:
        attention_mask = attention_mask[..., :kv_len]
    extra = {"softcap": softcap} if softcap else {}
    out = llmfast.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                               scale=scaling, enable_gqa=key.shape[1] != query.shape[1], **extra)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``"llmfast"`` a name transformers accepts for ``attn_implementation`` (attention and its mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, llmfast_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
