"""SwiGLU / GeGLU speed: llmfast vs the pure-PyTorch reference vs the reference under ``torch.compile``.

pytest-benchmark times llmfast on the ``auto`` backend (the Triton kernels on CUDA; torch ops on the CPU, so CPU
rows only check the wiring). ``benchmark.extra_info`` gets:

* ``gbps``: bytes moved counting each element once: forward reads gate and up and writes the product (3 tensors);
  backward reads dy, gate and up and writes both gradients (5 tensors).
* ``<peer>_ms``, ``<peer>_gbps``, ``speedup_vs_<peer>`` for ``reference`` (``F.silu(gate) * up`` in eager torch:
  what Hugging Face's Llama MLP runs) and ``torch_compile`` (the same under ``torch.compile``: Inductor's fused kernels).
* On a GPU, ``copy_gbps`` and ``fraction_of_copy_bandwidth`` (a device copy of the same bytes on the same card).

Shapes: 8192 tokens x Llama-3-8B's intermediate size 14336 (and Gemma-7B's 24576 for GeGLU) on CUDA; small on
the CPU, so ``--benchmark-disable`` is a few-second smoke run (the compiled peer then goes through ``aot_eager``).
"""
from __future__ import annotations

import pytest
import torch

import llmfast
from llmfast.reference import swiglu as reference

from conftest import copy_gbps, measure, synchronize, time_peer

CUDA = torch.cuda.is_available()
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
SHAPES = [(8192, 14336), (8192, 24576)] if CUDA else [(256, 1376)]
OPS = {
    "swiglu": (lambda g, u: llmfast.swiglu(g, u), reference.swiglu),
    "geglu_tanh": (lambda g, u: llmfast.geglu(g, u, "tanh"), lambda g, u: reference.geglu(g, u, "tanh")),
    "geglu": (lambda g, u: llmfast.geglu(g, u), reference.geglu),
}


def _step(fn, gate: torch.Tensor, up: torch.Tensor, mode: str, device: torch.device):
    """fwd: ``fn(gate, up)``; bwd: the gradients of gate and up for a fixed upstream gradient (forward run once)."""
    if mode == "fwd":
        def forward():
            out = fn(gate, up)
            synchronize(device)
            return out
        return forward
    g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = fn(g, u)
    dy = torch.randn_like(out)

    def backward():
        grads = torch.autograd.grad(out, (g, u), dy, retain_graph=True)
        synchronize(device)
        return grads
    return backward


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}_I{s[1]}")
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_gated_activation(benchmark, device, op, shape, dtype, mode):
    gate = torch.randn(shape, device=device, dtype=dtype)
    up = torch.randn(shape, device=device, dtype=dtype)
    ours, eager = OPS[op]
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if CUDA else "cpu",
                backend="triton" if CUDA else "torch (auto backend on the CPU)",
                dtype=str(dtype).replace("torch.", ""), shape=str(shape), op=op, mode=mode)
    with llmfast.backend("auto"):
        measure(benchmark, _step(ours, gate, up, mode, device))
    quick = benchmark.disabled or benchmark.stats is None
    torch._dynamo.reset()
    compiled = torch.compile(eager, backend="aot_eager" if quick and not CUDA else "inductor")
    peers = {"reference": eager, "torch_compile": compiled}
    if quick:
        for fn in peers.values():  # the smoke run exercises each peer once
            _step(fn, gate, up, mode, device)()
        return
    moved = (3 if mode == "fwd" else 5) * gate.numel() * gate.element_size()
    ours_s = benchmark.stats.stats.median
    info["gbps"] = moved / ours_s / 1e9
    copy = copy_gbps(gate, device)
    if copy:
        info["copy_gbps"] = copy
        info["fraction_of_copy_bandwidth"] = info["gbps"] / copy
    for name, fn in peers.items():
        try:
            seconds = time_peer(info, name, _step(fn, gate, up, mode, device), device, repeats=10 if CUDA else 5)
        except RuntimeError as err:  # e.g. out of memory
            info[f"{name}_status"] = f"unavailable: {str(err).splitlines()[0][:100]}"
            continue
        info[f"{name}_gbps"] = moved / seconds / 1e9
        info[f"speedup_vs_{name}"] = seconds / ours_s
