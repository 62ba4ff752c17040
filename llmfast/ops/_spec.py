"""Description of one shipped kernel configuration, consumed by ``llmfast.compile_check``."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel at one config, described so ``triton.compile`` can build it ahead of time.

    ``signature`` maps every non-constexpr argument to a Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``...);
    ``constexprs`` gives every ``tl.constexpr`` argument a value. ``arches`` limits the spec to some
    compute capabilities (``None``: all that compile_check is asked for).
    """

    kernel: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    config: str
    num_warps: int = 4
    num_stages: int = 2
    arches: tuple[int, ...] | None = None
    expect_mma: bool = False
