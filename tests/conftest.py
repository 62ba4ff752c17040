"""Test setup shared by every test file.

Triton kernels run on the CPU through Triton's interpreter unless told otherwise: ``TRITON_INTERPRET`` must be set
before triton is imported. ``python -m llmfast.gpu_report`` runs the same tests on a GPU with
``TRITON_INTERPRET=0 LLMFAST_TEST_DEVICE=cuda``.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TEST_DEVICE = torch.device(os.environ.get("LLMFAST_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    """Where tensors under test live: the CPU (interpreter) here, CUDA under gpu_report."""
    return TEST_DEVICE
