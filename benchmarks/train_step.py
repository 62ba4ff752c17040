"""One model training step (forward + backward + AdamW step) benchmarked three ways, shared by bench_gpt.py and
bench_llama.py: llmfast's ``auto`` backend (timed by pytest-benchmark), the pure-PyTorch reference backend, and the
same model with its ops pointed at torch's own (the strongest peer). The model and weights never change between
runs, so the ratios are what llmfast's kernels buy a whole step.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import llmfast

from conftest import measure, synchronize, time_peer


def make_train_step(model: torch.nn.Module, vocab_size: int, batch_size: int, block_size: int,
                    device: torch.device) -> tuple[Callable[[], None], int]:
    """A closure running one step on fixed random tokens (bfloat16 autocast on CUDA) and the tokens per step."""
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x, y = torch.randint(0, vocab_size, (2, batch_size, block_size), device=device).unbind(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step() -> None:
        with autocast:
            loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step, batch_size * block_size


def torch_fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean"):
    """What a model without llmfast computes: the whole logits, then torch's cross-entropy."""
    return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index, reduction=reduction)


def torch_patches() -> list[tuple[object, str, Callable]]:
    """The llmfast entry points every model reaches at run time, pointed at torch's own fused ops."""
    return [(llmfast, "scaled_dot_product_attention", F.scaled_dot_product_attention),
            (llmfast, "fused_linear_cross_entropy", torch_fused_linear_cross_entropy)]


def benchmark_train_step(benchmark, device: torch.device, monkeypatch, op: str, train_step: Callable[[], None],
                         tokens: int, patches: list[tuple[object, str, Callable]]) -> None:
    """Time ``train_step`` on llmfast, on the reference backend, and with ``patches`` applied (torch's ops)."""
    info = benchmark.extra_info
    info.update(device=device.type, op=op, tokens_per_step=tokens)

    def on(backend: str):
        def run() -> None:
            with llmfast.backend(backend):
                train_step()
            synchronize(device)
        return run

    def on_torch() -> None:
        with monkeypatch.context() as patch:
            for owner, name, replacement in patches:
                patch.setattr(owner, name, replacement)
            train_step()
        synchronize(device)

    measure(benchmark, on("auto"))
    if benchmark.disabled or benchmark.stats is None:  # smoke run: every variant once
        on("reference")()
        on_torch()
        return
    ours = benchmark.stats.stats.median
    reference_s = time_peer(info, "reference", on("reference"), device)
    torch_s = time_peer(info, "torch", on_torch, device)
    info.update(llmfast_tokens_per_s=tokens / ours,
                speedup_vs_reference=reference_s / ours,  # > 1: llmfast's backend makes the step faster
                speedup_vs_torch=torch_s / ours)  # > 1: faster than the model on torch's own ops
