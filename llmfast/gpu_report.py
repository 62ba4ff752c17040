"""``python -m llmfast.gpu_report``: the one command to run on a machine with a GPU.

1. Checks that CUDA is present (otherwise says so and exits 1).
2. Runs the test suite on the GPU: ``pytest tests/ -x -q`` in a subprocess with ``TRITON_INTERPRET=0`` (the
   kernels compile for the card instead of running in the interpreter) and ``LLMFAST_TEST_DEVICE=cuda`` (the test
   files put their tensors on that device).
3. Runs the main job, ``pytest benchmarks/ --benchmark-only --llmfast-json benchmarks/results/<card>.json``, adds
   the test outcome to that file, and regenerates ``benchmarks/RESULTS.md`` from every file in
   ``benchmarks/results/`` with ``python -m llmfast.report``.

Both steps run even if the other fails; the exit code is 0 only when the tests pass and the benchmarks produced
results. ``--skip-tests`` / ``--skip-benchmarks`` / ``-k`` split the work over several shorter runs.
``--from-json FILE`` prints a pytest-benchmark JSON file as a markdown table (it writes nothing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
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
    return env


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _slug(name: str) -> str:
    """A file name for a device: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) or "device"


def _cpu_name() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmfast.gpu_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md",
                        help="the results file to regenerate (default: benchmarks/RESULTS.md; the JSON goes to results/ "
                        "beside it)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    parser.add_argument("--skip-benchmarks", action="store_true", help="do not run the benchmarks")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression for tests and benchmarks")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="only print an existing pytest-benchmark JSON file as a markdown table")
    parser.add_argument("--device-name", default=None, help="device label for --from-json (default: this GPU, "
                        "else CPU)")
    args = parser.parse_args(argv)

    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
        device = args.device_name or (torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name())
        print(results_markdown(data, device, _now()))
        return 0

    if not torch.cuda.is_available():
        print("llmfast.gpu_report: no CUDA device is visible to torch (torch.cuda.is_available() is False), so "
              "there is nothing to measure. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.",
              file=sys.stderr)
        return 1
    card = torch.cuda.get_device_name()
    env = gpu_environment()
    keyword = ["-k", args.keyword] if args.keyword else []
    ok = True

    tests = None
    if not args.skip_tests:
        print(f"== tests on {card} ==", flush=True)
        result = subprocess.run([sys.executable, "-m", "pytest", "tests/", "-x", "-q", "-p", "no:cacheprovider",
                                 *keyword], cwd=REPO_ROOT, env=env)
        tests = "passed" if result.returncode == 0 else f"FAILED (pytest exit code {result.returncode})"
        ok &= result.returncode == 0

    if not args.skip_benchmarks:
        print(f"== benchmarks on {card} ==", flush=True)
        results_dir = args.results.parent / "results"
        json_path = results_dir / f"{_slug(card)}.json"
        result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only",
                                 f"--llmfast-json={json_path}", "-q", "-p", "no:cacheprovider", *keyword],
                                cwd=REPO_ROOT, env=env)
        if json_path.exists():
            document = json.loads(json_path.read_text())
            if tests is not None:
                document["tests"] = tests
            json_path.write_text(json.dumps(document, indent=1) + "\n")
            ok &= report.main([*map(str, sorted(results_dir.glob("*.json"))), "--out", str(args.results)]) == 0
        else:
            print("llmfast.gpu_report: the benchmarks wrote no JSON, RESULTS.md unchanged", file=sys.stderr)
            ok = False
        ok &= result.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
