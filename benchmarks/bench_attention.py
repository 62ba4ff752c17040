"""Attention speed: llmfast vs every torch SDPA backend vs the pure-PyTorch reference.

pytest-benchmark times llmfast (``llmfast.scaled_dot_product_attention`` on the ``auto`` backend: the Triton
kernels on CUDA, torch's CPU kernel on the CPU); the peers are timed next to it with ``time_peer`` and land in
``benchmark.extra_info``:

* ``tflops`` - llmfast's throughput; FLOPs are ``4 * B * H * Sq * Sk * D`` forward (half when causal) and 2.5x
  that for the backward, so forward+backward counts 3.5x the forward.
* ``<peer>_ms``, ``<peer>_tflops``, ``speedup_vs_<peer>`` (peer time / llmfast time: above 1 means llmfast is
  faster) for the torch SDPA backends FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION, MATH and the
  reference; a peer that cannot run here (unsupported on this machine, out of memory, too big to materialise)
  is recorded as ``<peer>_status`` and never fails the benchmark. ``speedup_vs_torch_best`` compares with the
  fastest torch backend that ran.
* On a GPU, ``fraction_of_bf16_matmul_peak``: llmfast's TFLOP/s over a large bf16 matmul's, measured once per
  session on the same card.

On CUDA: bf16, seqlen 512..16k with the batch shrinking to keep 16k tokens, 2048 / head_dim heads, head dims 64
and 128, causal or not, forward and forward+backward. On the CPU: float32, seqlen 512 and 1024 only, so
``pytest benchmarks/bench_attention.py --benchmark-disable`` is a few-second smoke run (peers run once, untimed,
at the smallest size).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast.reference import attention as reference

from conftest import measure, median_seconds, synchronize
from conftest import time_peer as record_peer

CUDA = torch.cuda.is_available()
DTYPE = torch.bfloat16 if CUDA else torch.float32
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384] if CUDA else [512, 1024]
HEAD_DIMS = [64, 128] if CUDA else [64]
TOKENS_PER_BATCH = 16384  # CUDA: batch = tokens / seqlen, as flash-attn's own benchmark does
MODEL_WIDTH = 2048        # CUDA: heads = width / head_dim
# Peers that materialise the (B, H, Sq, Sk) scores are skipped beyond this many score elements (about 4 GiB of
# fp32 scores, several copies of which live at once in the backward).
MAX_MATERIALISED_SCORES = 2**30

TORCH_BACKENDS = {}
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    TORCH_BACKENDS = {name.lower(): getattr(SDPBackend, name)
                      for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
                      if hasattr(SDPBackend, name)}
except ImportError:  # older torch: no per-backend selection, the peers are recorded as unavailable
    sdpa_kernel = None


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool,
                    mode: str) -> float:
    forward = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        forward /= 2
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def shape_for(seqlen: int, head_dim: int) -> tuple[int, int]:
    """(batch, heads) for a sequence length: constant tokens and width on CUDA, tiny on the CPU."""
    if CUDA:
        return max(1, TOKENS_PER_BATCH // seqlen), MODEL_WIDTH // head_dim
    return 1, 2


@pytest.fixture(scope="session")
def bf16_matmul_tflops(device: torch.device) -> float | None:
    """The card's practical bf16 ceiling: TFLOP/s of an 8192^3 matmul (None off CUDA)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = median_seconds(lambda: a @ b, device, repeats=10, warmup=3)
    return 2.0 * n**3 / seconds / 1e12


def make_step(attend, q, k, v, mode: str, device: torch.device):
    """One timed step: the forward, or the forward and the gradients of q, k, v for a fixed upstream gradient."""
    dout = torch.randn_like(q)

    def forward():
        out = attend(q, k, v)
        synchronize(device)
        return out

    def forward_backward():
        out = attend(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        synchronize(device)
        return grads

    return forward if mode == "fwd" else forward_backward


def peer_functions(causal: bool) -> dict[str, callable]:
    peers = {}
    for name, backend in TORCH_BACKENDS.items():
        def run(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        peers[f"torch_{name}"] = run
    peers["reference"] = lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return peers


def time_peer(name: str, attend, q, k, v, mode: str, device: torch.device, flops: float, quick: bool,
              materialises: bool, info: dict) -> float | None:
    """Median seconds of one peer, or None with the reason in ``info[f"{name}_status"]``."""
    batch, heads, seqlen_q, _ = q.shape
    if materialises and batch * heads * seqlen_q * k.shape[-2] > MAX_MATERIALISED_SCORES:
        info[f"{name}_status"] = "skipped: materialises the full score matrix"
        return None
    step = make_step(attend, q, k, v, mode, device)
    try:
        step()  # first call: raises here if this backend does not support the inputs on this machine
        if quick:
            info[f"{name}_status"] = "ran (smoke run, not timed)"
            return None
        seconds = record_peer(info, name, step, device, repeats=5, warmup=0)
    except (RuntimeError, NotImplementedError, ValueError) as err:  # includes torch.OutOfMemoryError
        if device.type == "cuda":
            torch.cuda.empty_cache()
        info[f"{name}_status"] = f"unavailable: {str(err).splitlines()[0][:100]}"
        return None
    info[f"{name}_tflops"] = flops / seconds / 1e12
    return seconds


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("seqlen", SEQLENS, ids=lambda s: f"s{s}")
def test_attention(benchmark, device, bf16_matmul_tflops, seqlen, head_dim, causal, mode):
    batch, heads = shape_for(seqlen, head_dim)
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=DTYPE,
                           requires_grad=mode == "fwd_bwd") for _ in range(3))
    flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, mode)
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                dtype=str(DTYPE).replace("torch.", ""), shape=f"B{batch} H{heads} S{seqlen} D{head_dim}",
                causal=causal, mode=mode, flops=flops)

    def llmfast_attention(q, k, v):
        return llmfast.scaled_dot_product_attention(q, k, v, is_causal=causal)

    with llmfast.backend("auto"):
        step = make_step(llmfast_attention, q, k, v, mode, device)
        measure(benchmark, step, warmup=2 if CUDA else 1)

    quick = benchmark.disabled or benchmark.stats is None  # smoke run: peers run once, untimed; no ratios
    if not quick:
        ours = benchmark.stats.stats.median
        info["tflops"] = flops / ours / 1e12
    if bf16_matmul_tflops and not quick:
        info["bf16_matmul_tflops"] = bf16_matmul_tflops
        info["fraction_of_bf16_matmul_peak"] = info["tflops"] / bf16_matmul_tflops

    if quick and seqlen != SEQLENS[0]:
        return  # the smoke run exercises the peers at the smallest size only
    best_torch = None
    for name, attend in peer_functions(causal).items():
        seconds = time_peer(name, attend, q, k, v, mode, device, flops, quick,
                            materialises=name in ("torch_math", "reference"), info=info)
        if seconds is None or quick:
            continue
        info[f"speedup_vs_{name}"] = seconds / ours
        if name.startswith("torch_") and (best_torch is None or seconds < best_torch):
            best_torch = seconds
    if best_torch is not None:
        info["speedup_vs_torch_best"] = best_torch / ours


# ------------------------------------------------------------------------------------------------- softcap
# Logit soft-capping (Gemma 2: softcap 50, head dim 256) through flash_attn_func, (B, S, H, D). Peers: the reference
# (materialises the scores), torch.compile of the same math, and torch's flex_attention with a tanh score_mod (on
# CUDA, compiled: torch's own fused kernel for score modifications). torch's SDPA backends have no soft-capping.
SOFTCAP = 50.0
SOFTCAP_SEQLENS = [512, 2048, 8192] if CUDA else [512]
SOFTCAP_HEAD_DIMS = [128, 256] if CUDA else [64]


def _softcap_math(q, k, v, causal):
    """Soft-capped attention as plain torch ops, (B, S, H, D) layout (what torch.compile fuses)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = (qt @ kt.transpose(-1, -2)).float() * qt.shape[-1] ** -0.5
    scores = torch.tanh(scores / SOFTCAP) * SOFTCAP
    if causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril(
            scores.shape[-1] - scores.shape[-2])
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1).to(vt.dtype) @ vt).transpose(1, 2)


def softcap_peers(causal: bool, device: torch.device) -> dict[str, callable]:
    peers = {"reference": lambda q, k, v: reference.flash_attn_func(q, k, v, causal=causal, softcap=SOFTCAP)}
    if device.type != "cuda":
        return peers  # torch.compile's CPU backend needs a C++ toolchain; flex_attention's CPU path is eager math
    compiled = torch.compile(_softcap_math)
    peers["torch_compile"] = lambda q, k, v: compiled(q, k, v, causal)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return peers
    flex = torch.compile(flex_attention)

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / SOFTCAP) * SOFTCAP

    def run(q, k, v):
        block_mask = None
        if causal:
            offset = k.shape[1] - q.shape[1]
            block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi + offset, None, None, q.shape[1], k.shape[1],
                                           device=q.device)
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                   block_mask=block_mask)
        return out.transpose(1, 2)

    peers["torch_flex_attention"] = run
    return peers


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", SOFTCAP_HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("seqlen", SOFTCAP_SEQLENS, ids=lambda s: f"s{s}")
def test_attention_softcap(benchmark, device, seqlen, head_dim, causal, mode):
    batch, heads = shape_for(seqlen, head_dim)
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=DTYPE,
                           requires_grad=mode == "fwd_bwd") for _ in range(3))
    flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, mode)
    info = benchmark.extra_info
    info.update(op="attention_softcap", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                dtype=str(DTYPE).replace("torch.", ""), shape=f"B{batch} S{seqlen} H{heads} D{head_dim}",
                causal=causal, mode=mode, flops=flops, softcap=SOFTCAP)

    def llmfast_attention(q, k, v):
        return llmfast.flash_attn_func(q, k, v, causal=causal, softcap=SOFTCAP)

    with llmfast.backend("auto"):
        step = make_step(llmfast_attention, q, k, v, mode, device)
        measure(benchmark, step, warmup=2 if CUDA else 1)

    quick = benchmark.disabled or benchmark.stats is None
    if not quick:
        ours = benchmark.stats.stats.median
        info["tflops"] = flops / ours / 1e12
    if quick and seqlen != SOFTCAP_SEQLENS[0]:
        return
    for name, attend in softcap_peers(causal, device).items():
        if name != "torch_flex_attention" and batch * heads * seqlen * seqlen > MAX_MATERIALISED_SCORES:
            info[f"{name}_status"] = "skipped: materialises the full score matrix"
            continue
        seconds = time_peer(name, attend, q, k, v, mode, device, flops, quick, materialises=False, info=info)
        if seconds is not None and not quick:
            info[f"speedup_vs_{name}"] = seconds / ours


# ------------------------------------------------------------------------------------------------- GQA
# Grouped-query attention at batch 1 (a long-context fine-tuning step): 32 query heads on 4 or 8 KV heads. Here the
# dK/dV pass has only KV heads x key blocks programs, so llmfast shares each group's query heads over several
# programs (configs.gqa_group_split); the peer "llmfast_unsplit" forces one program per group, which measures
# what the split buys. torch's SDPA backends take the grouped K/V with enable_gqa=True.
GQA_SEQLENS = [1024, 2048, 4096] if CUDA else [256]
GQA_HEADS = 32 if CUDA else 4
GQA_KV_HEADS = [4, 8] if CUDA else [2]
GQA_HEAD_DIM = 128 if CUDA else 64


def gqa_peers(causal: bool) -> dict[str, callable]:
    from llmfast.ops.attention.configs import forced_gqa_split

    def unsplit(q, k, v):
        with llmfast.backend("auto"), forced_gqa_split(1):
            return llmfast.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    peers = {"llmfast_unsplit": unsplit}
    for name, backend in TORCH_BACKENDS.items():
        def run(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        peers[f"torch_{name}"] = run
    peers["reference"] = lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                                enable_gqa=True)
    return peers


@pytest.mark.parametrize("kv_heads", GQA_KV_HEADS, ids=lambda h: f"kv{h}")
@pytest.mark.parametrize("seqlen", GQA_SEQLENS, ids=lambda s: f"s{s}")
def test_attention_gqa(benchmark, device, seqlen, kv_heads):
    causal, mode = True, "fwd_bwd"
    q = torch.randn(1, GQA_HEADS, seqlen, GQA_HEAD_DIM, device=device, dtype=DTYPE, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, seqlen, GQA_HEAD_DIM, device=device, dtype=DTYPE, requires_grad=True)
            for _ in range(2))
    flops = attention_flops(1, GQA_HEADS, seqlen, seqlen, GQA_HEAD_DIM, causal, mode)
    info = benchmark.extra_info
    info.update(op="attention_gqa", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                dtype=str(DTYPE).replace("torch.", ""),
                shape=f"B1 H{GQA_HEADS} Hkv{kv_heads} S{seqlen} D{GQA_HEAD_DIM}", causal=causal, mode=mode,
                flops=flops)

    def llmfast_attention(q, k, v):
        return llmfast.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    with llmfast.backend("auto"):
        step = make_step(llmfast_attention, q, k, v, mode, device)
        measure(benchmark, step, warmup=2 if CUDA else 1)

    quick = benchmark.disabled or benchmark.stats is None
    if not quick:
        ours = benchmark.stats.stats.median
        info["tflops"] = flops / ours / 1e12
    if quick and seqlen != GQA_SEQLENS[0]:
        return
    for name, attend in gqa_peers(causal).items():
        seconds = time_peer(name, attend, q, k, v, mode, device, flops, quick,
                            materialises=name in ("torch_math", "reference"), info=info)
        if seconds is not None and not quick:
            info[f"speedup_vs_{name}"] = seconds / ours
