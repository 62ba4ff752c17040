"""Liger-Kernel's functional API under its own names: ``from llmfast.liger import liger_cross_entropy, ...``.

Each function here has the signature of ``liger_kernel.transformers.functional``'s function of the same name (same
argument names, order and defaults) and runs llmfast's kernel for it, so code written against Liger-Kernel changes
only its import. Where Liger-Kernel's arguments differ from llmfast's own functions (``X``/``W`` for ``x``/``weight``,
``liger_layer_norm`` without ``normalized_shape``, ``liger_geglu``'s tanh GELU) the translation happens here.
The same functions are also ``llmfast.liger_*``. docs/COMPATIBILITY.md lists Liger-Kernel's functions that llmfast
does not have.
"""
from __future__ import annotations

import torch

# The losses have Liger-Kernel's signatures already (plus keyword-only extras): the same objects.
from llmfast.ops.cross_entropy import liger_cross_entropy, liger_fused_linear_cross_entropy

__all__ = [
    "liger_cross_entropy",
    "liger_fused_linear_cross_entropy",
    "liger_rms_norm",
    "liger_layer_norm",
    "liger_rope",
    "liger_swiglu",
    "liger_geglu",
    "liger_softmax",
]


# Liger-Kernel's casting modes by name and by its integer codes.
_LLAMA_CASTING = ("llama", 0)


def liger_rms_norm(X: torch.Tensor, W: torch.Tensor, eps: float, offset: float = 0.0, casting_mode: str = "llama",
                   in_place: bool = True) -> torch.Tensor:
    """Liger-Kernel's ``liger_rms_norm``: :func:`llmfast.rms_norm` (``X / rms(X) * (offset + W)``).

    ``casting_mode="llama"`` (Liger-Kernel's default: the normalized value is cast to X's dtype before the weight
    multiplies it) is what llmfast computes; "gemma" and "none" raise ValueError rather than give other rounding.
    ``in_place`` only lets Liger-Kernel's backward reuse the incoming gradient's memory; it does not change results
    and llmfast's backward allocates its own.
    """
    if isinstance(casting_mode, bool) or casting_mode not in _LLAMA_CASTING:
        raise ValueError(f"casting_mode must be 'llama' (llmfast's rounding; 'gemma' and 'none' are not supported), "
                         f"got {casting_mode!r}")
    if not isinstance(in_place, bool):
        raise TypeError(f"in_place must be a bool, got {type(in_place).__name__}")
    from llmfast.ops.rms_norm import rms_norm

    return rms_norm(X, W, eps, offset=offset)


def liger_layer_norm(X: torch.Tensor, W: torch.Tensor, B: torch.Tensor, eps: float) -> torch.Tensor:
    """Liger-Kernel's ``liger_layer_norm``: LayerNorm over X's last dim, :func:`llmfast.layer_norm`."""
    from llmfast.ops.layer_norm import layer_norm

    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() == 0:
        raise ValueError("X must have at least one dimension (the normalized one), got a 0-d tensor")
    return layer_norm(X, X.shape[-1:], W, B, eps)


def liger_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor | None = None, unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Liger-Kernel's ``liger_rope`` (Hugging Face's rotary convention): :func:`llmfast.apply_rotary_pos_emb`."""
    from llmfast.ops.rotary import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim)


def liger_swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Liger-Kernel's ``liger_swiglu``: ``silu(a) * b``, :func:`llmfast.swiglu`."""
    from llmfast.ops.swiglu import swiglu

    return swiglu(a, b)


def liger_geglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Liger-Kernel's ``liger_geglu``: ``gelu(a, approximate="tanh") * b`` (Liger-Kernel's GELU is the tanh
    approximation), :func:`llmfast.geglu`."""
    from llmfast.ops.swiglu import geglu

    return geglu(a, b, approximate="tanh")


def liger_softmax(x: torch.Tensor) -> torch.Tensor:
    """Liger-Kernel's ``liger_softmax``: softmax over the last dim, :func:`llmfast.softmax`."""
    from llmfast.ops.softmax import softmax

    return softmax(x, -1)
