"""Triton gated MLP activations: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up``, forward and backward.

Both are elementwise and memory-bound: the forward kernel reads gate and up once and writes the product once,
with the activation computed in fp32 and the result rounded once (torch rounds the activation, then the
product). The backward kernel recomputes the activation from gate instead of storing it, and writes both
gradients in one pass:

    d_up = dy * act(gate),    d_gate = dy * up * act'(gate)

so only gate and up are saved (both already live as the two projections' outputs).

Tensors are processed as rows of their last dim, which must be contiguous; the leading dims may be any strides
that fold into one row stride, so the two halves of a fused ``gate_up`` projection (``x.chunk(2, -1)``) are read
in place. Anything else is copied to a contiguous layout first.

The Triton path is exposed as the custom ops ``llmfast::gated_act_fwd`` / ``llmfast::gated_act_bwd`` (fake
implementations and an autograd formula registered), so ``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmfast import _backend, _validation
from llmfast.ops._arch import config_arch
from llmfast.ops._spec import KernelSpec, captured_launches, launch, launch_spec
from llmfast.ops.softmax import cast_out
from llmfast.reference import swiglu as reference

# ----------------------------------------------------------------------------------------------------------------
# Tuning: BLOCK columns of one row per program. 1024 elements on 4 warps is 8 per thread: one 16-byte vector
# load of 16-bit data per tensor.
# ----------------------------------------------------------------------------------------------------------------
GATED_CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "sm90": {"fwd": dict(BLOCK=1024, num_warps=4), "bwd": dict(BLOCK=1024, num_warps=4)},
    "sm80": {"fwd": dict(BLOCK=1024, num_warps=4), "bwd": dict(BLOCK=1024, num_warps=4)},
    # The interpreter: small blocks, so test rows cross several of them.
    "interpreter": {"fwd": dict(BLOCK=64, num_warps=1), "bwd": dict(BLOCK=64, num_warps=1)},
}

# Activation codes (constexpr).
ACT_SILU, ACT_GELU, ACT_GELU_TANH = 0, 1, 2
ACTIVATIONS = {"silu": ACT_SILU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}
_SQRT1_2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_TANH_C = tl.constexpr(0.044715)

# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(z):
    # 1 - 2 / (exp(2z) + 1): saturates to +-1 without overflow (exp -> inf gives 1, exp -> 0 gives -1).
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """act(g) in fp32."""
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * _SQRT1_2))
    else:
        return 0.5 * g * (1.0 + _tanh((g + g * g * g * _GELU_TANH_C) * _SQRT_2_PI))


@triton.jit
def _activation_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32, sharing the transcendental."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        a = g * sig
        da = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * _SQRT1_2))
        a = g * cdf
        da = cdf + g * tl.exp(-0.5 * g * g) * _INV_SQRT_2PI
    else:
        t = _tanh((g + g * g * g * _GELU_TANH_C) * _SQRT_2_PI)
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_PI * (1.0 + g * g * (3.0 * _GELU_TANH_C))
    return a, da


@triton.jit
def _gated_fwd_kernel(out_ptr, gate_ptr, up_ptr, n_cols, out_s_row, gate_s_row, up_s_row,
                      ACT: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (rows, column blocks): out = act(gate) * up."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    g = tl.load(gate_ptr + row * gate_s_row + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_s_row + cols, mask=m, other=0.0).to(tl.float32)
    y = _activation(g, ACT) * u
    tl.store(out_ptr + row * out_s_row + cols, cast_out(y, out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_bwd_kernel(dgate_ptr, dup_ptr, dy_ptr, gate_ptr, up_ptr, n_cols,
                      dgate_s_row, dup_s_row, dy_s_row, gate_s_row, up_s_row,
                      ACT: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (rows, column blocks): d_gate = dy * up * act'(gate), d_up = dy * act(gate)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    dy = tl.load(dy_ptr + row * dy_s_row + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * gate_s_row + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_s_row + cols, mask=m, other=0.0).to(tl.float32)
    a, da = _activation_and_grad(g, ACT)
    tl.store(dgate_ptr + row * dgate_s_row + cols, cast_out(dy * u * da, dgate_ptr.dtype.element_ty), mask=m)
    tl.store(dup_ptr + row * dup_s_row + cols, cast_out(dy * a, dup_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a (rows, n_cols) view with unit column stride, copying only when no such view exists."""
    n_cols = t.shape[-1] if t.dim() else 1
    if t.dim() == 0 or (t.stride(-1) != 1 and n_cols > 1):
        t = t.contiguous()
    try:
        return t.view(-1, n_cols)
    except RuntimeError:  # leading dims that do not fold into one row stride
        return t.contiguous().view(-1, n_cols)


def _config(kind: str, device: torch.device) -> dict[str, int]:
    return GATED_CONFIGS[config_arch(device)][kind]


def _grid(n_rows: int, n_cols: int, block: int) -> tuple[int, int]:
    return n_rows, triton.cdiv(n_cols, block)


def _forward_impl(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return out
    g, u, o = _rows(gate), _rows(up), out.view(-1, gate.shape[-1] if gate.dim() else 1)
    cfg = _config("fwd", gate.device)
    _backend.record_kernel_launch(f"{activation}_gated_fwd", cfg)
    launch(_gated_fwd_kernel, _grid(g.shape[0], g.shape[1], cfg["BLOCK"]))(
        o, g, u, g.shape[1], o.stride(0), g.stride(0), u.stride(0),
        ACT=ACTIVATIONS[activation], BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return out


def _backward_impl(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return dgate, dup
    n_cols = gate.shape[-1] if gate.dim() else 1
    dg, du = dgate.view(-1, n_cols), dup.view(-1, n_cols)
    d, g, u = _rows(dy), _rows(gate), _rows(up)
    cfg = _config("bwd", gate.device)
    _backend.record_kernel_launch(f"{activation}_gated_bwd", cfg)
    launch(_gated_bwd_kernel, _grid(g.shape[0], n_cols, cfg["BLOCK"]))(
        dg, du, d, g, u, n_cols, dg.stride(0), du.stride(0), d.stride(0), g.stride(0), u.stride(0),
        ACT=ACTIVATIONS[activation], BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return dgate, dup


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops with fake implementations and an autograd formula
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("llmfast::gated_act_fwd", mutates_args=())
def _gated_act_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    return _forward_impl(gate, up, activation)


@_gated_act_fwd.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("llmfast::gated_act_bwd", mutates_args=())
def _gated_act_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_impl(dy, gate, up, activation)


@_gated_act_bwd.register_fake
def _(dy, gate, up, activation):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _gated_act_bwd(dy, gate, up, ctx.activation)
    return dgate, dup, None


_gated_act_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(gate: object, up: object) -> None:
    _validation.check_tensor("gate", gate, dtypes=_validation.FLOAT_DTYPES)
    _validation.check_tensor("up", up, dtypes=_validation.FLOAT_DTYPES)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate and up must share one dtype, got {str(gate.dtype).replace('torch.', '')} and "
                        f"{str(up.dtype).replace('torch.', '')}")
    _validation.check_same_device(gate=gate, up=up)


def _gated(op: str, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    impl = _backend.resolve(op, gate)
    if impl == "triton" and gate.dtype in _KERNEL_DTYPES:
        return _gated_act_fwd(gate, up, activation)
    if impl == "reference":
        return reference.geglu(gate, up, "tanh" if activation == "gelu_tanh" else "none") if op == "geglu" \
            else reference.swiglu(gate, up)
    # torch-native: the activation and the product as torch ops (also fp64, served exactly).
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh" if activation == "gelu_tanh"
                                                           else "none")
    return act * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up`` (Llama's MLP: ``down_proj(swiglu(gate_proj(x), up_proj(x)))``).

    ``gate`` and ``up``: same shape and floating dtype (fp16/bf16/fp32 through the kernels, fp64 through
    torch). fp32 math, one rounding; differentiable, the backward recomputes silu from ``gate``.
    """
    _check(gate, up)
    return _gated("swiglu", gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GeGLU: ``gelu(gate, approximate) * up`` with ``approximate`` ``"none"`` (erf) or ``"tanh"`` (Gemma).

    Same contract as :func:`swiglu`.
    """
    _check(gate, up)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _gated("geglu", gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")


# ----------------------------------------------------------------------------------------------------------------
# Compile check
# ----------------------------------------------------------------------------------------------------------------

COMPILE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The representative launch: 4096 tokens of a Llama-3-8B MLP (intermediate size 14336), gate and up the two halves
# of one fused gate_up projection (row stride 2 x 14336, read in place), every size and stride 16-divisible.
_COMPILE_TOKENS, _COMPILE_COLS = 4096, 14336
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_specs() -> list[KernelSpec]:
    """Forward and backward kernels per activation, dtype and architecture, each captured from this module's own
    launch code (``_forward_impl`` / ``_backward_impl`` on ``meta`` tensors) with the arguments it passes."""
    specs: list[KernelSpec] = []
    for arch in ("sm80", "sm90"):
        for activation in ACTIVATIONS:
            for dtype in COMPILE_DTYPES:
                gate_up = torch.empty(_COMPILE_TOKENS, 2 * _COMPILE_COLS, dtype=dtype, device="meta")
                gate, up = gate_up.chunk(2, dim=-1)
                dy = torch.empty(_COMPILE_TOKENS, _COMPILE_COLS, dtype=dtype, device="meta")
                for kind, host in (("fwd", lambda: _forward_impl(gate, up, activation)),
                                   ("bwd", lambda: _backward_impl(dy, gate, up, activation))):
                    for call in captured_launches(host, arch):
                        specs.append(launch_spec(f"{activation}_gated_{kind}", call, f"{kind}_{_DTYPE_NAMES[dtype]}",
                                                 arches=(80 if arch == "sm80" else 90,)))
    return specs
