"""Row offsets past 2**31 elements in the row-wise kernels: softmax family, cross-entropy (and its vocabulary-parallel
shard kernels), RMSNorm/LayerNorm, rotary embeddings, SwiGLU/GeGLU (attention has its own such tests in
test_attention_kernels.py).

``row * row_stride`` reaches 2**31 elements in real work (a 256k-vocabulary cross-entropy over 8k tokens; a view
whose rows lie far apart), where an offset computed in 32 bits wraps and the kernel reads or writes the wrong
memory (or crashes). The tensors here are huge logically and tiny physically: consecutive rows ``2**27`` elements
apart (``as_strided`` over a storage that is reserved but never touched beyond the rows written, so the OS backs
only those pages; nothing dense of that size is ever allocated), so row 16 starts at 2**31 elements.

Each test runs an op on such tensors and on dense copies of the same values: the two must agree bit for bit (the
same tiles and arithmetic run; only the addresses differ), and the dense results must match the float64 reference
(flash-attn's policy: at most twice the error of the reference math in the input's dtype, plus a small atol).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import pytest
import torch

import llmfast
from llmfast import _backend
from llmfast.ops import _norm
from llmfast.ops.cross_entropy import _kernels as ce_kernels
from llmfast.ops.cross_entropy import _parallel as ce_parallel
from llmfast.reference import cross_entropy as ref_ce
from llmfast.reference import layer_norm as ref_layer_norm
from llmfast.reference import rms_norm as ref_rms_norm
from llmfast.reference import rotary as ref_rotary
from llmfast.reference import softmax as ref_softmax
from llmfast.reference import swiglu as ref_swiglu

# Padding lanes of partly filled tiles compute exp(-inf - -inf) in the interpreter (masked out on store).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
ATOL = {F16: 1e-3, BF16: 1e-2, F32: 1e-5}

STRIDE = 2**27  # elements between consecutive rows: row 16 starts at 2**31
ROWS = 18       # rows 16 and 17 lie past 2**31 elements from the base


# ---------------------------------------------------------------------------------------------------- helpers

def far(shape: Sequence[int], strides: Sequence[int], dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """A ``shape`` tensor with ``strides`` over reserved storage, holding random values (bool: about 70% True).

    Only the elements the view covers are written, so only their pages are backed."""
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    assert extent > 2**31, "the last element must lie past 2**31 elements from the first"
    t = torch.empty(extent, dtype=dtype).as_strided(tuple(shape), tuple(strides))
    values = torch.rand(shape) < 0.7 if dtype == torch.bool else (torch.randn(shape) * scale).to(dtype)
    t.copy_(values)
    return t


def far_rows(rows: int, cols: int, dtype: torch.dtype, stride: int = STRIDE, scale: float = 1.0) -> torch.Tensor:
    """(rows, cols), unit column stride, consecutive rows ``stride`` elements apart."""
    assert (rows - 1) * stride >= 2**31, "the last row must start past 2**31 elements"
    return far((rows, cols), (stride, 1), dtype, scale)


def _run(fn: Callable, inputs: Sequence[torch.Tensor], out_grads: Sequence[torch.Tensor], wrt: Sequence[int],
         backend: str | None = "triton") -> list[torch.Tensor]:
    """fn(*inputs)'s outputs, then the gradients of ``inputs[i]`` for i in ``wrt`` given ``out_grads`` for the
    first outputs."""
    leaves = [t.detach().requires_grad_(i in wrt) for i, t in enumerate(inputs)]
    if backend is None:
        outs = fn(*leaves)
    else:
        with llmfast.backend(backend):
            outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    grads = list(torch.autograd.grad(outs[:len(out_grads)], [leaves[i] for i in wrt], list(out_grads))) if wrt \
        else []
    return [o.detach() for o in outs] + grads


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)


def check_far_equals_dense(fn: Callable, inputs: Sequence[torch.Tensor], out_grads: Sequence[torch.Tensor] = (),
                           wrt: Sequence[int] = ()
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Run ``fn`` (Triton backend) on the far tensors and on dense copies: every output and gradient must be equal.

    The dense run goes first and ``inputs`` are used last as they are (an in-place op may overwrite them). Returns
    (the dense inputs, the dense output gradients, the dense results) for the reference check."""
    dense_inputs = [_dense(t) for t in inputs]
    dense_grads = [_dense(g) for g in out_grads]
    dense = _run(fn, [t.clone() for t in dense_inputs], dense_grads, wrt)
    got = _run(fn, inputs, out_grads, wrt)
    assert len(got) == len(dense)
    for i, (a, b) in enumerate(zip(got, dense)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"result {i}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().nan_to_num(float("inf")).max().item()
            raise AssertionError(f"result {i} on the far rows differs from the dense run (max |diff| {diff:.3g})")
    return dense_inputs, dense_grads, dense


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN positions differ"
    diff = torch.where(got == want, torch.zeros_like(got), (got - want).abs())[~torch.isnan(want)]
    return diff.max().item() if diff.numel() else 0.0


def check_reference(ref_fn: Callable, inputs: Sequence[torch.Tensor], out_grads: Sequence[torch.Tensor],
                    wrt: Sequence[int], got: Sequence[torch.Tensor], dtype: torch.dtype) -> None:
    """``got`` (outputs then gradients) against ``ref_fn`` in float64, within twice ``ref_fn``'s own error in the
    inputs' dtypes plus ATOL."""
    def widen(t):
        return t.double() if t.is_floating_point() else t

    want = _run(ref_fn, [widen(t) for t in inputs], [g.double() for g in out_grads], wrt, backend=None)
    lowp = _run(ref_fn, [t.clone() for t in inputs], out_grads, wrt, backend=None)
    for i, (g, w, low) in enumerate(zip(got, want, lowp)):
        if not g.is_floating_point():
            assert torch.equal(g, w), f"result {i} differs from the reference"
            continue
        err, base = _max_error(g, w), _max_error(low, w)
        assert err <= 2 * base + ATOL[dtype], f"result {i}: error {err:.3g} > 2 x reference error {base:.3g} + atol"


# ---------------------------------------------------------------------------------------------------- softmax

@pytest.mark.parametrize("op,n_cols", [("softmax", 40), ("log_softmax", 40), ("log_softmax", 20_000)],
                         ids=["softmax", "log_softmax", "log_softmax_looped"])
def test_softmax_rows_past_2_31(op, n_cols):
    # Forward reads x through the far rows; backward reads the incoming gradient through them.
    x, dy = far_rows(ROWS, n_cols, F16, scale=3), far_rows(ROWS, n_cols, F16)
    _backend.reset_kernel_launch_counts()
    inputs, grads, dense = check_far_equals_dense(lambda t: getattr(llmfast, op)(t, -1), [x], [dy], [0])
    counts = llmfast.kernel_launch_counts()
    kind = "_looped" if n_cols > 16384 else ""
    assert counts[f"{op}_fwd{kind}"] == 2 and counts[f"{op}_bwd{kind}"] == 2
    check_reference(lambda t: getattr(ref_softmax, op)(t, -1), inputs, grads, [0], dense, F16)


def test_softmax_segmented_long_rows_past_2_31():
    # Three long rows 2**30 elements apart: too few rows to fill the device, so each row is cut into segments
    # (a statistics kernel per pass, then the looped kernels merge them); row 2 starts at 2**31.
    x, dy = far_rows(3, 20_000, BF16, stride=2**30, scale=3), far_rows(3, 20_000, BF16, stride=2**30)
    _backend.reset_kernel_launch_counts()
    inputs, grads, dense = check_far_equals_dense(lambda t: llmfast.softmax(t, -1), [x], [dy], [0])
    counts = llmfast.kernel_launch_counts()
    assert counts["softmax_fwd_looped_stats"] == 2 and counts["softmax_bwd_looped_stats"] == 2
    check_reference(lambda t: ref_softmax.softmax(t, -1), inputs, grads, [0], dense, BF16)


def test_softmax_strided_rows_past_2_31():
    # Softmax along dim 1 of (3, 40, 16) with dim 2 contiguous: the strided tiles (consecutive rows along the
    # tile's first axis), and the leading dim 2**30 elements apart, so batch 2 starts at 2**31.
    x = far((3, 40, 16), (2**30, 16, 1), F16, scale=3)
    dy = far((3, 40, 16), (2**30, 16, 1), F16)
    _backend.reset_kernel_launch_counts()
    inputs, grads, dense = check_far_equals_dense(lambda t: llmfast.log_softmax(t, 1), [x], [dy], [0])
    assert _backend.last_launch_config("log_softmax_fwd")["BLOCK_R"] == 32  # a strided tile (rows along axis 0)
    check_reference(lambda t: ref_softmax.log_softmax(t, 1), inputs, grads, [0], dense, F16)


@pytest.mark.parametrize("mask_dtype", [torch.bool, F16], ids=["bool", "additive"])
def test_masked_softmax_mask_rows_past_2_31(mask_dtype):
    # The mask is read through its own strides: its rows 2**27 elements apart (an additive one also gets a
    # gradient, summed from the dense score gradient).
    x = torch.randn(ROWS, 40).to(F16) * 3
    mask = far_rows(ROWS, 40, mask_dtype)
    dy = torch.randn(ROWS, 40).to(F16)
    wrt = [0, 1] if mask_dtype != torch.bool else [0]

    def fn(x, m):
        return llmfast.masked_softmax(x, m, scale=0.5)

    inputs, grads, dense = check_far_equals_dense(fn, [x, mask], [dy], wrt)
    check_reference(lambda x, m: ref_softmax.masked_softmax(x, m, 0.5), inputs, grads, wrt, dense, F16)


# ---------------------------------------------------------------------------------------------------- cross-entropy

CE_OPTIONS = [
    {},
    dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=20.0, reduction="sum", return_z_loss=True,
         return_token_accuracy=True, return_predicted_tokens=True),
]


def _targets(n: int, n_classes: int) -> torch.Tensor:
    t = torch.randint(0, n_classes, (n,))
    t[3] = -100  # an ignored row
    return t


def _ce_outputs(out) -> tuple[torch.Tensor, ...]:
    """The loss first (the one output with a gradient), then whatever else was asked for."""
    if isinstance(out, llmfast.CrossEntropyOutput):
        return tuple(t for t in (out.loss, out.z_loss, out.token_accuracy, out.predicted_tokens) if t is not None)
    return (out,)


@pytest.mark.parametrize("inplace", [False, True], ids=["grad_buffer", "grad_in_place"])
@pytest.mark.parametrize("options", CE_OPTIONS, ids=["plain", "all_options"])
def test_cross_entropy_rows_past_2_31(options, inplace):
    # The kernel reads each row of logits through the far row stride; with inplace_backward the gradient is
    # written back through it too. 1500 classes: the 4096-column tile, loops masked at the row's end.
    n_classes = 1500
    logits = far_rows(ROWS, n_classes, BF16, scale=4)
    target = _targets(ROWS, n_classes)
    weight = torch.rand(n_classes) + 0.5
    grad_out = torch.tensor(1.5, dtype=BF16)  # the stored gradient is scaled in place in backward

    def fn(x, t, w):
        return _ce_outputs(llmfast.cross_entropy(x, t, w, inplace_backward=inplace, **options))

    inputs, grads, dense = check_far_equals_dense(fn, [logits, target, weight], [grad_out], [0])

    def ref_fn(x, t, w):
        return _ce_outputs(ref_ce.cross_entropy(x, t, w, **options))

    check_reference(ref_fn, inputs, grads, [0], dense, BF16)


def test_vocab_parallel_shard_kernels_rows_past_2_31():
    # The two kernels of the vocabulary-parallel loss on this rank's shard [700, 2200) of 3000 classes: pass 1
    # reads the logits through the far rows, pass 2 writes the gradient through far rows (and in place).
    n_cols, vocab_start, n_classes = 1500, 700, 3000
    logits = far_rows(ROWS, n_cols, F16, scale=4)
    dense_logits = _dense(logits)
    target = _targets(ROWS, n_classes)  # targets inside and outside the shard
    opts = ce_kernels.LossOptions(label_smoothing=0.1, softcap=20.0, track_argmax=True)
    weight = torch.rand(n_cols) + 0.5
    with llmfast.backend("triton"):
        got = ce_kernels.shard_stats_triton(logits, target, opts, vocab_start, weight)
        dense = ce_kernels.shard_stats_triton(dense_logits, target, opts, vocab_start, weight)
    for name, a, b in zip(got._fields, got, dense):
        assert torch.equal(a, b), f"{name} on the far rows differs from the dense run"
    want = ce_parallel._shard_stats_torch(dense_logits.double(), target, opts, vocab_start, weight.double())
    for name, a, w in zip(got._fields, got, want):
        torch.testing.assert_close(a, w.to(a.dtype), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")

    lse = torch.rand(ROWS) + torch.where(got.row_max == float("-inf"), 0.0, got.row_max)  # (ignored row: -inf)
    a, coef_t, uni = torch.rand(ROWS), torch.rand(ROWS), torch.rand(1) * 1e-3
    grad = far_rows(ROWS, n_cols, F16)
    dense_grad = torch.empty(ROWS, n_cols, dtype=F16)
    ce_kernels.shard_grad_triton(logits, grad, target, opts, vocab_start, weight, lse, a, coef_t, uni)
    ce_kernels.shard_grad_triton(dense_logits, dense_grad, target, opts, vocab_start, weight, lse, a, coef_t, uni)
    assert torch.equal(grad, dense_grad), "the gradient written through far rows differs from the dense run"
    want_grad = torch.empty(ROWS, n_cols, dtype=torch.float64)
    ce_parallel._shard_grad_torch(dense_logits.double(), want_grad, target, opts, vocab_start, weight.double(),
                                  lse, a, coef_t, uni)
    torch.testing.assert_close(dense_grad.double(), want_grad, rtol=2e-3, atol=1e-4)
    ce_kernels.shard_grad_triton(logits, logits, target, opts, vocab_start, weight, lse, a, coef_t, uni)
    assert torch.equal(logits, dense_grad), "the gradient written in place through far rows differs"


# ---------------------------------------------------------------------------------------------------- norms

# 40 columns: several rows per program; 1500: the looped kernels in the interpreter (one-pass on GPUs).
NORM_COLS = [40, 1500]


@pytest.mark.parametrize("n_cols", NORM_COLS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_rows_past_2_31(n_cols, residual):
    # x (and the residual) read through far rows in forward; in backward x (saved as given, when there is no
    # residual), the output gradient and the gradient reaching h directly are read through far rows.
    x, dy = far_rows(ROWS, n_cols, F16), far_rows(ROWS, n_cols, F16)
    weight = (torch.rand(n_cols) + 0.5).to(F16)
    if residual:
        r, dh = far_rows(ROWS, n_cols, F16), far_rows(ROWS, n_cols, F16)
        inputs, grads, dense = check_far_equals_dense(
            lambda x, w, r: llmfast.rms_norm(x, w, residual=r), [x, weight, r], [dy, dh], [0, 1, 2])
        check_reference(lambda x, w, r: ref_rms_norm.rms_norm(x, w, residual=r), inputs, grads, [0, 1, 2], dense,
                        F16)
    else:
        inputs, grads, dense = check_far_equals_dense(lambda x, w: llmfast.rms_norm(x, w), [x, weight], [dy], [0, 1])
        check_reference(lambda x, w: ref_rms_norm.rms_norm(x, w), inputs, grads, [0, 1], dense, F16)


@pytest.mark.parametrize("n_cols", NORM_COLS)
def test_layer_norm_rows_past_2_31(n_cols):
    x, dy = far_rows(ROWS, n_cols, BF16, scale=2), far_rows(ROWS, n_cols, BF16)
    weight, bias = torch.randn(n_cols).to(BF16), torch.randn(n_cols).to(BF16)
    inputs, grads, dense = check_far_equals_dense(lambda x, w, b: llmfast.layer_norm(x, n_cols, w, b),
                                                  [x, weight, bias], [dy], [0, 1, 2])
    check_reference(lambda x, w, b: ref_layer_norm.layer_norm(x, n_cols, w, b), inputs, grads, [0, 1, 2], dense,
                    BF16)


@pytest.mark.parametrize("gpu", [False, True], ids=["interpreter", "132_sms"])
def test_norm_backward_partial_rows_start_below_2_31(monkeypatch, gpu):
    # The weight/bias gradients are summed from one partial row per backward program, at pid * n_cols in the
    # kernels' 32-bit arithmetic: rows of millions of columns get fewer programs, so no partial row starts past
    # 2**31 elements (a grid of 3 or 132 SMs' worth of programs would put them there); usual rows keep them all.
    device = torch.device("cpu")
    if gpu:
        monkeypatch.setattr(_backend, "triton_interpreter_enabled", lambda: False)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132))
        device = torch.device("cuda")
    tile = _norm.NORM_CONFIGS["sm90"].looped
    full = min(10**6, _norm.INTERPRETER_BWD_PROGRAMS if not gpu else tile.programs_per_sm * 132)
    assert _norm._bwd_programs(10**6, 4096, tile, device) == full
    for n_cols in (2**22 + 1, 2**27, 2**30):
        programs = _norm._bwd_programs(10**6, n_cols, tile, device)
        assert 1 <= programs and programs * n_cols <= 2**31


# ---------------------------------------------------------------------------------------------------- rotary

def _far_tokens(batch: int, seqlen: int, heads: int, dim: int, dtype: torch.dtype, stride: int) -> torch.Tensor:
    """(batch, seqlen, heads, dim) with tokens ``stride`` elements apart (heads and channels packed in a token)."""
    return far((batch, seqlen, heads, dim), (seqlen * stride, stride, dim, 1), dtype)


def _tables(positions: int, half: int, dtype: torch.dtype = F32) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(positions, half) * 6.3
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_rotary_tokens_past_2_31(interleaved):
    # Two sequences of 3 tokens 2**29 elements apart: sequence 1 starts at 3 * 2**29 elements (a batch stride
    # still below 2**31) and its last token at 5 * 2**29. 12 channels, 10 rotated: the last two are copied through.
    x, dout = (_far_tokens(2, 3, 3, 12, F16, 2**29) for _ in range(2))
    cos, sin = _tables(3, 5)
    inputs, grads, dense = check_far_equals_dense(
        lambda x: llmfast.apply_rotary_emb(x, cos, sin, interleaved), [x], [dout], [0])
    check_reference(lambda x: ref_rotary.apply_rotary_emb(x, cos, sin, interleaved), inputs, grads, [0], dense, F16)
    # In place: the result is written back through the far tokens.
    check_far_equals_dense(lambda x: llmfast.apply_rotary_emb(x, cos, sin, interleaved, inplace=True), [x])


def test_rotary_pos_emb_tokens_past_2_31():
    # Hugging Face's layout (batch, heads, seqlen, dim), q and k (fewer heads) with tokens 2**30 elements apart:
    # token 2 starts at 2**31.
    def qk(heads):
        return far((1, heads, 3, 16), (3 * 2**30, 16, 2**30, 1), BF16)

    q, k, dq, dk = qk(4), qk(2), qk(4), qk(2)
    cos, sin = (t.repeat(1, 2) for t in _tables(3, 8, BF16))
    position_ids = torch.tensor([[2, 0, 1]])
    inputs, grads, dense = check_far_equals_dense(
        lambda q, k: llmfast.apply_rotary_pos_emb(q, k, cos, sin, position_ids), [q, k], [dq, dk], [0, 1])
    check_reference(lambda q, k: ref_rotary.apply_rotary_pos_emb(q, k, cos, sin, position_ids), inputs, grads,
                    [0, 1], dense, BF16)


def test_rotary_channels_past_2_31():
    # The channel dim outermost, channels 2**27 elements apart: channel 16 sits at 2**31 elements, past the
    # kernel's 32-bit channel offsets, so such tensors (input, gradient, in-place target) go through dense copies.
    def channel_major():
        return far((1, 4, 2, 18), (8, 2, 1, STRIDE), F16)

    x, dout = channel_major(), channel_major()
    cos, sin = _tables(4, 9)
    inputs, grads, dense = check_far_equals_dense(lambda x: llmfast.apply_rotary_emb(x, cos, sin), [x], [dout], [0])
    check_reference(lambda x: ref_rotary.apply_rotary_emb(x, cos, sin), inputs, grads, [0], dense, F16)
    check_far_equals_dense(lambda x: llmfast.apply_rotary_emb(x, cos, sin, inplace=True), [x])


def test_rotary_table_channels_past_2_31():
    # A (positions, rotary_dim) table with its channels 2**27 elements apart (a transposed table): also read
    # through a dense copy.
    q, k = torch.randn(1, 2, 4, 18).to(F16), torch.randn(1, 1, 4, 18).to(F16)
    angles = torch.rand(4, 9) * 6.3
    cos, sin = (far((4, 18), (1, STRIDE), F16) for _ in range(2))
    cos.copy_(angles.cos().repeat(1, 2))
    sin.copy_(angles.sin().repeat(1, 2))
    with llmfast.backend("triton"):
        got = llmfast.apply_rotary_pos_emb(q, k, cos, sin)
        dense = llmfast.apply_rotary_pos_emb(q, k, _dense(cos), _dense(sin))
    for a, b in zip(got, dense):
        assert torch.equal(a, b)
    want = ref_rotary.apply_rotary_pos_emb(q.double(), k.double(), _dense(cos).double(), _dense(sin).double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=0, atol=2e-3)


# ---------------------------------------------------------------------------------------------------- SwiGLU

@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_gated_activation_rows_past_2_31(op):
    # gate, up and the output gradient each read through far rows (as the halves of a fused gate_up projection
    # are: views sharing one row stride).
    gate, up, dy = (far_rows(ROWS, 150, BF16) for _ in range(3))  # 150: several column blocks
    inputs, grads, dense = check_far_equals_dense(getattr(llmfast, op), [gate, up], [dy], [0, 1])
    check_reference(getattr(ref_swiglu, op), inputs, grads, [0, 1], dense, BF16)
