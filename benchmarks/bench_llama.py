"""Llama training step (forward + backward + AdamW step): llmfast's ``auto`` backend vs the pure-PyTorch reference,
and vs the strongest peer: the same model on torch's own ops, as Hugging Face's eager Llama runs them
(``F.scaled_dot_product_attention`` with GQA, RMSNorm / rotary / SwiGLU as plain torch math, ``F.cross_entropy``
over materialised logits).

The model and its weights are the same in every run; only what serves its ops changes, so the ratios are what
llmfast's kernels buy a whole training step. On CUDA a 12-layer, width-768 model with 4 KV heads for 12 query heads
and a 32 000-token vocabulary runs in bfloat16 autocast; on the CPU a tiny one, so the smoke run
(``--benchmark-disable``) takes a few seconds.
"""
from __future__ import annotations

import torch

from llmfast.models.llama import Llama, LlamaConfig
from llmfast.ops import rms_norm as rms_norm_ops
from llmfast.ops import rotary as rotary_ops
from llmfast.ops import swiglu as swiglu_ops
from llmfast.reference import rms_norm as rms_norm_reference
from llmfast.reference import rotary as rotary_reference
from llmfast.reference import swiglu as swiglu_reference

from train_step import benchmark_train_step, make_train_step, torch_patches

# Sizes per device: (model config, batch size).
SIZES = {
    "cuda": (LlamaConfig(vocab_size=32000, block_size=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768), 8),
    "cpu": (LlamaConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64), 4),
}


def test_llama_train_step(benchmark, device, monkeypatch):
    config, batch_size = SIZES[device.type]
    torch.manual_seed(0)
    step, tokens = make_train_step(Llama(config), config.vocab_size, batch_size, config.block_size, device)
    # RMSNorm, rotary and SwiGLU as plain torch math: what Hugging Face's eager Llama computes.
    patches = torch_patches() + [(rms_norm_ops, "rms_norm", rms_norm_reference.rms_norm),
                                 (rotary_ops, "apply_rotary_pos_emb", rotary_reference.apply_rotary_pos_emb),
                                 (swiglu_ops, "swiglu", swiglu_reference.swiglu)]
    benchmark_train_step(benchmark, device, monkeypatch, "llama_train_step", step, tokens, patches)
