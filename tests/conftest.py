"""Test setup shared by every test file.

Triton kernels run on the CPU through Triton's interpreter unless told otherwise: ``TRITON_INTERPRET`` must be set
before triton is imported. ``python -m llmfast.gpu_report`` runs the same tests on a GPU with
``TRITON_INTERPRET=0 LLMFAST_TEST_DEVICE=cuda``.

One fixture decides the device for every test file: :func:`_test_device` (autouse) makes ``LLMFAST_TEST_DEVICE``
torch's default device for the test, so every tensor a test creates without naming a device lands there, and
the ``device`` fixture hands the same device to tests that name it.
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


@pytest.fixture(autouse=True)
def _test_device():
    """Every test's tensors on TEST_DEVICE (a no-op on the CPU)."""
    if TEST_DEVICE.type == "cpu":
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device(TEST_DEVICE)
    try:
        yield
    finally:
        torch.set_default_device(previous)


@pytest.fixture
def device() -> torch.device:
    """Where tensors under test live: the CPU (interpreter) here, CUDA under gpu_report."""
    return TEST_DEVICE
