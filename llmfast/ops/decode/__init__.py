"""Triton decode attention over a key/value cache: flash-attn's ``flash_attn_with_kvcache``.

One decoding step has a handful of query rows against a long cache, so the work is reading K and V once, as fast
as memory allows. The kernels:

* ``_kv_append_kernel``: writes the new ``k``/``v`` tokens into the cache in place at ``cache_seqlens`` (contiguous
  or paged), rotating ``k`` first when rotary tables are given. One program per (token, KV head).
* ``_decode_kernel`` (split-KV partial attention): one program per (batch, KV head, block of query rows, split).
  The rows of a block are the ``Sq x group`` query rows that share one KV head (row ``r`` is query position
  ``r // group``, query head ``kv_head * group + r % group``), so each K/V tile is loaded once for the whole GQA
  group. Each split streams its share of the key range through an online softmax and writes a partial output and
  its log-sum-exp (or, with one split, the final output). A single row (MHA decoding) runs on the FMA units (a
  keys x dims product reduced over dims); two rows or more (GQA groups x speculative tokens) run on the tensor
  cores with ``tl.dot`` in 16- or 64-row blocks (a few padded rows cost nothing in a memory-bound step).
  Causal / sliding windows (bottom-right per sequence), softcap and ALiBi are
  applied to the scores; paged caches are addressed per key through ``block_table``.
* ``_decode_combine_kernel``: merges the splits' partial outputs, weighting each by ``exp(lse_split - lse)``.

``num_splits=0`` picks the split count in :func:`choose_num_splits` (the one heuristic). Offsets into the cache
are 64-bit when the cache spans 2**31 elements or more (``WIDE``), 32-bit otherwise. Tiles are named configs per
architecture (``DECODE_CONFIGS``), all compiled by ``python -m llmfast.compile_check`` via :func:`compile_specs`.

The Triton path is the custom op ``llmfast::flash_attn_with_kvcache`` (it declares that it mutates ``k_cache``
and ``v_cache``), with a fake implementation so ``torch.compile`` traces it.

Layout: ``configs`` (tiles, split heuristic), ``kernels`` (Triton), ``launch`` (host side, custom op), ``api``
(checks, torch-native path, the public function), ``specs`` (compile check).
"""
from .api import flash_attn_with_kvcache, known_cache_lengths
from .configs import (DECODE_CONFIGS, MAX_HEAD_DIM, MAX_SPLITS, SPLIT_HEURISTIC, _row_kind,  # noqa: F401
                      _row_kind_for, choose_num_splits)
from .launch import _needs_wide  # noqa: F401  (tests check the 64-bit decision)
from .specs import compile_specs

__all__ = ["flash_attn_with_kvcache", "known_cache_lengths", "choose_num_splits", "compile_specs",
           "DECODE_CONFIGS", "SPLIT_HEURISTIC", "MAX_SPLITS", "MAX_HEAD_DIM"]
