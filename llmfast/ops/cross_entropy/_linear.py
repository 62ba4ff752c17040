"""``llmfast.fused_linear_cross_entropy``: the loss of ``input @ weight.T + bias`` without the (N, V) logits.

Tokens go through in chunks; each chunk's logits are computed (in the inputs' dtype), turned into their gradient
in place by the cross-entropy kernel (the kernel reads a block, then overwrites it: no fp32 copy of the chunk
beside it), and immediately contracted into ``grad_input`` (chunk rows) and ``grad_weight``/``grad_bias``
(accumulated in ``accum_dtype``, fp32 by default), all during the forward as Liger-Kernel does. Memory is
O(chunk x V) in the inputs' dtype plus the gradients themselves. With ``reduction="none"`` the per-row upstream
gradient is only known in backward, so the forward computes losses only and backward recomputes each chunk.
The loss is float32 for 16-bit inputs (Hugging Face upcasts the logits before its loss).
"""
from __future__ import annotations

from typing import Callable

import torch
import triton

from llmfast import _backend, _validation
from llmfast.ops.cross_entropy import _kernels as K
from llmfast.ops.cross_entropy._functional import (RowsFn, _package, check_class_weight, check_options,
                                                    check_target_values, normalisers, pair_scale, reduce_rows)
from llmfast.reference import cross_entropy as reference

# Token rows per chunk: at least MIN_CHUNKS chunks (so the chunk logits are at most a quarter of the full logits)
# and at most CHUNK_LOGITS_BYTES of logits per chunk, but never fewer than MIN_CHUNK_ROWS rows, which keeps the
# per-chunk matmuls reasonably shaped.
MIN_CHUNKS = 4
CHUNK_LOGITS_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 16
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def chunk_rows(n_rows: int, n_classes: int, element_size: int) -> int:
    """Token rows per chunk of the fused linear cross-entropy (see MIN_CHUNKS / CHUNK_LOGITS_BYTES)."""
    by_count = triton.next_power_of_2(max(1, triton.cdiv(n_rows, MIN_CHUNKS)))
    by_bytes = max(1, CHUNK_LOGITS_BYTES // max(1, n_classes * element_size))
    by_bytes = 1 << (by_bytes.bit_length() - 1)  # round down to a power of two
    return max(MIN_CHUNK_ROWS, min(by_count, by_bytes))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()


_mm_out_dtype_works = True  # torch.mm(..., out_dtype=) for 16-bit CUDA inputs: torch >= 2.8


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc += grad_logits.T @ hidden without rounding the chunk's product to a 16-bit dtype (rounding every chunk's
    partial sum would add up to several times the error of torch's single matmul)."""
    global _mm_out_dtype_works
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden.to(acc.dtype))
        return
    if grad_logits.is_cuda and _mm_out_dtype_works:
        try:
            acc += torch.mm(grad_logits.t(), hidden, out_dtype=acc.dtype)  # 16-bit tensor cores, fp32 result
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _mm_out_dtype_works = False
    # Upcast a bounded block of rows at a time: never an accumulation-dtype copy of the whole chunk.
    rows = max(1, K.TORCH_BLOCK_BYTES // max(1, grad_logits.shape[1] * acc.element_size()))
    for start in range(0, grad_logits.shape[0], rows):
        g, h = grad_logits[start:start + rows], hidden[start:start + rows]
        acc.addmm_(g.t().to(acc.dtype), h.to(acc.dtype))


def _hidden_grad_into(out: torch.Tensor, grad_logits: torch.Tensor, weight: torch.Tensor,
                      cache: dict[str, torch.Tensor]) -> None:
    """out = grad_logits @ weight, in ``out``'s dtype (fp32 for 16-bit inputs whose gradient is scaled later:
    rounding to 16 bits before that scaling would round twice)."""
    global _mm_out_dtype_works
    if out.dtype == grad_logits.dtype:
        torch.mm(grad_logits, weight, out=out)
        return
    if grad_logits.is_cuda and _mm_out_dtype_works:
        try:
            out.copy_(torch.mm(grad_logits, weight, out_dtype=out.dtype))
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _mm_out_dtype_works = False
    if "weight" not in cache:  # one upcast copy of the weight per call, never of the chunk
        cache["weight"] = weight.to(out.dtype)
    rows = max(1, K.TORCH_BLOCK_BYTES // max(1, grad_logits.shape[1] * out.element_size()))
    for start in range(0, grad_logits.shape[0], rows):
        torch.mm(grad_logits[start:start + rows].to(out.dtype), cache["weight"], out=out[start:start + rows])


def _linear_ce_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                      opts: K.LossOptions, rows_fn: RowsFn, chunk: int, grad_scale: torch.Tensor | None,
                      per_row: bool, need: tuple[bool, bool, bool], accum_dtype: torch.dtype):
    """Loop over token chunks: per-row results and, when ``grad_scale`` is given, the three gradients."""
    n_rows, dev = hidden.shape[0], hidden.device
    ce = torch.empty(n_rows, device=dev, dtype=torch.float32)
    z = torch.empty(n_rows, device=dev, dtype=torch.float32) if opts.lse_square_scale != 0 else None
    pred = torch.empty(n_rows, device=dev, dtype=torch.int64) if opts.track_argmax else None
    acc = torch.empty(n_rows, device=dev, dtype=torch.float32) if opts.track_argmax else None
    compute_grad = grad_scale is not None
    # A 16-bit input gradient that backward will still scale is kept in fp32 until then.
    hidden_grad_dtype = hidden.dtype if per_row or hidden.element_size() >= 4 else torch.float32
    grad_hidden = torch.empty(hidden.shape, device=dev, dtype=hidden_grad_dtype) \
        if compute_grad and need[0] else None
    cache: dict[str, torch.Tensor] = {}
    grad_weight = torch.zeros(weight.shape, device=dev, dtype=accum_dtype) if compute_grad and need[1] else None
    grad_bias = torch.zeros(weight.shape[0], device=dev, dtype=accum_dtype) \
        if compute_grad and need[2] and bias is not None else None
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias)
        scale = (grad_scale[start:end] if per_row else grad_scale) if compute_grad else None
        # The chunk's logits become their gradient in place.
        res = rows_fn(logits, target[start:end], opts, logits if compute_grad else None, scale, per_row)
        for full, part in ((ce, res.ce), (z, res.z), (pred, res.pred), (acc, res.acc)):
            if full is not None:
                full[start:end] = part
        if not compute_grad:
            continue
        if grad_hidden is not None:
            _hidden_grad_into(grad_hidden[start:end], logits, weight, cache)
        if grad_weight is not None:
            _accumulate_weight_grad(grad_weight, logits, h)
        if grad_bias is not None:
            grad_bias += logits.sum(dim=0, dtype=accum_dtype)
        del logits
    return K.RowsOut(ce, z, pred, acc), grad_hidden, grad_weight, grad_bias


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                opts: K.LossOptions, reduction: str, chunk: int, rows_fn: RowsFn, loss_dtype: torch.dtype,
                accum_dtype: torch.dtype, want: tuple[bool, bool, bool]):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        n_valid, total_weight = normalisers(target, opts)
        grad_scale = pair_scale(reduction, n_valid, total_weight) if any(need) and reduction != "none" else None
        with torch.autocast(hidden.device.type, enabled=False):  # inputs are already in the dtype to use
            res, gh, gw, gb = _linear_ce_chunks(hidden, weight, bias, target, opts, rows_fn, chunk, grad_scale,
                                                False, need, accum_dtype)
        ctx.need, ctx.reduction = need, reduction
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.grads = (gh, gw, gb)
        ctx.grad_consumed = False
        if reduction == "none" and any(need):
            # The per-row upstream gradient is known only in backward: keep the inputs and recompute there.
            ctx.save_for_backward(hidden, weight, bias, target)
            ctx.recompute = (opts, chunk, rows_fn, accum_dtype)
        outs = reduce_rows(res, reduction, n_valid, total_weight, loss_dtype, want)
        extras = [t for t in outs[1:] if t is not None]
        if extras:
            ctx.mark_non_differentiable(*extras)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor, *_unused):
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            opts, chunk, rows_fn, accum_dtype = ctx.recompute
            with torch.autocast(hidden.device.type, enabled=False):
                _, gh, gw, gb = _linear_ce_chunks(hidden, weight, bias, target, opts, rows_fn, chunk,
                                                  grad_output.reshape(-1).float(), True, ctx.need, accum_dtype)
        else:
            gh, gw, gb = ctx.grads
            if float(grad_output) != 1.0:
                if ctx.grad_consumed:
                    raise RuntimeError("llmfast fused_linear_cross_entropy: backward ran twice on a loss whose "
                                       "stored gradients were already scaled; recompute the loss instead")
                ctx.grad_consumed = True
                for g in (gh, gw, gb):
                    if g is not None:
                        g.mul_(grad_output.to(g.dtype))
        ctx.grads = (None, None, None)
        gh = gh.to(ctx.dtypes[0]) if gh is not None else None
        gw = gw.to(ctx.dtypes[1]) if gw is not None else None
        gb = gb.to(ctx.dtypes[2]) if gb is not None else None
        return gh, gw, gb, None, None, None, None, None, None, None, None


def _full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2-sharded (DTensor) parameter gathered whole, differentiably.

    The loss is a data-parallel rank's loss, so the gradient that flows back is averaged over the mesh: the full
    tensor's gradient is declared ``Partial("avg")`` and redistributed to the parameter's placements (a
    reduce-scatter for ``Shard``, an all-reduce for ``Replicate``), which is what FSDP2's own reduce-scatter does
    for the parameters of the modules it runs. (A parameter that FSDP2 has unsharded for a forward arrives as a
    plain tensor and is left to FSDP2.)
    """
    if t is None:
        return None
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate
    except ImportError:  # torch built without distributed
        return t
    if not isinstance(t, DTensor):
        return t
    ndim = t.device_mesh.ndim
    return t.redistribute(t.device_mesh, [Replicate()] * ndim).to_local(grad_placements=[Partial("avg")] * ndim)


def fused_linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ce_weight: torch.Tensor | None = None,
                               ignore_index: int = -100, lse_square_scale: float = 0.0,
                               label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
                               return_z_loss: bool = False, accum_dtype: torch.dtype | None = None,
                               use_token_scaling: bool = False, return_token_accuracy: bool = False,
                               return_predicted_tokens: bool = False, *, chunk_size: int | None = None):
    """``cross_entropy(input @ weight.T + bias, target)`` without materialising the (N, V) logits, with
    Liger-Kernel's ``liger_fused_linear_cross_entropy`` signature (same names, order and defaults).

    Args:
        input: ``(N, C)`` (or ``(..., C)``) hidden states, fp16/bf16/fp32/fp64.
        weight: ``(V, C)`` output projection (e.g. the tied embedding), same dtype as ``input``. An FSDP2-sharded
            ``DTensor`` is gathered whole; its gradient goes back to the shards averaged over the mesh, as FSDP2
            averages data-parallel gradients.
        target: int64/int32 class indices shaped like ``input`` without its last dim.
        bias: optional ``(V,)``.
        ce_weight: optional per-class loss weight ``(V,)`` (``weight`` of :func:`cross_entropy`).
        ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss,
        return_token_accuracy, return_predicted_tokens: as :func:`cross_entropy`.
        accum_dtype: dtype of the ``weight``/``bias`` gradient accumulators across chunks. ``None`` means float32
            for 16-bit weights (llmfast's default; Liger-Kernel accumulates in the weight's dtype unless told),
            pass the weight's dtype to save the fp32 buffer.
        use_token_scaling: multiply each row's loss (and gradient) by the target's predicted probability
            ``softmax(logits)[target]``, treated as a constant (Liger-Kernel's option).
        chunk_size: token rows per chunk (default: :func:`chunk_rows`); peak extra memory is about
            ``chunk_size x V`` logits in the inputs' dtype plus the gradients of ``input``, ``weight`` and ``bias``.

    The loss is float32 for 16-bit inputs. Gradients are computed chunk by chunk during forward (for ``"mean"``
    and ``"sum"``) and only scaled in backward.
    """
    hidden = input
    _validation.check_tensor("input", hidden, dtypes=FLOAT_DTYPES)
    _validation.check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    flags = {"return_z_loss": return_z_loss, "return_token_accuracy": return_token_accuracy,
             "return_predicted_tokens": return_predicted_tokens, "use_token_scaling": use_token_scaling}
    check_options(target, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, flags)
    if accum_dtype is not None and accum_dtype not in FLOAT_DTYPES:
        raise TypeError(f"accum_dtype must be None or a floating dtype {FLOAT_DTYPES}, got {accum_dtype!r}")
    weight, bias = _full_tensor(weight), _full_tensor(bias)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"input must have shape (N, C) with C = weight.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(hidden.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(hidden.shape[:-1])} (input without its last dim), "
                         f"got {tuple(target.shape)}")
    if bias is not None:
        _validation.check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    _validation.check_same_dtype(input=hidden, weight=weight, bias=bias)
    _validation.check_same_device(input=hidden, weight=weight, target=target, bias=bias)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (class), got shape (0, C)")
    class_weight = check_class_weight("ce_weight", ce_weight, weight.shape[0], hidden.device)
    device_type = hidden.device.type
    loss_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if torch.is_autocast_enabled(device_type):
        # As F.linear would under autocast: the projection runs in the autocast dtype (the loss math is fp32).
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        loss_dtype = torch.float32
    want = (return_z_loss, return_token_accuracy, return_predicted_tokens)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    flat_target = target.reshape(-1).contiguous()
    compiling = torch.compiler.is_compiling()
    if not compiling:  # (data-dependent: under torch.compile a bad target gives NaN, as on CUDA)
        check_target_values(target, weight.shape[0], ignore_index)
    impl = _backend.resolve("fused_linear_cross_entropy", hidden)
    if impl == "reference":
        return reference.fused_linear_cross_entropy(hidden, weight, target, bias, ce_weight, ignore_index,
                                                     lse_square_scale, label_smoothing, reduction, softcap,
                                                     return_z_loss, accum_dtype, use_token_scaling,
                                                     return_token_accuracy,
                                                     return_predicted_tokens)
    rows_fn: RowsFn = K.rows_triton if impl == "triton" and hidden.dtype != torch.float64 else K.rows_torch
    opts = K.LossOptions(ignore_index, float(label_smoothing), float(lse_square_scale),
                         float(softcap) if softcap is not None else None, class_weight,
                         return_token_accuracy or return_predicted_tokens, use_token_scaling)
    if accum_dtype is None:
        accum_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    chunk = chunk_size or chunk_rows(hidden2d.shape[0], weight.shape[0], hidden.element_size())
    if compiling:
        from llmfast.ops.cross_entropy._compiled import fused_linear_compiled

        outs = fused_linear_compiled(hidden2d, weight, bias, flat_target, opts, reduction, chunk,
                                     rows_fn is K.rows_torch, loss_dtype, accum_dtype, want)
        return _package(outs, tuple(target.shape), reduction, want)
    outs = _FusedLinearCrossEntropyFunction.apply(hidden2d, weight, bias, flat_target, opts, reduction, chunk,
                                                  rows_fn, loss_dtype, accum_dtype, want)
    return _package(outs, tuple(target.shape), reduction, want)


# ----------------------------------------------------------------------------------------------------------------
# Peak memory (for the benchmark and the memory test)
# ----------------------------------------------------------------------------------------------------------------


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated when it started.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: torch's profiler with ``profile_memory=True``
    records every allocation and free of torch's CPU allocator (sizes signed); the running sum of those records,
    in time order, is the live byte count and its maximum is the peak. Only torch tensors are counted (not
    Python objects), which is what the comparison is about.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
