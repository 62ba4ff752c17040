"""RMSNorm (Llama, Mistral, Qwen; Gemma with ``offset=1``), optionally fused with the residual add before it.

``rms_norm(x, weight, eps, offset=..., residual=...)``: the Triton kernels (``llmfast.ops._norm``) read each
element once and write it once, with fp32 math whatever the input dtype and Hugging Face LlamaRMSNorm's casting
order (spelled out in :mod:`llmfast.reference.rms_norm`). With ``residual`` the same pass computes
``h = x + residual``, writes it, and normalizes it: ``(rms_norm(h), h)``, the pre-norm block's two outputs, for
the traffic of one pass instead of an add kernel plus a norm kernel.

Backward computes dx (the residual's gradient too, plus the gradient reaching ``h`` directly) and the weight
gradient from per-program fp32 partial sums, deterministic (no atomics).

The Triton path is exposed as the custom ops ``llmfast::rms_norm_forward`` / ``llmfast::rms_norm_backward`` with
fake implementations and a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmfast import _backend, _validation
from llmfast.ops import _norm
from llmfast.ops._spec import KernelSpec
from llmfast.reference import rms_norm as reference


def _out_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    # Hugging Face's `weight * n.to(input_dtype)`: the product's dtype.
    return x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (traced through their fake implementations), with autograd.
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("llmfast::rms_norm_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? residual, float eps, float offset) "
                                "-> (Tensor, Tensor, Tensor)")
def _rms_norm_forward(x, weight, residual, eps, offset):
    """(y, h, rstd): h = x + residual (an empty tensor without residual), rstd fp32 of shape x.shape[:-1]."""
    return _forward_impl(x, weight, residual, eps, offset)


def _forward_impl(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float,
                  offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward custom op's body (also what compile_specs runs on meta tensors to capture its launches)."""
    y, h, _, rstd = _norm.forward("rms_norm", x, weight, None, residual, x.shape[-1], eps, offset,
                                  _out_dtype(x, weight), rms=True)
    return y, (h if h is not None else x.new_empty(0)), rstd.view(x.shape[:-1])


@_rms_norm_forward.register_fake
def _rms_norm_forward_fake(x, weight, residual, eps, offset):
    y = x.new_empty(x.shape, dtype=_out_dtype(x, weight))
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return y, h, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("llmfast::rms_norm_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor? dh, Tensor x, Tensor? weight, Tensor rstd, float offset, "
                                "bool weight_needs_grad) -> (Tensor, Tensor)")
def _rms_norm_backward(dy, dh, x, weight, rstd, offset, weight_needs_grad):
    """(dx, dweight): dweight in weight's dtype, an empty tensor when not asked for."""
    return _backward_impl(dy, dh, x, weight, rstd, offset, weight_needs_grad)


def _backward_impl(dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor | None,
                   rstd: torch.Tensor, offset: float, weight_needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward custom op's body (also run by compile_specs on meta tensors)."""
    want_dw = weight_needs_grad and weight is not None
    dx, dw, _ = _norm.backward("rms_norm", dy, dh, x, weight, None, rstd.reshape(-1), x.shape[-1], offset,
                               want_dw, False, rms=True)
    return dx, (dw.to(weight.dtype) if want_dw else x.new_empty(0))


@_rms_norm_backward.register_fake
def _rms_norm_backward_fake(dy, dh, x, weight, rstd, offset, weight_needs_grad):
    dw = weight.new_empty(weight.shape) if weight_needs_grad and weight is not None else x.new_empty(0)
    return x.new_empty(x.shape), dw


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, offset = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    # Backward recomputes n from what was normalized: h (rounded to x's dtype, as the kernel used it) or x.
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)
    ctx.offset = offset


def _backward(ctx, dy, dh, drstd):
    saved, weight, rstd = ctx.saved_tensors
    if dy is None:  # only h was used downstream
        dy = torch.zeros(saved.shape, dtype=_out_dtype(saved, weight), device=saved.device)
    dh = dh if ctx.has_residual else None
    needs_x, needs_w, needs_r = ctx.needs_input_grad[:3]
    dx, dw = _rms_norm_backward(dy, dh, saved, weight, rstd, ctx.offset, needs_w)
    # d(residual) = d(x): h = x + residual.
    return dx if needs_x else None, dw if needs_w else None, dx if needs_r else None, None, None


_rms_norm_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float,
                    residual: torch.Tensor | None):
    """torch-native path (``auto`` on the CPU, float64): torch's fused ``rms_norm`` on the upcast input, then the
    reference's casting order."""
    if residual is not None:
        h = x + residual
        return _rms_norm_torch(h, weight, eps, offset, None), h
    math = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = F.rms_norm(x.to(math), (x.shape[-1],), eps=eps).to(x.dtype)
    if weight is None:
        return n
    if offset == 0.0:
        return n * weight  # torch multiplies 16-bit operands in fp32 and rounds once: the same bits
    math = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    return (n.to(math) * (weight.to(math) + offset)).to(_out_dtype(x, weight))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *, offset: float = 0.0,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dim of ``x``: ``n = x / sqrt(mean(x^2) + eps)``, ``y = n * (offset + weight)``.

    Args:
        x: any shape ``(..., hidden)``, fp16/bf16/fp32 (float64 through torch), any strides.
        weight: ``(hidden,)`` or None (no scale; then ``offset`` must be 0). A weight of another floating dtype makes the output
            ``torch.promote_types(x.dtype, weight.dtype)``, as Hugging Face's LlamaRMSNorm does.
        eps: added to the mean square.
        offset: added to the weight; ``1.0`` for Gemma's ``(1 + weight)``.
        residual: optional, x's shape and dtype: normalize ``h = x + residual`` instead and return ``(y, h)``.

    The math is fp32 whatever the input dtype: ``n`` is computed in fp32, cast back to x's dtype, multiplied by
    ``offset + weight`` in fp32 and rounded once (Hugging Face LlamaRMSNorm's order: its bits for ``offset=0``, up
    to the last bit of the fp32 rsqrt). Differentiable in x, weight and residual.
    """
    _validation.check_tensor("x", x, dtypes=_validation.FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (the hidden size last), got a 0-d tensor")
    _norm.check_param("weight", weight, x, (x.shape[-1],), "x's last dim, the hidden size")
    eps = _norm.check_number("eps", eps, minimum=0.0)
    offset = _norm.check_number("offset", offset)
    if weight is None and offset != 0.0:
        raise ValueError(f"offset shifts the weight, so it needs one: got offset={offset} with weight=None")
    if residual is not None:
        _validation.check_tensor("residual", residual, dtypes=_validation.FLOAT_DTYPES)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got shape {tuple(residual.shape)}")
        _validation.check_same_dtype(x=x, residual=residual)
        if residual.device != x.device:
            raise ValueError(f"residual must be on x's device ({x.device}), got {residual.device}")

    impl = _backend.resolve("rms_norm", x)
    if impl == "reference":
        return reference.rms_norm(x, weight, eps, offset=offset, residual=residual)
    if impl == "torch" or _norm.uses_torch(x, weight, residual):
        return _rms_norm_torch(x, weight, eps, offset, residual)
    y, h, _ = _rms_norm_forward(x, weight, residual, eps, offset)
    return (y, h) if residual is not None else y


# ----------------------------------------------------------------------------------------------------------------
# Compile check
# ----------------------------------------------------------------------------------------------------------------


def compile_specs() -> list[KernelSpec]:
    """Forward with and without the residual, backward with and without dh; always with a weight and its
    gradient (the register-heaviest variants; without them the kernels only lose work); and bf16 inputs with an
    fp32 weight. Each is captured from this module's own launch code (see ``_norm.compile_specs_for``)."""

    def forward(residual: bool, weight_dtype: torch.dtype | None = None):
        def host(x: torch.Tensor) -> None:
            weight = torch.empty(x.shape[-1], dtype=weight_dtype or x.dtype, device=x.device)
            _forward_impl(x, weight, torch.empty_like(x) if residual else None, 1e-6, 0.0)
        return host

    def backward(dh: bool, weight_dtype: torch.dtype | None = None):
        def host(x: torch.Tensor) -> None:
            weight = torch.empty(x.shape[-1], dtype=weight_dtype or x.dtype, device=x.device)
            # dy has the output's dtype: fp32 under mixed precision (bf16 activations, an fp32 weight).
            dy = torch.empty(x.shape, dtype=_out_dtype(x, weight), device=x.device)
            rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
            _backward_impl(dy, torch.empty_like(x) if dh else None, x, weight, rstd, 0.0, True)
        return host

    return (_norm.compile_specs_for("rms_norm", [forward(False), forward(True)], [backward(False), backward(True)])
            + _norm.compile_specs_for("rms_norm", [forward(False, torch.float32)], [backward(False, torch.float32)],
                                      dtypes=("bf16",), suffix="_fp32_weight"))
