"""llmfast.compile_check, the checker itself: the launch specialization it compiles, how it reads the compiled
kernel (dots and their instructions, asynchronous copies), what it rejects (a deliberately spilling config, dots
off the expected instruction, an unpipelined 16-bit main loop), and the shipped attention forward it must accept.

Compiling for a GPU needs Triton's real JIT (not the interpreter this test session runs under), so the tests that
compile run a short script in a subprocess with ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from llmfast import compile_check
from llmfast.ops._spec import KernelSpec

REPO = Path(__file__).resolve().parent.parent


def run_compiled(script: str, timeout: int = 600) -> dict:
    """Run ``script`` with Triton's real JIT; it prints one JSON object as its last line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:  # @triton.jit needs its source in a file
        path = Path(tmp) / "compile_script.py"
        path.write_text(textwrap.dedent(script))
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- reading the IR

TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 64, 16]}>
module {
    %a = tt.dot %x, %y, %z, inputPrecision = tf32 : tensor<64x64xf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * tensor<64x64xf16, #ttg.dot_op<{opIdx = 1, parent = #mma, kWidth = 2}>> -> tensor<64x64xf32, #mma> loc(#loc1)
    %b = ttng.warp_group_dot %x, %y, %z {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<64x64xf16, #shared, #smem> * !ttg.memdesc<64x64xf16, #shared1, #smem> -> tensor<64x64xf32, #mma1> loc(#loc2)
    %c = tt.dot %x, %y, %z : tensor<16x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x16xf32, #blocked> loc(#loc3)
    %d = ttng.warp_group_dot_wait %b {pendings = 0 : i32} : tensor<64x64xf32, #mma1>
}
"""


def test_dot_instructions_classify_every_dot():
    assert compile_check.dot_instructions(TTGIR) == {"wgmma": 1, "mma": 1, "fma": 1}
    assert compile_check.count_dots("%1 = tt.dot %a, %b, %c : x\n%2 = tt.dot %d, %e, %f : y\n") == 2


def test_async_copies_are_counted():
    ptx = ("cp.async.cg.shared.global [%r1], [%rd2], 16, p;\ncp.async.commit_group;\ncp.async.wait_group 0;\n"
           "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r3], [%rd4, {%r5}], [%r6];")
    assert compile_check.async_copy_count(ptx) == 2


def _result(**fields) -> compile_check.CompileResult:
    base = dict(kernel="k", arch=90, config="c", regs=100, spills=0, smem=1024, dots=4, wgmma=4, mma=0, fma=0,
                async_copies=8)
    base.update(fields)
    return compile_check.CompileResult(**base)


def _spec(**fields) -> KernelSpec:
    return KernelSpec("k", None, config="c", **fields)


def test_check_result_accepts_a_good_build_and_names_each_problem():
    spec = _spec(matrix="tensor", pipelined=True, num_stages=2)
    assert compile_check.check_result(spec, _result()) == []
    problems = compile_check.check_result(spec, _result(spills=64, smem=300_000, wgmma=3, mma=1, async_copies=0))
    text = "; ".join(problems)
    assert "spills 64 bytes" in text and "shared memory" in text
    assert "expected all 4 dots on wgmma" in text and "not pipelined" in text
    # On sm_80 "tensor" means mma.sync; a kernel expected to use mma.sync everywhere must not use wgmma.
    assert compile_check.check_result(spec, _result(arch=80, wgmma=0, mma=4)) == []
    assert compile_check.check_result(_spec(matrix="mma"), _result()) != []
    assert compile_check.check_result(_spec(matrix="fma"), _result(wgmma=0, fma=4)) == []
    assert compile_check.check_result(_spec(expect_mma=True), _result(arch=80, wgmma=0, mma=0, fma=4)) != []


# ---------------------------------------------------------------------------------------------- specialization

def test_launch_specialization_matches_what_tritons_launcher_builds():
    # A real JIT function (not the interpreter's): the specialization of a launch with these values.
    out = run_compiled("""
        import json, torch, triton, triton.language as tl
        from llmfast.ops._spec import launch_specialization

        @triton.jit(do_not_specialize=["flag"])
        def kernel(x_ptr, y_ptr, n, stride, one, odd, flag, scale, BLOCK: tl.constexpr):
            pass

        sig, consts, attrs = launch_specialization(kernel, dict(
            x_ptr=torch.float16, y_ptr=torch.int32, n=4096, stride=1, one=1, odd=17, flag=1, scale=0.5, BLOCK=64))
        print(json.dumps({"sig": sig, "consts": {k: int(v) for k, v in consts.items()},
                          "attrs": {str(k[0]): v for k, v in attrs.items()}}))
    """)
    assert out["sig"] == {"x_ptr": "*fp16", "y_ptr": "*i32", "n": "i32", "stride": "constexpr", "one": "constexpr",
                          "odd": "i32", "flag": "i32", "scale": "fp32", "BLOCK": "constexpr"}
    assert out["consts"] == {"stride": 1, "one": 1, "BLOCK": 64}
    # Aligned pointers and 16-multiple ints get tt.divisibility=16; 17, the unspecialized flag and floats do not.
    assert out["attrs"] == {"0": [["tt.divisibility", 16]], "1": [["tt.divisibility", 16]],
                            "2": [["tt.divisibility", 16]]}


def test_attention_specs_carry_the_launch_arguments_of_the_real_host_code():
    from llmfast.ops import attention as attn

    specs = attn.compile_specs()
    by_config = {(s.arches, s.config): s for s in specs}
    fwd = by_config[((90,), "fwd_d128_fp16_flash_causal")]
    assert fwd.launch_args["stride_qm"] == 16 * 128 and fwd.launch_args["group_size"] == 1
    assert fwd.launch_args["BLOCK_M"] == attn.ATTENTION_CONFIGS["sm90"]["fwd_d128"]["BLOCK_M"]
    assert fwd.matrix == "tensor" and fwd.pipelined
    # Every launchable variant is compiled somewhere.
    flags = [s.launch_args for s in specs]
    for key, value in [("MASK_IS_BOOL", True), ("HAS_MASK", True), ("STORE_DS", True), ("DROPOUT", True),
                       ("IS_VARLEN", True), ("HAS_DLSE", True), ("FP32_IEEE", True), ("FP32_IEEE", False),
                       ("HAS_LEFT", True), ("BOTTOM_RIGHT", False), ("BOTTOM_RIGHT", True)]:
        assert any(f.get(key) is value for f in flags), (key, value)
    assert any(not f.get("HAS_LEFT") and not f.get("HAS_RIGHT") and "HAS_RIGHT" in f for f in flags)
    assert any(f["Q"] == torch.float32 and not f["FP32_IEEE"] for f in flags if "FP32_IEEE" in f)  # TF32
    assert any(f.get("group_size", 1) != 1 for f in flags)  # GQA
    # GQA's dK/dV pass both ways: a group in one program (dK/dV written directly) and shared over several (fp32
    # partials in a workspace).
    dkdv = [f for f in flags if "group_split" in f and f["group_size"] > 1]
    assert any(f["group_split"] == 1 and f["DK"] == torch.float16 for f in dkdv)
    assert any(f["group_split"] > 1 and f["DK"] == torch.float32 and f["Q"] != torch.float32 for f in dkdv)


def test_every_spec_carries_its_launch():
    # Every registered kernel compiles with the launch specialization (none falls back to a bare signature).
    specs = compile_check.collect_specs()
    assert specs and [s for s in specs if s.launch_args is None] == []


def test_norm_specs_are_captured_from_the_ops_launch_code():
    from llmfast.ops import _norm, layer_norm, rms_norm

    specs = {(s.kernel, s.config): s for s in rms_norm.compile_specs() + layer_norm.compile_specs()}
    fwd = specs[("rms_norm_fwd_residual_weight", "c4096_bf16")].launch_args
    tile = _norm.NORM_CONFIGS["sm90"].fwd_tiles["c4096"]
    assert (fwd["BLOCK_C"], fwd["n_cols"], fwd["x_s_row"], fwd["x_s_col"]) == (4096, 4096, 4096, 1)
    assert fwd["HAS_RESIDUAL"] and fwd["r_ptr"] == torch.bfloat16 and fwd["n_rows"] % 16 == 0
    assert specs[("rms_norm_fwd_residual_weight", "c4096_bf16")].num_warps == tile.num_warps
    # Mixed precision: bf16 x with an fp32 weight writes an fp32 output, and its backward reads an fp32 dy.
    mixed = specs[("rms_norm_bwd_weight_dw_fp32_weight", "c1024_bf16")].launch_args
    assert (mixed["x_ptr"], mixed["w_ptr"], mixed["dy_ptr"], mixed["dw_ptr"]) == (
        torch.bfloat16, torch.float32, torch.float32, torch.float32)
    looped = specs[("layer_norm_bwd_weight_dw_db", "looped_fp32")]
    assert looped.fn is _norm._norm_bwd_looped_kernel and looped.launch_args["COMPUTE_DB"]
    assert looped.launch_args["n_cols"] > _norm.NORM_CONFIGS["sm90"].max_single_pass_bwd
    # A launch leaving num_stages out gets Triton's default, and so does its spec.
    assert looped.num_stages == 3


def test_rotary_swiglu_and_cross_entropy_specs_are_captured_from_the_launch_code():
    from llmfast.ops import cross_entropy, rotary, swiglu

    qk = next(s for s in rotary.compile_specs() if s.kernel == "rotary_qk" and s.config == "k64_bf16_cosbf16")
    assert qk.launch_args["cos_ptr"] == torch.bfloat16 and qk.launch_args["COS_FULL"]
    assert qk.launch_args["q_sd"] == 1 and qk.launch_args["half"] == 64 and qk.launch_args["n_heads_k"] == 8
    gated = next(s for s in swiglu.compile_specs() if s.kernel == "silu_gated_bwd" and s.config == "bwd_fp16")
    assert gated.launch_args["gate_s_row"] == 2 * gated.launch_args["n_cols"]  # halves of a fused gate_up
    ce = {(s.kernel, s.config): s.launch_args for s in cross_entropy.compile_specs()}
    # int32 targets are their own build: the target pointer (and the argmax slot it stands in for) change type.
    assert ce[("cross_entropy_grad_i32", "v4k_bf16")]["target_ptr"] == torch.int32
    assert ce[("cross_entropy_grad", "v4k_bf16")]["target_ptr"] == torch.int64
    assert ce[("cross_entropy_grad", "v4k_bf16")]["z_scale_offset"] == 1  # mean's [ce, z] scale pair
    assert ce[("cross_entropy_grad_all", "v1k_fp32")]["TOKEN_SCALING"]
    # reduction="none": one scale per row at stride 1 (a launch constant), no z-loss offset
    assert ce[("cross_entropy_grad_per_row", "v4k_bf16")]["scale_row_stride"] == 1
    assert ce[("cross_entropy_grad_all_per_row", "v1k_fp32")]["z_scale_offset"] == 0
    for kernel in ("cross_entropy_shard_stats", "cross_entropy_shard_grad"):
        args = ce[(kernel, "v4k_fp32")]
        assert args["HAS_WEIGHT"] and args["HAS_SOFTCAP"] and args["vocab_start"] == args["n_cols"]


# ---------------------------------------------------------------------------------------------- real compiles

def test_checker_rejects_a_spilling_config_and_accepts_a_small_one():
    out = run_compiled("""
        import json, triton, triton.language as tl
        from llmfast import compile_check
        from llmfast.ops._spec import KernelSpec

        @triton.jit
        def accumulate(x_ptr, out_ptr, n_steps, BLOCK: tl.constexpr):
            # A BLOCK x BLOCK fp32 accumulator that lives across the loop: 128 x 128 on one warp is 512
            # registers a thread, past the 255 a thread can have.
            offs = tl.arange(0, BLOCK)
            acc = tl.zeros([BLOCK, BLOCK], tl.float32)
            for step in range(n_steps):
                acc += tl.load(x_ptr + step * BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :])
                acc = acc * 0.5 + tl.sqrt(tl.abs(acc))
            tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)

        results = {}
        for name, block, warps in (("spilling", 128, 1), ("small", 32, 4)):
            spec = KernelSpec("accumulate", accumulate, config=name, num_warps=warps, num_stages=1,
                              launch_args=dict(x_ptr=__import__("torch").float32, out_ptr=__import__("torch").float32,
                                               n_steps=7, BLOCK=block))
            result = compile_check.compile_one(spec, 80)
            results[name] = {"line": result.line(), "spills": result.spills, "error": result.error}
        print(json.dumps(results))
    """)
    assert out["spilling"]["spills"] > 0 and "spills" in out["spilling"]["error"], out
    assert out["small"]["error"] is None and out["small"]["spills"] == 0, out


@pytest.mark.parametrize("arch,instruction", [(90, "wgmma"), (80, "mma")])
def test_shipped_d128_forward_is_a_large_pipelined_tensor_core_tile(arch, instruction):
    # The bar: the 16-bit head-dim-128 forward, compiled as launched, has a tile of at least 128 x 64,
    # every dot on the arch's matrix instruction, asynchronous copies feeding the loop, and no spills.
    out = run_compiled(f"""
        import json
        from llmfast import compile_check
        from llmfast.ops.attention import compile_specs
        spec = next(s for s in compile_specs() if s.arches == ({arch},) and s.config == "fwd_d128_fp16_flash_causal")
        r = compile_check.compile_one(spec, {arch})
        print(json.dumps(dict(error=r.error, spills=r.spills, dots=r.dots, wgmma=r.wgmma, mma=r.mma,
                              async_copies=r.async_copies, BLOCK_M=spec.launch_args["BLOCK_M"],
                              BLOCK_N=spec.launch_args["BLOCK_N"])))
    """)
    assert out["error"] is None, out
    assert out["BLOCK_M"] >= 128 and out["BLOCK_N"] >= 64, out
    assert out["spills"] == 0 and out["async_copies"] > 0, out
    assert out["dots"] > 0 and out[instruction] == out["dots"], out
