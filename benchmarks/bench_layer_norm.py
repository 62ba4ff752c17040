"""LayerNorm speed: llmfast vs torch's F.layer_norm vs the pure-PyTorch reference, eager and torch.compile'd.

pytest-benchmark times llmfast on the ``auto`` backend (the Triton kernels on CUDA, torch's math on the CPU); the
peers are timed next to it with ``time_peer`` and land in ``benchmark.extra_info``:

* ``gbps``: llmfast's effective bandwidth counting each tensor element read once and written once (forward: x in,
  y out; backward: x and dy in, dx out), the weight, bias and per-row statistics not counted.
* ``<peer>_ms``, ``<peer>_gbps``, ``speedup_vs_<peer>`` (peer time / llmfast time: above 1 means llmfast is
  faster) for ``torch`` (``F.layer_norm``), ``reference`` (llmfast's reference, eager) and
  ``torch_compile`` (the reference through ``torch.compile``; full runs only, the smoke run skips its
  compile).
* On a GPU, ``copy_gbps`` (a device-to-device copy of the same bytes, same card) and
  ``fraction_of_copy_bandwidth`` = gbps / copy_gbps (issue #11's target: >= 0.9 forward, >= 0.8 forward+backward
  at hidden sizes 4096-8192).

On CUDA: bf16 and fp32, about 2^27 elements per tensor, hidden sizes 768 to 131072. On the CPU: float32, small
shapes, so ``pytest benchmarks/bench_layer_norm.py --benchmark-disable`` is a few-second smoke run; CPU figures are
torch's CPU math (the auto backend), never GPU claims.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast.reference import layer_norm as reference

from conftest import copy_gbps, measure, synchronize, time_peer

CUDA = torch.cuda.is_available()
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
ELEMENTS = 2**27 if CUDA else 2**18
HIDDEN = [768, 1024, 2048, 4096, 8192, 16384, 32768, 131072] if CUDA else [64, 768, 4096]
EPS = 1e-5


def torch_layer_norm(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def reference_layer_norm(x, weight, bias):
    return reference.layer_norm(x, x.shape[-1], weight, bias, EPS)


@functools.cache
def compiled_reference():
    return torch.compile(reference_layer_norm, dynamic=False)


def llmfast_layer_norm(x, weight, bias):
    return llmfast.layer_norm(x, x.shape[-1], weight, bias, EPS)


def make_step(fn, x, weight, bias, mode, device):
    """A timed step: forward only, or forward + backward for a fixed upstream gradient (no .grad accumulation)."""
    inputs = [x, weight, bias]
    if mode == "fwd_bwd":
        for t in inputs:
            t.requires_grad_(True)
    grad = torch.randn_like(x)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                result = fn(x, weight, bias)
        else:
            result = torch.autograd.grad(fn(x, weight, bias), inputs, grad)
        synchronize(device)
        return result

    return step


def moved_bytes(x: torch.Tensor, mode: str) -> int:
    return (2 + (3 if mode == "fwd_bwd" else 0)) * x.numel() * x.element_size()


CASES = [pytest.param(h, mode, id=f"h{h}-{mode}") for h in HIDDEN for mode in ("fwd", "fwd_bwd")]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("hidden, mode", CASES)
def test_layer_norm(benchmark, device, hidden, dtype, mode):
    rows = max(1, ELEMENTS // hidden)

    def inputs():
        x = torch.randn(rows, hidden, device=device, dtype=dtype)
        w = torch.rand(hidden, device=device, dtype=dtype) + 0.5
        b = torch.randn(hidden, device=device, dtype=dtype)
        return x, w, b

    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if CUDA else "cpu",
                backend="triton" if CUDA else "torch (auto backend on the CPU)",
                dtype=str(dtype).replace("torch.", ""), shape=str((rows, hidden)), mode=mode)
    x, w, b = inputs()
    with llmfast.backend("auto"):
        step = make_step(llmfast_layer_norm, x, w, b, mode, device)
        measure(benchmark, step, warmup=2 if CUDA else 1)
    peers = {"torch": torch_layer_norm, "reference": reference_layer_norm}
    if benchmark.disabled or benchmark.stats is None:
        if hidden == HIDDEN[0]:  # the smoke run exercises the eager peers once at the smallest size
            for fn in peers.values():
                make_step(fn, *inputs(), mode, device)()
        return
    moved = moved_bytes(x, mode)
    ours = benchmark.stats.stats.median
    info["gbps"] = moved / ours / 1e9
    copy = copy_gbps(x.detach(), device)
    if copy:
        info["copy_gbps"] = copy
        info["fraction_of_copy_bandwidth"] = info["gbps"] / copy
    peers["torch_compile"] = compiled_reference()
    for name, fn in peers.items():
        try:
            seconds = time_peer(info, name, make_step(fn, *inputs(), mode, device), device,
                                repeats=10 if CUDA else 5)
        except Exception as err:  # e.g. out of memory, or no compiler for torch.compile
            info[f"{name}_status"] = f"unavailable: {str(err).splitlines()[0][:100]}"
            continue
        info[f"{name}_gbps"] = moved / seconds / 1e9
        info[f"speedup_vs_{name}"] = seconds / ours
