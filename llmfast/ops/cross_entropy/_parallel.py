"""Vocabulary-parallel cross-entropy: logits sharded over the classes across a process group (Megatron-style).

Rank ``r`` holds the classes ``[start_r, start_r + V_r)`` (consecutive, in rank order; shards may differ in size).
Pass 1 (``_ce_stats_kernel``) gives each row's shard statistics: max, sum of exp(y - max), the target logit when
the target is in this shard, sum(w * y) for smoothing and the shard argmax. Then three all-reduces: MAX of the
maxima, SUM of the rescaled exp-sums, target logits and smoothing sums (one stacked tensor), MIN of the argmax
candidates. Every rank then knows each row's global log-sum-exp and loss; pass 2 (``_ce_grad_kernel``) writes the
gradient of its own shard. Nothing of size (N, V) crosses the group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from llmfast import _backend
from llmfast.ops.cross_entropy import _kernels as K
from llmfast.ops.cross_entropy._functional import (_grad_buffer, _mark_extras, _package, _scale_stored_grad,
                                                    check_class_weight, check_target_values, normalisers,
                                                    pair_scale, reduce_rows, shares_storage)
from llmfast.reference import cross_entropy as reference

_NO_ARGMAX = torch.iinfo(torch.int64).max


def _shard_layout(n_local: int, device: torch.device, group) -> tuple[int, int]:
    """(vocab_start, total classes) from every rank's shard width."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor([n_local], device=device, dtype=torch.int64)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    widths = [int(s) for s in sizes]
    return sum(widths[:rank]), sum(widths)


def _softcapped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _shard_stats_torch(logits: torch.Tensor, target: torch.Tensor, opts: K.LossOptions, vocab_start: int,
                       weight_shard: torch.Tensor | None) -> K.ShardStats:
    """Pass 1 of a shard with torch ops (the CPU "auto" path): :func:`K.shard_stats_triton`'s contract."""
    y = _softcapped(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), opts.softcap)
    active = target != opts.ignore_index
    y = torch.where(active[:, None], y, float("-inf"))
    row_max = y.amax(dim=1)
    sum_exp = torch.where(row_max == float("-inf"), 0.0, (y - row_max[:, None]).exp().sum(dim=1))
    t_local = target.long() - vocab_start
    here = active & (t_local >= 0) & (t_local < logits.shape[1])
    y_t = torch.where(here, y.gather(1, torch.where(here, t_local, 0)[:, None]).squeeze(1), 0.0)
    sum_wy = None
    if opts.label_smoothing > 0:
        finite = torch.where(active[:, None], y, 0.0)
        sum_wy = (finite * weight_shard).sum(dim=1) if weight_shard is not None else finite.sum(dim=1)
    argmax = y.argmax(dim=1) + vocab_start if opts.track_argmax else None
    return K.ShardStats(row_max.float(), sum_exp.float(), y_t.float(), sum_wy.float() if sum_wy is not None
                        else None, argmax)


def _shard_grad_torch(logits: torch.Tensor, grad: torch.Tensor, target: torch.Tensor, opts: K.LossOptions,
                      vocab_start: int, weight_shard: torch.Tensor | None, lse: torch.Tensor, a: torch.Tensor,
                      coef_t: torch.Tensor, uni: torch.Tensor) -> None:
    """Pass 2 of a shard with torch ops: :func:`K.shard_grad_triton`'s contract."""
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(work)
    y = _softcapped(x, opts.softcap)
    g = (y - lse.to(work)[:, None]).exp() * a.to(work)[:, None]
    if opts.label_smoothing > 0:
        g = g - uni.to(work) * (weight_shard.to(work) if weight_shard is not None else 1.0)
    t_local = target.long() - vocab_start
    cols = torch.arange(logits.shape[1], device=logits.device)
    g = torch.where(cols[None, :] == t_local[:, None], g - coef_t.to(work)[:, None], g)
    if opts.softcap is not None:
        g = g * (1.0 - (y / opts.softcap) ** 2)
    g = torch.where((target != opts.ignore_index)[:, None], g, 0.0)
    grad.copy_(g)


class _VocabParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, opts: K.LossOptions, reduction: str,
                inplace: bool, use_triton: bool, group, layout: tuple[int, int], want: tuple[bool, bool, bool]):
        vocab_start, n_classes = layout
        n_local = logits.shape[1]
        weight_shard = opts.weight[vocab_start:vocab_start + n_local].contiguous() if opts.weight is not None \
            else None
        stats_fn, grad_fn = (K.shard_stats_triton, K.shard_grad_triton) if use_triton \
            else (_shard_stats_torch, _shard_grad_torch)
        stats = stats_fn(logits, target, opts, vocab_start, weight_shard)

        row_max = stats.row_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        rescaled = torch.where(stats.row_max == float("-inf"), 0.0, stats.sum_exp * (stats.row_max - row_max).exp())
        sums = [rescaled, stats.y_t] + ([stats.sum_wy] if stats.sum_wy is not None else [])
        sums = torch.stack(sums)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        lse = row_max + sums[0].log()
        y_t = sums[1]

        eps, s = opts.label_smoothing, opts.lse_square_scale
        active = target != opts.ignore_index
        in_range = (target >= 0) & (target < n_classes)
        bad = torch.where(in_range, 0.0, float("nan"))
        safe = torch.where(active & in_range, target, 0).long()
        w_t = opts.weight[safe] if opts.weight is not None else torch.ones_like(lse)
        sum_w = opts.weight.sum() if opts.weight is not None else torch.tensor(float(n_classes), device=lse.device)
        ce = w_t * (lse - y_t)
        if eps > 0:
            ce = (1.0 - eps) * ce + eps / n_classes * (sum_w * lse - sums[2])
        ce = torch.where(active, ce + bad, 0.0)
        z = torch.where(active, s * lse * lse + bad, 0.0) if s != 0 else None
        pred = acc = None
        if opts.track_argmax:
            cand = torch.where(stats.row_max == row_max, stats.argmax, _NO_ARGMAX)
            dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
            pred = torch.where(active, cand, -1)
            acc = ((pred == target) & active).float()
        n_valid, total_weight = normalisers(target, opts)

        grad = _grad_buffer(logits, inplace)
        if grad is not None:
            ce_scale, z_scale = pair_scale(reduction, n_valid, total_weight)
            coef_t = ((1.0 - eps) * w_t * ce_scale + bad).float().contiguous()
            a = ce_scale * ((1.0 - eps) * w_t + eps / n_classes * sum_w) + bad
            if z is not None:
                a = a + 2.0 * s * lse * z_scale
            uni = (eps / n_classes * ce_scale).reshape(1).float()
            grad_fn(logits, grad, target, opts, vocab_start, weight_shard, lse.float().contiguous(),
                    a.float().contiguous(), coef_t, uni)
        ctx.grad_logits = grad
        ctx.grad_consumed = False
        outs = reduce_rows(K.RowsOut(ce, z, pred, acc), reduction, n_valid, total_weight, logits.dtype, want)
        return _mark_extras(ctx, outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor, *_unused):
        grad = _scale_stored_grad(ctx, ctx.grad_logits, grad_output)
        return grad, None, None, None, None, None, None, None, None


class _GatherVocab(torch.autograd.Function):
    """All shards side by side along the classes (the reference path); backward keeps this rank's slice only,
    since every rank computes the same loss from the gathered logits."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, group, layout: tuple[int, int]) -> torch.Tensor:
        world = dist.get_world_size(group)
        widths = torch.tensor([rows.shape[1]], device=rows.device, dtype=torch.int64)
        all_widths = [torch.empty_like(widths) for _ in range(world)]
        dist.all_gather(all_widths, widths, group=group)
        widths_list = [int(w) for w in all_widths]
        widest = max(widths_list)
        padded = torch.zeros(rows.shape[0], widest, device=rows.device, dtype=rows.dtype)
        padded[:, :rows.shape[1]] = rows
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.span = (layout[0], rows.shape[1])
        return torch.cat([p[:, :w] for p, w in zip(parts, widths_list)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start, width = ctx.span
        return grad[:, start:start + width], None, None


def vocab_parallel_cross_entropy(input: torch.Tensor, rows: torch.Tensor, target: torch.Tensor,
                                 flat_target: torch.Tensor, weight, ignore_index: int, reduction: str,
                                 label_smoothing: float, lse_square_scale: float, softcap: float | None,
                                 want: tuple[bool, bool, bool], inplace_backward: bool, group):
    """:func:`llmfast.cross_entropy` with ``process_group=group``: ``rows`` is this rank's (N, V_r) shard."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("cross_entropy: process_group= needs an initialised torch.distributed process group")
    layout = _shard_layout(rows.shape[1], rows.device, group)
    class_weight = check_class_weight("weight", weight, layout[1], input.device)
    check_target_values(target, layout[1], ignore_index)
    impl = _backend.resolve("cross_entropy", input)
    if impl == "reference":
        full = _GatherVocab.apply(rows, group, layout)
        out = reference.cross_entropy(full, flat_target, weight, None, ignore_index, None, reduction,
                                      label_smoothing, lse_square_scale, softcap, *want)
        if isinstance(out, reference.CrossEntropyOutput):
            return _package((out.loss, out.z_loss, out.token_accuracy, out.predicted_tokens), tuple(target.shape),
                            reduction, want)
        return out.reshape(target.shape) if reduction == "none" else out
    opts = K.LossOptions(ignore_index, float(label_smoothing), float(lse_square_scale),
                         float(softcap) if softcap is not None else None, class_weight,
                         want[1] or want[2])
    use_triton = impl == "triton" and input.dtype != torch.float64
    inplace = inplace_backward or not shares_storage(rows, input)
    outs = _VocabParallelFunction.apply(rows, flat_target, opts, reduction, inplace, use_triton, group, layout,
                                        want)
    return _package(outs, tuple(target.shape), reduction, want)
