"""The Triton attention path (backend "triton") against the float64 reference.

Accuracy policy (flash-attn's): with ``ref64`` the reference in float64 and ``ref_lowp`` the reference run in the
tested dtype (unfused math, rounding where an unfused model rounds), every output, LSE and gradient must satisfy
``|triton - ref64|.max() <= 2 * |ref_lowp - ref64|.max() + atol``. Every Triton test also checks that an attention
kernel really launched, so a silent fallback to torch cannot pass.

Runs on ``LLMFAST_TEST_DEVICE`` (``cpu`` by default, through the Triton interpreter; ``cuda`` on a GPU machine).
Shapes stay tiny (B <= 2, H <= 4, S <= 70) because the interpreter is slow.
"""
from __future__ import annotations

import itertools
import math
import os
import re

import pytest
import torch

import llmfast
from llmfast.reference import attention as ref

DEVICE = torch.device(os.environ.get("LLMFAST_TEST_DEVICE", "cpu"))
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ATOL = {F16: 1e-3, BF16: 2e-3, F32: 1e-5}
DTYPE_IDS = {F16: "fp16", BF16: "bf16", F32: "fp32"}


# ------------------------------------------------------------------------------------------------- helpers

def attn_launches() -> int:
    """Launches of the attention kernels proper (not the stand-alone dropout-mask kernel)."""
    return sum(n for name, n in llmfast.kernel_launch_counts().items()
               if ("attn" in name or "attention" in name) and "dropout_mask" not in name)


def rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


def assert_within_policy(name, got, ref64, ref_lowp, atol):
    """flash-attn's accuracy policy; NaN anywhere fails."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the Triton result"
    finite = torch.isfinite(ref64)
    # Where the truth is infinite (the LSE of a fully masked row is -inf) the result must match it exactly.
    assert torch.equal(got.double()[~finite], ref64[~finite]), f"{name}: non-finite entries differ"
    got, ref64, ref_lowp = got.double()[finite], ref64[finite], ref_lowp.double()[finite]
    if got.numel() == 0:
        return
    err = (got - ref64).abs().max().item()
    bound = 2 * (ref_lowp - ref64).abs().max().item() + atol
    assert err <= bound, f"{name}: max error {err:.3g} exceeds 2 x reference error + atol = {bound:.3g}"


def check_against_reference(public_call, reference_call, inputs, *, backward=True, lse=False, seed=None):
    """Run ``public_call`` on backend "triton" and ``reference_call`` in float64 and in the inputs' dtype, then
    compare the outputs (and the LSE, and the gradients for a random upstream gradient) under the policy.

    Both calls take the input tensors and return ``out`` or ``(out, lse, ...)``. With ``seed`` set the RNG is
    reseeded before each forward so dropout draws the same seed in all three runs.
    """
    dtype = inputs[0].dtype
    atol = ATOL[dtype]

    def forward(call, tensors):
        if seed is not None:
            torch.manual_seed(seed)
        result = call(*tensors)
        return (result[0], result[1]) if isinstance(result, tuple) else (result, None)

    leaves = [t.detach().clone().requires_grad_(backward) for t in inputs]
    lowp = [t.detach().clone().requires_grad_(backward) for t in inputs]
    exact = [t.detach().to(F64).requires_grad_(backward) for t in inputs]
    launches = attn_launches()
    with llmfast.backend("triton"):
        out, out_lse = forward(public_call, leaves)
    assert attn_launches() > launches, "no attention kernel launched: the Triton path did not run"
    ref_lowp, lse_lowp = forward(reference_call, lowp)
    ref64, lse64 = forward(reference_call, exact)

    assert out.dtype == dtype
    assert_within_policy("out", out, ref64, ref_lowp, atol)
    if lse:
        assert out_lse is not None and out_lse.dtype == F32, "softmax_lse must be float32"
        assert_within_policy("lse", out_lse, lse64, lse_lowp, atol)
    if not backward:
        return
    dout = torch.randn_like(out, dtype=F32).to(dtype)
    launches = attn_launches()
    with llmfast.backend("triton"):
        grads = torch.autograd.grad(out, leaves, dout)
    assert attn_launches() > launches, "no attention kernel launched in the backward pass"
    grads_lowp = torch.autograd.grad(ref_lowp, lowp, dout)
    grads64 = torch.autograd.grad(ref64, exact, dout.to(F64))
    for name, g, g_lowp, g64 in zip("qkv", grads, grads_lowp, grads64):
        assert g.dtype == dtype and torch.isfinite(g).all(), f"d{name} has NaN/inf"
        assert_within_policy(f"d{name}", g, g64, g_lowp, atol)


def sdpa_calls(**kwargs):
    """(public, reference) callables for SDPA with fixed keyword arguments."""
    return (lambda q, k, v: llmfast.scaled_dot_product_attention(q, k, v, **kwargs),
            lambda q, k, v: ref.scaled_dot_product_attention(q, k, v, **kwargs))


def flash_calls(**kwargs):
    """(public, reference) callables for flash_attn_func returning (out, lse, probs)."""
    return (lambda q, k, v: llmfast.flash_attn_func(q, k, v, return_attn_probs=True, **kwargs),
            lambda q, k, v: ref.flash_attn_func(q, k, v, return_attn_probs=True, **kwargs))


def cu_seqlens(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


# ------------------------------------------------------------------------------------------------- flash: seqlens

FLASH_SEQLENS = [(1, 1), (1, 33), (7, 7), (17, 33), (33, 17), (65, 65), (65, 7), (7, 65)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", FLASH_SEQLENS)
def test_flash_seqlens_forward_backward_lse(seqlen_q, seqlen_k, causal):
    # Cycle the dtypes over the cases so each dtype meets short, long, Sq<Sk and Sq>Sk shapes.
    index = FLASH_SEQLENS.index((seqlen_q, seqlen_k)) * 2 + causal
    dtype = (F16, BF16, F32)[index % 3]
    batch = 2 if seqlen_q * seqlen_k < 1000 else 1
    q, k, v = rand(batch, seqlen_q, 2, 40, dtype=dtype), rand(batch, seqlen_k, 2, 40, dtype=dtype), \
        rand(batch, seqlen_k, 2, 40, dtype=dtype)
    public, reference = flash_calls(causal=causal)
    check_against_reference(public, reference, [q, k, v], lse=True)


# ------------------------------------------------------------------------------------------------- head dims

HEAD_DIMS = [8, 40, 80, 96, 200, 256]


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_flash_head_dims_forward(head_dim, dtype):
    q, k, v = rand(1, 17, 2, head_dim, dtype=dtype), rand(1, 33, 2, head_dim, dtype=dtype), \
        rand(1, 33, 2, head_dim, dtype=dtype)
    public, reference = flash_calls(causal=head_dim % 16 == 0)
    check_against_reference(public, reference, [q, k, v], backward=False, lse=True)


@pytest.mark.parametrize("head_dim,dtype", [(8, BF16), (40, F32), (80, F16), (96, BF16), (200, F16), (256, BF16)],
                         ids=lambda x: DTYPE_IDS.get(x, str(x)))
def test_flash_head_dims_backward(head_dim, dtype):
    q, k, v = rand(1, 17, 2, head_dim, dtype=dtype), rand(1, 33, 2, head_dim, dtype=dtype), \
        rand(1, 33, 2, head_dim, dtype=dtype)
    public, reference = flash_calls(causal=True)
    check_against_reference(public, reference, [q, k, v], lse=True)


# ------------------------------------------------------------------------------------------------- SDPA

SDPA_CASES = [  # (Sq, Sk, D, is_causal, dtype, scale)
    (7, 17, 40, True, F16, None),
    (17, 7, 40, True, BF16, None),
    (33, 33, 64, True, F32, 0.2),
    (65, 1, 8, False, F16, None),
    (1, 65, 96, True, BF16, None),   # top-left causal with one query: it sees key 0 only
    (33, 33, 80, False, BF16, 1.3),
]


@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim,is_causal,dtype,scale", SDPA_CASES,
                         ids=lambda x: DTYPE_IDS.get(x, str(x)))
def test_sdpa_forward_backward_top_left_causal(seqlen_q, seqlen_k, head_dim, is_causal, dtype, scale):
    q = rand(2, 2, seqlen_q, head_dim, dtype=dtype)
    k, v = rand(2, 2, seqlen_k, head_dim, dtype=dtype), rand(2, 2, seqlen_k, head_dim, dtype=dtype)
    public, reference = sdpa_calls(is_causal=is_causal, scale=scale)
    check_against_reference(public, reference, [q, k, v])


def test_sdpa_strided_inputs_from_bshd_layout():
    # The usual model layout: (B, S, H, D) projections viewed as (B, H, S, D) without a copy.
    q, k, v = (rand(2, 33, 3, 40, dtype=F16).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    public, reference = sdpa_calls(is_causal=True)
    check_against_reference(public, reference, [q, k, v])


# ------------------------------------------------------------------------------------------------- windows

WINDOWS = [((3, -1), False), ((-1, 2), False), ((4, 5), False), ((0, 0), False), ((5, -1), True)]


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 33), (33, 17)])
@pytest.mark.parametrize("window,causal", WINDOWS, ids=lambda x: str(x))
def test_flash_sliding_window(window, causal, seqlen_q, seqlen_k):
    # With Sq > Sk and window (0, 0) the first Sq - Sk queries see no key: output 0, LSE -inf, finite grads.
    dtype = (F16, BF16, F32)[(WINDOWS.index((window, causal)) + seqlen_q) % 3]
    q, k, v = rand(1, seqlen_q, 2, 32, dtype=dtype), rand(1, seqlen_k, 2, 32, dtype=dtype), \
        rand(1, seqlen_k, 2, 32, dtype=dtype)
    public, reference = flash_calls(causal=causal, window_size=window)
    check_against_reference(public, reference, [q, k, v], lse=True)


# ------------------------------------------------------------------------------------------------- GQA / MQA

@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_sdpa_enable_gqa(kv_heads):
    q = rand(2, 4, 17, 40, dtype=BF16)
    k, v = rand(2, kv_heads, 33, 40, dtype=BF16), rand(2, kv_heads, 33, 40, dtype=BF16)
    public, reference = sdpa_calls(is_causal=True, enable_gqa=True)
    check_against_reference(public, reference, [q, k, v])


@pytest.mark.parametrize("kv_heads,causal,window", [(2, True, (-1, -1)), (1, False, (8, 0))], ids=["gqa", "mqa"])
def test_flash_fewer_kv_heads(kv_heads, causal, window):
    q = rand(1, 33, 4, 64, dtype=F16)
    k, v = rand(1, 65, kv_heads, 64, dtype=F16), rand(1, 65, kv_heads, 64, dtype=F16)
    public, reference = flash_calls(causal=causal, window_size=window)
    check_against_reference(public, reference, [q, k, v], lse=True)


# ------------------------------------------------------------------------------------------------- masks

def make_mask(kind, shape, dtype):
    """A random mask of ``shape`` with some rows (or a whole head) fully masked."""
    allowed = torch.rand(shape, device=DEVICE) > 0.3
    if len(shape) == 4 and shape[1] > 1:
        allowed[0, 1] = False          # every query row of head 1 is fully masked
    else:
        allowed[..., 2, :] = False     # query row 2 is fully masked
    if kind == "bool":
        return allowed
    bias = torch.randn(shape, device=DEVICE).to(dtype)
    return bias.masked_fill(~allowed, float("-inf"))


MASK_SHAPES = {"b1qk": lambda b, h, sq, sk: (b, 1, sq, sk), "1h1k": lambda b, h, sq, sk: (1, h, 1, sk),
               "qk": lambda b, h, sq, sk: (sq, sk)}


@pytest.mark.parametrize("shape_id", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_sdpa_masks_broadcast_and_fully_masked_rows(kind, shape_id):
    dtype = {"bool": F16, "additive": BF16}[kind] if shape_id != "qk" else F32
    seqlen_q, seqlen_k = (17, 33) if shape_id != "1h1k" else (33, 17)
    q = rand(2, 3, seqlen_q, 40, dtype=dtype)
    k, v = rand(2, 3, seqlen_k, 40, dtype=dtype), rand(2, 3, seqlen_k, 40, dtype=dtype)
    mask_shape = MASK_SHAPES[shape_id](2, 3, seqlen_q, seqlen_k)
    mask = make_mask(kind, mask_shape, dtype)  # a (1, H, 1, Sk) mask can only empty whole heads
    public, reference = sdpa_calls(attn_mask=mask)
    check_against_reference(public, reference, [q, k, v])
    with llmfast.backend("triton"):
        out = llmfast.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    empty_rows = ~(mask if kind == "bool" else torch.isfinite(mask)).expand(2, 3, seqlen_q, seqlen_k).any(-1)
    assert empty_rows.any() and torch.all(out[empty_rows] == 0)


def test_sdpa_mask_with_is_causal_is_rejected_or_means_both():
    q, k, v = (rand(1, 2, 17, 32, dtype=F16) for _ in range(3))
    mask = torch.rand(17, 17, device=DEVICE) > 0.3
    with llmfast.backend("triton"):
        try:
            out = llmfast.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
        except ValueError as err:  # torch's documented behaviour: the two may not be combined
            assert "attn_mask" in str(err) and "is_causal" in str(err)
            return
    combined = mask & ref.causal_mask(17, 17, device=DEVICE)
    want = ref.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=combined)
    lowp = ref.scaled_dot_product_attention(q, k, v, attn_mask=combined)
    assert_within_policy("out", out, want, lowp, ATOL[F16])


# ------------------------------------------------------------------------------------------------- varlen

VARLEN_CASES = [  # (lengths_q, lengths_k, heads_q, heads_kv, causal, window, dtype)
    ([1, 17, 33, 5], [1, 17, 40, 9], 2, 2, False, (-1, -1), F16),
    ([9, 1, 30], [20, 3, 30], 4, 2, True, (-1, -1), BF16),
    ([12, 33], [12, 25], 2, 1, False, (4, 2), F32),
]


@pytest.mark.parametrize("lengths_q,lengths_k,heads_q,heads_kv,causal,window,dtype", VARLEN_CASES,
                         ids=["full", "causal-gqa", "window-mqa"])
def test_flash_varlen(lengths_q, lengths_k, heads_q, heads_kv, causal, window, dtype):
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    q = rand(sum(lengths_q), heads_q, 40, dtype=dtype)
    k, v = rand(sum(lengths_k), heads_kv, 40, dtype=dtype), rand(sum(lengths_k), heads_kv, 40, dtype=dtype)
    args = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    check_against_reference(
        lambda q, k, v: llmfast.flash_attn_varlen_func(q, k, v, *args, causal=causal, window_size=window),
        lambda q, k, v: ref.flash_attn_varlen_func(q, k, v, *args, causal=causal, window_size=window),
        [q, k, v])


# ------------------------------------------------------------------------------------------------- dropout

def test_dropout_mask_kernel_matches_reference_philox():
    from llmfast.ops.attention import dropout_keep_mask
    got = dropout_keep_mask(20240607, 0.3, 2, 3, 17, 33, DEVICE)
    want = ref.dropout_keep_mask(20240607, 0.3, 2, 3, 17, 33, DEVICE)
    assert got.dtype == torch.bool and torch.equal(got, want)


def test_dropout_same_seed_same_output_other_seed_differs():
    q, k, v = (rand(1, 2, 33, 32, dtype=F16) for _ in range(3))
    with llmfast.backend("triton"):
        torch.manual_seed(5)
        first = llmfast.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        torch.manual_seed(5)
        again = llmfast.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        other = llmfast.scaled_dot_product_attention(q, k, v, dropout_p=0.3)  # the RNG moved on: a new seed
        plain = llmfast.scaled_dot_product_attention(q, k, v)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, plain)


@pytest.mark.parametrize("api", ["sdpa-causal", "flash-window", "flash-gqa"])
def test_dropout_matches_reference_with_the_same_seed(api):
    if api == "sdpa-causal":
        q, k, v = (rand(2, 2, 33, 40, dtype=F16) for _ in range(3))
        public, reference = sdpa_calls(dropout_p=0.25, is_causal=True)
        check_against_reference(public, reference, [q, k, v], seed=11)
    elif api == "flash-window":
        q, k, v = rand(1, 17, 2, 40, dtype=BF16), rand(1, 33, 2, 40, dtype=BF16), rand(1, 33, 2, 40, dtype=BF16)
        public, reference = flash_calls(dropout_p=0.4, window_size=(6, 3))
        check_against_reference(public, reference, [q, k, v], seed=12, lse=True)
    else:
        q, k, v = rand(1, 33, 4, 32, dtype=F32), rand(1, 33, 2, 32, dtype=F32), rand(1, 33, 2, 32, dtype=F32)
        public, reference = flash_calls(dropout_p=0.1, causal=True)
        check_against_reference(public, reference, [q, k, v], seed=13, lse=True)


def test_varlen_dropout_matches_reference_with_the_same_seed():
    lengths = [5, 1, 33]
    cu = cu_seqlens(lengths)
    q, k, v = (rand(sum(lengths), 2, 32, dtype=F16) for _ in range(3))
    args = (cu, cu, max(lengths), max(lengths), 0.3)
    check_against_reference(lambda q, k, v: llmfast.flash_attn_varlen_func(q, k, v, *args, causal=True),
                            lambda q, k, v: ref.flash_attn_varlen_func(q, k, v, *args, causal=True),
                            [q, k, v], seed=14)


# ------------------------------------------------------------------------------------------------- torch.compile

def test_torch_compile_fullgraph_has_no_graph_breaks():
    class CausalSelfAttention(torch.nn.Module):
        def forward(self, q, k, v):
            return llmfast.scaled_dot_product_attention(q, k, v, is_causal=True)

    compile_backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"  # CPU inductor would need a compiler
    torch._dynamo.reset()
    compiled = torch.compile(CausalSelfAttention(), fullgraph=True, backend=compile_backend)
    q, k, v = (rand(1, 2, 17, 32, dtype=F16).requires_grad_() for _ in range(3))
    launches = attn_launches()
    with llmfast.backend("triton"):
        out = compiled(q, k, v)
        out.backward(torch.ones_like(out))
    assert attn_launches() > launches
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lowp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want, want_lowp = (ref.scaled_dot_product_attention(*ts, is_causal=True) for ts in (exact, lowp))
    assert_within_policy("out", out.detach(), want.detach(), want_lowp.detach(), ATOL[F16])
    want.backward(torch.ones_like(want))
    want_lowp.backward(torch.ones_like(want_lowp))
    for t, t64, tl in zip((q, k, v), exact, lowp):
        assert_within_policy("grad", t.grad, t64.grad, tl.grad, ATOL[F16])


# ------------------------------------------------------------------------------------------------- bad input

def _t(*shape, dtype=F16):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _sdpa(**overrides):
    args = dict(query=_t(1, 2, 5, 16), key=_t(1, 2, 7, 16), value=_t(1, 2, 7, 16))
    args.update(overrides)
    return lambda: llmfast.scaled_dot_product_attention(**args)


def _flash(**overrides):
    args = dict(q=_t(1, 5, 2, 16), k=_t(1, 7, 2, 16), v=_t(1, 7, 2, 16))
    args.update(overrides)
    return lambda: llmfast.flash_attn_func(**args)


def _varlen(**overrides):
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
    args = dict(q=_t(7, 2, 16), k=_t(7, 2, 16), v=_t(7, 2, 16), cu_seqlens_q=cu, cu_seqlens_k=cu,
                max_seqlen_q=4, max_seqlen_k=4)
    args.update(overrides)
    return lambda: llmfast.flash_attn_varlen_func(**args)


BAD_INPUTS = {  # id: (call, expected exception types, argument name that the message must contain)
    "sdpa-dtype-mismatch": (_sdpa(key=_t(1, 2, 7, 16, dtype=F32)), (TypeError, ValueError), "key"),
    "sdpa-not-a-tensor": (_sdpa(query=[[1.0]]), (TypeError,), "query"),
    "sdpa-int-dtype": (_sdpa(query=torch.ones(1, 2, 5, 16, dtype=torch.int32, device=DEVICE)), (TypeError,),
                       "query"),
    "sdpa-rank": (_sdpa(query=_t(2, 5, 16)), (ValueError,), "query"),
    "sdpa-heads-without-gqa": (_sdpa(key=_t(1, 1, 7, 16), value=_t(1, 1, 7, 16)), (ValueError,), "enable_gqa"),
    "sdpa-gqa-heads-not-dividing": (_sdpa(query=_t(1, 3, 5, 16), enable_gqa=True), (ValueError,), "key"),
    "sdpa-head-dim-512": (_sdpa(query=_t(1, 2, 5, 512), key=_t(1, 2, 7, 512), value=_t(1, 2, 7, 512)),
                          (ValueError,), "query"),
    "sdpa-kv-length-mismatch": (_sdpa(value=_t(1, 2, 6, 16)), (ValueError,), "value"),
    "sdpa-mask-shape": (_sdpa(attn_mask=torch.ones(3, 7, dtype=torch.bool, device=DEVICE)), (ValueError,),
                        "attn_mask"),
    "sdpa-mask-dtype": (_sdpa(attn_mask=torch.ones(5, 7, dtype=torch.int64, device=DEVICE)), (TypeError,),
                        "attn_mask"),
    "sdpa-dropout-1.5": (_sdpa(dropout_p=1.5), (ValueError,), "dropout_p"),
    "sdpa-dropout-negative": (_sdpa(dropout_p=-0.1), (ValueError,), "dropout_p"),
    "flash-heads-not-dividing": (_flash(q=_t(1, 5, 3, 16)), (ValueError,), "k"),
    "flash-rank": (_flash(q=_t(5, 2, 16)), (ValueError,), "q"),
    "flash-head-dim-512": (_flash(q=_t(1, 5, 2, 512), k=_t(1, 7, 2, 512), v=_t(1, 7, 2, 512)), (ValueError,),
                           "q"),
    "flash-dtype-mismatch": (_flash(v=_t(1, 7, 2, 16, dtype=BF16)), (TypeError, ValueError), "v"),
    "flash-window-below-minus-one": (_flash(window_size=(-2, 0)), (ValueError,), "window_size"),
    "flash-window-three-values": (_flash(window_size=(1, 2, 3)), (ValueError, TypeError), "window_size"),
    "flash-window-floats": (_flash(window_size=(1.5, 2)), (ValueError, TypeError), "window_size"),
    "flash-dropout-1.5": (_flash(dropout_p=1.5), (ValueError,), "dropout_p"),
    "varlen-cu-dtype": (_varlen(cu_seqlens_q=torch.tensor([0.0, 3.0, 7.0], device=DEVICE)), (TypeError,),
                        "cu_seqlens_q"),
    "varlen-cu-rank": (_varlen(cu_seqlens_k=torch.tensor([[0, 3, 7]], dtype=torch.int32, device=DEVICE)),
                       (ValueError,), "cu_seqlens_k"),
    "varlen-cu-decreasing": (_varlen(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32, device=DEVICE)),
                             (ValueError,), "cu_seqlens_q"),
    "varlen-cu-past-the-end": (_varlen(cu_seqlens_k=torch.tensor([0, 3, 9], dtype=torch.int32, device=DEVICE),
                                       max_seqlen_k=6), (ValueError,), "cu_seqlens_k"),
    "varlen-cu-lengths-differ": (_varlen(cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32, device=DEVICE),
                                         max_seqlen_k=7), (ValueError,), "cu_seqlens"),
    "varlen-rank": (_varlen(q=_t(1, 7, 2, 16)), (ValueError,), "q"),
    "varlen-window": (_varlen(window_size=(0, -3)), (ValueError,), "window_size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case):
    call, errors, argument = BAD_INPUTS[case]
    with llmfast.backend("triton"):
        with pytest.raises(errors) as info:
            call()
    assert re.search(rf"\b{re.escape(argument)}", str(info.value)), \
        f"message does not name {argument!r}: {info.value}"


# ------------------------------------------------------------------------------------------------- other backends

@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("api", ["sdpa", "flash", "varlen"])
def test_reference_and_auto_backends_match_the_reference(backend, api):
    if backend == "auto" and DEVICE.type == "cuda":
        pytest.skip("auto means the Triton kernels on CUDA, covered above")
    dtype = F32 if api == "sdpa" else BF16
    if api == "sdpa":
        q, k, v = rand(2, 4, 17, 40, dtype=dtype), rand(2, 2, 33, 40, dtype=dtype), rand(2, 2, 33, 40, dtype=dtype)
        mask = torch.rand(2, 1, 17, 33, device=DEVICE) > 0.2

        def public(q, k, v):
            return llmfast.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)

        def reference(q, k, v):
            return ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)
    elif api == "flash":
        q, k, v = rand(2, 33, 2, 40, dtype=dtype), rand(2, 17, 2, 40, dtype=dtype), rand(2, 17, 2, 40, dtype=dtype)

        def public(q, k, v):
            return llmfast.flash_attn_func(q, k, v, causal=True, window_size=(5, -1), return_attn_probs=True)[:2]

        def reference(q, k, v):
            return ref.flash_attn_func(q, k, v, causal=True, window_size=(5, -1), return_attn_probs=True)[:2]
    else:
        cu_q, cu_k = cu_seqlens([3, 1, 17]), cu_seqlens([5, 1, 12])
        q, k, v = rand(21, 2, 40, dtype=dtype), rand(18, 2, 40, dtype=dtype), rand(18, 2, 40, dtype=dtype)

        def public(q, k, v):
            return llmfast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 12, causal=True)

        def reference(q, k, v):
            return ref.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 12, causal=True)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    launches = attn_launches()
    with llmfast.backend(backend):
        result = public(*leaves)
    assert attn_launches() == launches, f"backend {backend!r} on {DEVICE.type} must not launch Triton kernels"
    out = result[0] if isinstance(result, tuple) else result
    lowp = [t.clone().requires_grad_() for t in (q, k, v)]
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    want_lowp, want = reference(*lowp), reference(*exact)
    if isinstance(want, tuple):
        assert_within_policy("lse", result[1], want[1].detach(), want_lowp[1].detach(), ATOL[dtype])
        want, want_lowp = want[0], want_lowp[0]
    if backend == "reference":
        assert torch.equal(out, want_lowp)
    assert_within_policy("out", out.detach(), want.detach(), want_lowp.detach(), ATOL[dtype])
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    grads_lowp = torch.autograd.grad(want_lowp, lowp, dout)
    grads64 = torch.autograd.grad(want, exact, dout.double())
    for g, gl, g64 in zip(grads, grads_lowp, grads64):
        assert_within_policy("grad", g, g64, gl, ATOL[dtype])


def test_sdpa_fp32_scale_is_applied_once():
    # A scale far from 1/sqrt(D) catches a kernel that applies the default scale as well.
    q, k, v = (rand(1, 1, 7, 16, dtype=F32) for _ in range(3))
    public, reference = sdpa_calls(scale=math.pi)
    check_against_reference(public, reference, [q, k, v], backward=False)
