"""Backend selection: which implementation serves a public op.

* ``"triton"``    - the fused Triton kernels. CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
                    was set before Triton was imported (the interpreter; slow, for tests).
* ``"reference"`` - the pure-PyTorch references in :mod:`llmfast.reference` (the judge).
* ``"auto"``      - the default: Triton for CUDA tensors, otherwise the fastest correct torch-native path
                    (for example SDPA's CPU kernel).

Select with ``with llmfast.backend("triton"): ...`` or the environment variable ``LLMFAST_BACKEND``.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import os
from typing import Iterator, Mapping

import torch

BACKENDS = ("auto", "triton", "reference")

_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmfast_backend", default=None)

# How many times each Triton kernel was launched: lets tests prove the Triton path ran, not a fallback.
_kernel_launches: collections.Counter[str] = collections.Counter()
# The config (tile sizes, warps...) of each kernel's latest launch: lets tests prove which tile really ran.
_last_launch_configs: dict[str, dict[str, object]] = {}


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The backend in force: the innermost ``llmfast.backend(...)``, else ``LLMFAST_BACKEND``, else ``"auto"``."""
    name = _selected.get()
    if name is not None:
        return name
    env = os.environ.get("LLMFAST_BACKEND")
    if env:
        return _check_name(env, "LLMFAST_BACKEND")
    return "auto"


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run the enclosed ops on backend ``name`` (``"auto"``, ``"triton"`` or ``"reference"``)."""
    token = _selected.set(_check_name(name, "backend"))
    try:
        yield get_backend()
    finally:
        _selected.reset(token)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_can_run_on(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on this tensor's device."""
    if not triton_available():
        return False
    if triton_interpreter_enabled():
        return tensor.device.type in ("cpu", "cuda")
    return tensor.device.type == "cuda"


def resolve(op: str, tensor: torch.Tensor) -> str:
    """Which implementation ``op`` should run for ``tensor``: ``"triton"``, ``"reference"`` or ``"torch"``.

    ``"torch"`` means the torch-native fast path chosen by ``auto`` where Triton cannot run.
    Asking for ``"triton"`` where it cannot run raises instead of silently falling back.
    Under ``torch.compile`` the choice is made once, at trace time (Dynamo cannot trace a ContextVar), so the
    backend in force when a function is compiled stays baked into its graph.
    """
    if torch.compiler.is_compiling():
        return _resolve_at_trace_time(op, tensor.device)
    return _resolve(op, tensor)


@torch.compiler.assume_constant_result
def _resolve_at_trace_time(op: str, device: torch.device) -> str:
    return _resolve(op, torch.empty(0, device=device))


def _resolve(op: str, tensor: torch.Tensor) -> str:
    name = get_backend()
    if name == "reference":
        return "reference"
    if name == "triton":
        if not triton_can_run_on(tensor):
            why = (
                "Triton is not installed"
                if not triton_available()
                else f"tensors are on {tensor.device.type!r}; Triton kernels need CUDA tensors, or CPU tensors "
                "with TRITON_INTERPRET=1 set before triton is imported"
            )
            raise RuntimeError(f"llmfast.{op}: backend 'triton' was requested but {why}")
        return "triton"
    return "triton" if tensor.device.type == "cuda" and triton_available() else "torch"


def record_kernel_launch(kernel: str, config: Mapping[str, object] | None = None) -> None:
    """Count one launch of ``kernel``; ``config`` (its tile sizes, warps...) is kept as the latest launch's."""
    _kernel_launches[kernel] += 1
    if config is not None:
        _last_launch_configs[kernel] = dict(config)


def last_launch_config(kernel: str) -> dict[str, object] | None:
    """The config recorded with ``kernel``'s latest launch (None if it never ran or recorded none)."""
    config = _last_launch_configs.get(kernel)
    return dict(config) if config is not None else None


def kernel_launch_counts() -> dict[str, int]:
    """Launch counts per Triton kernel name since the process started (or the last reset)."""
    return dict(_kernel_launches)


def reset_kernel_launch_counts() -> None:
    _kernel_launches.clear()
    _last_launch_configs.clear()
