"""Hugging Face integration: run transformers models on llmfast's kernels.

    import llmfast.transformers as lt
    lt.register()                                   # attn_implementation="llmfast" becomes a valid name
    model = lt.apply_llmfast(model)                 # an instantiated model, patched in place
    lt.apply_llmfast_to_llama()                     # or patch the classes before from_pretrained

Needs ``transformers`` (``pip install llmfast[hf]``); the rest of llmfast never imports it.
"""
from __future__ import annotations

from .attention import IMPLEMENTATION, llmfast_attention_forward, register
from .loss import causal_lm_loss, fused_causal_lm_loss
from .patch import FAMILIES, apply_llmfast, apply_llmfast_to, revert, supported_architectures


def apply_llmfast_to_llama(**kwargs: bool) -> None:
    """Patch Llama's classes (see :func:`apply_llmfast_to`)."""
    apply_llmfast_to("llama", **kwargs)


def apply_llmfast_to_mistral(**kwargs: bool) -> None:
    """Patch Mistral's classes (see :func:`apply_llmfast_to`)."""
    apply_llmfast_to("mistral", **kwargs)


def apply_llmfast_to_qwen2(**kwargs: bool) -> None:
    """Patch Qwen2's classes (see :func:`apply_llmfast_to`)."""
    apply_llmfast_to("qwen2", **kwargs)


def apply_llmfast_to_qwen3(**kwargs: bool) -> None:
    """Patch Qwen3's classes (see :func:`apply_llmfast_to`)."""
    apply_llmfast_to("qwen3", **kwargs)


def apply_llmfast_to_gemma2(**kwargs: bool) -> None:
    """Patch Gemma-2's classes (see :func:`apply_llmfast_to`)."""
    apply_llmfast_to("gemma2", **kwargs)


def apply_llmfast_to_gpt2(**kwargs: bool) -> None:
    """Patch GPT-2's classes (see :func:`apply_llmfast_to`)."""
    apply_llmfast_to("gpt2", **kwargs)


def apply_llmfast_to_bert(**kwargs: bool) -> None:
    """Patch BERT's classes (see :func:`apply_llmfast_to`)."""
    apply_llmfast_to("bert", **kwargs)


__all__ = [
    "IMPLEMENTATION", "FAMILIES", "register", "llmfast_attention_forward", "apply_llmfast", "apply_llmfast_to",
    "apply_llmfast_to_llama", "apply_llmfast_to_mistral", "apply_llmfast_to_qwen2", "apply_llmfast_to_qwen3",
    "apply_llmfast_to_gemma2", "apply_llmfast_to_gpt2", "apply_llmfast_to_bert", "causal_lm_loss",
    "fused_causal_lm_loss", "revert", "supported_architectures",
]
