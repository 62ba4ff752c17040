"""Triton cross-entropy and fused linear cross-entropy, with torch's and Liger-Kernel's options.

* :func:`cross_entropy` (``_functional.py``): ``F.cross_entropy``'s signature extended with Liger-Kernel's
  (class ``weight``, ``lse_square_scale`` z-loss, ``softcap``, ``return_z_loss`` / ``return_token_accuracy`` /
  ``return_predicted_tokens``), and ``process_group=`` for logits sharded over the vocabulary (``_parallel.py``).
  One program per row computes the loss terms and, when the logits need a gradient, writes it right away (times
  1/normaliser for ``mean``); backward only scales it by the upstream gradient (nothing at all when it is 1).
* :func:`fused_linear_cross_entropy` (``_linear.py``): the loss of ``input @ weight.T + bias`` chunk by chunk,
  never holding the (N, V) logits, with Liger-Kernel's signature.
* The kernels and their per-row contract in torch (CPU "auto" path): ``_kernels.py``; the compile specs, captured
  from the launchers: ``_specs.py``.
* Under ``torch.compile`` both functions run as ``torch.library`` custom ops (``_compiled.py``).

Where the gradient goes: by default into a new buffer (the logits are left alone). With ``inplace_backward=True``
it overwrites the logits' own storage, saving an (N, V) buffer; the logits' autograd version counter is bumped, so
another autograd node that saved them raises instead of silently using gradients as logits. Internally-made copies
(the ``(N, C, d1, ...)`` layout made contiguous as ``(N*d1*..., C)``) are always overwritten in place.

Targets outside ``[0, V)`` (other than ``ignore_index``) raise on CPU tensors, naming the position; on CUDA,
checking would need a device sync, so the kernel gives such rows a NaN loss and NaN gradient instead (loud, never
silently wrong).
"""
from __future__ import annotations

from llmfast.ops.cross_entropy._functional import LOGIT_DTYPES, REDUCTIONS, TARGET_DTYPES, cross_entropy
from llmfast.ops.cross_entropy._kernels import (CE_TILES, LossOptions, RowsOut, VocabTile, pick_ce_tile, rows_torch,
                                                rows_triton)
from llmfast.ops.cross_entropy._linear import (CHUNK_LOGITS_BYTES, MIN_CHUNK_ROWS, MIN_CHUNKS, chunk_rows,
                                               fused_linear_cross_entropy, peak_memory_bytes)
from llmfast.ops.cross_entropy._specs import compile_specs
from llmfast.reference.cross_entropy import CrossEntropyOutput

# Liger-Kernel's functional names (liger_kernel.transformers.functional): same arguments, order and returns.
liger_cross_entropy = cross_entropy
liger_fused_linear_cross_entropy = fused_linear_cross_entropy

__all__ = ["cross_entropy", "fused_linear_cross_entropy", "CrossEntropyOutput", "liger_cross_entropy",
           "liger_fused_linear_cross_entropy", "compile_specs",
           "peak_memory_bytes", "chunk_rows", "LossOptions", "RowsOut", "rows_triton", "rows_torch", "CE_TILES",
           "VocabTile", "pick_ce_tile", "REDUCTIONS", "TARGET_DTYPES", "LOGIT_DTYPES", "MIN_CHUNKS",
           "CHUNK_LOGITS_BYTES", "MIN_CHUNK_ROWS"]
