"""flash-attn's full API on the Triton kernels: logit soft-capping, ALiBi, the packed functions (qkv / kv, padded
and varlen), ``return_attn_probs`` (S_dmask), ``deterministic``, and the FlashSelfAttention / FlashCrossAttention
modules, each against the float64 reference under the accuracy policy of tests/test_attention.py (the kernel's
error at most 2x the error the unfused reference makes in the same dtype, plus a small atol).

Runs on ``LLMFAST_TEST_DEVICE`` (the CPU interpreter by default): tiny shapes (S <= 70, H <= 4).
"""
from __future__ import annotations

import re

import pytest
import torch

import llmfast
import llmfast.nn
from llmfast.reference import attention as ref
from test_attention import (ATOL, BF16, DEVICE, DTYPE_IDS, F16, F32, assert_within_policy, attn_launches,
                            check_against_reference, cu_seqlens, rand)


def slopes(*shape):
    """ALiBi slopes in float32 (as flash-attn requires), large enough to matter over 70 positions."""
    return (torch.rand(*shape, device=DEVICE) * 0.3 + 0.05).float()


def capped_inputs(dtype, *shapes, gain=4.0):
    """q scaled up so that many scores exceed the soft cap (tanh's non-linear regime), then k and v."""
    q = (torch.randn(*shapes[0], device=DEVICE) * gain).to(dtype)
    return [q] + [rand(*shape, dtype=dtype) for shape in shapes[1:]]


def flash_pair(fn_name, *args, **kwargs):
    """(public, reference) callables for a flash-attn function name returning (out, lse)."""
    public, reference = getattr(llmfast, fn_name), getattr(ref, fn_name)
    return (lambda *t: public(*t, *args, return_attn_probs=True, **kwargs)[:2],
            lambda *t: reference(*t, *args, return_attn_probs=True, **kwargs)[:2])


# ------------------------------------------------------------------------------------------------- softcap

SOFTCAP_CASES = [  # (Sq, Sk, Hq, Hkv, causal, window, dtype)
    (17, 33, 2, 2, False, (-1, -1), F16),
    (33, 17, 2, 2, True, (-1, -1), BF16),    # bottom-right causal with Sq > Sk: leading rows see no key
    (7, 65, 4, 2, True, (-1, -1), F32),      # GQA
    (33, 33, 2, 1, False, (5, 3), BF16),     # MQA with a window
    (1, 19, 2, 2, False, (-1, -1), F32),
]


@pytest.mark.parametrize("seqlen_q,seqlen_k,heads_q,heads_kv,causal,window,dtype", SOFTCAP_CASES,
                         ids=lambda x: DTYPE_IDS.get(x, str(x)))
def test_softcap_flash_forward_backward_lse(seqlen_q, seqlen_k, heads_q, heads_kv, causal, window, dtype):
    q, k, v = capped_inputs(dtype, (2, seqlen_q, heads_q, 40), (2, seqlen_k, heads_kv, 40), (2, seqlen_k, heads_kv, 40))
    public, reference = flash_pair("flash_attn_func", causal=causal, window_size=window, softcap=3.0)
    check_against_reference(public, reference, [q, k, v], lse=True)


@pytest.mark.parametrize("seqlen_q,seqlen_k,dtype", [(17, 33, F16), (33, 17, F32)], ids=str)
def test_softcap_sdpa_top_left_causal(seqlen_q, seqlen_k, dtype):
    q, k, v = capped_inputs(dtype, (1, 2, seqlen_q, 32), (1, 2, seqlen_k, 32), (1, 2, seqlen_k, 32))
    check_against_reference(
        lambda q, k, v: llmfast.scaled_dot_product_attention(q, k, v, is_causal=True, softcap=2.5),
        lambda q, k, v: ref.scaled_dot_product_attention(q, k, v, is_causal=True, softcap=2.5), [q, k, v])


def test_softcap_with_additive_mask_gradient_is_taken_after_the_cap():
    # The additive mask is added after soft-capping, so its gradient is dS itself, without the tanh' factor.
    q, k, v = capped_inputs(F32, (1, 2, 17, 16), (1, 2, 23, 16), (1, 2, 23, 16))
    mask = torch.randn(17, 23, device=DEVICE).requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [mask]
    with llmfast.backend("triton"):
        out = llmfast.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], softcap=2.0)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    want = ref.scaled_dot_product_attention(*exact[:3], attn_mask=exact[3], softcap=2.0)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    grads64 = torch.autograd.grad(want, exact, dout.double())
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=2e-5, rtol=1e-4)


def test_softcap_varlen_gqa_causal():
    lengths_q, lengths_k = [5, 1, 33], [9, 17, 30]
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    q, k, v = capped_inputs(BF16, (sum(lengths_q), 4, 32), (sum(lengths_k), 2, 32), (sum(lengths_k), 2, 32))
    args = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    public, reference = flash_pair("flash_attn_varlen_func", *args, causal=True, softcap=5.0)
    check_against_reference(public, reference, [q, k, v], lse=True)


# ------------------------------------------------------------------------------------------------- ALiBi

ALIBI_CASES = [  # (Sq, Sk, Hq, Hkv, causal, window, per_batch_slopes, dtype)
    (17, 33, 2, 2, False, (-1, -1), False, F16),
    (33, 17, 2, 2, True, (-1, -1), True, F32),
    (33, 65, 4, 2, True, (-1, -1), False, BF16),
    (33, 33, 4, 1, False, (6, 2), True, F16),
]


@pytest.mark.parametrize("seqlen_q,seqlen_k,heads_q,heads_kv,causal,window,per_batch,dtype", ALIBI_CASES,
                         ids=lambda x: DTYPE_IDS.get(x, str(x)))
def test_alibi_flash_forward_backward_lse(seqlen_q, seqlen_k, heads_q, heads_kv, causal, window, per_batch, dtype):
    q, k, v = (rand(2, seqlen_q, heads_q, 32, dtype=dtype), rand(2, seqlen_k, heads_kv, 32, dtype=dtype),
               rand(2, seqlen_k, heads_kv, 32, dtype=dtype))
    alibi = slopes(2, heads_q) if per_batch else slopes(heads_q)
    public, reference = flash_pair("flash_attn_func", causal=causal, window_size=window, alibi_slopes=alibi)
    check_against_reference(public, reference, [q, k, v], lse=True)


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared", "per-batch"])
def test_alibi_softcap_varlen_window(per_batch):
    lengths_q, lengths_k = [12, 1, 20], [12, 7, 31]
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    q, k, v = capped_inputs(F16, (sum(lengths_q), 2, 40), (sum(lengths_k), 2, 40), (sum(lengths_k), 2, 40), gain=2.0)
    alibi = slopes(3, 2) if per_batch else slopes(2)
    args = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    public, reference = flash_pair("flash_attn_varlen_func", *args, window_size=[8, 4], softcap=4.0,
                                   alibi_slopes=alibi)
    check_against_reference(public, reference, [q, k, v], lse=True)


def test_softcap_alibi_dropout_matches_reference_with_the_same_seed():
    q, k, v = capped_inputs(BF16, (1, 33, 2, 32), (1, 33, 2, 32), (1, 33, 2, 32), gain=2.0)
    public, reference = flash_pair("flash_attn_func", dropout_p=0.2, causal=True, softcap=3.0, alibi_slopes=slopes(2))
    check_against_reference(public, reference, [q, k, v], seed=21, lse=True)


# ------------------------------------------------------------------------------------------------- packed

def assert_single_packed_gradient_node(out, packed):
    """The packed tensor's gradient comes from one autograd node (the packed op), not from per-part views that
    autograd would have to zero-fill and sum into it."""
    (node, _), = [(fn, i) for fn, i in out.grad_fn.next_functions if fn is not None
                  and getattr(fn, "variable", None) is packed]
    assert type(node).__name__ == "AccumulateGrad"


@pytest.mark.parametrize("causal,dtype", [(True, F16), (False, F32)], ids=["causal-fp16", "full-fp32"])
def test_qkvpacked_func(causal, dtype):
    qkv = rand(2, 33, 3, 2, 40, dtype=dtype)
    public, reference = flash_pair("flash_attn_qkvpacked_func", causal=causal, softcap=4.0 if causal else 0.0)
    check_against_reference(public, reference, [qkv], lse=True)
    leaf = qkv.clone().requires_grad_()
    with llmfast.backend("triton"):
        out = llmfast.flash_attn_qkvpacked_func(leaf, causal=causal)
    assert out.shape == (2, 33, 2, 40)
    assert_single_packed_gradient_node(out, leaf)
    out.backward(torch.randn_like(out))
    assert leaf.grad.shape == leaf.shape and leaf.grad.is_contiguous()


def test_qkvpacked_strided_view_of_a_projection():
    # (B, S, 3 * H * D) projection output viewed as (B, S, 3, H, D) and then a non-contiguous slice along S.
    proj = rand(2, 40, 3 * 2 * 16, dtype=BF16)
    qkv = proj.view(2, 40, 3, 2, 16)[:, ::2]
    assert not qkv.is_contiguous()
    public, reference = flash_pair("flash_attn_qkvpacked_func", causal=True)
    check_against_reference(public, reference, [qkv], lse=True)


@pytest.mark.parametrize("heads_kv,dtype", [(2, BF16), (1, F32)], ids=["mha-bf16", "mqa-fp32"])
def test_kvpacked_func(heads_kv, dtype):
    q, kv = rand(2, 17, 2, 32, dtype=dtype), rand(2, 33, 2, heads_kv, 32, dtype=dtype)
    public, reference = flash_pair("flash_attn_kvpacked_func", causal=True, alibi_slopes=slopes(2))
    check_against_reference(public, reference, [q, kv], lse=True)
    leaves = [q.clone().requires_grad_(), kv.clone().requires_grad_()]
    with llmfast.backend("triton"):
        out = llmfast.flash_attn_kvpacked_func(*leaves)
    assert_single_packed_gradient_node(out, leaves[1])
    out.sum().backward()
    assert leaves[1].grad.shape == kv.shape


def test_varlen_qkvpacked_func():
    lengths = [5, 1, 33, 17]
    cu = cu_seqlens(lengths)
    qkv = rand(sum(lengths), 3, 2, 32, dtype=F16)
    public, reference = flash_pair("flash_attn_varlen_qkvpacked_func", cu, max(lengths), causal=True,
                                   window_size=(9, 0))
    check_against_reference(public, reference, [qkv], lse=True)


def test_varlen_kvpacked_func():
    lengths_q, lengths_k = [3, 17, 1], [20, 17, 6]
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    q, kv = rand(sum(lengths_q), 4, 32, dtype=BF16), rand(sum(lengths_k), 2, 2, 32, dtype=BF16)
    public, reference = flash_pair("flash_attn_varlen_kvpacked_func", cu_q, cu_k, max(lengths_q), max(lengths_k),
                                   causal=True, softcap=2.0, alibi_slopes=slopes(3, 4))
    check_against_reference(public, reference, [q, kv], lse=True)


# ------------------------------------------------------------------------------------------------- S_dmask

def assert_probs_close(name, got, want64, want_lowp, atol):
    """S_dmask against the float64 probabilities: same sign pattern (dropout encoding), values under the policy."""
    assert got.shape == want64.shape and got.dtype == want_lowp.dtype, f"{name}: {got.shape} {got.dtype}"
    assert torch.equal(got < 0, want64 < 0), f"{name}: the dropped entries (negative) differ"
    assert_within_policy(name, got, want64, want_lowp, ATOL[got.dtype])


@pytest.mark.parametrize("dropout_p,dtype", [(0.0, F32), (0.3, F16)], ids=["no-dropout", "dropout"])
def test_return_attn_probs_is_the_probability_matrix(dropout_p, dtype):
    q, k, v = capped_inputs(dtype, (2, 17, 2, 16), (2, 23, 2, 16), (2, 23, 2, 16), gain=2.0)
    kwargs = dict(dropout_p=dropout_p, causal=True, softcap=3.0, alibi_slopes=slopes(2, 2))
    torch.manual_seed(3)
    with llmfast.backend("triton"):
        out, lse, s_dmask = llmfast.flash_attn_func(q, k, v, return_attn_probs=True, **kwargs)
    results = []
    for inputs in ((q, k, v), tuple(t.double() for t in (q, k, v))):
        torch.manual_seed(3)
        results.append(ref.flash_attn_func(*inputs, return_attn_probs=True, **kwargs))
    assert lse.shape == (2, 2, 17) and lse.dtype == F32
    assert_probs_close("S_dmask", s_dmask, results[1][2], results[0][2], ATOL[dtype])
    rows = s_dmask.abs().double().sum(-1)
    torch.testing.assert_close(rows, torch.where(torch.isfinite(results[1][1]), 1.0, 0.0).to(rows), atol=5e-3,
                               rtol=0)
    if dropout_p:
        dropped = (s_dmask < 0).double().mean().item()
        assert 0.1 < dropped < 0.3  # of all entries, about p of the causal band


def test_return_attn_probs_varlen_layout():
    lengths_q, lengths_k = [3, 17], [20, 9]
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    q, k, v = rand(20, 2, 16, dtype=F32), rand(29, 2, 16, dtype=F32), rand(29, 2, 16, dtype=F32)
    args = (cu_q, cu_k, 17, 20)
    with llmfast.backend("triton"):
        out, lse, s_dmask = llmfast.flash_attn_varlen_func(q, k, v, *args, causal=True, return_attn_probs=True)
    _, lse64, want = ref.flash_attn_varlen_func(q.double(), k.double(), v.double(), *args, causal=True,
                                                return_attn_probs=True)
    assert s_dmask.shape == (2, 2, 17, 20) and lse.shape == (2, 20)
    torch.testing.assert_close(s_dmask.double(), want, atol=1e-5, rtol=0)
    assert torch.all(s_dmask[0, :, 3:] == 0) and torch.all(s_dmask[1, :, :, 9:] == 0)


# ------------------------------------------------------------------------------------------------- deterministic

def test_deterministic_backward_is_bit_for_bit_reproducible():
    lengths = [7, 33, 20]
    cu = cu_seqlens(lengths)
    q, kv = rand(sum(lengths), 4, 32, dtype=BF16), rand(sum(lengths), 2, 1, 32, dtype=BF16)
    upstream = rand(sum(lengths), 4, 32, dtype=BF16)
    alibi = slopes(4)
    results = []
    with llmfast.backend("triton"):
        for _ in range(2):
            leaves = [q.clone().requires_grad_(), kv.clone().requires_grad_()]
            out = llmfast.flash_attn_varlen_kvpacked_func(*leaves, cu, cu, 33, 33, causal=True, softcap=3.0,
                                                          alibi_slopes=alibi, deterministic=True)
            results.append((out,) + torch.autograd.grad(out, leaves, upstream))
    for first, second in zip(*results):
        assert torch.equal(first, second)


# ------------------------------------------------------------------------------------------------- modules

def test_flash_self_attention_module_padded_and_varlen():
    module = llmfast.nn.FlashSelfAttention(causal=True, alibi_slopes=slopes(2))
    qkv = rand(2, 17, 3, 2, 16, dtype=F16)
    with llmfast.backend("triton"):
        out = module(qkv)
        full = module(qkv, causal=False)
    want = ref.flash_attn_qkvpacked_func(qkv.double(), causal=True, alibi_slopes=module.alibi_slopes)
    assert_within_policy("out", out, want, ref.flash_attn_qkvpacked_func(qkv, causal=True,
                                                                       alibi_slopes=module.alibi_slopes), ATOL[F16])
    assert not torch.equal(out, full)
    cu = cu_seqlens([17, 17])
    with llmfast.backend("triton"):
        packed = module(qkv.reshape(34, 3, 2, 16), cu_seqlens=cu, max_seqlen=17)
    torch.testing.assert_close(packed.reshape(2, 17, 2, 16), out, atol=2e-3, rtol=0)
    assert "alibi_slopes" not in module.state_dict()


def test_flash_cross_attention_module():
    module = llmfast.nn.FlashCrossAttention(softmax_scale=0.3, window_size=[4, 4])
    q, kv = rand(1, 17, 4, 16, dtype=BF16), rand(1, 23, 2, 2, 16, dtype=BF16)
    with llmfast.backend("triton"):
        out = module(q, kv)
        causal = module(q, kv, causal=True)
    want = ref.flash_attn_kvpacked_func(q.double(), kv.double(), softmax_scale=0.3, window_size=(4, 4))
    assert_within_policy("out", out, want, ref.flash_attn_kvpacked_func(q, kv, softmax_scale=0.3, window_size=(4, 4)),
                         ATOL[BF16])
    assert not torch.equal(out, causal)
    cu_q, cu_k = cu_seqlens([17]), cu_seqlens([23])
    with llmfast.backend("triton"):
        varlen = module(q[0], kv[0], cu_seqlens=cu_q, max_seqlen=17, cu_seqlens_k=cu_k, max_seqlen_k=23)
    torch.testing.assert_close(varlen, out[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        module(q[0], kv[0], cu_seqlens=cu_q, max_seqlen=17)


def test_module_dropout_only_in_training():
    module = llmfast.nn.FlashSelfAttention(attention_dropout=0.5)
    qkv = rand(1, 17, 3, 2, 16, dtype=F32)
    with llmfast.backend("triton"):
        module.eval()
        first, second = module(qkv), module(qkv)
        module.train()
        dropped = module(qkv)
    assert torch.equal(first, second) and not torch.equal(first, dropped)


# ------------------------------------------------------------------------------------------------- other backends

@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("api", ["softcap-alibi", "qkvpacked-probs", "varlen-kvpacked"])
def test_reference_and_auto_backends(backend, api):
    if backend == "auto" and DEVICE.type == "cuda":
        pytest.skip("auto means the Triton kernels on CUDA, covered above")
    if api == "softcap-alibi":
        inputs = capped_inputs(F32, (2, 17, 2, 16), (2, 33, 2, 16), (2, 33, 2, 16))
        public, reference = flash_pair("flash_attn_func", causal=True, softcap=3.0, alibi_slopes=slopes(2, 2))
    elif api == "qkvpacked-probs":
        inputs = [rand(1, 17, 3, 2, 16, dtype=F32)]
        public, reference = (lambda qkv: llmfast.flash_attn_qkvpacked_func(qkv, return_attn_probs=True)[::2],
                             lambda qkv: ref.flash_attn_qkvpacked_func(qkv, return_attn_probs=True)[::2])
    else:
        cu_q, cu_k = cu_seqlens([3, 14]), cu_seqlens([5, 12])
        inputs = [rand(17, 2, 16, dtype=F32), rand(17, 2, 2, 16, dtype=F32)]
        public, reference = flash_pair("flash_attn_varlen_kvpacked_func", cu_q, cu_k, 14, 12, softcap=2.0,
                                       window_size=(3, 3), alibi_slopes=slopes(2))
    leaves = [t.clone().requires_grad_() for t in inputs]
    launches = attn_launches()
    with llmfast.backend(backend):
        got = public(*leaves)
    assert attn_launches() == launches, f"backend {backend!r} on {DEVICE.type} must not launch Triton kernels"
    exact = [t.double().requires_grad_() for t in inputs]
    lowp = [t.clone().requires_grad_() for t in inputs]
    want, want_lowp = reference(*exact), reference(*lowp)
    for name, g, w, wl in zip(("out", "second"), got, want, want_lowp):
        assert_within_policy(name, g.detach(), w.detach(), wl.detach(), ATOL[F32])
    dout = torch.randn_like(got[0])
    for g, w, wl in zip(torch.autograd.grad(got[0], leaves, dout), torch.autograd.grad(want[0], exact, dout.double()),
                        torch.autograd.grad(want_lowp[0], lowp, dout)):
        assert_within_policy("grad", g, w, wl, ATOL[F32])


# ------------------------------------------------------------------------------------------------- torch.compile

def test_custom_ops_pass_opcheck():
    qkv = torch.randn(1, 17, 3, 2, 16, requires_grad=True)
    problem = (None, None, 0, 0, "bshd", 0.25, -1, 0, True, 0.0, None, 2.0, torch.rand(2))
    torch.library.opcheck(torch.ops.llmfast.flash_attention_packed_forward.default, (qkv, None) + problem,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    q, k = qkv[:, :, 0].detach(), qkv[:, :, 1].detach()
    lse = torch.randn(1, 2, 17)
    torch.library.opcheck(torch.ops.llmfast.flash_attention_probs.default, (q, k, lse) + problem,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_packed_softcap():
    def f(qkv):
        out, lse, _ = llmfast.flash_attn_qkvpacked_func(qkv, causal=True, softcap=3.0, return_attn_probs=True)
        return out, lse

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    qkv = torch.randn(1, 20, 3, 2, 16)
    with llmfast.backend("triton"):
        out, lse = compiled(qkv)
        want_out, want_lse = f(qkv)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


# ------------------------------------------------------------------------------------------------- bad input

def _t(*shape, dtype=F16):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _call(fn_name, *args, **kwargs):
    return lambda: getattr(llmfast, fn_name)(*args, **kwargs)


_Q, _K = _t(1, 5, 2, 16), _t(1, 7, 2, 16)
_CU = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
BAD_INPUTS = {  # id: (call, expected exception types, argument name that the message must contain)
    "softcap-negative": (_call("flash_attn_func", _Q, _K, _K, softcap=-1.0), (ValueError,), "softcap"),
    "softcap-bool": (_call("flash_attn_func", _Q, _K, _K, softcap=True), (TypeError,), "softcap"),
    "softcap-inf": (_call("flash_attn_func", _Q, _K, _K, softcap=float("inf")), (ValueError,), "softcap"),
    "sdpa-softcap-str": (_call("scaled_dot_product_attention", _t(1, 2, 5, 16), _t(1, 2, 7, 16), _t(1, 2, 7, 16),
                               softcap="3"), (TypeError,), "softcap"),
    "alibi-fp16": (_call("flash_attn_func", _Q, _K, _K, alibi_slopes=torch.ones(2, dtype=F16, device=DEVICE)),
                   (TypeError,), "alibi_slopes"),
    "alibi-shape": (_call("flash_attn_func", _Q, _K, _K, alibi_slopes=torch.ones(3, device=DEVICE)), (ValueError,),
                    "alibi_slopes"),
    "alibi-batch-shape": (_call("flash_attn_func", _Q, _K, _K, alibi_slopes=torch.ones(2, 2, device=DEVICE)),
                          (ValueError,), "alibi_slopes"),
    "alibi-list": (_call("flash_attn_func", _Q, _K, _K, alibi_slopes=[0.1, 0.2]), (TypeError,), "alibi_slopes"),
    "window-tensor": (_call("flash_attn_func", _Q, _K, _K, window_size=torch.tensor([2, 2])), (ValueError,),
                      "window_size"),
    "window-int": (_call("flash_attn_func", _Q, _K, _K, window_size=3), (ValueError,), "window_size"),
    "deterministic-int": (_call("flash_attn_func", _Q, _K, _K, deterministic=1), (TypeError,), "deterministic"),
    "qkv-four-parts": (_call("flash_attn_qkvpacked_func", _t(1, 5, 4, 2, 16)), (ValueError,), "qkv"),
    "qkv-rank": (_call("flash_attn_qkvpacked_func", _t(5, 3, 2, 16)), (ValueError,), "qkv"),
    "kv-three-parts": (_call("flash_attn_kvpacked_func", _Q, _t(1, 7, 3, 2, 16)), (ValueError,), "kv"),
    "kv-head-dim": (_call("flash_attn_kvpacked_func", _Q, _t(1, 7, 2, 2, 8)), (ValueError,), "kv"),
    "kv-batch": (_call("flash_attn_kvpacked_func", _Q, _t(2, 7, 2, 2, 16)), (ValueError,), "kv"),
    "varlen-qkv-cu": (_call("flash_attn_varlen_qkvpacked_func", _t(7, 3, 2, 16), _CU.float(), 4), (TypeError,),
                      "cu_seqlens"),
    "varlen-qkv-max": (_call("flash_attn_varlen_qkvpacked_func", _t(7, 3, 2, 16), _CU, 2), (ValueError,),
                       "max_seqlen"),
    "varlen-kv-total": (_call("flash_attn_varlen_kvpacked_func", _t(7, 2, 16), _t(6, 2, 2, 16), _CU, _CU, 4, 4),
                        (ValueError,), "cu_seqlens_k"),
    "varlen-block-table": (_call("flash_attn_varlen_func", _t(7, 2, 16), _t(7, 2, 16), _t(7, 2, 16), _CU, _CU, 4, 4,
                                 block_table=torch.zeros(2, 1, dtype=torch.int32)), (ValueError,), "block_table"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case):
    call, errors, argument = BAD_INPUTS[case]
    with llmfast.backend("triton"):
        with pytest.raises(errors) as info:
            call()
    assert re.search(rf"\b{re.escape(argument)}", str(info.value)), \
        f"message does not name {argument!r}: {info.value}"


def test_window_size_accepts_a_list():
    q, k, v = rand(1, 17, 2, 16, dtype=F32), rand(1, 17, 2, 16, dtype=F32), rand(1, 17, 2, 16, dtype=F32)
    with llmfast.backend("triton"):
        as_list = llmfast.flash_attn_func(q, k, v, window_size=[3, 1])
        as_tuple = llmfast.flash_attn_func(q, k, v, window_size=(3, 1))
    assert torch.equal(as_list, as_tuple)
