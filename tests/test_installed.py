"""The package as a user gets it: version, warmup, a kernel smoke test, and (in CI's wheel step) proof that the
tests import the installed wheel, not the checkout.

CI's "wheel" step (``.ci/run``) installs the built wheel into a fresh virtual environment and runs this file and the
tokenizer tests from a temporary directory with ``LLMFAST_EXPECT_INSTALLED=1``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmfast

CHECKOUT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.environ.get("LLMFAST_EXPECT_INSTALLED") != "1", reason="only in CI's installed-wheel step")
def test_tests_import_the_installed_wheel():
    from llmfast import _C

    for module_file in (llmfast.__file__, _C.__file__):
        path = Path(module_file).resolve()
        assert "site-packages" in path.parts, path
        assert CHECKOUT not in path.parents, f"{path} is in the checkout {CHECKOUT}, not the installed wheel"


def test_version_command():
    result = subprocess.run([sys.executable, "-m", "llmfast", "--version"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"llmfast {llmfast.__version__} (torch {torch.__version__}") and "native tokenizer built" in line


def test_kernel_smoke_in_the_interpreter():
    """Each kernel family launches once through the triton backend and agrees with the float64 reference."""
    torch.manual_seed(0)
    before = dict(llmfast.kernel_launch_counts())
    with llmfast.backend("triton"):
        x = torch.randn(3, 37, requires_grad=True)
        y = llmfast.softmax(x, -1)
        y.backward(torch.ones_like(y))
        torch.testing.assert_close(y.detach().double(), torch.softmax(x.detach().double(), -1), atol=1e-6, rtol=1e-5)
        q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))
        out = llmfast.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
        logits, target = torch.randn(5, 11), torch.randint(0, 11, (5,))
        loss = llmfast.cross_entropy(logits, target)
        torch.testing.assert_close(loss.double(), torch.nn.functional.cross_entropy(logits.double(), target),
                                   atol=1e-6, rtol=1e-5)
    after = llmfast.kernel_launch_counts()
    launched = {name for name, count in after.items() if count > before.get(name, 0)}
    assert len(launched) >= 3, launched


def test_warmup_without_cuda_has_nothing_to_compile(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert llmfast.warmup(dtypes=["bf16"], head_dims=[64]) == []
    assert "nothing to compile" in capsys.readouterr().err


def test_warmup_launches_every_planned_kernel_in_the_interpreter():
    before = dict(llmfast.kernel_launch_counts())
    steps = llmfast.warmup(dtypes=[torch.float32], head_dims=[16], seq_len=16, vocab_size=64, width=32,
                           device="cpu", progress=True)
    names = [s.name for s in steps]
    assert names == ["attention float32 d16 causal", "attention float32 d16 full", "softmax/log_softmax float32",
                     "cross_entropy float32", "fused_linear_cross_entropy float32"]
    assert all(s.seconds > 0 for s in steps)
    after = llmfast.kernel_launch_counts()
    assert sum(after.values()) > sum(before.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtypes=[torch.int32]), "dtypes"),
    (dict(dtypes=["fp8"]), "dtypes"),
    (dict(dtypes=[]), "dtypes"),
    (dict(head_dims=[4]), "head_dims"),
    (dict(seq_len=0, device="cpu"), "seq_len"),
])
def test_warmup_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        llmfast.warmup(**kwargs)
