"""Argument validation of the public functions: every failure names the argument, what it got and what it
accepts."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from llmfast import _validation

from .configs import MAX_HEAD_DIM

_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_qkv(names: Sequence[str], tensors: Sequence[torch.Tensor], ndim) -> None:
    for name, t in zip(names, tensors):
        _validation.check_tensor(name, t, ndim=ndim, dtypes=_ATTENTION_DTYPES)
    _validation.check_same_dtype(**dict(zip(names, tensors)))
    _validation.check_same_device(**dict(zip(names, tensors)))


def _check_head_dims(q_name: str, head_dim: int, v_name: str, head_dim_v: int) -> None:
    for name, d in ((q_name, head_dim), (v_name, head_dim_v)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} has head dim (last dimension) {d}; accepted head dims are 1..{MAX_HEAD_DIM}")


def _check_heads(q_heads: int, kv_heads: int, *, allow_grouped: bool, hint: str = "") -> None:
    if q_heads == kv_heads:
        return
    if not allow_grouped:
        raise ValueError(f"query has {q_heads} heads but key/value have {kv_heads}; equal head counts are "
                         f"accepted{hint}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads}) for "
                         f"grouped-query attention")


def _check_dropout(dropout_p: object) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _check_scale(name: str, scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"{name} must be finite, got {scale}")
    return float(scale)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_window(window_size: object) -> tuple[int, int]:
    ok = (isinstance(window_size, (tuple, list)) and len(window_size) == 2
          and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size))
    if not ok:
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), "
                         f"got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def _check_mask(attn_mask: object, query: torch.Tensor, target: tuple[int, ...]) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    accepted = (torch.bool, query.dtype, torch.float32)
    if attn_mask.dtype not in accepted:
        names = ", ".join(sorted({str(d).replace("torch.", "") for d in accepted}))
        raise TypeError(f"attn_mask must have dtype in ({names}), got {str(attn_mask.dtype).replace('torch.', '')}")
    _validation.check_same_device(query=query, attn_mask=attn_mask)
    try:
        ok = attn_mask.dim() <= len(target) and torch.broadcast_shapes(attn_mask.shape, target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to the attention "
                         f"scores' shape {tuple(target)} (batch..., heads, Sq, Sk)")


def _check_cu_seqlens(name: str, cu: object, total: int, total_name: str) -> int:
    """Validate a cu_seqlens tensor; returns the longest sequence it describes."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if torch.compiler.is_compiling():
        return -1  # the value checks below would read the tensor and break the graph
    values = cu.cpu()
    lengths = values[1:] - values[:-1]
    if int(values[0]) != 0 or bool((lengths < 0).any()):
        raise ValueError(f"{name} must start at 0 and never decrease, got {values.tolist()}")
    if int(values[-1]) != total:
        raise ValueError(f"{name} must end at the number of packed tokens in {total_name} ({total}), "
                         f"got {int(values[-1])}")
    return int(lengths.max())


def _check_max_seqlen(name: str, value: object, longest: int, cu_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < max(longest, 0):
        raise ValueError(f"{name} must be >= the longest sequence in {cu_name} ({longest}), got {value}")
    return value


def _check_softcap(softcap: object) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float (0.0: no soft-capping), got {type(softcap).__name__}")
    if not math.isfinite(float(softcap)) or float(softcap) < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0.0: no soft-capping), got {softcap}")
    return float(softcap)


def _check_alibi(alibi_slopes: object, batch: int, heads: int, query: torch.Tensor) -> torch.Tensor | None:
    """ALiBi slopes: None, or a float32 tensor of shape (heads,) or (batch, heads) on the query's device."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must have dtype float32, got {str(alibi_slopes.dtype).replace('torch.', '')}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}) (query heads, or batch and "
                         f"query heads), got {tuple(alibi_slopes.shape)}")
    _validation.check_same_device(q=query, alibi_slopes=alibi_slopes)
    return alibi_slopes.contiguous()
