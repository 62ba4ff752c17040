import pytest
import torch

import llmfast
from llmfast import _backend


def test_default_backend_is_auto(monkeypatch):
    monkeypatch.delenv("LLMFAST_BACKEND", raising=False)
    assert llmfast.get_backend() == "auto"


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.delenv("LLMFAST_BACKEND", raising=False)
    with llmfast.backend("reference"):
        assert llmfast.get_backend() == "reference"
        with llmfast.backend("triton"):
            assert llmfast.get_backend() == "triton"
        assert llmfast.get_backend() == "reference"
    assert llmfast.get_backend() == "auto"


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("LLMFAST_BACKEND", "reference")
    assert llmfast.get_backend() == "reference"
    with llmfast.backend("auto"):
        assert llmfast.get_backend() == "auto"


def test_bad_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="cuda-magic"):
        with llmfast.backend("cuda-magic"):
            pass
    monkeypatch.setenv("LLMFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="LLMFAST_BACKEND"):
        llmfast.get_backend()


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3, 5)
    with llmfast.backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            llmfast.softmax(x)


def test_auto_on_cpu_uses_torch_and_triton_backend_launches_kernel():
    x = torch.randn(4, 33)
    _backend.reset_kernel_launch_counts()
    with llmfast.backend("auto"):
        llmfast.softmax(x)
    assert llmfast.kernel_launch_counts().get("softmax_fwd", 0) == 0
    with llmfast.backend("triton"):
        y = llmfast.softmax(x)
    assert llmfast.kernel_launch_counts()["softmax_fwd"] == 1
    torch.testing.assert_close(y, torch.softmax(x.double(), -1).float())
