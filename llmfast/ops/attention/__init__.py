"""Triton FlashAttention (forward and backward) behind torch's SDPA and flash-attn's function signatures.

Forward (``_attn_fwd_kernel``): one program per (batch, query head, block of BLOCK_M query rows). It streams
BLOCK_N-key tiles of K and V through an online softmax (running max ``m``, running sum ``l``, rescaled
accumulator), works in base 2 with the softmax scale folded into one multiplier, and saves the log-sum-exp of each
row so the backward pass can rebuild the probabilities without storing them.

Backward (FlashAttention-2 style, no atomics, hence deterministic):

* ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` (minus the incoming LSE gradient, if any).
* ``_attn_bwd_dkdv_kernel``: one program per (batch, KV head, key block); it recomputes ``P`` for every query
  block of every query head of its GQA group, so grouped K/V gradients are summed in registers, not with atomics.
  When that grid is too small to fill the GPU (few KV heads, small batch), ``group_split`` programs share a
  group's query heads, each writing fp32 partials to a workspace that the host sums in a fixed order
  (:func:`configs.gqa_group_split` picks the split).
* ``_attn_bwd_dq_kernel``: one program per (batch, query head, query block); recomputes ``P`` again for ``dQ``.

Every kernel takes the same masking description: the key range ``[start, end)`` allowed for a query row comes
from the causal diagonal / sliding window (``HAS_LEFT``, ``HAS_RIGHT``, aligned top-left or bottom-right), the
sequence lengths (fixed, or per sequence from ``cu_seqlens`` for varlen batches) and an optional boolean or additive
mask broadcast through stride-0 dimensions and loaded tile by tile. Blocks wholly outside the allowed band are
never visited; blocks wholly inside it run without any element masking; only the blocks on the band's edges pay
for it (the forward pass runs separate loops for the left edge, the interior and the diagonal / sequence end; the
backward kernels, tighter on registers, run one loop with a runtime branch for edge blocks). Under a causal band
the query blocks with the most keys are launched first. Rows with no allowed key produce output 0, LSE ``-inf``
and gradient 0.

Two optional score modifications (constexpr flags, compiled out when off) act before any mask: logit soft-capping
(``SOFTCAP``: ``s = softcap * tanh(scale * qk / softcap)``; the backward multiplies dS by ``1 - tanh^2``) and ALiBi
(``ALIBI``: ``-slope * |i + Sk - Sq - j|`` per (batch, query head) slope).

Tiles, warps and pipeline stages are named configs per architecture (``ATTENTION_CONFIGS``), picked at launch by
:func:`llmfast.ops._arch.config_arch`, head dim, dtype and features, and all compiled by
``python -m llmfast.compile_check`` (through :func:`compile_specs`).

Dropout uses Triton's Philox (``tl.rand``) at offset ``((b * H + h) * Sq + i) * Sk + j`` and is regenerated, not
stored, in the backward pass (:func:`dropout_keep_mask` materialises the same mask for the reference).

The Triton path is exposed to PyTorch as the custom ops ``llmfast::flash_attention_forward`` and
``llmfast::flash_attention_backward`` (with fake implementations and a registered autograd formula), so
``torch.compile(fullgraph=True)`` traces through them without graph breaks.

Files (one concern each):

* ``configs.py``: ``ATTENTION_CONFIGS`` and the config a launch picks.
* ``common.py``: device helpers shared by every kernel (dropout, casts, dots, tile loads, ranges, masking).
* ``forward.py``: the forward kernel.
* ``backward.py``: the backward kernels (preprocess, dK/dV, dQ).
* ``launch.py``: host-side launchers (layouts, strides, grids) and :func:`dropout_keep_mask`.
* ``probs.py``: the kernel that materialises flash-attn's ``S_dmask`` (``return_attn_probs=True``).
* ``custom_ops.py``: the ``torch.library`` custom ops and their autograd.
* ``checks.py``: argument validation; ``torch_paths.py``: the torch-native fallbacks.
* ``api.py``: the public functions; ``specs.py``: :func:`compile_specs` for ``llmfast.compile_check``.
"""
from __future__ import annotations

from .api import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                  flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func, scaled_dot_product_attention)
from .common import _dropout_keep, _dropout_offsets  # noqa: F401  (kernel tests use these)
from .configs import ATTENTION_CONFIGS, MAX_HEAD_DIM, _block_d, _config, _config_name  # noqa: F401
from .launch import _Problem, dropout_keep_mask  # noqa: F401
from .specs import compile_specs

# The public functions are documented (and reported by ``__module__``) as living here, not in ``api``.
for _fn in (scaled_dot_product_attention, flash_attn_func, flash_attn_varlen_func, flash_attn_qkvpacked_func,
            flash_attn_kvpacked_func, flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func,
            dropout_keep_mask, compile_specs):
    _fn.__module__ = __name__
del _fn

__all__ = ["scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
           "dropout_keep_mask", "compile_specs", "ATTENTION_CONFIGS", "MAX_HEAD_DIM"]
