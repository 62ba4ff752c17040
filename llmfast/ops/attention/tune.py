"""Pick attention tiles from the binary that runs: compile candidate tiles for one named config and report them.

    python -m llmfast.ops.attention.tune --arch 90 --config fwd_d128 [--candidate 128x64x8x2 ...] [--jobs 2]

Each candidate (BLOCK_M x BLOCK_N x num_warps x num_stages) replaces the named config and is compiled, with the
launch specialization, for the cases that config serves (``specs.CASES``), through ``llmfast.compile_check``.
A candidate is usable when no case spills, shared memory fits the card, every dot uses the expected instruction and
16-bit main loops are pipelined. ``ATTENTION_CONFIGS`` ships the largest usable tile (ties: fewer registers); speed
on a real GPU is ``triton.autotune``'s job (see ``configs.AUTOTUNE_CANDIDATES``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import sys

# Default candidates per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages).
DEFAULT_CANDIDATES = {
    "fwd": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2),
            (64, 32, 4, 2)],
    "bwd_dkdv": [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2)],
    "bwd_dq": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
}


def _specs(arch_key: str, config: str, candidate: tuple[int, int, int, int], only_cases=None):
    from .specs import config_specs

    block_m, block_n, warps, stages = candidate
    return config_specs(arch_key, config, dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                               num_stages=stages), only_cases)


def _compile(job):
    from llmfast import compile_check

    arch_key, config, candidate, only_cases = job
    specs = _specs(arch_key, config, candidate, only_cases)
    return candidate, [compile_check.compile_one(spec, int(arch_key[2:])) for spec in specs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmfast.ops.attention.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=(80, 90), required=True)
    parser.add_argument("--config", required=True, help="a named config, e.g. fwd_d128 or bwd_dq_d64_extra")
    parser.add_argument("--candidate", action="append", help="BLOCK_MxBLOCK_NxWARPSxSTAGES, e.g. 128x64x8x2")
    parser.add_argument("--case", action="append", help="only these cases (specs.CASES names), e.g. flash_causal")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("tune: unset TRITON_INTERPRET; the interpreter does not compile kernels", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    kernel_key = re.fullmatch(r"(\w+?)_d\d+(?:_fp32|_extra)?(?:_window|_unaligned)?", args.config).group(1)
    candidates = ([tuple(int(x) for x in c.split("x")) for c in args.candidate] if args.candidate
                  else DEFAULT_CANDIDATES[kernel_key])
    jobs = [(f"sm{args.arch}", args.config, c, args.case) for c in candidates]
    with concurrent.futures.ProcessPoolExecutor(max(1, min(args.jobs, len(jobs)))) as pool:
        for candidate, results in pool.map(_compile, jobs):
            ok = all(r.error is None for r in results)
            worst = max(results, key=lambda r: (r.spills, r.regs))
            print(f"{'x'.join(map(str, candidate)):>12} {'usable' if ok else 'REJECTED':8} max regs={worst.regs} "
                  f"spills={max(r.spills for r in results)} smem={max(r.smem for r in results)} "
                  f"async={min(r.async_copies for r in results)}", flush=True)
            for r in results:
                if r.error:
                    print(f"{'':22}{r.config}: {r.error}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
