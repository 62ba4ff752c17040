"""Triton softmax: one program per row, the whole row in registers, read once and written once.

(The softmax-family issue extends this with log-softmax, backward, long rows and other dims.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmfast import _backend, _validation
from llmfast.ops._spec import KernelSpec
from llmfast.reference import softmax as reference

# Tuning: the block covers the whole row (next power of two); more warps for longer rows.
SOFTMAX_CONFIGS = {
    "row1k": dict(BLOCK_SIZE=1024, num_warps=4),
    "row4k": dict(BLOCK_SIZE=4096, num_warps=8),
    "row16k": dict(BLOCK_SIZE=16384, num_warps=16),
}


@triton.jit
def _softmax_fwd_kernel(out_ptr, in_ptr, in_row_stride, out_row_stride, n_cols, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    # Padding lanes read -inf so they add exp(-inf) = 0 to the sum; math in fp32 whatever the input dtype.
    x = tl.load(in_ptr + row * in_row_stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)
    numerator = tl.exp(x)
    y = numerator / tl.sum(numerator, axis=0)
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _softmax_triton(x: torch.Tensor) -> torch.Tensor:
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _backend.record_kernel_launch("softmax_fwd")
    _softmax_fwd_kernel[(x2.shape[0],)](out, x2, x2.stride(0), out.stride(0), n_cols,
                                         BLOCK_SIZE=block, num_warps=num_warps)
    return out.view(x.shape)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``; same semantics as ``torch.softmax``."""
    _validation.check_tensor("x", x, dtypes=_validation.FLOAT_DTYPES)
    dim = _validation.normalize_dim(dim, x.dim())
    impl = _backend.resolve("softmax", x)
    if impl == "reference":
        return reference.softmax(x, dim)
    if impl == "torch" or x.dtype == torch.float64 or x.dim() == 0 or x.numel() == 0 or dim != x.dim() - 1:
        return torch.softmax(x, dim)
    return _softmax_triton(x)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """PLACEHOLDER until the softmax-family issue: delegates to torch."""
    return torch.log_softmax(x, dim)


def masked_softmax(x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0, causal: bool = False,
                   dim: int = -1) -> torch.Tensor:
    """PLACEHOLDER until the softmax-family issue."""
    raise NotImplementedError("masked_softmax lands with the softmax-family issue")


def compile_specs() -> list[KernelSpec]:
    return [
        KernelSpec("softmax_fwd", _softmax_fwd_kernel,
                   {"out_ptr": f"*{t}", "in_ptr": f"*{t}", "in_row_stride": "i32", "out_row_stride": "i32",
                    "n_cols": "i32"},
                   {"BLOCK_SIZE": cfg["BLOCK_SIZE"]}, f"{name}_{t}", num_warps=cfg["num_warps"])
        for name, cfg in SOFTMAX_CONFIGS.items() for t in ("fp16", "bf16", "fp32")
    ]
