"""``llmfast.cross_entropy``: validation, the autograd Function and the vocabulary-parallel variant."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from llmfast import _backend, _validation
from llmfast.ops.cross_entropy import _kernels as K
from llmfast.reference import cross_entropy as reference
from llmfast.reference.cross_entropy import CrossEntropyOutput, legacy_reduction

REDUCTIONS = ("none", "mean", "sum")
TARGET_DTYPES = (torch.int64, torch.int32)
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

RowsFn = Callable[..., K.RowsOut]

# ----------------------------------------------------------------------------------------------------------------
# Validation and shapes
# ----------------------------------------------------------------------------------------------------------------


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_options(target: torch.Tensor, ignore_index: object, reduction: object, label_smoothing: object,
                  lse_square_scale: object, softcap: object, flags: dict[str, object]) -> None:
    """The options shared by cross_entropy and fused_linear_cross_entropy; errors name the argument."""
    _validation.check_tensor("target", target, dtypes=TARGET_DTYPES)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= _check_real("label_smoothing", label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    _check_real("lse_square_scale", lse_square_scale)
    if softcap is not None and _check_real("softcap", softcap) <= 0:
        raise ValueError(f"softcap must be None or a positive float, got {softcap}")
    for name, value in flags.items():
        _check_bool(name, value)


def check_class_weight(name: str, weight: object, n_classes: int, device: torch.device) -> torch.Tensor | None:
    """A per-class weight: None or a floating (C,) tensor on the logits' device; returned as fp32 contiguous."""
    if weight is None:
        return None
    if isinstance(weight, int) and not isinstance(weight, bool):
        raise TypeError(f"{name} must be a (C,) float tensor or None, got int {weight} (ignore_index comes after it: "
                        "pass it by keyword, as torch's and Liger-Kernel's signatures order them)")
    _validation.check_tensor(name, weight, ndim=1, dtypes=_validation.FLOAT_DTYPES)
    if weight.shape[0] != n_classes:
        raise ValueError(f"{name} must have shape ({n_classes},), one entry per class, got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {weight.device}")
    return weight.detach().to(torch.float32).contiguous()


def check_target_values(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """A target outside ``[0, n_classes)`` (other than ignore_index) raises, naming its position. CPU tensors only:
    on CUDA checking would need a device sync, so the kernel gives such rows a NaN loss and gradient instead."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), target.shape)) if target.dim() else ()
        index = ", ".join(str(i) for i in where)
        raise ValueError(f"target[{index}] = {int(target.reshape(-1)[flat])} is out of range: class indices must be "
                         f"in [0, {n_classes}) (or ignore_index={ignore_index})")


def canonical_logits(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, classes) logits and (rows,) targets from torch's layouts: (C,)+(), (N, C)+(N,), (N, C, d...)+(N, d...)."""
    if logits.dim() == 0:
        raise ValueError("logits must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    expected = () if logits.dim() == 1 else (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        layout = {1: "()", 2: "(N,)"}.get(logits.dim(), "(N, d1, ...)")
        raise ValueError(f"target must have shape {layout} = {expected} for logits of shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    if logits.shape[-1 if logits.dim() == 1 else 1] == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if logits.dim() == 1:
        return logits.unsqueeze(0), target.reshape(1)
    rows = logits if logits.dim() == 2 else logits.movedim(1, -1).reshape(-1, logits.shape[1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, target.reshape(-1).contiguous()


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ----------------------------------------------------------------------------------------------------------------
# Reductions shared by every path
# ----------------------------------------------------------------------------------------------------------------


def normalisers(target: torch.Tensor, opts: K.LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_valid, total target weight) as fp32 device tensors: what ``mean`` divides the z-loss and the loss by."""
    active = target != opts.ignore_index
    n_valid = active.sum().to(torch.float32)
    if opts.weight is None:
        return n_valid, n_valid
    safe = torch.where(active, target, torch.zeros_like(target)).long().clamp_(0, opts.weight.shape[0] - 1)
    return n_valid, torch.where(active, opts.weight[safe], 0.0).sum()


def pair_scale(reduction: str, n_valid: torch.Tensor, total_weight: torch.Tensor) -> torch.Tensor:
    """``[ce_scale, z_scale]`` the gradient is computed with in forward (upstream gradient 1)."""
    if reduction == "mean":
        return torch.stack([1.0 / total_weight, 1.0 / n_valid])
    return torch.ones(2, device=n_valid.device, dtype=torch.float32)


def reduce_rows(res: K.RowsOut, reduction: str, n_valid: torch.Tensor, total_weight: torch.Tensor,
                dtype: torch.dtype, want: tuple[bool, bool, bool]):
    """(loss, z_loss, token_accuracy, predicted_tokens) from per-row results (unrequested ones are None)."""
    z = res.z if res.z is not None else torch.zeros_like(res.ce)
    if reduction == "none":
        loss, z_loss, acc = (res.ce + z) if res.z is not None else res.ce, z, res.acc
    elif reduction == "sum":
        loss, z_loss = res.ce.sum() + z.sum(), z.sum()
        acc = res.acc.sum() / n_valid if res.acc is not None else None
    else:
        loss, z_loss = res.ce.sum() / total_weight + z.sum() / n_valid, z.sum() / n_valid
        acc = res.acc.sum() / n_valid if res.acc is not None else None
    return (loss.to(dtype), z_loss.to(dtype) if want[0] else None, acc if want[1] else None,
            res.pred if want[2] else None)


def _scale_stored_grad(ctx, grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Multiply the gradient computed in forward by the upstream gradient, in place (skipped when it is 1)."""
    # The upstream gradient stays fp32 (or fp64) so that a 16-bit gradient is rounded once, after the product.
    wide = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if grad_output.dim() == 0:
        if float(grad_output) == 1.0:
            return grad
        scale = grad_output.to(wide)
    else:
        scale = grad_output.reshape(-1, 1).to(wide)
    if ctx.grad_consumed:
        raise RuntimeError("llmfast cross_entropy: backward ran twice on a loss whose stored gradient was already "
                           "scaled in place; recompute the loss instead of using retain_graph=True")
    ctx.grad_consumed = True
    return grad.mul_(scale)


def _mark_extras(ctx, outs: tuple) -> tuple:
    extras = [t for t in outs[1:] if t is not None]
    if extras:
        ctx.mark_non_differentiable(*extras)
    return outs


def _grad_buffer(logits: torch.Tensor, inplace: bool) -> torch.Tensor | None:
    if not logits.requires_grad:
        return None
    if inplace:
        torch.autograd.graph.increment_version(logits)
        return logits
    return torch.empty_like(logits)


# ----------------------------------------------------------------------------------------------------------------
# Single-device cross-entropy
# ----------------------------------------------------------------------------------------------------------------


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, opts: K.LossOptions, reduction: str,
                inplace: bool, rows_fn: RowsFn, want: tuple[bool, bool, bool]):
        n_valid, total_weight = normalisers(target, opts)
        grad = _grad_buffer(logits, inplace)
        res = rows_fn(logits, target, opts, grad, pair_scale(reduction, n_valid, total_weight) if grad is not None
                      else None)
        ctx.grad_logits = grad
        ctx.grad_consumed = False
        return _mark_extras(ctx, reduce_rows(res, reduction, n_valid, total_weight, logits.dtype, want))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor, *_unused):
        grad = _scale_stored_grad(ctx, ctx.grad_logits, grad_output)
        return grad, None, None, None, None, None, None


def _package(outs: tuple, target_shape: tuple, reduction: str, want: tuple[bool, bool, bool]):
    loss, z_loss, acc, pred = outs
    if reduction == "none":
        loss = loss.reshape(target_shape)
        z_loss = z_loss.reshape(target_shape) if z_loss is not None else None
        acc = acc.reshape(target_shape) if acc is not None else None
    pred = pred.reshape(target_shape) if pred is not None else None
    if not any(want):
        return loss
    return CrossEntropyOutput(loss, z_loss, acc, pred)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100, reduce: bool | None = None,
                  reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                  softcap: float | None = None, return_z_loss: bool = False, return_token_accuracy: bool = False,
                  return_predicted_tokens: bool = False, *, inplace_backward: bool = False,
                  process_group: "torch.distributed.ProcessGroup | None" = None):
    """Cross-entropy between logits ``input`` and class indices ``target``: ``torch.nn.functional.cross_entropy``'s
    signature and semantics, extended with Liger-Kernel's ``liger_cross_entropy`` options (same names and order).

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``; fp16/bf16/fp32 (math in fp32), fp64.
        target: class indices, int64 or int32, shaped ``()``, ``(N,)`` or ``(N, d1, ...)``.
        weight: optional per-class rescaling ``(C,)`` (torch's ``weight``; ``mean`` divides by the targets' total
            weight, as torch).
        size_average, reduce: torch's deprecated spellings of ``reduction``.
        ignore_index: targets equal to it add nothing and get zero gradient.
        reduction: ``"mean"`` (NaN when every target is ignored, as torch), ``"sum"`` or ``"none"``.
        label_smoothing: eps in [0, 1]: the target distribution is ``(1 - eps) * onehot + eps / C``.
        lse_square_scale: z-loss ``lse_square_scale * logsumexp(logits)**2`` added to each row's loss (``mean``
            divides its sum by the number of non-ignored rows, as Liger-Kernel).
        softcap: Gemma-2's final soft-capping, ``logits <- softcap * tanh(logits / softcap)`` before everything
            else (inside the kernel, forward and backward).
        return_z_loss, return_token_accuracy, return_predicted_tokens: also return the z-loss (reduced like the
            loss; for logging, no gradient), the fraction of non-ignored rows whose argmax is the target (per row
            for ``"none"``) and the argmax per row (-1 for ignored rows), computed in the kernel without
            materialising anything (Liger-Kernel's conventions). With any of them set the result is a
            :class:`CrossEntropyOutput`.
        inplace_backward: write the gradient into the logits' storage during forward instead of a new buffer (saves
            an (N, C) buffer). Only when nothing reads ``input`` afterwards.
        process_group: logits sharded over the vocabulary across this group (Megatron-style vocab-parallel
            cross-entropy): ``input`` holds this rank's consecutive slice of the classes (ranks in order), ``target``
            and ``weight`` are global. Every rank gets the full loss and the gradient of its own shard.

    The loss comes back in the logits' dtype. The gradient is computed during forward (one kernel, no softmax saved),
    so backward costs nothing when the upstream gradient is 1.
    """
    reduction = legacy_reduction(size_average, reduce, reduction)
    _validation.check_tensor("input", input, dtypes=LOGIT_DTYPES)
    flags = {"return_z_loss": return_z_loss, "return_token_accuracy": return_token_accuracy,
             "return_predicted_tokens": return_predicted_tokens, "inplace_backward": inplace_backward}
    check_options(target, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, flags)
    _validation.check_same_device(input=input, target=target)
    rows, flat_target = canonical_logits(input, target)
    want = (return_z_loss, return_token_accuracy, return_predicted_tokens)
    if process_group is not None:
        from llmfast.ops.cross_entropy._parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(input, rows, target, flat_target, weight, ignore_index, reduction,
                                            label_smoothing, lse_square_scale, softcap, want, inplace_backward,
                                            process_group)
    class_weight = check_class_weight("weight", weight, rows.shape[1], input.device)
    compiling = torch.compiler.is_compiling()
    if not compiling:  # (data-dependent: under torch.compile a bad target gives NaN, as on CUDA)
        check_target_values(target, rows.shape[1], ignore_index)
    impl = _backend.resolve("cross_entropy", input)
    if impl == "reference":
        return reference.cross_entropy(input, target, weight, None, ignore_index, None, reduction, label_smoothing,
                                       lse_square_scale, softcap, *want)
    opts = K.LossOptions(ignore_index, float(label_smoothing), float(lse_square_scale),
                         float(softcap) if softcap is not None else None, class_weight,
                         return_token_accuracy or return_predicted_tokens)
    rows_fn: RowsFn = K.rows_triton
    if impl == "torch" or input.dtype == torch.float64:
        if opts.plain and not any(want):  # exactly what torch's own kernel computes
            return F.cross_entropy(input, target.long(), weight=weight.to(input.dtype) if weight is not None else None,
                                   ignore_index=ignore_index,
                                   reduction=reduction, label_smoothing=float(label_smoothing))
        rows_fn = K.rows_torch
    if compiling:
        from llmfast.ops.cross_entropy._compiled import cross_entropy_compiled

        outs = cross_entropy_compiled(rows, flat_target, opts, reduction, rows_fn is K.rows_torch, want)
        return _package(outs, tuple(target.shape), reduction, want)
    # A reshaped copy made above is private, so its storage can take the gradient.
    inplace = inplace_backward or not shares_storage(rows, input)
    outs = _CrossEntropyFunction.apply(rows, flat_target, opts, reduction, inplace, rows_fn, want)
    return _package(outs, tuple(target.shape), reduction, want)
