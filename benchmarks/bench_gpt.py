"""GPT training step (forward + backward + AdamW step): llmfast's ``auto`` backend vs the pure-PyTorch reference,
and vs the strongest peer: the same model on torch's own fused ops (``F.scaled_dot_product_attention``, whose CUDA
flash/memory-efficient kernels torch picks, and ``F.cross_entropy`` over materialised logits).

The model is the same in every run; only what serves its attention and loss changes, so the ratios are what
llmfast's kernels buy a whole training step. On CUDA the step runs a GPT-2-small-like model in bfloat16 autocast;
on CPU a tiny model, to keep the smoke run (``--benchmark-disable``) to a few seconds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import llmfast
from llmfast.models.gpt import GPT, GPTConfig
from llmfast.nn import normalization

from conftest import measure, synchronize, time_peer

# Sizes per device: (model config, batch size).
SIZES = {
    "cuda": (GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 8),
    "cpu": (GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64), 4),
}


def make_train_step(device: torch.device):
    config, batch_size = SIZES[device.type]
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x, y = torch.randint(0, config.vocab_size, (2, batch_size, config.block_size), device=device).unbind(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step() -> None:
        with autocast:
            loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step, batch_size * config.block_size


def torch_fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean"):
    return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index, reduction=reduction)


def test_gpt_train_step(benchmark, device, monkeypatch):
    train_step, tokens = make_train_step(device)
    info = benchmark.extra_info
    info.update(device=device.type, op="gpt_train_step", tokens_per_step=tokens)

    def on(backend: str):
        def run() -> None:
            with llmfast.backend(backend):
                train_step()
            synchronize(device)
        return run

    def on_torch() -> None:
        with monkeypatch.context() as patch:  # the model calls llmfast.<op> at run time: point those at torch's ops
            patch.setattr(llmfast, "scaled_dot_product_attention", F.scaled_dot_product_attention)
            patch.setattr(llmfast, "fused_linear_cross_entropy", torch_fused_linear_cross_entropy)
            patch.setattr(normalization.ln_ops, "layer_norm", F.layer_norm)
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
                speedup_vs_torch=torch_s / ours)  # > 1: faster than the model on torch's own fused ops
