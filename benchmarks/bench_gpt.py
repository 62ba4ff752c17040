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

from llmfast.models.gpt import GPT, GPTConfig
from llmfast.nn import normalization

from train_step import benchmark_train_step, make_train_step, torch_patches

# Sizes per device: (model config, batch size).
SIZES = {
    "cuda": (GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 8),
    "cpu": (GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64), 4),
}


def test_gpt_train_step(benchmark, device, monkeypatch):
    config, batch_size = SIZES[device.type]
    torch.manual_seed(0)
    step, tokens = make_train_step(GPT(config), config.vocab_size, batch_size, config.block_size, device)
    patches = torch_patches() + [(normalization.ln_ops, "layer_norm", F.layer_norm)]
    benchmark_train_step(benchmark, device, monkeypatch, "gpt_train_step", step, tokens, patches)
