"""Triton cross-entropy and fused linear cross-entropy (placeholder until the softmax-family issue lands)."""
from __future__ import annotations

from llmfast.ops._spec import KernelSpec


def compile_specs() -> list[KernelSpec]:
    return []
