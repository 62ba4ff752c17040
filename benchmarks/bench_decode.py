"""Decode attention speed: one generation step over a key/value cache, llmfast vs torch SDPA vs the reference.

pytest-benchmark times ``llmfast.flash_attn_with_kvcache`` on the ``auto`` backend (the Triton decode kernels on
CUDA; the PyTorch path on the CPU) for one decoding step: append one token's key/value at ``cache_seqlens`` and
attend over the whole cache (``cache_seqlens`` is reset each round, so every round does the same work). The peers,
timed next to it with ``time_peer``, do the same step:

* ``torch_sdpa`` (``torch_sdpa_ms``): the new key/value written into the cache by indexing, then
  ``torch.nn.functional.scaled_dot_product_attention`` over the (B, Hk, L, D) view of the cache (``enable_gqa``);
* ``reference`` (``reference_ms``): :func:`llmfast.reference.decode.flash_attn_with_kvcache` (materialises the scores).

``benchmark.extra_info`` gets ``ms_per_token`` (the step's latency), ``tokens_per_s`` (batch / latency),
``<peer>_ms`` and ``<peer>_tokens_per_s`` for each peer and ``speedup_vs_<peer>``; on CUDA also ``kv_read_gbps``
(bytes of K and V read per second) against ``copy_gbps``, the card's measured copy bandwidth for a buffer of the
cache's size (``fraction_of_copy``).

On CUDA: bf16, 32 query heads over 8 KV heads (GQA), head dim 128, batch 1, 8 and 64, cache lengths 1k to 32k, a
contiguous cache and a paged one (page size 256). On the CPU: float32, tiny sizes (batch 1 and 8 at 256 cached
positions), so ``pytest benchmarks/bench_decode.py --benchmark-disable`` is a smoke run of a few seconds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast.reference import decode as reference

from conftest import copy_gbps, measure, synchronize, time_peer

CUDA = torch.cuda.is_available()
DTYPE = torch.bfloat16 if CUDA else torch.float32
CACHE_LENGTHS = [1024, 4096, 8192, 16384, 32768] if CUDA else [256]
BATCHES = [1, 8, 64] if CUDA else [1, 8]
HEADS, KV_HEADS, HEAD_DIM = (32, 8, 128) if CUDA else (4, 2, 64)
PAGE_SIZE = 256 if CUDA else 64
# The reference materialises (B, H, 1, L) scores and gathers the whole cache: skipped beyond this many elements.
MAX_REFERENCE_ELEMENTS = 2**31


def make_step(batch: int, length: int, paged: bool, device: torch.device):
    """The inputs of one decoding step at cache length ``length`` (the new token is the last position)."""
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    k = torch.randn(batch, 1, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v = torch.randn(batch, 1, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    if paged:
        pages = length // PAGE_SIZE
        k_cache = torch.randn(batch * pages, PAGE_SIZE, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
        v_cache = torch.randn_like(k_cache)
        block_table = torch.randperm(batch * pages, device=device).view(batch, pages).to(torch.int32)
    else:
        k_cache = torch.randn(batch, length, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
        v_cache = torch.randn_like(k_cache)
        block_table = None
    seqlens = torch.full((batch,), length - 1, dtype=torch.int32, device=device)
    return q, k, v, k_cache, v_cache, block_table, seqlens


def sdpa_step(q, k, v, k_cache, v_cache, seqlens):
    """The same step with torch: write the new token, then SDPA over the (B, Hk, L, D) view (contiguous cache)."""
    rows = torch.arange(q.shape[0], device=q.device)
    pos = seqlens.long()
    k_cache[rows, pos] = k[:, 0]
    v_cache[rows, pos] = v[:, 0]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                          enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("length", CACHE_LENGTHS, ids=lambda n: f"L{n}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
def test_decode_step(benchmark, device, batch, length, paged):
    q, k, v, k_cache, v_cache, block_table, seqlens = make_step(batch, length, paged, device)
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                dtype=str(DTYPE).replace("torch.", ""),
                shape=f"B{batch} L{length} H{HEADS} Hk{KV_HEADS} D{HEAD_DIM}", paged=paged)

    def ours():
        out = llmfast.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                              block_table=block_table, causal=True)
        synchronize(device)
        return out

    with llmfast.backend("auto"):
        measure(benchmark, ours)

    quick = benchmark.disabled or benchmark.stats is None  # smoke run: peers run once, untimed
    if not quick:
        seconds = benchmark.stats.stats.median
        info["ms_per_token"] = seconds * 1e3
        info["tokens_per_s"] = batch / seconds
        if CUDA:
            kv_bytes = 2 * batch * length * KV_HEADS * HEAD_DIM * k_cache.element_size()
            info["kv_read_gbps"] = kv_bytes / seconds / 1e9
            ceiling = copy_gbps(k_cache, device)
            info["copy_gbps"] = ceiling
            info["fraction_of_copy"] = info["kv_read_gbps"] / ceiling
    if quick and length != CACHE_LENGTHS[0]:
        return

    peers = {"reference": lambda: reference.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=block_table, causal=True)}
    if not paged:
        peers["torch_sdpa"] = lambda: sdpa_step(q, k, v, k_cache, v_cache, seqlens)
    for name, fn in peers.items():
        if name == "reference" and batch * HEADS * length * HEAD_DIM > MAX_REFERENCE_ELEMENTS:
            info[f"{name}_status"] = "skipped: gathers and materialises the whole cache"
            continue
        try:
            fn()
            if quick:
                info[f"{name}_status"] = "ran (smoke run, not timed)"
                continue
            peer = time_peer(info, name, fn, device, repeats=10 if CUDA else 3)
        except (RuntimeError, ValueError) as err:  # includes torch.OutOfMemoryError
            info[f"{name}_status"] = f"unavailable: {str(err).splitlines()[0][:100]}"
            continue
        info[f"{name}_tokens_per_s"] = batch / peer
        info[f"speedup_vs_{name}"] = peer / benchmark.stats.stats.median


@pytest.mark.parametrize("use_cache", [True, False], ids=["static_cache", "no_cache"])
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_generate_tokens_per_second(benchmark, device, arch, use_cache):
    """End to end: greedy generation of the small GPT / Llama with the static cache and the decode kernel, or
    without a cache (every step a full forward)."""
    from llmfast.models.gpt import GPT, GPTConfig
    from llmfast.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    width, context = (256, 512) if CUDA else (64, 64)
    if arch == "gpt":
        model = GPT(GPTConfig(vocab_size=256, block_size=context, n_layer=4, n_head=4, n_embd=width))
    else:
        model = Llama(LlamaConfig(vocab_size=256, block_size=context, n_layer=4, n_head=4, n_kv_head=2,
                                  n_embd=width))
    model = model.to(device).eval()
    prompt = torch.randint(0, 256, (1, 16), device=device)
    new = 256 if CUDA else 8
    benchmark.extra_info.update(op=f"{arch}_generate", shape=f"width {width}, 4 layers, {new} new tokens")

    def run():
        out = model.generate(prompt, new, temperature=0, use_cache=use_cache)
        synchronize(device)
        return out

    measure(benchmark, run, rounds=3 if CUDA else 1)
    if not (benchmark.disabled or benchmark.stats is None):
        benchmark.extra_info["tokens_per_s"] = new / benchmark.stats.stats.median
