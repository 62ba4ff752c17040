"""Drop-in ``torch.nn.Softmax`` / ``torch.nn.LogSoftmax`` on llmfast's kernels (same constructor, same state)."""
from __future__ import annotations

import warnings

import torch

from llmfast.ops import softmax as ops


def _legacy_dim(ndim: int) -> int:
    """torch's implicit dim for ``dim=None`` (deprecated there too): 0 for 0-, 1- and 3-d inputs, else 1."""
    warnings.warn("Implicit dimension choice for softmax has been deprecated. Change the call to include dim=X "
                  "as an argument.", stacklevel=3)
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax(dim)`` computed by :func:`llmfast.softmax`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dim = self.dim if self.dim is not None else _legacy_dim(input.dim())
        return ops.softmax(input, dim)


class LogSoftmax(torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax(dim)`` computed by :func:`llmfast.log_softmax`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dim = self.dim if self.dim is not None else _legacy_dim(input.dim())
        return ops.log_softmax(input, dim)
