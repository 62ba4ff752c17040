"""Which architecture's tuning configs a kernel launch uses: the one place every op asks.

* A CUDA tensor outside the interpreter gets its card's configs: ``"sm90"`` (Hopper and newer) or ``"sm80"``.
* Under Triton's interpreter (CPU tests) the default is ``"interpreter"``: small tiles, so short test sequences
  still cross several blocks.
* ``LLMFAST_CONFIG_ARCH=sm80`` or ``=sm90`` (read at every launch) makes the launch use that architecture's
  shipped configs wherever it runs, so the tiles a real GPU would get are checked numerically in the interpreter.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import torch

from .. import _backend

CONFIG_ARCHES = ("sm80", "sm90", "interpreter")
# Streaming multiprocessors of the reference cards (A100, H100 SXM): what a forced arch assumes away from its card.
NOMINAL_SM_COUNT = {"sm80": 108, "sm90": 132}


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmfast_config_arch", default=None)


@contextlib.contextmanager
def forced_config_arch(arch: str) -> Iterator[None]:
    """Launches inside pick ``arch``'s configs (the compile check builds each arch's launches this way)."""
    if arch not in CONFIG_ARCHES:
        raise ValueError(f"arch must be one of {CONFIG_ARCHES}, got {arch!r}")
    token = _forced.set(arch)
    try:
        yield
    finally:
        _forced.reset(token)


def config_arch(device: torch.device) -> str:
    """``"sm80"``, ``"sm90"`` or ``"interpreter"``: whose configs a launch on ``device`` picks."""
    if _forced.get() is not None:
        return _forced.get()
    forced = os.environ.get("LLMFAST_CONFIG_ARCH", "").strip().lower()
    if forced:
        if forced not in CONFIG_ARCHES:
            raise ValueError(f"LLMFAST_CONFIG_ARCH must be one of {CONFIG_ARCHES}, got {forced!r}")
        return forced
    if device.type != "cuda" or _backend.triton_interpreter_enabled():
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def multiprocessor_count(device: torch.device, arch: str) -> int | None:
    """SMs a launch on ``device`` should fill under config ``arch``: the card's own on a GPU, the reference card's
    when an arch is forced elsewhere, None for the interpreter."""
    if arch == "interpreter":
        return None
    if device.type == "cuda" and not _backend.triton_interpreter_enabled():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NOMINAL_SM_COUNT[arch]
