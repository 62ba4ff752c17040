"""LayerNorm with ``torch.nn.functional.layer_norm``'s signature and semantics, on Triton kernels.

The trailing ``normalized_shape`` dims of ``x`` are flattened into one row of N elements; the shared norm kernels
(``llmfast.ops._norm``) read each row once and write it once, fp32 math whatever the input dtype, output in x's
dtype (one rounding, as torch's kernels). Rows longer than a block sum deviations from the mean of their first
block, so a large mean does not cancel the variance away. Backward computes dx, and the weight and bias gradients
from per-program fp32 partial sums (deterministic, no atomics).

Exposed as the custom ops ``llmfast::layer_norm_forward`` / ``llmfast::layer_norm_backward`` with fake
implementations and a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llmfast import _backend, _validation
from llmfast.ops import _norm
from llmfast.ops._spec import KernelSpec
from llmfast.reference import layer_norm as reference

# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("llmfast::layer_norm_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, int norm_ndim, float eps) "
                                "-> (Tensor, Tensor, Tensor)")
def _layer_norm_forward(x, weight, bias, norm_ndim, eps):
    """(y, mean, rstd): statistics fp32 of shape x.shape[:-norm_ndim]."""
    return _forward_impl(x, weight, bias, norm_ndim, eps)


def _forward_impl(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, norm_ndim: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward custom op's body (also what compile_specs runs on meta tensors to capture its launches)."""
    n_cols = math.prod(x.shape[x.dim() - norm_ndim:])
    y, _, mean, rstd = _norm.forward("layer_norm", x, weight, bias, None, n_cols, eps, 0.0, x.dtype, rms=False)
    lead = x.shape[:x.dim() - norm_ndim]
    return y, mean.view(lead), rstd.view(lead)


@_layer_norm_forward.register_fake
def _layer_norm_forward_fake(x, weight, bias, norm_ndim, eps):
    lead = x.shape[:x.dim() - norm_ndim]
    return x.new_empty(x.shape), x.new_empty(lead, dtype=torch.float32), x.new_empty(lead, dtype=torch.float32)


@torch.library.custom_op("llmfast::layer_norm_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, int norm_ndim, "
                                "bool weight_needs_grad, bool bias_needs_grad, ScalarType bias_dtype) "
                                "-> (Tensor, Tensor, Tensor)")
def _layer_norm_backward(dy, x, weight, mean, rstd, norm_ndim, weight_needs_grad, bias_needs_grad, bias_dtype):
    """(dx, dweight, dbias) in their parameters' shapes and dtypes; empty tensors where not asked for."""
    return _backward_impl(dy, x, weight, mean, rstd, norm_ndim, weight_needs_grad, bias_needs_grad, bias_dtype)


def _backward_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor, norm_ndim: int, weight_needs_grad: bool, bias_needs_grad: bool,
                   bias_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward custom op's body (also run by compile_specs on meta tensors)."""
    norm_shape = x.shape[x.dim() - norm_ndim:]
    want_dw = weight_needs_grad and weight is not None
    dx, dw, db = _norm.backward("layer_norm", dy, None, x, weight, mean.reshape(-1), rstd.reshape(-1),
                                math.prod(norm_shape), 0.0, want_dw, bias_needs_grad, rms=False)
    dw = dw.view(norm_shape).to(weight.dtype) if want_dw else x.new_empty(0)
    db = db.view(norm_shape).to(bias_dtype) if bias_needs_grad else x.new_empty(0)
    return dx, dw, db


@_layer_norm_backward.register_fake
def _layer_norm_backward_fake(dy, x, weight, mean, rstd, norm_ndim, weight_needs_grad, bias_needs_grad,
                              bias_dtype):
    norm_shape = x.shape[x.dim() - norm_ndim:]
    dw = weight.new_empty(weight.shape) if weight_needs_grad and weight is not None else x.new_empty(0)
    db = x.new_empty(norm_shape, dtype=bias_dtype) if bias_needs_grad else x.new_empty(0)
    return x.new_empty(x.shape), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, norm_ndim, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.norm_ndim = norm_ndim
    ctx.bias_dtype = bias.dtype if bias is not None else x.dtype


def _backward(ctx, dy, dmean, drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    dx, dw, db = _layer_norm_backward(dy, x, weight, mean, rstd, ctx.norm_ndim, needs_w, needs_b, ctx.bias_dtype)
    return dx if needs_x else None, dw if needs_w else None, db if needs_b else None, None, None


_layer_norm_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _normalized_shape(normalized_shape: object, x: torch.Tensor) -> tuple[int, ...]:
    if isinstance(normalized_shape, bool):
        raise TypeError("normalized_shape must be an int or a sequence of ints, got bool")
    if isinstance(normalized_shape, int):
        shape = (normalized_shape,)
    elif isinstance(normalized_shape, Sequence) and all(
            isinstance(d, int) and not isinstance(d, bool) for d in normalized_shape):
        shape = tuple(normalized_shape)
    else:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    if not shape:
        raise ValueError("normalized_shape must name at least one dimension, got ()")
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} must match the trailing dimensions of x, got x of shape "
                         f"{tuple(x.shape)}")
    return shape


def layer_norm(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.layer_norm``: normalize over the trailing ``normalized_shape`` dims of ``x``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` (biased variance); ``weight`` and ``bias`` are optional
    and of shape ``normalized_shape``. fp16/bf16/fp32 inputs (float64 through torch), any strides; fp32 math,
    output in x's dtype. Differentiable in x, weight and bias.
    """
    _validation.check_tensor("x", x, dtypes=_validation.FLOAT_DTYPES)
    shape = _normalized_shape(normalized_shape, x)
    _norm.check_param("weight", weight, x, shape, "normalized_shape")
    _norm.check_param("bias", bias, x, shape, "normalized_shape")
    eps = _norm.check_number("eps", eps, minimum=0.0)

    impl = _backend.resolve("layer_norm", x)
    if impl == "reference":
        return reference.layer_norm(x, shape, weight, bias, eps)
    if impl == "torch" or _norm.uses_torch(x, weight, bias):
        return F.layer_norm(x, shape, weight, bias, eps)
    y, _, _ = _layer_norm_forward(x, weight, bias, len(shape), eps)
    return y


# ----------------------------------------------------------------------------------------------------------------
# Compile check
# ----------------------------------------------------------------------------------------------------------------


def compile_specs() -> list[KernelSpec]:
    """Forward with weight and bias, backward with both gradients (the register-heaviest variants), each captured
    from this module's own launch code (see ``_norm.compile_specs_for``)."""

    def forward(x: torch.Tensor) -> None:
        weight, bias = (torch.empty(x.shape[-1], dtype=x.dtype, device=x.device) for _ in range(2))
        _forward_impl(x, weight, bias, 1, 1e-5)

    def backward(x: torch.Tensor) -> None:
        weight = torch.empty(x.shape[-1], dtype=x.dtype, device=x.device)
        mean, rstd = (torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) for _ in range(2))
        _backward_impl(torch.empty_like(x), x, weight, mean, rstd, 1, True, True, x.dtype)

    return _norm.compile_specs_for("layer_norm", [forward], [backward])
