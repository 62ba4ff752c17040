"""Triton rotary embeddings (interpreter) against the float64 reference, in both conventions.

Tolerance policy (flash-attn's, as in the other op tests): the kernel's error against the float64 reference may be
at most twice the error the same reference math makes in the input's dtype, plus a small atol. Every Triton test
also checks the kernel really launched (no silent fallback).
"""
from __future__ import annotations

import os

import pytest
import torch

import llmfast
from llmfast import _backend
from llmfast.nn import RotaryEmbedding
from llmfast.reference import rotary as ref

DEVICE = torch.device(os.environ.get("LLMFAST_TEST_DEVICE", "cpu"))
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, BF16, F32]
ATOL = {F16: 1e-3, BF16: 2e-3, F32: 1e-5}


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def assert_within_policy(what: str, got: torch.Tensor, want64: torch.Tensor, lowp: torch.Tensor,
                         dtype: torch.dtype) -> None:
    assert got.dtype == lowp.dtype and got.shape == want64.shape, (what, got.dtype, got.shape, want64.shape)
    err, base = _max_error(got, want64), _max_error(lowp, want64)
    assert err <= 2 * base + ATOL[dtype], f"{what}: error {err:.3g} > 2 x torch-math error {base:.3g} + {ATOL[dtype]}"


def tables(n_pos: int, rotary_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn's (n_pos, rotary_dim / 2) fp32 cos/sin tables."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)


def hf_tables(position_ids: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's (B, S, dim) cos/sin with duplicated halves for the given positions."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = position_ids.double()[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().float().to(DEVICE), emb.sin().float().to(DEVICE)


def launches(prefix: str) -> int:
    return sum(n for name, n in llmfast.kernel_launch_counts().items() if name.startswith(prefix))


def rand(*shape, dtype=F32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


# ------------------------------------------------------------------------------------------ flash-attn convention

def check_flash(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, seqlen_offsets,
                inplace: bool = False) -> None:
    dtype = x.dtype
    # Upstream gradients representable in the tested dtype: float64 and the kernels see the same ones.
    dy = torch.randn(x.shape, device=DEVICE).to(dtype).double()
    off64 = seqlen_offsets
    x64 = x.detach().double().requires_grad_()
    want = ref.apply_rotary_emb(x64, cos.double(), sin.double(), interleaved, False, off64)
    want.backward(dy)
    xl = x.detach().clone().requires_grad_()
    lowp = ref.apply_rotary_emb(xl, cos, sin, interleaved, False, seqlen_offsets)
    lowp.backward(dy.to(dtype))

    xk = x.detach().clone().requires_grad_()
    before_f, before_b = launches("rotary_fwd"), launches("rotary_bwd")
    with llmfast.backend("triton"):
        if inplace:
            inp = xk * 1  # a non-leaf to rotate in place
            got = llmfast.apply_rotary_emb(inp, cos, sin, interleaved, True, seqlen_offsets)
            assert got.data_ptr() == inp.data_ptr()
        else:
            got = llmfast.apply_rotary_emb(xk, cos, sin, interleaved, False, seqlen_offsets)
        got.backward(dy.to(dtype))
    assert launches("rotary_fwd") == before_f + 1 and launches("rotary_bwd") == before_b + 1
    assert_within_policy("out", got.detach(), want.detach(), lowp.detach(), dtype)
    assert_within_policy("grad", xk.grad, x64.grad, xl.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("shape,rotary_dim,offset", [
    ((1, 1, 1, 2), 2, 0),       # the smallest problem
    ((2, 7, 3, 10), 6, 3),      # rotary_dim < head dim (4 channels pass through), odd S, an int offset
    ((2, 11, 5, 16), 16, 0),    # primes, several head and channel blocks of the interpreter tiles
    ((2, 5, 3, 22), 18, 4),     # 9 pairs: a partial channel block, 4 pass-through channels
])
def test_flash_convention_matches_reference(shape, rotary_dim, offset, interleaved, dtype):
    x = rand(*shape, dtype=dtype)
    cos, sin = tables(shape[1] + offset + 2, rotary_dim)
    check_flash(x, cos, sin, interleaved, offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_seqlen_offsets_tensor(interleaved, dtype):
    x = rand(3, 5, 2, 12, dtype=dtype)
    cos, sin = tables(11, 8)
    offsets = torch.tensor([0, 6, 3], dtype=torch.int32, device=DEVICE)  # 6 + 5 = 11: the table's last row
    check_flash(x, cos, sin, interleaved, offsets)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_inplace(interleaved, dtype):
    x = rand(2, 6, 3, 10, dtype=dtype)
    cos, sin = tables(9, 6)
    check_flash(x, cos, sin, interleaved, torch.tensor([1, 3], device=DEVICE), inplace=True)
    # Without autograd: the result is written into x's own storage, pass-through channels untouched.
    y = x.clone()
    with llmfast.backend("triton"):
        out = llmfast.apply_rotary_emb(y, cos, sin, interleaved, inplace=True, seqlen_offsets=2)
    assert out is y
    want = ref.apply_rotary_emb(x.double(), cos.double(), sin.double(), interleaved, False, 2)
    assert_within_policy("inplace", y, want, ref.apply_rotary_emb(x, cos, sin, interleaved, False, 2), dtype)
    assert torch.equal(y[..., 6:], x[..., 6:])


def test_strided_input_and_tables():
    """A (B, H, S, D) tensor transposed to (B, S, H, D) and a table with strided rows are read where they lie."""
    x = rand(2, 3, 7, 16).transpose(1, 2)
    cos_full, sin_full = tables(9, 16)
    cos = torch.cat((cos_full, cos_full), -1)[:, :8]  # row stride 16, 8 columns
    sin = torch.cat((sin_full, sin_full), -1)[:, :8]
    assert not x.is_contiguous() and not cos.is_contiguous()
    check_flash(x, cos, sin, False, 1)


@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 128), (256, 256), (40, 32), (80, 64)])
def test_gpu_tiles_in_the_interpreter(monkeypatch, head_dim, rotary_dim):
    """The sm80/sm90 tiles (8-32 heads x 16-64 pairs, channel loop past 64 pairs) computed numerically."""
    monkeypatch.setenv("LLMFAST_CONFIG_ARCH", "sm90")
    x = rand(1, 3, 9, head_dim, dtype=BF16)
    cos, sin = tables(5, rotary_dim)
    check_flash(x, cos, sin, False, 2)
    launched = _backend.last_launch_config("rotary_fwd")
    half = rotary_dim // 2
    assert launched["config"] == ("k16" if half <= 16 else "k32" if half <= 32 else "k64")


# ------------------------------------------------------------------------------------------ Hugging Face convention

def check_hf(q, k, cos, sin, position_ids=None, unsqueeze_dim=1) -> None:
    dtype = q.dtype
    dq, dk = (torch.randn(t.shape, device=DEVICE).to(dtype).double() for t in (q, k))
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    want = ref.apply_rotary_pos_emb(q64, k64, cos.double(), sin.double(), position_ids, unsqueeze_dim)
    torch.autograd.backward(want, (dq, dk))
    ql, kl = (t.detach().clone().requires_grad_() for t in (q, k))
    lowp = ref.apply_rotary_pos_emb(ql, kl, cos.to(dtype), sin.to(dtype), position_ids, unsqueeze_dim)
    torch.autograd.backward(lowp, (dq.to(dtype), dk.to(dtype)))

    qk, kk = (t.detach().clone().requires_grad_() for t in (q, k))
    before_f, before_b = launches("rotary_qk_fwd"), launches("rotary_qk_bwd")
    with llmfast.backend("triton"):
        got = llmfast.apply_rotary_pos_emb(qk, kk, cos, sin, position_ids, unsqueeze_dim)
        torch.autograd.backward(got, (dq.to(dtype), dk.to(dtype)))
    # q and k in one launch, their gradients in one more.
    assert launches("rotary_qk_fwd") == before_f + 1 and launches("rotary_qk_bwd") == before_b + 1
    for name, g, w, lp in zip(("q_embed", "k_embed"), got, want, lowp):
        assert_within_policy(name, g.detach(), w.detach(), lp.detach(), dtype)
    assert_within_policy("dq", qk.grad, q64.grad, ql.grad, dtype)
    assert_within_policy("dk", kk.grad, k64.grad, kl.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,kv_heads,seqlen,head_dim", [
    (1, 1, 1, 1, 2),
    (2, 4, 2, 7, 16),     # GQA: k has half the heads
    (2, 5, 1, 11, 10),    # MQA, primes, 5 pairs (a partial channel block)
])
def test_hf_convention_matches_reference(batch, heads, kv_heads, seqlen, head_dim, dtype):
    q, k = rand(batch, heads, seqlen, head_dim, dtype=dtype), rand(batch, kv_heads, seqlen, head_dim, dtype=dtype)
    # Per-sequence positions (left padding / packed batches), as Hugging Face's rotary module returns them.
    position_ids = torch.arange(seqlen, device=DEVICE)[None, :] + torch.arange(batch, device=DEVICE)[:, None] * 3
    cos, sin = hf_tables(position_ids, head_dim)
    check_hf(q, k, cos.to(dtype), sin.to(dtype))


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_hf_layouts_and_tables(dtype):
    batch, heads, kv_heads, seqlen, head_dim = 2, 4, 2, 9, 12
    # unsqueeze_dim=2: (B, S, H, D) tensors; a (1, S, D) table broadcast over the batch.
    q, k = rand(batch, seqlen, heads, head_dim, dtype=dtype), rand(batch, seqlen, kv_heads, head_dim, dtype=dtype)
    cos, sin = hf_tables(torch.arange(seqlen, device=DEVICE)[None], head_dim)
    check_hf(q, k, cos, sin, unsqueeze_dim=2)
    # A 2-d table indexed by position_ids (older transformers), fp32 table with low-precision q/k.
    q, k = rand(batch, heads, seqlen, head_dim, dtype=dtype), rand(batch, kv_heads, seqlen, head_dim, dtype=dtype)
    table_cos, table_sin = hf_tables(torch.arange(20, device=DEVICE), head_dim)
    position_ids = torch.randint(0, 20, (batch, seqlen), device=DEVICE)
    check_hf(q, k, table_cos, table_sin, position_ids=position_ids)
    # A 2-d table without position ids: its first S rows; a rotary dim smaller than the head dim passes the rest.
    check_hf(q, k, table_cos[:, :8].contiguous(), table_sin[:, :8].contiguous())
    # q and k as transposed views of (B, S, H, D) projections, the usual Hugging Face layout.
    qt = rand(batch, seqlen, heads, head_dim, dtype=dtype).transpose(1, 2)
    kt = rand(batch, seqlen, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
    check_hf(qt, kt, cos, sin)


def test_hf_matches_flash_convention():
    """The same rotation in both conventions gives the same numbers."""
    q, k = rand(2, 4, 7, 16), rand(2, 2, 7, 16)
    cos, sin = tables(7, 16)
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    with llmfast.backend("triton"):
        q_hf, k_hf = llmfast.apply_rotary_pos_emb(q, k, full_cos, full_sin)
        q_fl = llmfast.apply_rotary_emb(q.transpose(1, 2), cos, sin).transpose(1, 2)
        k_fl = llmfast.apply_rotary_emb(k.transpose(1, 2), cos, sin).transpose(1, 2)
    torch.testing.assert_close(q_hf, q_fl)
    torch.testing.assert_close(k_hf, k_fl)


# ------------------------------------------------------------------------------------------ module, dispatch

@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_rotary_embedding_module(interleaved):
    rope = RotaryEmbedding(8, base=500.0, max_position_embeddings=32, interleaved=interleaved).to(DEVICE)
    assert not rope.state_dict()  # tables are not persistent: Hugging Face state dicts load unchanged
    q, k = rand(2, 5, 4, 12), rand(2, 5, 2, 12)
    cos, sin = rope.cos_sin()
    for offsets in (0, 7, torch.tensor([3, 20], device=DEVICE)):
        with llmfast.backend("triton"):
            got_q, got_k = rope(q, k, offsets)
        want_q = ref.apply_rotary_emb(q.double(), cos.double(), sin.double(), interleaved, False, offsets)
        want_k = ref.apply_rotary_emb(k.double(), cos.double(), sin.double(), interleaved, False, offsets)
        torch.testing.assert_close(got_q.double(), want_q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_k.double(), want_k, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        rope(q, k, 28)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)


def test_backends_agree_and_fp64():
    x = rand(2, 5, 3, 8)
    cos, sin = tables(5, 8)
    want = ref.apply_rotary_emb(x, cos, sin)
    for name in ("auto", "reference"):
        with llmfast.backend(name):
            torch.testing.assert_close(llmfast.apply_rotary_emb(x, cos, sin), want)
    with llmfast.backend("triton"):  # float64 is served by torch, exactly
        got = llmfast.apply_rotary_emb(x.double(), cos.double(), sin.double())
    torch.testing.assert_close(got, ref.apply_rotary_emb(x.double(), cos.double(), sin.double()))


def test_table_gradients_take_the_reference_path():
    """cos/sin are constants to the kernels; when they need a gradient the result still gets one."""
    x = rand(1, 4, 2, 8)
    cos, sin = (t.clone().requires_grad_() for t in tables(4, 8))
    with llmfast.backend("triton"):
        out = llmfast.apply_rotary_emb(x, cos, sin)
    out.sum().backward()
    assert cos.grad is not None and sin.grad is not None


def test_torch_compile_fullgraph():
    def fn(x, q, k, cos, sin, full_cos, full_sin, offsets):
        a = llmfast.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets)
        b = llmfast.apply_rotary_emb(x * 2, cos, sin, interleaved=True, inplace=True, seqlen_offsets=1)
        qe, ke = llmfast.apply_rotary_pos_emb(q, k, full_cos, full_sin)
        return a.sum() + b.sum() + (qe * qe).sum() + (ke * ke).sum()

    compile_backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    x = rand(2, 5, 3, 8).requires_grad_()
    q, k = rand(2, 4, 5, 8).requires_grad_(), rand(2, 2, 5, 8).requires_grad_()
    cos, sin = tables(8, 8)
    full_cos, full_sin = torch.cat((cos, cos), -1)[:5], torch.cat((sin, sin), -1)[:5]
    offsets = torch.tensor([0, 3], device=DEVICE)
    args = (x, q, k, cos, sin, full_cos, full_sin, offsets)
    before = launches("rotary")
    with llmfast.backend("triton"):
        out = compiled(*args)
        out.backward()
    assert launches("rotary") == before + 6  # three forward launches, three backward
    grads = [t.grad.clone() for t in (x, q, k)]
    eager = [t.detach().clone().requires_grad_() for t in (x, q, k)]
    with llmfast.backend("reference"):
        fn(eager[0], eager[1], eager[2], *args[3:]).backward()
    torch.testing.assert_close(out, fn(*[t.detach() for t in args[:3]], *args[3:]), atol=1e-4, rtol=1e-5)
    for g, e in zip(grads, eager):
        torch.testing.assert_close(g, e.grad, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ bad input

def _flash(**overrides):
    cos, sin = tables(8, 8)
    args = dict(x=rand(2, 5, 3, 8), cos=cos, sin=sin)
    args.update(overrides)
    return lambda: llmfast.apply_rotary_emb(**args)


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
@pytest.mark.parametrize("make,error,match", [
    (lambda: _flash(x=torch.randint(0, 5, (2, 5, 3, 8))), TypeError, "x must have dtype"),
    (lambda: _flash(x=rand(5, 3, 8)), ValueError, "x must have 4 dimensions"),
    (lambda: _flash(cos=tables(8, 8)[0].long()), TypeError, "cos must have dtype"),
    (lambda: _flash(cos=tables(8, 6)[0]), ValueError, "same shape"),
    (lambda: _flash(cos=tables(8, 10)[0], sin=tables(8, 10)[1]), ValueError, "exceeds the head dim"),
    (lambda: _flash(cos=tables(4, 8)[0], sin=tables(4, 8)[1]), ValueError, "cos/sin have 4 positions"),
    (lambda: _flash(seqlen_offsets=4), ValueError, "seqlen_offsets \\+ seqlen = 4 \\+ 5 = 9"),
    (lambda: _flash(seqlen_offsets=-1), ValueError, "non-negative"),
    (lambda: _flash(seqlen_offsets=1.5), TypeError, "seqlen_offsets must be an int"),
    (lambda: _flash(seqlen_offsets=torch.tensor([0.0, 1.0])), TypeError, "integer tensor"),
    (lambda: _flash(seqlen_offsets=torch.tensor([0, 1, 2])), ValueError, "shape \\(batch,\\)"),
    (lambda: _flash(interleaved=1), TypeError, "interleaved must be a bool"),
])
def test_flash_bad_input(backend, make, error, match):
    with llmfast.backend(backend), pytest.raises(error, match=match):
        make()()


@pytest.mark.parametrize("offsets,match", [
    ([0, 4], "asks for position 8"),   # 4 + 5 > 8 rows: must raise, never read past the table
    ([-1, 0], "non-negative"),
])
def test_flash_offsets_tensor_out_of_range(offsets, match):
    with llmfast.backend("triton"), pytest.raises(ValueError, match=match):
        _flash(seqlen_offsets=torch.tensor(offsets, device=DEVICE))()


def _hf(**overrides):
    cos, sin = hf_tables(torch.arange(5, device=DEVICE)[None].expand(2, 5), 8)
    args = dict(q=rand(2, 4, 5, 8), k=rand(2, 2, 5, 8), cos=cos, sin=sin)
    args.update(overrides)
    return lambda: llmfast.apply_rotary_pos_emb(**args)


@pytest.mark.parametrize("make,error,match", [
    (lambda: _hf(q=rand(2, 4, 5, 8).half().int()), TypeError, "q must have dtype"),
    (lambda: _hf(k=rand(2, 2, 6, 8)), ValueError, "k must match q"),
    (lambda: _hf(cos=rand(2, 5, 7), sin=rand(2, 5, 7)), ValueError, "must be even"),
    (lambda: _hf(cos=rand(2, 5, 10), sin=rand(2, 5, 10)), ValueError, "2..8"),
    (lambda: _hf(cos=rand(2, 6, 8), sin=rand(2, 6, 8)), ValueError, "broadcast"),
    (lambda: _hf(cos=rand(3, 8), sin=rand(3, 8)), ValueError, "cos/sin have 3 positions"),
    (lambda: _hf(cos=rand(9, 8), sin=rand(9, 8), position_ids=torch.full((2, 5), 9, device=DEVICE)),
     ValueError, "asks for position 9"),
    (lambda: _hf(cos=rand(9, 8), sin=rand(9, 8), position_ids=torch.zeros(2, 5, device=DEVICE)),
     TypeError, "position_ids must be an integer tensor"),
    (lambda: _hf(unsqueeze_dim=3), ValueError, "unsqueeze_dim"),
    (lambda: _hf(sin=rand(2, 5, 8).double()), TypeError, "share one dtype"),
])
def test_hf_bad_input(make, error, match):
    with llmfast.backend("triton"), pytest.raises(error, match=match):
        make()()


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_every_launchable_config_is_compile_checked(monkeypatch, arch):
    from llmfast.ops import rotary as ops

    monkeypatch.setenv("LLMFAST_CONFIG_ARCH", arch)
    configs = {spec.config.split("_")[0] for spec in ops.compile_specs() if spec.arches == (int(arch[2:]),)}
    for half in range(1, 300):
        name, _ = ops.pick_config(half, torch.device("cpu"))
        assert name in configs, f"{name} (half rotary dim {half}) is not compile-checked"


def test_torch_compile_fullgraph_reference_path_with_position_tensors():
    """On the reference path the host-side position check is skipped while tracing (it would break the graph)."""
    def fn(x, q, k, cos, sin, full_cos, full_sin, offsets, position_ids):
        a = llmfast.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets)
        qe, ke = llmfast.apply_rotary_pos_emb(q, k, full_cos, full_sin, position_ids)
        return a, qe, ke

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    cos, sin = tables(9, 8)
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    args = (rand(2, 5, 3, 8), rand(2, 4, 5, 8), rand(2, 2, 5, 8), cos, sin, full_cos, full_sin,
            torch.tensor([0, 4], device=DEVICE), torch.randint(0, 9, (2, 5), device=DEVICE))
    with llmfast.backend("reference"):
        for got, want in zip(compiled(*args), fn(*args)):
            torch.testing.assert_close(got, want)
