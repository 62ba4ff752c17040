"""llmfast.liger: Liger-Kernel's functional names and signatures, each checked against float64 torch math for
Liger-Kernel's semantics (fresh random inputs, awkward shapes, forward and backward)."""
from __future__ import annotations

import inspect
import os

import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast import liger

# Where tensors live: the CPU (Triton's interpreter) here, CUDA under gpu_report (as conftest's ``device``).
DEVICE = torch.device(os.environ.get("LLMFAST_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _triton_kernels():
    """Every call below must run llmfast's Triton kernels (the interpreter on CPU), never torch's fallback."""
    before = sum(llmfast.kernel_launch_counts().values())
    with llmfast.backend("triton"):
        yield
    assert sum(llmfast.kernel_launch_counts().values()) > before

# The signatures of liger_kernel.transformers.functional (Liger-Kernel 0.6), argument for argument.
LIGER_SIGNATURES = {
    "liger_cross_entropy": "input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, "
                           "reduction='mean', label_smoothing=0.0, lse_square_scale=0.0, softcap=None, "
                           "return_z_loss=False, return_token_accuracy=False, return_predicted_tokens=False",
    "liger_fused_linear_cross_entropy": "input, weight, target, bias=None, ce_weight=None, ignore_index=-100, "
                                        "lse_square_scale=0.0, label_smoothing=0.0, reduction='mean', softcap=None, "
                                        "return_z_loss=False, accum_dtype=None, use_token_scaling=False, "
                                        "return_token_accuracy=False, return_predicted_tokens=False",
    "liger_rms_norm": "X, W, eps, offset=0.0, casting_mode='llama', in_place=True",
    "liger_layer_norm": "X, W, B, eps",
    "liger_rope": "q, k, cos, sin, position_ids=None, unsqueeze_dim=1",
    "liger_swiglu": "a, b",
    "liger_geglu": "a, b",
    "liger_softmax": "x",
}


def _signature_text(params) -> str:
    return ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params)


@pytest.mark.parametrize("name", sorted(LIGER_SIGNATURES))
def test_signature_is_ligers(name):
    liger.liger_softmax(torch.randn(2, 3, device=DEVICE))  # (the fixture wants a launch)
    fn = getattr(liger, name)
    params = list(inspect.signature(fn).parameters.values())
    theirs = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert _signature_text(theirs) == LIGER_SIGNATURES[name]
    # llmfast's own extras come after, keyword-only and optional.
    assert all(p.kind == p.KEYWORD_ONLY and p.default is not p.empty for p in params[len(theirs):])
    assert name in liger.__all__ and getattr(llmfast, name) is fn


def _close(got: torch.Tensor, ref64: torch.Tensor, atol: float = 2e-5, rtol: float = 2e-5) -> None:
    torch.testing.assert_close(got.double(), ref64, atol=atol, rtol=rtol)


def _pair(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(DEVICE)
    return x.clone().requires_grad_(), x.double().requires_grad_()


def test_cross_entropy_options():
    g = torch.Generator().manual_seed(1)
    logits, logits64 = _pair(7, 37, seed=1)
    target = torch.randint(0, 37, (7,), generator=g).to(DEVICE)
    target[2] = -100
    w = torch.rand(37, generator=g).to(DEVICE) + 0.5
    out = liger.liger_cross_entropy(logits, target, w, label_smoothing=0.1, lse_square_scale=1e-3,
                                    return_z_loss=True)
    ref = F.cross_entropy(logits64, target, weight=w.double(), label_smoothing=0.1)
    keep = target != -100
    z = (torch.logsumexp(logits64[keep], -1) ** 2).mean() * 1e-3
    _close(out.loss, ref + z)
    _close(out.z_loss, z)
    out.loss.backward()
    (ref + z).backward()
    _close(logits.grad, logits64.grad)
    plain = liger.liger_cross_entropy(logits.detach(), target, reduction="sum")
    _close(plain, F.cross_entropy(logits64.detach(), target, reduction="sum"))


def test_fused_linear_cross_entropy():
    g = torch.Generator().manual_seed(2)
    x, x64 = _pair(5, 16, seed=2)
    w, w64 = _pair(29, 16, seed=3)
    b = torch.randn(29, generator=g).to(DEVICE)
    target = torch.randint(0, 29, (5,), generator=g).to(DEVICE)
    loss = liger.liger_fused_linear_cross_entropy(x, w, target, b, softcap=20.0)
    logits64 = x64 @ w64.T + b.double()
    ref = F.cross_entropy(20.0 * torch.tanh(logits64 / 20.0), target)
    _close(loss, ref)
    loss.backward()
    ref.backward()
    _close(x.grad, x64.grad)
    _close(w.grad, w64.grad)


def test_rms_norm_llama_casting_only():
    x, x64 = _pair(3, 5, 40, seed=4)
    w, w64 = _pair(40, seed=5)
    y = liger.liger_rms_norm(x, w, 1e-6, offset=1.0, in_place=False)
    ref = x64 * torch.rsqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6) * (1.0 + w64)
    _close(y, ref)
    y.sum().backward()
    ref.sum().backward()
    _close(x.grad, x64.grad, atol=1e-4)
    _close(w.grad, w64.grad, atol=1e-4)
    assert torch.equal(liger.liger_rms_norm(x.detach(), w.detach(), 1e-6, 0.0, 0), liger.liger_rms_norm(
        x.detach(), w.detach(), 1e-6))
    for mode in ("gemma", "none", 1, -1, True):
        with pytest.raises(ValueError, match="casting_mode"):
            liger.liger_rms_norm(x, w, 1e-6, casting_mode=mode)
    with pytest.raises(TypeError, match="in_place"):
        liger.liger_rms_norm(x, w, 1e-6, in_place="yes")


def test_layer_norm():
    x, x64 = _pair(4, 3, 33, seed=6)
    w, w64 = _pair(33, seed=7)
    b, b64 = _pair(33, seed=8)
    y = liger.liger_layer_norm(x, w, b, 1e-5)
    ref = F.layer_norm(x64, (33,), w64, b64, 1e-5)
    _close(y, ref)
    y.sum().backward()
    ref.sum().backward()
    _close(x.grad, x64.grad, atol=1e-4)
    with pytest.raises(TypeError, match="X must be"):
        liger.liger_layer_norm([1.0], w, b, 1e-5)


def _rotate_half(t):
    a, b = t.chunk(2, -1)
    return torch.cat((-b, a), -1)


def test_rope_hf_convention():
    q, q64 = _pair(2, 3, 7, 16, seed=9)
    k, k64 = _pair(2, 1, 7, 16, seed=10)
    pos = torch.arange(7, dtype=torch.float64, device=DEVICE)
    inv = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64, device=DEVICE) / 16)
    ang = torch.cat([torch.outer(pos, inv)] * 2, -1)[None]
    cos, sin = ang.cos(), ang.sin()
    qo, ko = liger.liger_rope(q, k, cos.float(), sin.float())
    q_ref = q64 * cos[:, None] + _rotate_half(q64) * sin[:, None]
    k_ref = k64 * cos[:, None] + _rotate_half(k64) * sin[:, None]
    _close(qo, q_ref)
    _close(ko, k_ref)
    (qo.sum() + ko.sum()).backward()
    (q_ref.sum() + k_ref.sum()).backward()
    _close(q.grad, q64.grad)
    _close(k.grad, k64.grad)


@pytest.mark.parametrize("name", ["liger_swiglu", "liger_geglu"])
def test_gated_activations(name):
    a, a64 = _pair(3, 67, seed=11)
    b, b64 = _pair(3, 67, seed=12)
    y = getattr(liger, name)(a, b)
    act = F.silu(a64) if name == "liger_swiglu" else F.gelu(a64, approximate="tanh")  # Liger's GELU is tanh
    ref = act * b64
    _close(y, ref)
    y.sum().backward()
    ref.sum().backward()
    _close(a.grad, a64.grad)
    _close(b.grad, b64.grad)


def test_softmax_last_dim():
    x, x64 = _pair(5, 3, 70, seed=13)
    y = liger.liger_softmax(x)
    ref = torch.softmax(x64, -1)
    _close(y, ref)
    g = torch.randn(5, 3, 70, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    (y * g).sum().backward()
    (ref * g.double()).sum().backward()
    _close(x.grad, x64.grad)
