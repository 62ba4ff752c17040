"""llmfast.gpu_report without a GPU: the refusal, the orchestration, and the JSON -> markdown table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from llmfast import gpu_report

SYNTHETIC = {
    "commit_info": {"id": "0123456789abcdef0123"},
    "benchmarks": [
        {"name": "test_attention[s512-d64-full-fwd]",
         "fullname": "benchmarks/bench_attention.py::test_attention[s512-d64-full-fwd]",
         "stats": {"median": 0.00123, "mean": 0.0013},
         "extra_info": {"tflops": 187.456, "speedup_vs_torch_flash_attention": 1.0734,
                        "torch_math_status": "skipped: materialises the full score matrix",
                        "fraction_of_bf16_matmul_peak": 0.4213, "causal": False}},
        {"name": "test_softmax[4096]", "fullname": "benchmarks/bench_softmax.py::test_softmax[4096]",
         "stats": {"median": 2.5e-5}, "extra_info": {"gbps": 2890.0, "ratio_vs_torch": 0.91}},
        {"name": "test_tokenizer", "fullname": "benchmarks/bench_tokenizer.py::test_tokenizer",
         "stats": {"median": 1.5}, "extra_info": {}},
    ],
}


def test_table_from_synthetic_json():
    text = gpu_report.results_markdown(SYNTHETIC, "NVIDIA H100 80GB HBM3", "2026-01-02 03:04 UTC", tests="passed")
    lines = text.splitlines()
    assert lines[0] == "## NVIDIA H100 80GB HBM3 — 2026-01-02 03:04 UTC"
    assert "commit 0123456789ab" in text and "Tests on this device: passed." in text
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| benchmark | median | throughput | ratios |"
    assert rows[1] == ("| bench_attention.py::test_attention[s512-d64-full-fwd] | 1.23 ms | 187 TFLOP/s | "
                       "speedup_vs_torch_flash_attention 1.07x, fraction_of_bf16_matmul_peak 42.1% |")
    assert rows[2] == "| bench_softmax.py::test_softmax[4096] | 25 µs | 2.89e+03 GB/s | ratio_vs_torch 0.91x |"
    assert rows[3] == "| bench_tokenizer.py::test_tokenizer | 1.5 s | — | — |"
    assert len(rows) == 4


def test_table_without_benchmarks_says_so():
    text = gpu_report.results_markdown({"benchmarks": []}, "CPU (x86_64, 2 cores)", "now")
    assert "(no benchmark results)" in text and "Tests on this device" not in text


def test_append_creates_the_header_once(tmp_path):
    results = tmp_path / "RESULTS.md"
    gpu_report.append_results("## first\n", results)
    gpu_report.append_results("## second\n", results)
    text = results.read_text()
    assert text.startswith(gpu_report.RESULTS_HEADER)
    assert text.count("# Benchmark results") == 1
    assert text.index("## first") < text.index("## second")


def test_without_cuda_it_explains_and_exits_1(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_report.subprocess, "run", lambda *a, **k: pytest.fail("must not run anything"))
    assert gpu_report.main(["--results", str(tmp_path / "RESULTS.md")]) == 1
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "RESULTS.md").exists()


LLMFAST_DOC = {"format": "llmfast-benchmarks/1", "date": "2026-01-02 03:04 UTC",
               "command": "pytest benchmarks/ --benchmark-only", "machine": {"device": "Fake GPU 9000"},
               "rows": [{"group": "attention", "op": "attention", "case": "s512-d64-full-fwd", "shape": "",
                         "benchmark": "x", "llmfast_s": 1.23e-3, "rounds": 20, "min_s": 1.2e-3, "reference_s": None,
                         "peer": "torch_flash_attention", "peer_s": 1.32e-3, "speedup_vs_peer": 1.0734,
                         "speedup_vs_reference": None, "first_call_s": 2.5, "flags": [], "reruns": 0}]}


def _fake_runner(calls, test_rc=0):
    def fake_run(cmd, cwd, env):
        calls.append((cmd, env))
        json_flag = [c for c in cmd if c.startswith("--llmfast-json=")]
        if json_flag:
            Path(json_flag[0].split("=", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
            Path(json_flag[0].split("=", 1)[1]).write_text(json.dumps(LLMFAST_DOC))
        return type("Completed", (), {"returncode": 0 if json_flag else test_rc})()
    return fake_run


def test_with_cuda_runs_tests_then_benchmarks_and_regenerates(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 9000")
    monkeypatch.setattr(gpu_report.subprocess, "run", _fake_runner(calls))
    results = tmp_path / "RESULTS.md"
    assert gpu_report.main(["--results", str(results)]) == 0
    (test_cmd, test_env), (bench_cmd, bench_env) = calls
    assert test_cmd[:3] == [sys.executable, "-m", "pytest"] and "tests/" in test_cmd and "-x" in test_cmd
    assert "benchmarks/" in bench_cmd and "--benchmark-only" in bench_cmd
    assert f"--llmfast-json={tmp_path / 'results' / 'fake-gpu-9000.json'}" in bench_cmd
    for env in (test_env, bench_env):
        assert env["TRITON_INTERPRET"] == "0" and env["LLMFAST_TEST_DEVICE"] == "cuda"
    text = results.read_text()
    assert "## Fake GPU 9000 — 2026-01-02 03:04 UTC" in text and "Tests on this device: passed." in text
    assert "×1.1 vs torch" in text


def test_failing_tests_are_reported_and_exit_nonzero(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(gpu_report.subprocess, "run", _fake_runner([], test_rc=1))
    results = tmp_path / "RESULTS.md"
    assert gpu_report.main(["--results", str(results)]) == 1
    assert "Tests on this device: FAILED (pytest exit code 1)." in results.read_text()


def test_from_json_prints_a_cpu_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(SYNTHETIC))
    assert gpu_report.main(["--from-json", str(source), "--results", str(tmp_path / "RESULTS.md")]) == 0
    assert "## CPU (" in capsys.readouterr().out
    assert not (tmp_path / "RESULTS.md").exists()
