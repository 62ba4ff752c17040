"""RMSNorm speed: llmfast vs torch's F.rms_norm vs the pure-PyTorch reference, eager and torch.compile'd.

pytest-benchmark times llmfast on the ``auto`` backend (the Triton kernels on CUDA, torch's math on the CPU); the
peers are timed next to it with ``time_peer`` and land in ``benchmark.extra_info``:

* ``gbps``: llmfast's effective bandwidth counting each tensor element read once and written once (forward: x in,
  y out, plus residual in and h out with ``residual``; backward: x (h), dy (and dh) in, dx out), the weight and
  the per-row statistics not counted.
* ``<peer>_ms``, ``<peer>_gbps``, ``speedup_vs_<peer>`` (peer time / llmfast time: above 1 means llmfast is
  faster) for ``torch`` (``F.rms_norm``, after ``x + residual`` for the residual case), ``reference`` (llmfast's
  reference, eager) and ``torch_compile`` (the reference through ``torch.compile``; full runs only,
  the smoke run skips its compile).
* On a GPU, ``copy_gbps`` (a device-to-device copy of the same bytes, same card) and
  ``fraction_of_copy_bandwidth`` = gbps / copy_gbps (issue #11's target: >= 0.9 forward, >= 0.8 forward+backward
  at hidden sizes 4096-8192).

On CUDA: bf16 and fp32, about 2^27 elements per tensor, hidden sizes 1024 to 131072. On the CPU: float32, small
shapes, so ``pytest benchmarks/bench_rms_norm.py --benchmark-disable`` is a few-second smoke run; CPU figures are
torch's CPU math (the auto backend), never GPU claims.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast.reference import rms_norm as reference

from conftest import copy_gbps, measure, synchronize, time_peer

CUDA = torch.cuda.is_available()
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
ELEMENTS = 2**27 if CUDA else 2**18
HIDDEN = [1024, 2048, 4096, 8192, 16384, 32768, 131072] if CUDA else [64, 1024, 4096]
EPS = 1e-6


def torch_rms_norm(x, weight, residual=None):
    if residual is not None:
        h = x + residual
        return F.rms_norm(h, (h.shape[-1],), weight, EPS), h
    return F.rms_norm(x, (x.shape[-1],), weight, EPS)


def reference_rms_norm(x, weight, residual=None):
    return reference.rms_norm(x, weight, EPS, residual=residual)


@functools.cache
def compiled_reference():
    return torch.compile(reference_rms_norm, dynamic=False)


def llmfast_rms_norm(x, weight, residual=None):
    return llmfast.rms_norm(x, weight, EPS, residual=residual)


def make_step(fn, x, weight, residual, mode, device):
    """A timed step: forward only, or forward + backward for fixed upstream gradients (no .grad accumulation)."""
    inputs = [t for t in (x, weight, residual) if t is not None]
    if mode == "fwd_bwd":
        for t in inputs:
            t.requires_grad_(True)
    out = fn(x, weight, residual)
    grads = [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]

    def step():
        if mode == "fwd":
            with torch.no_grad():
                result = fn(x, weight, residual)
        else:
            o = fn(x, weight, residual)
            result = torch.autograd.grad(o if isinstance(o, tuple) else (o,), inputs, grads)
        synchronize(device)
        return result

    return step


def moved_bytes(x: torch.Tensor, residual: bool, mode: str) -> int:
    fwd, bwd = (4, 4) if residual else (2, 3)
    return (fwd + (bwd if mode == "fwd_bwd" else 0)) * x.numel() * x.element_size()


CASES = [pytest.param(h, mode, res, id=f"h{h}-{mode}{'-residual' if res else ''}")
         for h in HIDDEN for mode in ("fwd", "fwd_bwd") for res in (False, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("hidden, mode, residual", CASES)
def test_rms_norm(benchmark, device, hidden, dtype, mode, residual):
    rows = max(1, ELEMENTS // hidden)

    def inputs():
        x = torch.randn(rows, hidden, device=device, dtype=dtype)
        w = torch.rand(hidden, device=device, dtype=dtype) + 0.5
        r = torch.randn(rows, hidden, device=device, dtype=dtype) if residual else None
        return x, w, r

    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if CUDA else "cpu",
                backend="triton" if CUDA else "torch (auto backend on the CPU)",
                dtype=str(dtype).replace("torch.", ""), shape=str((rows, hidden)), mode=mode, residual=residual)
    x, w, r = inputs()
    with llmfast.backend("auto"):
        step = make_step(llmfast_rms_norm, x, w, r, mode, device)
        measure(benchmark, step, warmup=2 if CUDA else 1)
    peers = {"torch": torch_rms_norm, "reference": reference_rms_norm}
    if benchmark.disabled or benchmark.stats is None:
        if hidden == HIDDEN[0]:  # the smoke run exercises the eager peers once at the smallest size
            for fn in peers.values():
                make_step(fn, *inputs(), mode, device)()
        return
    moved = moved_bytes(x, residual, mode)
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
