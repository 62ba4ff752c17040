"""Cross-entropy speed and memory: llmfast vs torch's F.cross_entropy (and linear + cross-entropy) vs the reference.

pytest-benchmark times llmfast on the ``auto`` backend (Triton kernels on CUDA; on the CPU torch's
``F.cross_entropy`` for ``cross_entropy`` and the chunked torch path for ``fused_linear_cross_entropy``); peers
are timed next to it with ``time_peer``. ``benchmark.extra_info`` gets:

* ``cross_entropy``: ``gbps`` counting the logits read once (plus the gradient written once for forward +
  backward), ``<peer>_ms`` / ``speedup_vs_<peer>`` for ``torch`` and ``reference``, and on a GPU
  ``fraction_of_copy_bandwidth`` against a device copy of the same bytes.
* ``fused_linear_cross_entropy``: forward + backward time vs ``F.linear`` + ``F.cross_entropy``, and the peak
  memory of each (``peak_mib_fused``, ``peak_mib_torch``, ``peak_memory_ratio`` = fused / torch,
  ``peak_memory_at_most_quarter``). Peak memory is *measured*: on CUDA the caching allocator's
  ``max_memory_allocated``; on the CPU torch's profiler with ``profile_memory=True``, which records every
  allocation and free of torch's CPU allocator, so the running total's maximum is the peak of live tensor bytes
  (see ``llmfast.ops.cross_entropy.peak_memory_bytes``). Inputs and the parameters' ``.grad`` buffers from an
  earlier step are allocated before the measurement starts and are not counted for either side.

* ``cross_entropy_liger_options``: forward + backward with Gemma-2's soft-capping, a z-loss and token accuracy,
  against the same loss composed from torch ops (eager and ``torch.compile``d), with both peaks.

The headline case is N=4096 tokens, V=50 000 classes, C=768 (GPT-2 small's width). On the CPU it runs in full
benchmark runs only; ``--benchmark-disable`` (the CI smoke run) uses small sizes and takes a few seconds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast.ops.cross_entropy import peak_memory_bytes
from llmfast.reference import cross_entropy as reference

from conftest import copy_gbps, measure, synchronize, time_peer

CUDA = torch.cuda.is_available()
CE_SHAPES = [(8192, 32000), (8192, 50257), (4096, 128256)] if CUDA else [(256, 8192), (64, 50000)]
CE_DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
HEADLINE = (4096, 768, 50000)
LINEAR_SHAPES = [HEADLINE, (8192, 4096, 128256)] if CUDA else [(512, 64, 4096), HEADLINE]
LINEAR_DTYPES = [torch.bfloat16] if CUDA else [torch.float32, torch.bfloat16]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype", CE_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: f"N{s[0]}_V{s[1]}")
def test_cross_entropy(benchmark, device, shape, dtype, mode):
    n, v = shape
    logits = torch.randn(n, v, device=device, dtype=dtype, requires_grad=mode == "fwd_bwd")
    target = torch.randint(0, v, (n,), device=device)
    target[::17] = -100
    info = benchmark.extra_info
    info.update(device=_device_name(device), backend="triton" if CUDA else "torch (auto backend on the CPU)",
                dtype=str(dtype).replace("torch.", ""), shape=f"N{n} V{v}", mode=mode)

    def step_for(fn):
        def step():
            loss = fn(logits, target)
            if mode == "fwd_bwd":
                loss.backward()
                logits.grad = None
            synchronize(device)
            return loss
        return step

    peers = {"torch": lambda x, t: F.cross_entropy(x, t), "reference": reference.cross_entropy}
    with llmfast.backend("auto"):
        measure(benchmark, step_for(llmfast.cross_entropy))
    if benchmark.disabled or benchmark.stats is None:
        if shape == CE_SHAPES[0]:
            for fn in peers.values():
                step_for(fn)()
        return
    ours = benchmark.stats.stats.median
    moved = (2 if mode == "fwd_bwd" else 1) * logits.numel() * logits.element_size()
    info["gbps"] = moved / ours / 1e9
    copy = copy_gbps(logits.detach(), device)
    if copy:
        info["copy_gbps"] = copy
        info["fraction_of_copy_bandwidth"] = info["gbps"] / copy
    for name, fn in peers.items():
        try:
            seconds = time_peer(info, name, step_for(fn), device, repeats=10 if CUDA else 5)
        except RuntimeError as err:  # out of memory for the materialising peers
            info[f"{name}_status"] = f"unavailable: {str(err).splitlines()[0][:100]}"
            continue
        info[f"speedup_vs_{name}"] = seconds / ours
    if mode == "fwd_bwd":
        with llmfast.backend("auto"):
            fused = peak_memory_bytes(step_for(llmfast.cross_entropy), device)
        torch_peak = peak_memory_bytes(step_for(peers["torch"]), device)
        info.update(peak_mib_llmfast=fused / 2**20, peak_mib_torch=torch_peak / 2**20,
                    peak_memory_ratio=fused / max(torch_peak, 1))


@pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"N{s[0]}_C{s[1]}_V{s[2]}")
def test_fused_linear_cross_entropy(benchmark, device, shape, dtype):
    """16-bit inputs: the peer upcasts the logits to fp32 before the loss, as Hugging Face's causal-LM loss does
    (llmfast returns the same fp32 loss without any fp32 (chunk x V) buffer)."""
    n, c, v = shape
    if benchmark.disabled and not CUDA and shape == HEADLINE:
        benchmark.extra_info["status"] = "smoke run: the headline size runs in full benchmark runs only"
        return
    hidden = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, c, device=device) / c**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=device)
    target[::31] = -100
    info = benchmark.extra_info
    info.update(device=_device_name(device), dtype=str(dtype).replace("torch.", ""),
                shape=f"N{n} C{c} V{v}",
                backend="triton" if CUDA else "chunked torch path (auto backend on the CPU)")

    def step_for(loss_fn):
        def step():
            loss_fn().backward()
            synchronize(device)
        return step

    def ours():
        return llmfast.fused_linear_cross_entropy(hidden, weight, target)

    def torch_linear_ce():
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float() if logits.element_size() < 4 else logits, target)

    with llmfast.backend("auto"):
        measure(benchmark, step_for(ours))
        # .grad buffers exist on both sides from here on; the peaks below count what each step adds
        fused_peak = peak_memory_bytes(step_for(ours), device)
    step_for(torch_linear_ce)()
    torch_peak = peak_memory_bytes(step_for(torch_linear_ce), device)
    ratio = fused_peak / max(torch_peak, 1)
    info["note"] = (f"peak memory {fused_peak / 2**20:.0f} MiB vs {torch_peak / 2**20:.0f} MiB for torch's "
                    f"linear + cross-entropy ({ratio:.2f}x)")
    info.update(peak_mib_fused=fused_peak / 2**20, peak_mib_torch=torch_peak / 2**20, peak_memory_ratio=ratio,
                peak_memory_at_most_quarter=ratio <= 0.25,
                logits_mib=n * v * torch.finfo(dtype).bits / 8 / 2**20)
    if benchmark.disabled or benchmark.stats is None:
        return
    ours_s = benchmark.stats.stats.median
    seconds = time_peer(info, "torch", step_for(torch_linear_ce), device, repeats=5 if CUDA else 1, warmup=0)
    info["speedup_vs_torch"] = seconds / ours_s
    if n * v <= 2**26:  # the reference materialises the logits several times over
        def reference_step():
            return reference.fused_linear_cross_entropy(hidden, weight, target)
        seconds = time_peer(info, "reference", step_for(reference_step), device, repeats=3 if CUDA else 1,
                            warmup=0)
        info["speedup_vs_reference"] = seconds / ours_s


GEMMA_SHAPES = [(8192, 256000)] if CUDA else [(256, 8192)]


def _torch_liger_options(logits: torch.Tensor, target: torch.Tensor, softcap: float, z_scale: float):
    """The same Gemma-2-style loss in plain torch: soft-capped logits upcast to fp32, cross-entropy, z-loss from
    the log-sum-exp, token accuracy from the argmax (each materialises (N, V) intermediates)."""
    y = softcap * torch.tanh(logits.float() / softcap)
    active = target != -100
    loss = F.cross_entropy(y, target)
    lse = torch.logsumexp(y, dim=-1)
    z = (z_scale * lse * lse * active).sum() / active.sum()
    accuracy = ((y.argmax(dim=-1) == target) & active).sum() / active.sum()
    return loss + z, z.detach(), accuracy


@pytest.mark.parametrize("shape", GEMMA_SHAPES, ids=lambda s: f"N{s[0]}_V{s[1]}")
def test_cross_entropy_liger_options(benchmark, device, shape):
    """Forward + backward with Gemma-2's final soft-capping (30), a z-loss (1e-4) and token accuracy: llmfast's
    kernel computes all of it in its two passes; peers: the torch composite (eager and ``torch.compile``d) and the
    reference."""
    n, v = shape
    dtype = torch.bfloat16 if CUDA else torch.float32
    logits = torch.randn(n, v, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, v, (n,), device=device)
    target[::17] = -100
    info = benchmark.extra_info
    info.update(device=_device_name(device), backend="triton" if CUDA else "torch (auto backend on the CPU)",
                dtype=str(dtype).replace("torch.", ""), shape=f"N{n} V{v}", mode="fwd_bwd",
                options="softcap=30, lse_square_scale=1e-4, return_z_loss, return_token_accuracy")

    def ours(x, t):
        out = llmfast.cross_entropy(x, t, softcap=30.0, lse_square_scale=1e-4, return_z_loss=True,
                                    return_token_accuracy=True)
        return out.loss

    def ref(x, t):
        return reference.cross_entropy(x, t, softcap=30.0, lse_square_scale=1e-4, return_z_loss=True,
                                       return_token_accuracy=True).loss

    def composite(x, t):
        return _torch_liger_options(x, t, 30.0, 1e-4)[0]

    def step_for(fn):
        def step():
            fn(logits, target).backward()
            logits.grad = None
            synchronize(device)
        return step

    with llmfast.backend("auto"):
        measure(benchmark, step_for(ours))
    peers = {"torch": composite, "reference": ref}
    if benchmark.disabled or benchmark.stats is None:
        for fn in peers.values():
            step_for(fn)()
        return
    ours_s = benchmark.stats.stats.median
    try:
        peers["torch_compile"] = torch.compile(composite)
    except Exception as err:  # no compiler available
        info["torch_compile_status"] = f"unavailable: {str(err).splitlines()[0][:100]}"
    for name, fn in peers.items():
        try:
            seconds = time_peer(info, name, step_for(fn), device, repeats=10 if CUDA else 3)
        except Exception as err:  # out of memory for the materialising peers, or no compiler
            info[f"{name}_status"] = f"unavailable: {str(err).splitlines()[0][:100]}"
            continue
        info[f"speedup_vs_{name}"] = seconds / ours_s
    with llmfast.backend("auto"):
        info["peak_mib_llmfast"] = peak_memory_bytes(step_for(ours), device) / 2**20
    info["peak_mib_torch"] = peak_memory_bytes(step_for(composite), device) / 2**20
