"""``python -m llmfast.gpu_report``: the one command to run on a machine with a GPU (under 8 minutes on an H100).

It runs, in one call, the parts of :data:`PARTS`, each in a subprocess under its own time budget, and goes on
whatever a part does (a failure or a timeout is reported, never the end of the run):

1. ``environment``: card, driver, CUDA, torch and Triton versions.
2. ``copy_bandwidth``: the card's measured device-to-device copy bandwidth, the ceiling of memory-bound kernels.
3. ``tests``: every kernel test file (all of ``tests/`` but the CPU-only ones), on the GPU: ``TRITON_INTERPRET=0``
   and ``LLMFAST_TEST_DEVICE=cuda``, which ``tests/conftest.py`` turns into the device of every test file.
   No ``-x``: every failure is listed.
4. ``autotune``: with ``LLMFAST_AUTOTUNE=1`` the attention launches let ``triton.autotune`` pick among a short
   candidate list per shape; this part runs a few shapes and reports the picks.
5. ``benchmarks``: ``pytest benchmarks/ --benchmark-only``: TFLOP/s and GB/s, against the measured copy
   bandwidth, torch SDPA's flash and cuDNN backends and the ``torch.compile``d references.

The benchmarks write ``benchmarks/results/<card>.json`` (``--llmfast-json``); the run adds the test outcome with
every failure, driver, copy bandwidth and the autotuner's picks to that file and regenerates
``benchmarks/RESULTS.md`` from every file in ``benchmarks/results/`` with ``python -m llmfast.report``. The exit
code is 0 only when every part passed.

``--plan`` prints what it would run and each part's budget, without a GPU. ``--skip-tests`` /
``--skip-benchmarks`` / ``-k`` split the work over several shorter runs. ``--from-json FILE`` prints a
pytest-benchmark JSON file as a markdown table (it writes nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from llmfast import report

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_HEADER = """# Benchmark results

Every figure in this file comes from a real run of `python -m llmfast.gpu_report` (or of
`pytest benchmarks/ --benchmark-only --benchmark-json=...` formatted with `python -m llmfast.gpu_report
--from-json`), appended with the device it ran on and the date. Nothing here is estimated or copied from elsewhere.
Sections whose device says CPU were measured on a CPU (the `auto` backend runs torch's CPU kernels there) and say
nothing about GPU speed. No GPU figures yet: a GPU section appears only after a run on a GPU.

Columns: the median wall time of llmfast's implementation; its throughput (TFLOP/s for attention, GB/s for
memory-bound ops); `speedup_vs_X` = X's time / llmfast's time (above 1: llmfast is faster); `fraction_of_*` =
share of a measured ceiling on the same card.
"""

_THROUGHPUT_KEYS = (("tflops", "TFLOP/s"), ("gbps", "GB/s"))
_RATIO_PREFIXES = ("speedup_vs_", "ratio_")
_FRACTION_PREFIX = "fraction_of_"


def format_seconds(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _throughput(extra: dict[str, Any]) -> str:
    for key, unit in _THROUGHPUT_KEYS:
        value = extra.get(key)
        if isinstance(value, (int, float)):
            return f"{value:.3g} {unit}"
    return "—"


def _ratios(extra: dict[str, Any]) -> str:
    parts = []
    for key, value in extra.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.startswith(_RATIO_PREFIXES):
            parts.append(f"{key} {value:.2f}x")
        elif key.startswith(_FRACTION_PREFIX):
            parts.append(f"{key} {100 * value:.1f}%")
    return ", ".join(parts) if parts else "—"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_markdown(data: dict[str, Any], device: str, when: str, tests: str | None = None) -> str:
    """One markdown section for a pytest-benchmark JSON document: a heading naming the device and date, then
    a table with one row per benchmark."""
    lines = [f"## {device} — {when}", ""]
    versions = [f"torch {torch.__version__}"]
    try:
        import triton
        versions.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    commit = (data.get("commit_info") or {}).get("id")
    if commit:
        versions.append(f"commit {commit[:12]}")
    lines.append(", ".join(versions) + ".")
    if tests is not None:
        lines.append(f"Tests on this device: {tests}.")
    lines += ["", "| benchmark | median | throughput | ratios |", "| --- | --- | --- | --- |"]
    benchmarks = data.get("benchmarks") or []
    for bench in benchmarks:
        name = bench.get("fullname") or bench.get("name", "?")
        name = name.split("/")[-1]
        stats = bench.get("stats") or {}
        median = stats.get("median")
        extra = bench.get("extra_info") or {}
        lines.append("| " + " | ".join(_cell(c) for c in (
            name,
            format_seconds(median) if isinstance(median, (int, float)) else "—",
            _throughput(extra),
            _ratios(extra),
        )) + " |")
    if not benchmarks:
        lines.append("| (no benchmark results) | — | — | — |")
    return "\n".join(lines) + "\n"


def append_results(markdown: str, results_path: Path) -> None:
    """Append a section to the results file, creating it with its explanatory header if needed."""
    results_path.parent.mkdir(parents=True, exist_ok=True)
    if not results_path.exists() or not results_path.read_text().strip():
        results_path.write_text(RESULTS_HEADER)
    with results_path.open("a") as f:
        f.write("\n" + markdown)


def gpu_environment() -> dict[str, str]:
    """The environment for the test and benchmark subprocesses: kernels compiled for the GPU, tests on CUDA."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"  # tests/conftest.py only sets it when absent
    env["LLMFAST_TEST_DEVICE"] = "cuda"
    env.pop("LLMFAST_CONFIG_ARCH", None)  # the card's own configs
    return env


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _slug(name: str) -> str:
    """A file name for a device: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) or "device"


def _cpu_name() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ----------------------------------------------------------------------------------------------------------------
# The parts of a run and their budgets
# ----------------------------------------------------------------------------------------------------------------
# Test files that exercise no kernel (tokenizer, CLI, the report tools, the compile check): left out on the GPU.
CPU_ONLY_TESTS = ("test_tokenizer", "test_pretokenize", "test_native_extension", "test_cli", "test_gpu_report",
                  "test_report", "test_compile_check", "test_reference_")
TOTAL_BUDGET_SECONDS = 8 * 60


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    budget_s: int
    what: str


PARTS = (
    Part("environment", 10, "card, driver, CUDA, torch and Triton versions"),
    Part("copy_bandwidth", 15, "device-to-device copy of 1 GiB: the card's measured memory bandwidth"),
    Part("tests", 210, "every kernel test file on the GPU (pytest -v, no -x: every failure listed)"),
    Part("autotune", 45, "LLMFAST_AUTOTUNE=1: the attention config triton.autotune picks per shape"),
    Part("benchmarks", 180, "pytest benchmarks/ --benchmark-only: TFLOP/s, GB/s vs copy bandwidth, SDPA "
                            "flash/cuDNN, torch.compile"),
)
assert sum(p.budget_s for p in PARTS) <= TOTAL_BUDGET_SECONDS


def kernel_test_files(root: Path = REPO_ROOT) -> list[str]:
    """``tests/test_*.py`` files that run kernels (every one but the CPU-only ones), relative to ``root``."""
    files = sorted((root / "tests").glob("test_*.py"))
    return [f"tests/{f.name}" for f in files if not f.stem.startswith(CPU_ONLY_TESTS)]


_AUTOTUNE_SCRIPT = """
import json, torch, llmfast
from llmfast.ops.attention import launch
picks = []
for (b, h, s, d, causal) in [(4, 16, 1024, 64, True), (4, 16, 1024, 128, True), (2, 16, 4096, 128, True),
                            (8, 16, 512, 128, False)]:
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = llmfast.flash_attn_func(q, k, v, causal=causal)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    picks.append({"shape": f"B={b} H={h} S={s} D={d} causal={causal}", "picks": launch.autotune_picks()})
print("AUTOTUNE " + json.dumps(picks))
"""

_ENVIRONMENT_SCRIPT = """
import json, subprocess, torch, triton
driver = "unknown"
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=5).stdout.strip().splitlines()[0]
except Exception:
    pass
p = torch.cuda.get_device_properties(0)
print("ENVIRONMENT " + json.dumps({"card": torch.cuda.get_device_name(0), "driver": driver,
      "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton.__version__,
      "capability": f"sm_{p.major}{p.minor}", "sms": p.multi_processor_count,
      "memory_gib": round(p.total_memory / 2**30, 1)}))
"""

_COPY_SCRIPT = """
import json, torch
x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(10):
    start.record(); y.copy_(x); end.record(); torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
times.sort()
print("COPY " + json.dumps({"gbps": 2 * x.numel() / times[len(times) // 2] / 1e9}))
"""


def part_commands(keyword: str | None = None, json_path: str = "benchmarks/results/<card>.json"
                  ) -> dict[str, list[str]]:
    """The command line of each part (run from the repository root)."""
    k = ["-k", keyword] if keyword else []
    return {
        "environment": [sys.executable, "-c", _ENVIRONMENT_SCRIPT],
        "copy_bandwidth": [sys.executable, "-c", _COPY_SCRIPT],
        "tests": [sys.executable, "-m", "pytest", *kernel_test_files(), "-v", "-p", "no:cacheprovider", "-rfE", *k],
        "autotune": [sys.executable, "-c", _AUTOTUNE_SCRIPT],
        "benchmarks": [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only",
                       f"--llmfast-json={json_path}", "-q", "-p", "no:cacheprovider", "--llmfast-budget=0.25", *k],
    }


def plan_text(keyword: str | None = None, skip: Sequence[str] = ()) -> str:
    """What a run would do: each part, its budget and its command; the total stays under 8 minutes."""
    commands = part_commands(keyword)
    lines = ["python -m llmfast.gpu_report: plan (each part in a subprocess, killed at its budget; a failure or "
             "timeout is reported and the run goes on)", ""]
    total = 0
    for part in PARTS:
        if part.name in skip:
            lines.append(f"  {part.name:15} skipped")
            continue
        total += part.budget_s
        cmd = commands[part.name]
        shown = " ".join(c if "\n" not in c else "<script>" for c in cmd[1:])
        lines.append(f"  {part.name:15} {part.budget_s:4d} s  {part.what}")
        lines.append(f"  {'':15}         $ python {shown}")
    lines += ["", "  environment: TRITON_INTERPRET=0 LLMFAST_TEST_DEVICE=cuda (LLMFAST_AUTOTUNE=1 for autotune)",
              f"  total budget: {total} s ({total / 60:.1f} min; at most {TOTAL_BUDGET_SECONDS // 60} min)",
              "  then adds the test outcome with every failure, driver, copy bandwidth and autotuner picks to "
              "benchmarks/results/<card>.json and regenerates benchmarks/RESULTS.md (python -m llmfast.report)"]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class PartResult:
    name: str
    returncode: int | None  # None: killed at its budget
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_part(part: Part, cmd: list[str], env: dict[str, str]) -> PartResult:
    """Run one part under its budget, echoing its output; a timeout kills it and is reported, not raised."""
    print(f"== {part.name} (budget {part.budget_s} s) ==", flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=part.budget_s)
        code, output = proc.returncode, (proc.stdout or "") + (proc.stderr or "")
    except subprocess.TimeoutExpired as exc:
        code = None
        output = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
    result = PartResult(part.name, code, time.monotonic() - started, output)
    print(output[-4000:], flush=True)
    status = "ok" if result.ok else ("TIMED OUT" if code is None else f"FAILED (exit code {code})")
    print(f"== {part.name}: {status} in {result.seconds:.0f} s ==", flush=True)
    return result


def test_outcome(result: PartResult) -> tuple[str, list[str]]:
    """(summary, failing test ids) from a ``pytest -v`` run's output, also when it was cut at its budget."""
    passed = len(re.findall(r" PASSED", result.output))
    failed = sorted(set(re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)", result.output, flags=re.M))
                    | set(re.findall(r"^(?:FAILED|ERROR) (\S+::\S+)", result.output, flags=re.M)))
    skipped = len(re.findall(r" SKIPPED", result.output))
    if result.returncode is None:
        head = f"NOT FINISHED (killed at its budget after {result.seconds:.0f} s)"
    elif result.ok:
        head = "passed"
    else:
        head = f"FAILED (pytest exit code {result.returncode})"
    return f"{head}: {passed} passed, {len(failed)} failed, {skipped} skipped", failed


def _tagged_json(output: str, tag: str) -> Any:
    for line in reversed(output.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmfast.gpu_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md",
                        help="markdown file the section is appended to (default: benchmarks/RESULTS.md)")
    parser.add_argument("--plan", action="store_true", help="print what would run and each part's budget; "
                        "needs no GPU")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    parser.add_argument("--skip-benchmarks", action="store_true", help="do not run the benchmarks")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression for tests and benchmarks")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="only format an existing pytest-benchmark JSON file and append it")
    parser.add_argument("--device-name", default=None, help="device label for --from-json (default: this GPU, "
                        "else CPU)")
    args = parser.parse_args(argv)
    skip = [name for name, flag in (("tests", args.skip_tests), ("benchmarks", args.skip_benchmarks)) if flag]

    if args.plan:
        print(plan_text(args.keyword, skip), end="")
        return 0

    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
        device = args.device_name or (torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name())
        print(results_markdown(data, device, _now()))
        return 0

    if not torch.cuda.is_available():
        print("llmfast.gpu_report: no CUDA device is visible to torch (torch.cuda.is_available() is False), so "
              "there is nothing to measure. Run it on a machine with an NVIDIA GPU and a CUDA build of torch. "
              "(--plan shows what it would run.)", file=sys.stderr)
        return 1
    card = torch.cuda.get_device_name()
    env = gpu_environment()
    results_dir = args.results.parent / "results"
    json_path = results_dir / f"{_slug(card)}.json"
    commands = part_commands(args.keyword, str(json_path))
    results: dict[str, PartResult] = {}
    for part in PARTS:
        if part.name in skip:
            continue
        part_env = dict(env, LLMFAST_AUTOTUNE="1") if part.name == "autotune" else env
        results[part.name] = run_part(part, commands[part.name], part_env)

    notes: list[str] = []
    environment = _tagged_json(results["environment"].output, "ENVIRONMENT") if "environment" in results else None
    if environment:
        notes.append(f"{environment['card']}: driver {environment['driver']}, CUDA {environment['cuda']}, "
                     f"{environment['capability']}, {environment['sms']} SMs, {environment['memory_gib']} GiB.")
    copy = _tagged_json(results["copy_bandwidth"].output, "COPY") if "copy_bandwidth" in results else None
    if copy:
        notes.append(f"Measured device-to-device copy bandwidth: {copy['gbps']:.0f} GB/s.")
    tests = None
    if "tests" in results:
        tests, failed = test_outcome(results["tests"])
        if failed:
            notes.append("Failing tests: " + ", ".join(f"`{f}`" for f in failed) + ".")
    if "autotune" in results:
        picks = _tagged_json(results["autotune"].output, "AUTOTUNE")
        for entry in picks or []:
            chosen = "; ".join(f"{k}: {v}" for k, v in entry["picks"].items()) or "none recorded"
            notes.append(f"Autotune picks, {entry['shape']}: {chosen}.")
    for name, result in results.items():
        if not result.ok and name != "tests":
            notes.append(f"Part {name}: {'timed out' if result.returncode is None else 'failed'}.")

    ok = all(r.ok for r in results.values())
    if "benchmarks" in results:
        if json_path.exists():
            document = json.loads(json_path.read_text())
            if tests is not None:
                document["tests"] = tests
            document["notes"] = notes
            json_path.write_text(json.dumps(document, indent=1) + "\n")
            ok &= report.main([*map(str, sorted(results_dir.glob("*.json"))), "--out", str(args.results)]) == 0
        else:
            print("llmfast.gpu_report: the benchmarks wrote no JSON, RESULTS.md unchanged", file=sys.stderr)
            ok = False
    for line in ([f"Tests: {tests}"] if tests else []) + notes:
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
