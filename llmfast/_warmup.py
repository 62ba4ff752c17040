"""``llmfast.warmup`` (this module is private: the function is the public name): compile the common Triton kernels before the first training step.

Triton compiles a kernel the first time it is launched with a new specialisation (dtype, head dim, block sizes,
alignment), which on a GPU costs seconds per kernel and lands in the first steps of a run. ``warmup`` launches each
common kernel once, forward and backward, on small tensors of the given dtypes and head dims, so that the
compilations (or their loads from Triton's on-disk cache) happen up front, with a progress bar.

On a machine without CUDA there is nothing to compile: the ``auto`` backend runs torch's CPU kernels there, and the
interpreter (``TRITON_INTERPRET=1``) compiles nothing. ``warmup()`` then says so and returns at once; pass
``device="cpu"`` under ``TRITON_INTERPRET=1`` to run the same launches in the interpreter (what the tests do).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

import llmfast

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


@dataclass
class WarmupStep:
    """One warm-up launch: what ran, and how long it took (compilation or cache load included)."""

    name: str
    seconds: float


def _dtype_of(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtypes must be float16, bfloat16 or float32, got {value}")
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(f"dtypes must hold torch dtypes or names like 'bf16', got {value!r}")


def _attention(dtype: torch.dtype, head_dim: int, device: torch.device, seq_len: int, causal: bool) -> None:
    q, k, v = (torch.randn(1, 2, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    out = llmfast.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.backward(torch.randn_like(out))


def _softmax(dtype: torch.dtype, width: int, device: torch.device) -> None:
    for fn in (llmfast.softmax, llmfast.log_softmax):
        x = torch.randn(4, width, device=device, dtype=dtype, requires_grad=True)
        y = fn(x, -1)
        y.backward(torch.randn_like(y))


def _cross_entropy(dtype: torch.dtype, vocab: int, device: torch.device) -> None:
    logits = torch.randn(8, vocab, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (8,), device=device)
    llmfast.cross_entropy(logits, target).backward()


def _fused_linear_cross_entropy(dtype: torch.dtype, width: int, vocab: int, device: torch.device) -> None:
    hidden = torch.randn(8, width, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (8,), device=device)
    llmfast.fused_linear_cross_entropy(hidden, weight, target).backward()


def plan(dtypes: Sequence[torch.dtype | str], head_dims: Sequence[int], seq_len: int, vocab_size: int,
         width: int, device: torch.device) -> list[tuple[str, Callable[[], None]]]:
    """The launches ``warmup`` makes, in order: (label, call)."""
    steps: list[tuple[str, Callable[[], None]]] = []
    for dtype in [_dtype_of(d) for d in dtypes]:
        name = str(dtype).replace("torch.", "")
        for head_dim in head_dims:
            for causal in (True, False):
                steps.append((f"attention {name} d{head_dim} {'causal' if causal else 'full'}",
                              lambda d=dtype, h=head_dim, c=causal: _attention(d, h, device, seq_len, c)))
        steps.append((f"softmax/log_softmax {name}", lambda d=dtype: _softmax(d, width, device)))
        steps.append((f"cross_entropy {name}", lambda d=dtype: _cross_entropy(d, vocab_size, device)))
        steps.append((f"fused_linear_cross_entropy {name}",
                      lambda d=dtype: _fused_linear_cross_entropy(d, width, vocab_size, device)))
    return steps


def warmup(dtypes: Iterable[torch.dtype | str] = (torch.bfloat16,), head_dims: Iterable[int] = (64, 128), *,
           seq_len: int = 256, vocab_size: int = 50304, width: int = 768, device: torch.device | str | None = None,
           progress: bool = True) -> list[WarmupStep]:
    """Launch the common kernels once per dtype and head dim (forward and backward) so Triton compiles them now.

    ``dtypes``: torch dtypes or names (``"bf16"``, ``"fp16"``, ``"fp32"``); ``head_dims``: attention head dims
    (8 to 256); ``seq_len``, ``vocab_size`` and ``width``: sizes of the warm-up tensors (the model's block size,
    vocabulary and width pick the same kernel tiles as the real steps). ``device``: CUDA by default; without CUDA,
    warmup has nothing to compile and returns ``[]`` (``device="cpu"`` with ``TRITON_INTERPRET=1`` runs the
    launches in Triton's interpreter instead). Returns one :class:`WarmupStep` per launch, with its time.
    """
    dtypes = list(dtypes)
    head_dims = list(head_dims)
    if not dtypes:
        raise ValueError("dtypes must name at least one dtype, got an empty list")
    for d in dtypes:
        _dtype_of(d)
    for h in head_dims:
        if isinstance(h, bool) or not isinstance(h, int) or not 8 <= h <= 256:
            raise ValueError(f"head_dims must hold ints from 8 to 256, got {h!r}")
    for arg, value in (("seq_len", seq_len), ("vocab_size", vocab_size), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if device is None:
        if not torch.cuda.is_available():
            if progress:
                print("llmfast.warmup: no CUDA device, nothing to compile (on the CPU the auto backend runs "
                      "torch's kernels)", file=sys.stderr)
            return []
        device = torch.device("cuda")
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"device must be a CUDA device (or the CPU under TRITON_INTERPRET=1), got {device}")
    steps = plan(dtypes, head_dims, seq_len, vocab_size, width, device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="llmfast.warmup", unit="kernel")
    done: list[WarmupStep] = []
    try:
        with llmfast.backend("triton"):
            for label, call in steps:
                if bar is not None:
                    bar.set_postfix_str(label)
                start = time.perf_counter()
                call()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                done.append(WarmupStep(label, time.perf_counter() - start))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return done
