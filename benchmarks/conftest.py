"""Shared benchmark helpers: device choice and how ratios are recorded.

Every benchmark compares llmfast with its reference and the strongest peer, and records ratios in
``benchmark.extra_info`` so ``--benchmark-json`` carries them. Nothing here fails for lack of a GPU: on CPU the
``auto`` backend is measured.
"""
from __future__ import annotations

import time
from typing import Callable

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` (synchronised on CUDA), for the peer timings stored next to a benchmark."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def copy_gbps(x: torch.Tensor, device: torch.device) -> float | None:
    """The device's measured copy bandwidth (bytes read + written per second) for ``x``'s size; CUDA only.

    This is the ceiling a memory-bound kernel that reads and writes each element once is judged against.
    """
    if device.type != "cuda":
        return None
    out = torch.empty_like(x)
    seconds = median_seconds(lambda: out.copy_(x), device, repeats=20, warmup=3)
    return 2 * x.numel() * x.element_size() / seconds / 1e9
