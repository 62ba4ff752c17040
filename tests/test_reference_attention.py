"""The reference attention against independent float64 math: explicit loops, einsum, torch's own SDPA."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from llmfast.reference import attention as ref

DEVICE = torch.device(os.environ.get("LLMFAST_TEST_DEVICE", "cpu"))
F64 = torch.float64


def randn(*shape, dtype=F64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE, requires_grad=requires_grad)


def loop_attention(q, k, v, allowed, scale):
    """Attention one (b, h, i) row at a time with Python loops: (B, H, S, D) layout, boolean (B, H, Sq, Sk)
    ``allowed``, GQA by integer division of the head index. Returns (out, lse) with 0 / -inf for empty rows."""
    batch, heads, seqlen_q, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, heads, seqlen_q, v.shape[-1], dtype=F64)
    lse = torch.full((batch, heads, seqlen_q), float("-inf"), dtype=F64)
    q, k, v, allowed = q.cpu(), k.cpu(), v.cpu(), allowed.cpu()
    for b in range(batch):
        for h in range(heads):
            for i in range(seqlen_q):
                keys = [j for j in range(k.shape[2]) if allowed[b, h, i, j]]
                if not keys:
                    continue
                s = torch.stack([scale * torch.dot(q[b, h, i], k[b, h // group, j]) for j in keys])
                m = s.max()
                w = torch.exp(s - m)
                lse[b, h, i] = m + torch.log(w.sum())
                out[b, h, i] = (w[:, None] * v[b, h // group, keys]).sum(0) / w.sum()
    return out.to(DEVICE), lse.to(DEVICE)


def brute_window(seqlen_q, seqlen_k, left, right, causal):
    """The window rule written out pair by pair."""
    allowed = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    for i in range(seqlen_q):
        for j in range(seqlen_k):
            diag = i + seqlen_k - seqlen_q
            r = 0 if causal else right
            ok = (left < 0 or j >= diag - left) and (r < 0 or j <= diag + r)
            allowed[i, j] = ok
    return allowed.to(DEVICE)


# ---------------------------------------------------------------------------------------------------- core math

@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (5, 5), (3, 7), (7, 3)])
def test_core_matches_loops_with_gqa_and_bool_mask(seqlen_q, seqlen_k):
    q, k, v = randn(2, 4, seqlen_q, 6), randn(2, 2, seqlen_k, 6), randn(2, 2, seqlen_k, 5)
    allowed = torch.rand(2, 4, seqlen_q, seqlen_k, device=DEVICE) > 0.3
    allowed[0, 1, 0] = False  # one fully masked row
    out, lse = ref.attention(q, k, v, scale=0.7, mask=allowed, return_lse=True)
    want_out, want_lse = loop_attention(q, k, v, allowed, 0.7)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    assert torch.all(out[0, 1, 0] == 0) and lse[0, 1, 0] == float("-inf")


def test_core_additive_mask_equals_einsum_softmax():
    q, k, v = randn(1, 3, 6, 4), randn(1, 3, 8, 4), randn(1, 3, 8, 4)
    bias = randn(1, 1, 6, 8)
    out, lse = ref.attention(q, k, v, mask=bias, return_lse=True)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / 2.0 + bias  # default scale 1/sqrt(4)
    torch.testing.assert_close(out, torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v))
    torch.testing.assert_close(lse, scores.logsumexp(-1))


def test_core_rejects_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="key has 3 heads"):
        ref.attention(randn(1, 4, 2, 8), randn(1, 3, 2, 8), randn(1, 3, 2, 8))


# ---------------------------------------------------------------------------------------------------- SDPA

@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 9), (6, 6), (4, 9), (9, 4)])
def test_sdpa_matches_torch_float64(is_causal, seqlen_q, seqlen_k):
    q, k, v = randn(2, 4, seqlen_q, 8), randn(2, 2, seqlen_k, 8), randn(2, 2, seqlen_k, 8)
    got = ref.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True, scale=0.3)
    # torch returns NaN where top-left causal leaves no key (never here: row 0 always sees key 0)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mask_shape", [(2, 1, 5, 7), (1, 3, 1, 7), (5, 7), (1, 7)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_broadcast_masks_match_torch(mask_shape, kind):
    q, k, v = randn(2, 3, 5, 4), randn(2, 3, 7, 4), randn(2, 3, 7, 4)
    mask = torch.rand(mask_shape, device=DEVICE) > 0.2 if kind == "bool" else randn(*mask_shape)
    got = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_sdpa_mask_and_causal_combine_like_torch_math():
    q, k, v = randn(1, 2, 5, 4), randn(1, 2, 5, 4), randn(1, 2, 5, 4)
    mask = torch.rand(5, 5, device=DEVICE) > 0.3
    got = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & torch.ones(5, 5, dtype=torch.bool,
                                                                               device=DEVICE).tril())
    torch.testing.assert_close(got, want)
    assert torch.equal(ref.sdpa_mask(5, 5, mask, True), mask & ref.causal_mask(5, 5, device=DEVICE))


def test_sdpa_requires_enable_gqa_for_different_head_counts():
    with pytest.raises(ValueError, match="enable_gqa"):
        ref.scaled_dot_product_attention(randn(1, 4, 2, 8), randn(1, 2, 2, 8), randn(1, 2, 2, 8))


# ---------------------------------------------------------------------------------------------------- flash

@pytest.mark.parametrize("seqlen_q,seqlen_k", [(4, 9), (9, 4), (6, 6), (1, 5)])
@pytest.mark.parametrize("window,causal", [((-1, -1), True), ((2, -1), False), ((-1, 1), False), ((2, 1), False),
                                           ((0, 0), False), ((3, 5), True)])
def test_flash_window_and_bottom_right_causal_match_loops(seqlen_q, seqlen_k, window, causal):
    q, k, v = randn(1, seqlen_q, 4, 8), randn(1, seqlen_k, 2, 8), randn(1, seqlen_k, 2, 8)
    out, lse, probs = ref.flash_attn_func(q, k, v, softmax_scale=0.5, causal=causal, window_size=window,
                                          return_attn_probs=True)
    allowed = brute_window(seqlen_q, seqlen_k, *window, causal)
    assert torch.equal(ref.window_mask(seqlen_q, seqlen_k, window, causal, device=DEVICE), allowed)
    want_out, want_lse = loop_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        allowed.expand(1, 4, -1, -1), 0.5)
    torch.testing.assert_close(out, want_out.transpose(1, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    assert lse.shape == (1, 4, seqlen_q) and probs.shape == (1, 4, seqlen_q, seqlen_k)
    rows_with_keys = allowed.any(-1)
    torch.testing.assert_close(probs.sum(-1), rows_with_keys.to(F64).expand(1, 4, -1))
    assert torch.all(probs[..., ~allowed] == 0)


def test_both_causal_alignments_differ_exactly_as_documented():
    # Sq < Sk: top-left lets query 0 see key 0 only; bottom-right lets it see keys 0..Sk-Sq.
    assert torch.equal(ref.causal_mask(2, 4, "top-left"), torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]]).bool())
    assert torch.equal(ref.causal_mask(2, 4, "bottom-right"), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool())
    # Sq > Sk: bottom-right leaves the first Sq - Sk queries with no key at all.
    assert torch.equal(ref.causal_mask(4, 2, "bottom-right"),
                       torch.tensor([[0, 0], [0, 0], [1, 0], [1, 1]]).bool())
    q, k, v = randn(1, 3, 2, 4), randn(1, 5, 2, 4), randn(1, 5, 2, 4)
    flash = ref.flash_attn_func(q, k, v, causal=True)
    sdpa = ref.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=True).transpose(1, 2)
    explicit = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=ref.causal_mask(3, 5, "bottom-right", DEVICE))
    torch.testing.assert_close(flash, explicit.transpose(1, 2))
    assert not torch.allclose(flash, sdpa)


def test_flash_lse_dtype_follows_the_input():
    q = torch.randn(1, 3, 2, 8, device=DEVICE, dtype=torch.bfloat16)
    out, lse, _ = ref.flash_attn_func(q, q, q, return_attn_probs=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    _, lse64, _ = ref.flash_attn_func(q.double(), q.double(), q.double(), return_attn_probs=True)
    assert lse64.dtype == F64


def test_bad_window_is_rejected():
    for bad in [(-2, 0), (1,), (1.5, 2), "left"]:
        with pytest.raises(ValueError, match="window_size"):
            ref.flash_attn_func(randn(1, 2, 1, 4), randn(1, 2, 1, 4), randn(1, 2, 1, 4), window_size=bad)


# ---------------------------------------------------------------------------------------------------- empty rows

@pytest.mark.parametrize("case", ["bool", "float", "flash_causal"])
def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_grads(case):
    q, k, v = (randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    if case == "flash_causal":  # Sq=4 > Sk=2: queries 0 and 1 see nothing
        k2, v2 = k[:, :, :2].detach().requires_grad_(), v[:, :, :2].detach().requires_grad_()
        out, lse, _ = ref.flash_attn_func(q.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2), causal=True,
                                          return_attn_probs=True)
        out = out.transpose(1, 2)
        empty = torch.tensor([True, True, False, False], device=DEVICE)
        leaves = (q, k2, v2)
    else:
        allowed = torch.ones(4, 4, dtype=torch.bool, device=DEVICE)
        allowed[1] = False
        mask = allowed if case == "bool" else torch.zeros(4, 4, dtype=F64, device=DEVICE).masked_fill(
            ~allowed, float("-inf"))
        out, lse = ref.attention(q, k, v, mask=mask, return_lse=True)
        empty = ~allowed.any(-1)
        leaves = (q, k, v)
    assert torch.all(out[:, :, empty] == 0)
    assert torch.all(lse[:, :, empty] == float("-inf")) and torch.isfinite(lse[:, :, ~empty]).all()
    # The loss touches the LSE too: its empty rows must not poison the gradient (filter them as kernels' users do).
    loss = (out * randn(*out.shape)).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
    grads = torch.autograd.grad(loss, leaves)
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.all(grads[0][:, :, empty] == 0)  # empty query rows get no gradient


# ---------------------------------------------------------------------------------------------------- gradients

def test_gradcheck_sdpa_float_mask_gqa():
    q, k, v = randn(1, 4, 3, 4, requires_grad=True), randn(1, 2, 5, 4, requires_grad=True), \
        randn(1, 2, 5, 3, requires_grad=True)
    bias = randn(1, 1, 3, 5, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: ref.scaled_dot_product_attention(q, k, v, attn_mask=b, enable_gqa=True), (q, k, v, bias))


def test_gradcheck_sdpa_causal_with_bool_mask_and_empty_row():
    q, k, v = (randn(1, 2, 4, 3, requires_grad=True) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool, device=DEVICE)
    mask[2] = False
    assert torch.autograd.gradcheck(
        lambda q, k, v: ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True), (q, k, v))


@pytest.mark.parametrize("window,causal", [((1, 1), False), ((-1, -1), True), ((2, 0), False)])
def test_gradcheck_flash_window_mqa_with_lse(window, causal):
    q, k, v = randn(1, 3, 2, 4, requires_grad=True), randn(1, 5, 1, 4, requires_grad=True), \
        randn(1, 5, 1, 4, requires_grad=True)

    def fn(q, k, v):
        out, lse, _ = ref.flash_attn_func(q, k, v, softmax_scale=0.8, causal=causal, window_size=window,
                                          return_attn_probs=True)
        return out, lse
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---------------------------------------------------------------------------------------------------- varlen

@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (2, 1))])
def test_varlen_equals_per_sequence_calls_and_block_diagonal_dense(causal, window):
    lens_q, lens_k = [3, 1, 6, 0], [5, 1, 4, 2]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q, k, v = randn(sum(lens_q), 4, 8), randn(sum(lens_k), 2, 8), randn(sum(lens_k), 2, 8)
    out = ref.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                     window_size=window)
    assert out.shape == q.shape
    for b in range(len(lens_q)):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        want = ref.flash_attn_func(q[None, sq], k[None, sk], v[None, sk], causal=causal, window_size=window)[0]
        torch.testing.assert_close(out[sq], want, rtol=0, atol=0)
    # Independently: one dense attention over all packed tokens with a block-diagonal mask.
    allowed = ref.varlen_dense_mask(cu_q, cu_k, causal, window)
    dense = ref.attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask=allowed)
    torch.testing.assert_close(out, dense[0].transpose(0, 1))


# ---------------------------------------------------------------------------------------------------- dropout

def test_philox_uniform_matches_triton_rand():
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from llmfast import _backend
    probe = torch.empty(1, device=DEVICE)
    if not _backend.triton_can_run_on(probe):
        pytest.skip("Triton cannot run on this device (no CUDA and no TRITON_INTERPRET)")

    @triton.jit
    def rand_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, tl.rand(seed, offsets.to(tl.int64)), mask=offsets < n)

    n = 3000
    for seed in (0, 7, 2**31 - 2):
        got = torch.empty(n, device=DEVICE)
        rand_kernel[(triton.cdiv(n, 1024),)](got, seed, n, BLOCK=1024)
        want = ref.philox_uniform(seed, torch.arange(n, device=DEVICE))
        assert torch.equal(got, want), seed
    # offsets past 2**32 use the high counter word
    big = torch.tensor([2**32 + 5, 2**33 + 1], device=DEVICE)
    assert not torch.equal(ref.philox_uniform(3, big), ref.philox_uniform(3, big & 0xFFFFFFFF))


def test_dropout_keep_mask_statistics_and_layout():
    keep = ref.dropout_keep_mask(1234, 0.25, 2, 3, 17, 33, DEVICE)
    assert keep.shape == (2, 3, 17, 33) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.75) < 0.03
    flat = ref.philox_uniform(1234, torch.arange(2 * 3 * 17 * 33, device=DEVICE)) >= 0.25
    assert torch.equal(keep.flatten(), flat)
    assert not torch.equal(keep, ref.dropout_keep_mask(1235, 0.25, 2, 3, 17, 33, DEVICE))


def test_dropout_uses_the_seed_drawn_from_torch_and_scales_kept_probs():
    q, k, v = randn(1, 2, 5, 4), randn(1, 2, 6, 4), randn(1, 2, 6, 4)
    torch.manual_seed(42)
    got = ref.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(42)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    keep = ref.dropout_keep_mask(seed, 0.4, 1, 2, 5, 6, DEVICE)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
    torch.testing.assert_close(got, (probs * keep / 0.6) @ v)
    torch.manual_seed(42)
    again = ref.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    assert torch.equal(got, again)
    assert not torch.equal(got, ref.scaled_dot_product_attention(q, k, v, dropout_p=0.4))


def test_varlen_dropout_uses_the_padded_mask_corner():
    lens = [2, 5]
    cu = torch.tensor([0, 2, 7], dtype=torch.int32, device=DEVICE)
    q, k, v = randn(7, 2, 4), randn(7, 2, 4), randn(7, 2, 4)
    keep = ref.dropout_keep_mask(99, 0.5, 2, 2, 5, 5, DEVICE)
    out = ref.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, dropout_p=0.5, dropout_keep=keep)
    for b, (start, n) in enumerate(zip([0, 2], lens)):
        want = ref.flash_attn_func(q[None, start:start + n], k[None, start:start + n], v[None, start:start + n],
                                   dropout_p=0.5, dropout_keep=keep[b:b + 1, :, :n, :n])
        torch.testing.assert_close(out[start:start + n], want[0])


# ---------------------------------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_reference_is_close_to_float64(dtype):
    q, k, v = (torch.randn(2, 3, 17, 40, device=DEVICE, dtype=dtype) for _ in range(3))
    out = ref.scaled_dot_product_attention(q, k, v, is_causal=True)
    exact = ref.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    eps = torch.finfo(dtype).eps
    err = (out.double() - exact).abs().max().item()
    assert out.dtype == dtype
    assert err < 8 * eps * math.sqrt(40)
    assert err > 0  # the low-precision path really rounds: the error bar the kernel tests use is not zero
