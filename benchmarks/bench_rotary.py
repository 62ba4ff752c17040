"""Rotary embedding speed: llmfast vs the pure-PyTorch reference vs the reference under ``torch.compile``.

pytest-benchmark times llmfast on the ``auto`` backend (the Triton kernel on CUDA; on the CPU the reference math,
so CPU rows only check the wiring). Peers land in ``benchmark.extra_info`` next to it:

* ``gbps``: llmfast's effective bandwidth counting each element of x (or q and k) read once and written once
  (backward: the gradient read, the input gradient written); the small cos/sin tables are not counted.
* ``<peer>_ms``, ``<peer>_gbps`` and ``speedup_vs_<peer>`` (peer time / llmfast time) for ``reference`` (eager
  torch ops, what Hugging Face and flash-attn's torch fallback run) and ``torch_compile`` (the reference under
  ``torch.compile``: Inductor's fused kernel, the strongest torch-native peer).
* On a GPU, ``copy_gbps`` (a device copy of the same bytes on the same card) and ``fraction_of_copy_bandwidth``.

Cases: flash-attn's convention on (B, S, H, D) = (8, 4096, 32, 128) tensors (full and half rotary dim,
interleaved or not, an int and a per-sequence offset), and Hugging Face's q/k pair with GQA (32 query heads,
8 KV heads) in (B, H, S, D). On the CPU the shapes are small so ``--benchmark-disable`` is a few-second smoke run
(the compiled peer then runs through ``aot_eager``, which checks the wiring without a C++ build).
"""
from __future__ import annotations

import pytest
import torch

import llmfast
from llmfast.reference import rotary as reference

from conftest import copy_gbps, measure, synchronize, time_peer

CUDA = torch.cuda.is_available()
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
FLASH_SHAPE = (8, 4096, 32, 128) if CUDA else (2, 128, 8, 64)   # (B, S, H, D)
HF_SHAPE = (8, 4096, 32, 8, 128) if CUDA else (2, 128, 8, 2, 64)  # (B, S, H, H_kv, D)


def _tables(n_pos: int, rotary_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)
    angles = torch.outer(torch.arange(n_pos, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _compiled(fn, quick: bool):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager" if quick and not CUDA else "inductor")


def _step(fn, inputs: list[torch.Tensor], mode: str, device: torch.device):
    """A callable running ``fn(*inputs)`` (fwd) or the gradient of its outputs for fixed upstream grads (bwd)."""
    if mode == "fwd":
        def forward():
            out = fn(*inputs)
            synchronize(device)
            return out
        return forward
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]

    def backward():
        result = torch.autograd.grad(outs, inputs, grads, retain_graph=True)
        synchronize(device)
        return result
    return backward


def _record(benchmark, info: dict, peers: dict, inputs: list[torch.Tensor], mode: str, device: torch.device,
            moved: int) -> None:
    """Time the peers next to llmfast and store bandwidth and speedups (smoke run: exercise them once)."""
    quick = benchmark.disabled or benchmark.stats is None
    if quick:
        for fn in peers.values():
            _step(fn, inputs, mode, device)()
        return
    ours = benchmark.stats.stats.median
    info["gbps"] = moved / ours / 1e9
    copy = copy_gbps(inputs[0].detach(), device)
    if copy:
        info["copy_gbps"] = copy
        info["fraction_of_copy_bandwidth"] = info["gbps"] / copy
    for name, fn in peers.items():
        try:
            seconds = time_peer(info, name, _step(fn, inputs, mode, device), device, repeats=10 if CUDA else 5)
        except RuntimeError as err:  # e.g. out of memory
            info[f"{name}_status"] = f"unavailable: {str(err).splitlines()[0][:100]}"
            continue
        info[f"{name}_gbps"] = moved / seconds / 1e9
        info[f"speedup_vs_{name}"] = seconds / ours


FLASH_CASES = [
    pytest.param(rot, interleaved, offsets, mode,
                 id=f"rot{rot}-{'interleaved' if interleaved else 'halves'}-{offsets}-{mode}")
    for rot in ("full", "half")
    for interleaved in (False, True)
    for offsets in ("int", "tensor")
    for mode in ("fwd", "bwd")
    if not (rot == "half" and (interleaved or offsets == "tensor"))
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rot, interleaved, offsets, mode", FLASH_CASES)
def test_apply_rotary_emb(benchmark, device, dtype, rot, interleaved, offsets, mode):
    batch, seqlen, heads, head_dim = FLASH_SHAPE
    rotary_dim = head_dim if rot == "full" else head_dim // 2
    cos, sin = _tables(2 * seqlen, rotary_dim, device)
    x = torch.randn(FLASH_SHAPE, device=device, dtype=dtype)
    seqlen_offsets = (torch.randint(0, seqlen, (batch,), device=device, dtype=torch.int32)
                      if offsets == "tensor" else seqlen // 2)
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(dtype).replace("torch.", ""),
                shape=str(FLASH_SHAPE), rotary_dim=rotary_dim, interleaved=interleaved, offsets=offsets, mode=mode)

    def ours(t):
        return llmfast.apply_rotary_emb(t, cos, sin, interleaved, False, seqlen_offsets)

    def eager(t):
        return reference.apply_rotary_emb(t, cos, sin, interleaved, False, seqlen_offsets)

    quick = benchmark.disabled
    with llmfast.backend("auto"):
        measure(benchmark, _step(ours, [x], mode, device))
    if quick and (rot, interleaved, offsets) != ("full", False, "int"):
        return  # the smoke run exercises the peers on one case
    _record(benchmark, info, {"reference": eager, "torch_compile": _compiled(eager, quick)}, [x], mode, device,
            2 * x.numel() * x.element_size())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_apply_rotary_pos_emb(benchmark, device, dtype, mode):
    """Hugging Face's layout: q (B, H, S, D) and k (B, H_kv, S, D) as transposed views of the projections."""
    batch, seqlen, heads, kv_heads, head_dim = HF_SHAPE
    q = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    cos, sin = _tables(seqlen, head_dim, device)
    cos, sin = (torch.cat((t, t), -1)[None].expand(batch, -1, -1).to(dtype) for t in (cos, sin))
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(dtype).replace("torch.", ""),
                shape=f"q {tuple(q.shape)} k {tuple(k.shape)}", mode=mode)

    def ours(q, k):
        return llmfast.apply_rotary_pos_emb(q, k, cos, sin)

    def eager(q, k):
        return reference.apply_rotary_pos_emb(q, k, cos, sin)

    quick = benchmark.disabled
    with llmfast.backend("auto"):
        measure(benchmark, _step(ours, [q, k], mode, device))
    _record(benchmark, info, {"reference": eager, "torch_compile": _compiled(eager, quick)}, [q, k], mode, device,
            2 * (q.numel() + k.numel()) * q.element_size())
