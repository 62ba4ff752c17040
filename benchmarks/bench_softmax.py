"""Softmax speed: llmfast vs torch.softmax / torch.log_softmax vs the pure-PyTorch reference.

pytest-benchmark times llmfast on the ``auto`` backend (the Triton kernels on CUDA, torch's kernels on the CPU);
the peers are timed next to it with ``time_peer`` and land in ``benchmark.extra_info``:

* ``gbps``: llmfast's effective bandwidth counting each element read once and written once (forward: x in,
  y out; backward: y and dy in, dx out), whatever the kernel really moves. A looped kernel that re-reads a long
  row shows up as lower GB/s, as it should.
* ``<peer>_ms``, ``<peer>_gbps``, ``speedup_vs_<peer>`` (peer time / llmfast time: above 1 means llmfast is
  faster) for ``torch`` (torch's native softmax) and ``reference`` (llmfast's pure-PyTorch reference).
* On a GPU, ``copy_gbps`` (a device-to-device copy of the same bytes, measured on the same card) and
  ``fraction_of_copy_bandwidth`` = gbps / copy_gbps: how close the kernel is to moving bytes at copy speed.

On CUDA: bf16 and fp32, about 2^27 elements per tensor, rows from 64 to 2^20 columns, the last dim and dim 0.
On the CPU: float32, a few small shapes only, so ``pytest benchmarks/bench_softmax.py --benchmark-disable`` is a
few-second smoke run; CPU figures are torch's CPU kernels (the auto backend), never GPU claims.
"""
from __future__ import annotations

import pytest
import torch

import llmfast
from llmfast.reference import softmax as reference

from conftest import copy_gbps, measure, synchronize, time_peer

CUDA = torch.cuda.is_available()
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
ELEMENTS = 2**27 if CUDA else 2**18
COLUMNS = [64, 512, 1024, 4096, 16384, 32768, 65536, 262144, 1_048_576] if CUDA else [64, 1024, 65536]
# The reference materialises several full-size temporaries; skip it beyond this many elements.
MAX_REFERENCE_ELEMENTS = 2**28


def shape_for(n_cols: int) -> tuple[int, int]:
    return max(1, ELEMENTS // n_cols), n_cols


def make_step(fn, x: torch.Tensor, dim: int, mode: str, device: torch.device):
    dy = torch.randn_like(x)

    def forward():
        y = fn(x, dim)
        synchronize(device)
        return y

    def backward_only():
        # time the backward alone: forward once outside, then gradients for a fixed upstream gradient
        return torch.autograd.grad(y_saved, x, dy, retain_graph=True)

    if mode == "fwd":
        return forward, 2
    x.requires_grad_(True)
    y_saved = fn(x, dim)

    def backward():
        grads = backward_only()
        synchronize(device)
        return grads

    return backward, 3


# Every row length for softmax; dim 0 up to 65536-long columns; log_softmax backward at three sizes.
CASES = [
    pytest.param(n_cols, op, dim, mode, id=f"c{n_cols}-{op}-{'last_dim' if dim == -1 else 'dim0'}-{mode}")
    for n_cols in COLUMNS
    for op in ("softmax", "log_softmax")
    for dim in (-1, 0)
    for mode in ("fwd", "bwd")
    if not (dim == 0 and n_cols > 65536)
    and not (op == "log_softmax" and mode == "bwd" and n_cols not in (COLUMNS[0], 4096, 65536))
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n_cols, op, dim, mode", CASES)
def test_softmax(benchmark, device, n_cols, dtype, op, dim, mode):
    rows, cols = shape_for(n_cols)
    shape = (rows, cols) if dim == -1 else (cols, rows)  # dim 0: the softmax runs down columns of length n_cols
    x = torch.randn(shape, device=device, dtype=dtype)
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                backend="triton" if device.type == "cuda" else "torch (auto backend on the CPU)",
                dtype=str(dtype).replace("torch.", ""), shape=str(tuple(shape)), dim=dim, op=op, mode=mode)

    with llmfast.backend("auto"):
        step, passes = make_step(getattr(llmfast, op), x, dim, mode, device)
        measure(benchmark, step, warmup=2 if CUDA else 1)
    moved = passes * x.numel() * x.element_size()
    quick = benchmark.disabled or benchmark.stats is None
    if quick:
        if n_cols == COLUMNS[0]:  # the smoke run exercises the peers once at the smallest size
            for fn in (getattr(torch, op), getattr(reference, op)):
                make_step(fn, x.detach(), dim, mode, device)[0]()
        return
    ours = benchmark.stats.stats.median
    info["gbps"] = moved / ours / 1e9
    copy = copy_gbps(x.detach(), device)
    if copy:
        info["copy_gbps"] = copy
        info["fraction_of_copy_bandwidth"] = info["gbps"] / copy
    for name, fn in (("torch", getattr(torch, op)), ("reference", getattr(reference, op))):
        if name == "reference" and x.numel() > MAX_REFERENCE_ELEMENTS:
            info["reference_status"] = "skipped: too large to materialise"
            continue
        peer_step = make_step(fn, x.detach().clone(), dim, mode, device)[0]
        try:
            seconds = time_peer(info, name, peer_step, device, repeats=10 if CUDA else 5)
        except RuntimeError as err:  # e.g. out of memory
            info[f"{name}_status"] = f"unavailable: {str(err).splitlines()[0][:100]}"
            continue
        info[f"{name}_gbps"] = moved / seconds / 1e9
        info[f"speedup_vs_{name}"] = seconds / ours


@pytest.mark.parametrize("n_cols", [1024, 65536] if CUDA else [1024], ids=lambda c: f"c{c}")
def test_masked_softmax(benchmark, device, n_cols):
    """Fused scale + broadcast boolean mask + causal softmax vs the same in torch ops (scores of attention)."""
    dtype = DTYPES[0]
    heads = 16 if CUDA else 2
    batch = max(1, ELEMENTS // (heads * n_cols * n_cols)) if n_cols <= 4096 else 1
    q_len = n_cols if n_cols <= 4096 else max(1, ELEMENTS // (heads * n_cols))
    x = torch.randn(batch, heads, q_len, n_cols, device=device, dtype=dtype)
    keep = torch.rand(batch, 1, 1, n_cols, device=device) > 0.1
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", op="masked_softmax",
                dtype=str(dtype).replace("torch.", ""), shape=str(tuple(x.shape)))

    def ours():
        y = llmfast.masked_softmax(x, keep, scale=0.125, causal=True)
        synchronize(device)
        return y

    def torch_ops():
        causal = torch.ones(q_len, n_cols, dtype=torch.bool, device=device).tril()
        y = torch.softmax((x * 0.125).masked_fill(~(keep & causal), float("-inf")), -1)
        synchronize(device)
        return y

    with llmfast.backend("auto"):
        measure(benchmark, ours)
    if benchmark.disabled or benchmark.stats is None:
        torch_ops()
        return
    moved = 2 * x.numel() * x.element_size()
    info["gbps"] = moved / benchmark.stats.stats.median / 1e9
    seconds = time_peer(info, "torch", torch_ops, device, repeats=10 if CUDA else 5)
    info["speedup_vs_torch"] = seconds / benchmark.stats.stats.median
