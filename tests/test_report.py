"""The benchmark summary: row conventions, timing checks, RESULTS.md generation, and the pytest plugin end to end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmfast import report

REPO = Path(__file__).resolve().parent.parent


def bench(name="benchmarks/bench_softmax.py::test_softmax[c64-fwd]", median=1e-3, low=0.9e-3, rounds=20,
          iterations=1, **extra):
    return {"fullname": name, "name": name.rsplit("::", 1)[-1], "param": name.split("[", 1)[1].rstrip("]"),
            "stats": {"median": median, "min": low, "rounds": rounds, "iterations": iterations},
            "extra_info": extra}


def test_format_speedup_shows_slower_as_ratio_below_one():
    assert report.format_speedup(3.14, "torch") == "×3.1 vs torch"
    assert report.format_speedup(0.62, "torch") == "×0.62 vs torch"
    assert report.format_speedup(12.4, "tiktoken") == "×12 vs tiktoken"
    assert report.format_speedup(0.999) == "×1.0"
    assert report.format_speedup(None) == "—"


def test_quality_flags():
    assert report.quality_flags({"median": 1e-3, "min": 0.95e-3, "rounds": 20, "iterations": 1}) == []
    flags = report.quality_flags({"median": 8e-3, "min": 1e-4, "rounds": 3, "iterations": 1})
    assert any("few rounds" in f for f in flags) and any("spread" in f for f in flags)
    assert any("timer-bound" in f for f in report.quality_flags({"median": 7e-6, "min": 7e-6, "rounds": 50,
                                                                  "iterations": 1}))
    # looped rounds are not timer-bound: 200 iterations of 7 µs
    assert report.quality_flags({"median": 7e-6, "min": 7e-6, "rounds": 50, "iterations": 200}) == []
    assert report.quality_flags(None, {"torch_spread": 2.5}) == ["torch spread: median 2.5x min"]
    assert report.quality_flags(None, {"rounds": 3}) == ["few rounds (3)"]


def test_row_conventions():
    row = report.row_of(bench(op="softmax", shape="(4096, 64)", reference_ms=4.0, torch_ms=2.0,
                              torch_compile_ms=1.5, first_call_ms=30.0))
    assert (row["group"], row["op"], row["case"], row["shape"]) == ("softmax", "softmax", "c64-fwd", "(4096, 64)")
    assert row["llmfast_s"] == pytest.approx(1e-3)
    assert row["peer"] == "torch_compile" and row["peer_s"] == pytest.approx(1.5e-3)
    assert row["speedup_vs_peer"] == pytest.approx(1.5) and row["speedup_vs_reference"] == pytest.approx(4.0)
    assert row["first_call_s"] == pytest.approx(0.03) and row["flags"] == []
    # op from the test name; llmfast's own timing (llmfast_ms) and a given ratio win over pytest-benchmark's
    row = report.row_of(bench("benchmarks/bench_tokenizer.py::test_decode[cl100k-english]", median=1.0, low=0.1,
                              rounds=1, llmfast_ms=2.0, tiktoken_ms=6.0, speedup_vs_tiktoken=2.9))
    assert (row["group"], row["op"]) == ("tokenizer", "decode")
    assert row["llmfast_s"] == pytest.approx(2e-3) and row["speedup_vs_peer"] == pytest.approx(2.9)
    assert row["flags"] == []  # pytest-benchmark's 1 round of 1 s is not the row's timing
    assert "×2.9 vs tiktoken" in report.text_table([row])


def test_results_markdown_withholds_flagged_rows(tmp_path):
    good = report.row_of(bench(op="softmax", torch_ms=2.0))
    bad = report.row_of(bench("benchmarks/bench_softmax.py::test_softmax[c1024-fwd]", median=8e-3, low=1e-4,
                              rounds=3, torch_ms=1.0))
    document = report.run_document([good, bad], {"device": "CPU only (test)", "versions": {"torch": "x"}},
                                   "pytest benchmarks/ --benchmark-only")
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(document))
    out = tmp_path / "RESULTS.md"
    assert report.main([str(path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Command: `pytest benchmarks/ --benchmark-only`" in text and "CPU only (test)" in text
    assert "×2.0 vs torch" in text
    assert "c1024-fwd" in text and "Withheld" in text and "8 ms" not in text
    bad_path = tmp_path / "other.json"
    bad_path.write_text("{}")
    assert report.main([str(bad_path), "--out", str(out)]) == 1


TOY_BENCH = '''
import pytest, torch
from conftest import measure, time_peer, device  # noqa: F401

@pytest.mark.parametrize("n", [64, 256])
def test_toy(benchmark, device, n):
    x = torch.randn(n, n)
    benchmark.extra_info.update(op="toy_softmax", shape=str(tuple(x.shape)))
    measure(benchmark, lambda: torch.softmax(x, -1))
    if benchmark.disabled:
        return
    time_peer(benchmark.extra_info, "torch", lambda: torch.log_softmax(x, -1), device)
    time_peer(benchmark.extra_info, "reference", lambda: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True), device)
'''


def test_plugin_prints_summary_and_writes_json(tmp_path):
    shutil.copy(REPO / "benchmarks" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "bench_toy.py").write_text(TOY_BENCH)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out_json = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench_toy.py", "--benchmark-only", "-p", "no:cacheprovider",
         "-o", "python_files=bench_*.py", "--rootdir", str(tmp_path), "--llmfast-json", str(out_json),
         "--llmfast-budget", "0.05"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[llmfast] toy: 2 benchmarks" in result.stdout
    assert "llmfast summary" in result.stdout and "vs torch" in result.stdout
    document = json.loads(out_json.read_text())
    assert document["format"] == "llmfast-benchmarks/1" and "pytest bench_toy.py" in document["command"]
    assert [r["op"] for r in document["rows"]] == ["toy_softmax", "toy_softmax"]
    for row in document["rows"]:
        assert row["peer"] == "torch" and row["reference_s"] and row["first_call_s"]
        assert row["rounds"] >= report.MIN_ROUNDS
    assert document["machine"]["versions"]["torch"]


def test_results_md_is_what_the_report_command_writes():
    """benchmarks/RESULTS.md holds only figures regenerated from benchmarks/results/*.json (no hand edits)."""
    paths = sorted((REPO / "benchmarks" / "results").glob("*.json"))
    if not paths:
        pytest.skip("no benchmarks/results/*.json yet")
    documents = [(str(p.relative_to(REPO)), json.loads(p.read_text())) for p in paths]
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == report.results_markdown(documents), (
        "RESULTS.md differs from its JSON: run python -m llmfast.report")
