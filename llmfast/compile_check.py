"""Compile every registered Triton kernel ahead of time for real GPUs, with no GPU present.

    python -m llmfast.compile_check --arch 80 90 [--kernel attention_fwd] [--config d128] [--jobs N]

For each kernel, shipped config and architecture it runs ``triton.compile`` with ``GPUTarget("cuda", arch, 32)``
and the specialization a real launch gets (``tt.divisibility=16`` on aligned pointers and 16-multiple integers,
constants for integers equal to 1: see ``llmfast/ops/_spec.py``), assembles the PTX with the ``ptxas`` that
Triton's wheel carries to read registers and spills, reads the shared memory Triton reserved, and inspects the
compiled kernel: how many ``tl.dot`` it has (TTIR), which instruction each one became (TTGIR: ``wgmma``,
``mma`` = mma.sync, or ``fma``), and how many asynchronous copies (``cp.async``, TMA) feed them (PTX). One line each:

    <kernel> sm_<arch> <config> regs=N spills=N smem=N dots=N wgmma=N mma=N fma=N async=N

It exits non-zero when a kernel fails to compile, spills registers, needs more shared memory than the card has,
when a dot does not use the instruction its spec expects (every dot, not just one), or when a spec that must be
pipelined (16-bit matmul kernels with two or more stages) has no asynchronous copy.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Largest dynamic shared memory one block may opt into (bytes): A100 (sm_80) and H100 (sm_90).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class CompileResult:
    kernel: str
    arch: int
    config: str
    regs: int = 0
    spills: int = 0
    smem: int = 0
    dots: int = 0
    wgmma: int = 0
    mma: int = 0
    fma: int = 0
    async_copies: int = 0
    tile: str = ""
    num_warps: int = 0
    num_stages: int = 0
    error: str | None = None

    def line(self) -> str:
        text = (f"{self.kernel} sm_{self.arch} {self.config} regs={self.regs} spills={self.spills} "
                f"smem={self.smem} dots={self.dots} wgmma={self.wgmma} mma={self.mma} fma={self.fma} "
                f"async={self.async_copies}")
        return text + (f"  FAILED: {self.error}" if self.error else "")


def _ptxas_binaries() -> list[str]:
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    found = [os.path.join(bin_dir, name) for name in ("ptxas", "ptxas-blackwell")]
    return [path for path in found if os.path.exists(path)]


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """Registers and spilled bytes (stores + loads) that ptxas reports for the PTX's kernel."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # Triton may emit a PTX ISA newer than the older ptxas accepts: try each assembler the wheel ships.
        for ptxas in _ptxas_binaries():
            proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                report = proc.stdout + proc.stderr
                regs = max((int(m) for m in re.findall(r"Used (\d+) registers", report)), default=0)
                spills = sum(int(a) + int(b) for a, b in
                             re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report))
                return regs, spills
            errors.append(f"{os.path.basename(ptxas)}: {proc.stderr.strip().splitlines()[-1:]}")
    raise RuntimeError("ptxas failed: " + "; ".join(errors) if errors else "no ptxas found in the triton wheel")


def count_dots(ttir: str) -> int:
    """``tl.dot`` operations in the kernel after inlining (a dot in a loop counts once)."""
    return len(re.findall(r"= tt\.dot ", ttir))


def dot_instructions(ttgir: str) -> dict[str, int]:
    """How the dots of a TTGIR module lower: ``wgmma`` (``ttng.warp_group_dot``), ``mma`` (``tt.dot`` with an
    ``nvidia_mma`` version 2 result) or ``fma`` (``tt.dot`` on a blocked layout: CUDA cores)."""
    aliases = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<[^\n]*)$", ttgir, flags=re.M))
    counts = {"wgmma": 0, "mma": 0, "fma": 0}
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line and "=" in line.split("ttng.warp_group_dot")[0]:
            counts["wgmma"] += 1
            continue
        if not re.search(r"= tt\.dot ", line):
            continue
        result = line.rsplit("->", 1)[-1]
        encoding = re.search(r"(#\w+)>\s*(?:loc\(.*\))?\s*$", result)
        text = aliases.get(encoding.group(1), encoding.group(1)) if encoding else ""
        if "nvidia_mma" in text and "versionMajor = 3" in text:
            counts["wgmma"] += 1
        elif "nvidia_mma" in text:
            counts["mma"] += 1
        else:
            counts["fma"] += 1
    return counts


def async_copy_count(ptx: str) -> int:
    """Asynchronous global -> shared copies in the PTX: ``cp.async`` (sm_80+) and TMA bulk tensor copies."""
    return len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)", ptx))


def _expected_instruction(matrix: str, arch: int) -> str:
    if matrix == "tensor":
        return "wgmma" if arch >= 90 else "mma"
    return matrix


def compile_one(spec, arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget

    from llmfast.ops._spec import spec_specialization

    result = CompileResult(spec.kernel, arch, spec.config, num_warps=spec.num_warps, num_stages=spec.num_stages)
    try:
        signature, constexprs, attrs = spec_specialization(spec)
        result.tile = "x".join(str(constexprs[k]) for k in sorted(constexprs) if k.startswith("BLOCK_")
                               and k not in ("BLOCK_D", "BLOCK_DV"))
        source = triton.compiler.ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ptx = compiled.asm["ptx"]
        result.regs, result.spills = _ptxas_usage(ptx, arch)
        result.smem = int(compiled.metadata.shared)
        result.dots = count_dots(compiled.asm["ttir"])
        kinds = dot_instructions(compiled.asm["ttgir"])
        result.wgmma, result.mma, result.fma = kinds["wgmma"], kinds["mma"], kinds["fma"]
        result.async_copies = async_copy_count(ptx)
    except Exception as exc:  # report every failure as a line, keep checking the rest
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.error = "; ".join(check_result(spec, result)) or None
    return result


def check_result(spec, result: CompileResult) -> list[str]:
    """The problems of a compiled spec (empty: it passes)."""
    problems = []
    arch = result.arch
    if result.spills:
        problems.append(f"spills {result.spills} bytes")
    limit = SHARED_MEMORY_LIMIT.get(arch)
    if limit is not None and result.smem > limit:
        problems.append(f"needs {result.smem} bytes of shared memory, sm_{arch} has {limit}")
    matrix = spec.expected_matrix
    if matrix is not None:
        wanted = _expected_instruction(matrix, arch)
        got = {"wgmma": result.wgmma, "mma": result.mma, "fma": result.fma}
        if result.dots == 0 or got[wanted] != result.dots:
            problems.append(f"expected all {result.dots} dots on {wanted}, found "
                            + ", ".join(f"{k}={v}" for k, v in got.items()))
    if spec.pipelined and spec.num_stages >= 2 and result.async_copies == 0:
        problems.append(f"num_stages={spec.num_stages} but no cp.async / TMA copy: the main loop is not pipelined")
    return problems


MARKDOWN_HEADER = """# Compiled kernels: registers, shared memory, instructions

Generated by `{command}` (Triton {triton}, ptxas from its wheel; no GPU involved; without `--module` the command
covers every kernel module). Each row is one shipped config compiled with the specialization a real launch
gets, for one of the calls it serves. `tile`: the BLOCK_* sizes in name order (attention: BLOCK_M x BLOCK_N;
softmax and the norms: BLOCK_C x BLOCK_R, columns x rows); `dots`: `tl.dot`s in the kernel and the instruction
each became (wgmma, mma = mma.sync, fma = CUDA cores); `async`: asynchronous global-to-shared copies (cp.async /
TMA), i.e. a pipelined main loop. These are compiler figures, not speed measurements.
"""


def markdown_table(results: list[CompileResult], command: str = "python -m llmfast.compile_check") -> str:
    """The results as a markdown document (one table per kernel family)."""
    import triton

    lines = [MARKDOWN_HEADER.format(triton=triton.__version__, command=command)]
    family = None
    for r in sorted(results, key=lambda r: (r.kernel.split("_")[0], r.kernel, r.arch, r.config)):
        if r.kernel.split("_")[0] != family:
            family = r.kernel.split("_")[0]
            lines += ["", f"## {family}", "",
                      "| kernel | arch | config | tile | warps | stages | regs | spills | smem (KiB) | dots | async "
                      "| status |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        kinds = ", ".join(f"{k} {v}" for k, v in (("wgmma", r.wgmma), ("mma", r.mma), ("fma", r.fma)) if v)
        dots = f"{r.dots} ({kinds})" if r.dots else "0"
        status = "ok" if r.error is None else "FAILED: " + r.error.replace("|", "/")
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.config} | {r.tile or '-'} | {r.num_warps} | {r.num_stages} "
                     f"| {r.regs} | {r.spills} | {r.smem / 1024:.1f} | {dots} | {r.async_copies} | {status} |")
    return "\n".join(lines) + "\n"


def collect_specs(modules=None):
    from llmfast.ops import KERNEL_MODULES

    specs = []
    for name in modules or KERNEL_MODULES:
        module = importlib.import_module(name)
        specs.extend(module.compile_specs())
    return specs


_worker_specs: list = []


def _init_worker(modules) -> None:
    global _worker_specs
    _worker_specs = collect_specs(modules)


def _compile_by_index(job: tuple[int, int]):
    index, arch = job
    return compile_one(_worker_specs[index], arch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmfast.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--kernel", action="append", help="only kernels whose name contains this text")
    parser.add_argument("--config", action="append", help="only configs whose name contains this text")
    parser.add_argument("--module", action="append", help="only these kernel modules (e.g. llmfast.ops.softmax)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write every result as a markdown table (e.g. benchmarks/COMPILE.md)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per core)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET; the interpreter does not compile kernels", file=sys.stderr)
        return 2
    # Triton 3.9 warns on every compile unless FP fusion is chosen explicitly; keep its current default (on).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    specs = collect_specs(args.module)
    jobs = [(index, arch) for index, spec in enumerate(specs)
            if (not args.kernel or any(k in spec.kernel for k in args.kernel))
            and (not args.config or any(c in spec.config for c in args.config))
            for arch in args.arch if spec.arches is None or arch in spec.arches]
    failures = 0
    collected: list[CompileResult] = []
    # Compilation is CPU-bound Python and ptxas: worker processes (each collecting the specs itself, since
    # JIT functions do not pickle) keep every core busy; results come back in the order of the jobs.
    if args.jobs > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(args.jobs, initializer=_init_worker,
                                                    initargs=(args.module,)) as pool:
            results = pool.map(_compile_by_index, jobs, chunksize=4)
            for result in results:
                print(result.line(), flush=True)
                failures += result.error is not None
                collected.append(result)
    else:
        for index, arch in jobs:
            result = compile_one(specs[index], arch)
            print(result.line(), flush=True)
            failures += result.error is not None
            collected.append(result)
    if args.markdown is not None:
        given = list(sys.argv[1:] if argv is None else argv)
        shown = [a for i, a in enumerate(given) if not a.startswith("--jobs") and (i == 0 or given[i - 1] != "--jobs")]
        args.markdown.write_text(markdown_table(collected, " ".join(["python -m llmfast.compile_check", *shown])))
    specs = {jobs_index for jobs_index, _ in jobs}
    print(f"compile_check: {len(jobs)} kernel builds ({len(specs)} configs), {failures} failed", file=sys.stderr)
    return 1 if failures or not jobs else 0


if __name__ == "__main__":
    sys.exit(main())
