"""Triton cross-entropy and fused linear cross-entropy, with torch's and Liger-Kernel's options.

* :func:`cross_entropy` (``_functional.py``): ``F.cross_entropy``'s signature extended with Liger-Kernel's
  (class ``weight``, ``lse_square_scale`` z-loss, ``softcap``, ``return_z_loss`` / ``return_token_accuracy`` /
  ``return_predicted_tokens``), and ``process_group=`` for logits sharded over the vocabulary (``_parallel.py``).
  One program per row computes the loss terms and, when the logits need a gradient, writes it right away (times
  1/normaliser for ``mean``); backward only scales it by the upstream gradient (nothing at all when it is 1).
* :func:`fused_linear_cross_entropy` (``_linear.py``): the loss of ``input @ weight.T + bias`` chunk by chunk,
  never holding the (N, V) logits, with Liger-Kernel's signature.
* The kernels, their per-row contract in torch (CPU "auto" path) and the compile specs: ``_kernels.py``.
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

from llmfast.ops._spec import KernelSpec
from llmfast.ops.cross_entropy._functional import LOGIT_DTYPES, REDUCTIONS, TARGET_DTYPES, cross_entropy
from llmfast.ops.cross_entropy._kernels import (CE_TILES, LossOptions, RowsOut, VocabTile, _ce_grad_kernel,
                                                _ce_stats_kernel, _cross_entropy_kernel, pick_ce_tile, rows_torch,
                                                rows_triton)
from llmfast.ops.cross_entropy._linear import (CHUNK_LOGITS_BYTES, MIN_CHUNK_ROWS, MIN_CHUNKS, chunk_rows,
                                               fused_linear_cross_entropy, peak_memory_bytes)
from llmfast.reference.cross_entropy import CrossEntropyOutput

# Liger-Kernel's functional names (liger_kernel.transformers.functional): same arguments, order and returns.
liger_cross_entropy = cross_entropy
liger_fused_linear_cross_entropy = fused_linear_cross_entropy

__all__ = ["cross_entropy", "fused_linear_cross_entropy", "CrossEntropyOutput", "liger_cross_entropy",
           "liger_fused_linear_cross_entropy", "compile_specs",
           "peak_memory_bytes", "chunk_rows", "LossOptions", "RowsOut", "rows_triton", "rows_torch", "CE_TILES",
           "VocabTile", "pick_ce_tile", "REDUCTIONS", "TARGET_DTYPES", "LOGIT_DTYPES", "MIN_CHUNKS",
           "CHUNK_LOGITS_BYTES", "MIN_CHUNK_ROWS"]

# The kernel variants the compile check builds: the plain loss, each option alone (with the gradient), all of them
# at once (the most registers, with token scaling), and the forward-only forms. Flags: smoothing, weight, z-loss,
# softcap, argmax, grad.
_FUSED_VARIANTS = {
    "": (False, False, False, False, False, False),
    "_grad": (False, False, False, False, False, True),
    "_grad_smooth": (True, False, False, False, False, True),
    "_grad_weight": (False, True, False, False, False, True),
    "_grad_weight_smooth": (True, True, False, False, False, True),
    "_grad_zloss": (False, False, True, False, False, True),
    "_grad_softcap": (False, False, False, True, False, True),
    "_argmax": (False, False, False, False, True, False),
    "_grad_all": (True, True, True, True, True, True),
    "_all": (True, True, True, True, True, False),
}


def compile_specs() -> list[KernelSpec]:
    """The cross-entropy kernels at each vocabulary tile and logits dtype, for the variants above (int64 targets;
    int32 targets for the plain and gradient forms), and the two vocabulary-shard kernels with all options."""
    specs = []
    for cfg, tile in CE_TILES.items():
        for t in ("fp16", "bf16", "fp32"):
            for suffix, (smooth, weight, zloss, softcap, argmax, grad) in _FUSED_VARIANTS.items():
                for target_type in (("i64", "i32") if suffix in ("", "_grad") else ("i64",)):
                    signature = {
                        "logits_ptr": f"*{t}", "grad_ptr": f"*{t}", "loss_ptr": "*fp32", "z_ptr": "*fp32",
                        "pred_ptr": "*i64", "acc_ptr": "*fp32", "target_ptr": f"*{target_type}",
                        "weight_ptr": "*fp32", "scale_ptr": "*fp32", "n_cols": "i32", "logits_row_stride": "i32",
                        "grad_row_stride": "i32", "scale_row_stride": "i32", "z_scale_offset": "i32",
                        "ignore_index": "i32", "label_smoothing": "fp32", "lse_square_scale": "fp32",
                        "softcap": "fp32", "HAS_SMOOTHING": "constexpr", "HAS_WEIGHT": "constexpr",
                        "HAS_ZLOSS": "constexpr", "HAS_SOFTCAP": "constexpr", "TRACK_ARGMAX": "constexpr",
                        "COMPUTE_GRAD": "constexpr", "BLOCK_V": "constexpr", "TOKEN_SCALING": "constexpr"}
                    constexprs = {"HAS_SMOOTHING": smooth, "HAS_WEIGHT": weight, "HAS_ZLOSS": zloss,
                                  "HAS_SOFTCAP": softcap, "TRACK_ARGMAX": argmax, "COMPUTE_GRAD": grad,
                                  "BLOCK_V": tile.block_v, "TOKEN_SCALING": suffix.endswith("all")}
                    name = "cross_entropy" + suffix + ("_i32" if target_type == "i32" else "")
                    specs.append(KernelSpec(name, _cross_entropy_kernel, signature, constexprs, f"{cfg}_{t}",
                                            num_warps=tile.num_warps))
            flags = {"HAS_SMOOTHING": True, "HAS_WEIGHT": True, "HAS_SOFTCAP": True}
            stats_sig = {"logits_ptr": f"*{t}", "target_ptr": "*i64", "weight_ptr": "*fp32", "max_ptr": "*fp32",
                         "sumexp_ptr": "*fp32", "yt_ptr": "*fp32", "wy_ptr": "*fp32", "arg_ptr": "*i64",
                         "n_cols": "i32", "logits_row_stride": "i32", "vocab_start": "i32", "ignore_index": "i32",
                         "softcap": "fp32", "HAS_SMOOTHING": "constexpr", "HAS_WEIGHT": "constexpr",
                         "HAS_SOFTCAP": "constexpr", "TRACK_ARGMAX": "constexpr", "BLOCK_V": "constexpr"}
            specs.append(KernelSpec("cross_entropy_shard_stats", _ce_stats_kernel, stats_sig,
                                    {**flags, "TRACK_ARGMAX": True, "BLOCK_V": tile.block_v}, f"{cfg}_{t}",
                                    num_warps=tile.num_warps))
            grad_sig = {"logits_ptr": f"*{t}", "grad_ptr": f"*{t}", "target_ptr": "*i64", "weight_ptr": "*fp32",
                        "lse_ptr": "*fp32", "a_ptr": "*fp32", "coef_ptr": "*fp32", "uni_ptr": "*fp32",
                        "n_cols": "i32", "logits_row_stride": "i32", "grad_row_stride": "i32", "vocab_start": "i32",
                        "ignore_index": "i32", "softcap": "fp32", "HAS_SMOOTHING": "constexpr",
                        "HAS_WEIGHT": "constexpr", "HAS_SOFTCAP": "constexpr", "BLOCK_V": "constexpr"}
            specs.append(KernelSpec("cross_entropy_shard_grad", _ce_grad_kernel, grad_sig,
                                    {**flags, "BLOCK_V": tile.block_v}, f"{cfg}_{t}", num_warps=tile.num_warps))
    return specs
