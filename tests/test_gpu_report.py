"""llmfast.gpu_report without a GPU: the refusal, the orchestration, and the JSON -> markdown table."""
from __future__ import annotations

import json
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


def _fake_runner(calls, *, test_output="tests/test_x.py::test_a PASSED\n", test_code=0, timeout_part=None):
    def fake_run(cmd, cwd, env, capture_output, text, timeout):
        calls.append((cmd, env, timeout))
        script = cmd[2] if cmd[1] == "-c" else ""
        if timeout_part and timeout_part in " ".join(cmd):
            raise gpu_report.subprocess.TimeoutExpired(cmd, timeout, output="partial\n")
        out, code = "", 0
        if "ENVIRONMENT" in script:
            out = 'ENVIRONMENT {"card": "Fake GPU 9000", "driver": "999.1", "cuda": "12.8", "torch": "2", ' \
                  '"triton": "3", "capability": "sm_90", "sms": 132, "memory_gib": 80.0}\n'
        elif "COPY" in script:
            out = 'COPY {"gbps": 2950.4}\n'
        elif "AUTOTUNE" in script:
            out = 'AUTOTUNE [{"shape": "B=4 H=16 S=1024 D=128 causal=True", "picks": {"fwd": "128x64 w8 s2"}}]\n'
        elif "tests/test_attention.py" in cmd:
            out, code = test_output, test_code
        json_flag = [c for c in cmd if c.startswith("--llmfast-json=")]
        if json_flag:
            Path(json_flag[0].split("=", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
            Path(json_flag[0].split("=", 1)[1]).write_text(json.dumps(LLMFAST_DOC))
        return type("Completed", (), {"returncode": code, "stdout": out, "stderr": ""})()
    return fake_run


def test_with_cuda_runs_every_part_and_appends(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 9000")
    monkeypatch.setattr(gpu_report.subprocess, "run", _fake_runner(calls))
    results = tmp_path / "RESULTS.md"
    assert gpu_report.main(["--results", str(results)]) == 0
    assert len(calls) == len(gpu_report.PARTS)
    test_cmd = next(cmd for cmd, _, _ in calls if "pytest" in cmd and "tests/test_attention.py" in cmd)
    assert "-x" not in test_cmd and "-v" in test_cmd
    assert "tests/test_softmax.py" in test_cmd and not any("tokenizer" in c for c in test_cmd)
    bench_cmd = next(cmd for cmd, _, _ in calls if "benchmarks/" in cmd)
    assert "--benchmark-only" in bench_cmd
    assert f"--llmfast-json={tmp_path / 'results' / 'fake-gpu-9000.json'}" in bench_cmd
    budgets = sorted(p.budget_s for p in gpu_report.PARTS)
    assert sorted(timeout for _, _, timeout in calls) == budgets  # each part runs under its own budget
    for cmd, env, timeout in calls:
        assert env["TRITON_INTERPRET"] == "0" and env["LLMFAST_TEST_DEVICE"] == "cuda"
    text = results.read_text()
    assert "## Fake GPU 9000 — 2026-01-02 03:04 UTC" in text
    assert "Tests on this device: passed: 1 passed, 0 failed" in text
    assert "driver 999.1" in text and "2950 GB/s" in text and "128x64 w8 s2" in text
    assert "×1.1 vs torch" in text


def test_failing_tests_are_all_listed_and_the_run_goes_on(monkeypatch, tmp_path):
    calls = []
    output = ("tests/test_attention.py::test_a PASSED\ntests/test_attention.py::test_b FAILED\n"
              "tests/test_softmax.py::test_c PASSED\ntests/test_softmax.py::test_d FAILED\n"
              "FAILED tests/test_attention.py::test_b - AssertionError\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(gpu_report.subprocess, "run", _fake_runner(calls, test_output=output, test_code=1))
    results = tmp_path / "RESULTS.md"
    assert gpu_report.main(["--results", str(results)]) == 1
    text = results.read_text()
    assert "FAILED (pytest exit code 1): 2 passed, 2 failed" in text
    assert "`tests/test_attention.py::test_b`" in text and "`tests/test_softmax.py::test_d`" in text
    assert "×1.1 vs torch" in text  # the benchmarks still ran


def test_a_part_past_its_budget_is_reported_and_the_run_goes_on(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(gpu_report.subprocess, "run", _fake_runner(calls, timeout_part="tests/test_attention.py"))
    results = tmp_path / "RESULTS.md"
    assert gpu_report.main(["--results", str(results)]) == 1
    text = results.read_text()
    assert "NOT FINISHED (killed at its budget" in text and "×1.1 vs torch" in text


def test_plan_needs_no_gpu_and_fits_in_eight_minutes(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_report.subprocess, "run", lambda *a, **k: pytest.fail("--plan must not run anything"))
    assert gpu_report.main(["--plan"]) == 0
    plan = capsys.readouterr().out
    for part in gpu_report.PARTS:
        assert part.name in plan and f"{part.budget_s:4d} s" in plan
    total = sum(p.budget_s for p in gpu_report.PARTS)
    assert total <= 8 * 60 and f"total budget: {total} s" in plan
    test_line = next(line for line in plan.splitlines() if "pytest tests/" in line)
    assert "LLMFAST_TEST_DEVICE=cuda" in plan and " -x" not in test_line
    assert "tests/test_attention.py" in plan and "tests/test_softmax.py" in plan and "--benchmark-only" in plan
    # every kernel test file is on the plan; CPU-only ones are not
    files = gpu_report.kernel_test_files()
    assert "tests/test_attention_kernels.py" in files and "tests/test_tokenizer.py" not in files
    assert all(f in plan for f in files)


def test_from_json_prints_a_cpu_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(SYNTHETIC))
    assert gpu_report.main(["--from-json", str(source), "--results", str(tmp_path / "RESULTS.md")]) == 0
    assert "## CPU (" in capsys.readouterr().out
    assert not (tmp_path / "RESULTS.md").exists()
