"""Compile every registered Triton kernel ahead of time for real GPUs, with no GPU present.

    python -m llmfast.compile_check --arch 80 90

For each kernel, shipped config and architecture it runs ``triton.compile`` with ``GPUTarget("cuda", arch, 32)``,
assembles the PTX with the ``ptxas`` that Triton's wheel carries to read registers and spills, reads the shared
memory Triton reserved, and looks for matrix instructions (``wgmma`` on sm_90, ``mma`` on sm_80). One line each:

    <kernel> sm_<arch> <config> regs=N spills=N smem=N mma=<wgmma|mma|none>

It exits non-zero when a kernel fails to compile, spills registers, needs more shared memory than the card has,
or lacks the matrix instructions a matmul kernel must use.
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

# Largest dynamic shared memory one block may opt into (bytes): A100 (sm_80) and H100 (sm_90).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class CompileResult:
    kernel: str
    arch: int
    config: str
    regs: int
    spills: int
    smem: int
    mma: str
    error: str | None = None

    def line(self) -> str:
        text = (f"{self.kernel} sm_{self.arch} {self.config} regs={self.regs} spills={self.spills} "
                f"smem={self.smem} mma={self.mma}")
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


def _matrix_instructions(ptx: str) -> str:
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


def compile_one(spec, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        source = triton.compiler.ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ptx = compiled.asm["ptx"]
        regs, spills = _ptxas_usage(ptx, arch)
        result = CompileResult(spec.kernel, arch, spec.config, regs, spills, int(compiled.metadata.shared),
                               _matrix_instructions(ptx))
    except Exception as exc:  # report every failure as a line, keep checking the rest
        return CompileResult(spec.kernel, arch, spec.config, 0, 0, 0, "none", f"{type(exc).__name__}: {exc}")
    problems = []
    if result.spills:
        problems.append(f"spills {result.spills} bytes")
    limit = SHARED_MEMORY_LIMIT.get(arch)
    if limit is not None and result.smem > limit:
        problems.append(f"needs {result.smem} bytes of shared memory, sm_{arch} has {limit}")
    if spec.expect_mma:
        wanted = "wgmma" if arch >= 90 else "mma"
        if result.mma != wanted:
            problems.append(f"expected {wanted} instructions, found {result.mma}")
    result.error = "; ".join(problems) or None
    return result


def collect_specs(modules=None):
    from llmfast.ops import KERNEL_MODULES

    specs = []
    for name in modules or KERNEL_MODULES:
        module = importlib.import_module(name)
        specs.extend(module.compile_specs())
    return specs


_worker_specs: list = []


def _init_worker() -> None:
    global _worker_specs
    _worker_specs = collect_specs()


def _compile_by_index(job: tuple[int, int]):
    index, arch = job
    return compile_one(_worker_specs[index], arch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmfast.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--kernel", action="append", help="only kernels whose name contains this text")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per core)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET; the interpreter does not compile kernels", file=sys.stderr)
        return 2
    # Triton 3.9 warns on every compile unless FP fusion is chosen explicitly; keep its current default (on).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    specs = collect_specs()
    jobs = [(index, arch) for index, spec in enumerate(specs)
            if not args.kernel or any(k in spec.kernel for k in args.kernel)
            for arch in args.arch if spec.arches is None or arch in spec.arches]
    failures = 0
    # Compilation is CPU-bound Python and ptxas: worker processes (each collecting the specs itself, since
    # JIT functions do not pickle) keep every core busy; results come back in the order of the jobs.
    if args.jobs > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(args.jobs, initializer=_init_worker) as pool:
            results = pool.map(_compile_by_index, jobs, chunksize=4)
            for result in results:
                print(result.line(), flush=True)
                failures += result.error is not None
    else:
        for index, arch in jobs:
            result = compile_one(specs[index], arch)
            print(result.line(), flush=True)
            failures += result.error is not None
    specs = {jobs_index for jobs_index, _ in jobs}
    print(f"compile_check: {len(jobs)} kernel builds ({len(specs)} configs), {failures} failed", file=sys.stderr)
    return 1 if failures or not jobs else 0


if __name__ == "__main__":
    sys.exit(main())
