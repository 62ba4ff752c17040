"""Ahead-of-time compile check (``python -m llmfast.compile_check``): every named config of every architecture,
built from the launches that really run.

Each case below is a call of the real host code (:func:`_forward_impl` and :func:`_backward_impl`) on ``meta``
tensors, with the architecture's configs forced and the kernel launches captured instead of run
(:func:`llmfast.ops._spec.capture_launches`). So a spec carries exactly the arguments a GPU launch passes, and the
compile check gives them the specialization Triton's launcher would (16-divisible pointers and strides, constants
for arguments equal to 1). Together the cases launch every variant: non-causal, causal aligned top-left (SDPA) and
bottom-right (flash-attn), sliding windows, varlen batches, GQA, bool and additive masks (with the mask gradient),
dropout, the LSE gradient, fp32 inputs exact (IEEE) and with TF32, head dims that are not multiples of 16, logit
soft-capping and ALiBi (with and without an additive mask's gradient), GQA's dK/dV pass with each group's query
heads in one program and shared over several (fp32 partials in a workspace); and the S_dmask kernel of
``return_attn_probs`` (one config, every score feature on).
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch

import contextlib

from llmfast.ops._arch import forced_config_arch
from llmfast.ops._spec import KernelSpec, capture_launches

from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .configs import ATTENTION_CONFIGS, AUTOTUNE_CANDIDATES, _block_d, config_key, forced_gqa_split
from .forward import _attn_fwd_kernel
from .launch import _backward_impl, _forward_impl, _Problem
from .probs import _attn_probs_kernel, _probs_impl

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_KERNELS = {  # kernel function -> (config kernel key, compile-check kernel name)
    _attn_fwd_kernel: ("fwd", "attention_fwd"),
    _attn_bwd_preprocess_kernel: ("bwd_preprocess", "attention_bwd_preprocess"),
    _attn_bwd_dkdv_kernel: ("bwd_dkdv", "attention_bwd_dkdv"),
    _attn_bwd_dq_kernel: ("bwd_dq", "attention_bwd_dq"),
    _attn_probs_kernel: ("probs", "attention_probs"),
}
ALL = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")
MAIN = ("fwd", "bwd_dkdv", "bwd_dq")

# Representative sizes: a batch of 2, 16 query heads, 1024 tokens (the multiples of 16 a real model has).
BATCH, HEADS, SEQLEN = 2, 16, 1024


@dataclasses.dataclass(frozen=True)
class Case:
    """One kind of call. ``kernels``: which of its launches to compile (the others are compiled by other cases)."""

    name: str
    dtype: torch.dtype
    kernels: tuple[str, ...]
    layout: str = "bshd"           # "bhsd" (SDPA), "bshd" (flash_attn_func), "thd" (varlen)
    causal: str = "bottom_right"   # "none", "top_left" or "bottom_right"
    window: tuple[int, int] = (-1, -1)
    kv_heads: int = HEADS
    mask: str | None = None        # None, "bool" or "additive" (the additive one receives a gradient)
    dropout: bool = False
    dlse: bool = False
    tf32: bool = False
    # Head dim 8 below the bucket and an odd length: the head strides are not multiples of 16, so the launch
    # gets no divisibility on them; the loads stay scalar and are not pipelined (cp.async needs the alignment).
    unaligned: bool = False
    softcap: float = 0.0           # logit soft-capping (Gemma 2's 50)
    alibi: bool = False            # ALiBi slopes, one per query head
    # Programs sharing one GQA group in the dK/dV pass (None: the launch's heuristic). 1 keeps the group loop in
    # one program, writing dK/dV directly; > 1 writes fp32 partials to a workspace (and group_split is no constant).
    gqa_split: int | None = None


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
CASES = {
    # 16-bit inputs without mask or dropout: the plain configs.
    "": (
        Case("flash_causal", F16, ALL),
        Case("sdpa_causal", BF16, MAIN, layout="bhsd", causal="top_left"),
        Case("full_gqa", F16, MAIN, causal="none", kv_heads=4, gqa_split=1),
        Case("gqa_split", F16, ("bwd_dkdv",), kv_heads=4, gqa_split=3),
        Case("varlen_window", BF16, ALL, layout="thd", window=(256, 0)),
        Case("unaligned", F16, ALL, unaligned=True),
        Case("dlse", F16, ("bwd_preprocess",), dlse=True),
    ),
    # 16-bit inputs with a mask, dropout, soft-capping or ALiBi: the "_extra" configs.
    "_extra": (
        Case("additive_mask", F16, MAIN, layout="bhsd", causal="top_left", mask="additive"),
        Case("bool_mask_dropout", BF16, MAIN, layout="bhsd", causal="none", mask="bool", dropout=True),
        Case("dropout_causal", F16, MAIN, dropout=True),
        Case("softcap_alibi", BF16, MAIN, softcap=50.0, alibi=True),
        Case("additive_mask_softcap", F16, MAIN, layout="bhsd", causal="top_left", mask="additive", softcap=30.0),
        Case("dropout_softcap_alibi", BF16, MAIN, dropout=True, softcap=50.0, alibi=True),
        Case("gqa_split_dropout_softcap_alibi", BF16, ("bwd_dkdv",), kv_heads=4, dropout=True, softcap=50.0,
             alibi=True, gqa_split=3),
    ),
    # fp32 inputs: exact (IEEE) dots on the FMA units, or TF32 on the tensor cores when torch allows it.
    "_fp32": (
        Case("ieee_causal", F32, ALL),
        Case("tf32_causal", F32, MAIN, tf32=True),
        Case("ieee_mask_dropout", F32, MAIN, layout="bhsd", causal="none", mask="additive", dropout=True),
        Case("ieee_softcap_alibi", F32, MAIN, softcap=50.0, alibi=True),
        Case("ieee_gqa_split", F32, ("bwd_dkdv",), kv_heads=4, gqa_split=3),
    ),
}


def _inputs(case: Case, head_dim: int):
    """Meta tensors (no memory) shaped like the case's call, and the call's problem arguments."""
    seqlen = SEQLEN - 23 if case.unaligned else SEQLEN
    meta = dict(device="meta", dtype=case.dtype)
    if case.layout == "bhsd":
        q = torch.empty(BATCH, HEADS, seqlen, head_dim, **meta)
        k, v = (torch.empty(BATCH, case.kv_heads, seqlen, head_dim, **meta) for _ in range(2))
    elif case.layout == "bshd":
        q = torch.empty(BATCH, seqlen, HEADS, head_dim, **meta)
        k, v = (torch.empty(BATCH, seqlen, case.kv_heads, head_dim, **meta) for _ in range(2))
    else:
        q = torch.empty(BATCH * seqlen, HEADS, head_dim, **meta)
        k, v = (torch.empty(BATCH * seqlen, case.kv_heads, head_dim, **meta) for _ in range(2))
    cu = torch.empty(BATCH + 1, device="meta", dtype=torch.int32) if case.layout == "thd" else None
    mask = None
    if case.mask == "bool":
        mask = torch.empty(BATCH, HEADS, seqlen, seqlen, device="meta", dtype=torch.bool)
    elif case.mask == "additive":
        mask = torch.empty(1, 1, seqlen, seqlen, **meta)
    left, right = case.window
    if case.causal != "none":
        right = 0
    problem = dict(mask=mask, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seqlen if cu is not None else 0,
                   max_seqlen_k=seqlen if cu is not None else 0, layout=case.layout,
                   scale=1.0 / math.sqrt(head_dim), window_left=left, window_right=right,
                   bottom_right=case.causal != "top_left", dropout_p=0.1 if case.dropout else 0.0,
                   seed=torch.tensor([1234]) if case.dropout else None, softcap=case.softcap,
                   alibi_slopes=torch.empty(HEADS, device="meta", dtype=torch.float32) if case.alibi else None)
    return q, k, v, problem


def capture_case(case: Case, head_dim: int, arch: str):
    """The kernel launches of one forward + backward call of ``case`` under ``arch``'s configs."""
    q, k, v, problem = _inputs(case, head_dim)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.tf32
    split = forced_gqa_split(case.gqa_split) if case.gqa_split is not None else contextlib.nullcontext()
    try:
        with forced_config_arch(arch), split, capture_launches() as launches:
            out, lse = _forward_impl(q, k, v, **problem)
            dlse = torch.empty_like(lse) if case.dlse else None
            _backward_impl(torch.empty_like(out), dlse, q, k, v, out, lse, **problem,
                           mask_needs_grad=case.mask == "additive")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return launches


def _matrix(kernel_key: str, case: Case, cfg: dict) -> str | None:
    if kernel_key == "bwd_preprocess":
        return None  # no dot
    if case.dtype == torch.float32:
        # Exact fp32 runs on the FMA units; TF32 on mma.sync, since the fp32 tiles (16-32 rows) are below
        # wgmma's 64-row warpgroup tile.
        return "mma" if case.tf32 else "fma"
    return "mma" if cfg.get("mma_sync", False) else "tensor"


def case_specs(arch_key: str, bucket: int, kind: str, case: Case) -> list[KernelSpec]:
    """The specs of one case at one head-dim bucket under ``arch_key``'s configs (the kernels ``case`` keeps)."""
    arch = int(arch_key[2:])
    head_dim = bucket - 8 if case.unaligned else bucket
    specs = []
    for call in capture_case(case, head_dim, arch_key):
        kernel_key, kernel_name = _KERNELS[call.kernel]
        if kernel_key not in case.kernels:
            continue
        config_name = config_key(kernel_key, arch_key, _block_d(head_dim), case.dtype, kind == "_extra",
                                 case.window[0] >= 0, head_dim % 16 != 0)
        cfg = ATTENTION_CONFIGS[arch_key][config_name]
        label = f"{config_name}_{_TRITON_DTYPE[case.dtype]}_{case.name}"
        if case.dtype == torch.float32 and "_fp32" in config_name:
            label = f"{config_name}_{case.name}"
        num_stages = call.option("num_stages", 2)
        matrix = _matrix(kernel_key, case, cfg)
        specs.append(KernelSpec(
            kernel_name, call.kernel, config=label, num_warps=call.option("num_warps", 4), num_stages=num_stages,
            arches=(arch,), launch_args=call.launch_args(), matrix=matrix,
            pipelined=matrix is not None and case.dtype != torch.float32 and num_stages >= 2 and not case.unaligned))
    return specs


def config_specs(arch_key: str, config: str, override: dict | None = None,
                 only_cases: tuple[str, ...] | None = None, label: str | None = None) -> list[KernelSpec]:
    """The specs of every case whose launches resolve to ``config`` (exactly: not to a ``_window`` or
    ``_unaligned`` refinement of it), optionally with the config replaced by ``override`` and the specs'
    labels starting with ``label`` instead of the config's name (autotuning alternatives, tile candidates)."""
    kernel_key, bucket, kind = re.fullmatch(r"(\w+?)_d(\d+)(_fp32|_extra)?(?:_window|_unaligned)?", config).groups()
    table = ATTENTION_CONFIGS[arch_key]
    saved = table[config]
    if override is not None:
        table[config] = dict(saved, **override)
    try:
        specs = []
        for case in CASES[kind or ""]:
            if kernel_key not in case.kernels or (only_cases and case.name not in only_cases):
                continue
            pattern = re.escape(config) + r"_(?:fp16_|bf16_|fp32_)?" + re.escape(case.name)
            for spec in case_specs(arch_key, int(bucket), kind or "", case):
                if re.fullmatch(pattern, spec.config):
                    if label is not None:
                        spec = dataclasses.replace(spec, config=label + spec.config[len(config):])
                    specs.append(spec)
        return specs
    finally:
        table[config] = saved


def probs_specs(arch_key: str, bucket: int, dtype: torch.dtype) -> list[KernelSpec]:
    """The S_dmask kernel (``return_attn_probs``) at one head-dim bucket: its one config, with soft-capping, ALiBi,
    a sliding window and dropout all on (the most registers it can need)."""
    case = Case("probs", dtype, ("probs",), window=(256, 0), dropout=True, softcap=50.0, alibi=True)
    q, k, v, problem = _inputs(case, bucket)
    lse = torch.empty(BATCH, HEADS, SEQLEN, device="meta", dtype=torch.float32)
    args = [problem[name] for name in ("mask", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                                       "layout", "scale", "window_left", "window_right", "bottom_right",
                                       "dropout_p", "seed", "softcap", "alibi_slopes")]
    with forced_config_arch(arch_key), capture_launches() as launches:
        _probs_impl(q, k, lse, _Problem(q, k, v, *args))
    arch = int(arch_key[2:])
    return [KernelSpec("attention_probs", call.kernel, config=f"probs_d{bucket}_{_TRITON_DTYPE[dtype]}_softcap_alibi",
                       num_warps=call.option("num_warps", 4), num_stages=call.option("num_stages", 1),
                       arches=(arch,), launch_args=call.launch_args(),
                       matrix="fma" if dtype == torch.float32 else "mma") for call in launches]


def compile_specs() -> list[KernelSpec]:
    """Every named config of every GPU architecture, each compiled for the calls (cases) it serves, and every
    autotuning alternative for the calls of the config it stands in for."""
    specs: dict[tuple[tuple[int, ...] | None, str], KernelSpec] = {}
    for arch_key in ("sm80", "sm90"):
        for bucket in (64, 128, 256):
            for kind, cases in CASES.items():
                for case in cases:
                    for spec in case_specs(arch_key, bucket, kind, case):
                        specs.setdefault((spec.arches, spec.config), spec)
            for dtype in (F16, F32):
                for spec in probs_specs(arch_key, bucket, dtype):
                    specs.setdefault((spec.arches, spec.config), spec)
        for name, alternatives in AUTOTUNE_CANDIDATES[arch_key].items():
            for index, alternative in enumerate(alternatives):
                for spec in config_specs(arch_key, name, alternative, label=f"{name}_autotune{index}"):
                    specs.setdefault((spec.arches, spec.config), spec)
    return list(specs.values())
