"""Shared benchmark helpers and the summary plugin of the main job (``pytest benchmarks/ --benchmark-only``).

Every benchmark compares llmfast with its pure-PyTorch reference and the strongest peer (torch's kernels,
torch.compile, tiktoken). After pytest-benchmark's raw table, this plugin prints one summary table: per op and case
llmfast's time, the reference's, the strongest peer's, the speedup (``×3.1 vs torch``; below 1 when llmfast is
slower), the first call's time and a quality check. Options:

* ``--llmfast-json FILE``: the same rows as JSON, with machine, date, versions and the command
  (``python -m llmfast.report`` turns such files into ``benchmarks/RESULTS.md``);
* ``--llmfast-plot DIR``: one PNG per op, speedup against case (needs matplotlib: ``pip install llmfast[plot]``);
* ``--llmfast-reruns N`` (default 2): a benchmark whose rounds disagree (median more than
  ``llmfast.report.MAX_SPREAD`` times the fastest round) runs again, up to N more times, and the steadiest attempt
  is kept (benchmarks that take over ``RERUN_MAX_SECONDS`` are not rerun); one still noisy is flagged in the table
  and withheld from RESULTS.md, never published silently;
* ``--llmfast-cpu-threads N`` (default 1, 0 = torch's default): torch's intra-op threads on a machine without
  CUDA. On a shared 2-core VM, a parallel CPU op waits for its second OpenMP thread to be scheduled whenever
  another process holds that core: the wait is the scheduler's time slice, 4-12 ms, whatever the op. That is
  why many unrelated CPU benchmarks once read ≈7.9 ms; one thread measures the op, not the scheduler.

A progress line is printed per op group (benchmark file) as it starts and ends.

Conventions a benchmark file follows to land in the table (no edit here needed):

1. Name it ``benchmarks/bench_<group>.py``; ``<group>`` heads its rows and its progress line.
2. The row's op is ``benchmark.extra_info["op"]`` if set, else the test's name without ``test_``; the case is
   the parametrize id; ``extra_info["shape"]`` is shown when set.
3. Time llmfast with pytest-benchmark, preferably through :func:`measure` (first call timed apart, iterations
   calibrated so a round is never timer-bound, enough rounds); its median is llmfast's time. A file that times
   llmfast itself (e.g. interleaved with a peer) stores ``extra_info["llmfast_ms"]`` instead.
4. Each peer's time goes to ``extra_info["<peer>_ms"]`` (milliseconds): ``reference_ms`` for the pure-PyTorch
   reference, ``torch_ms``, ``torch_compile_ms``, ``torch_flash_attention_ms``, ``tiktoken_ms``, ... The fastest
   non-reference peer is the "strongest peer". :func:`time_peer` records ``<peer>_ms`` and ``<peer>_spread``.
   ``speedup_vs_<peer>`` (peer time / llmfast time), when set, is used as is.
5. ``extra_info["first_call_ms"]``: the first call, Triton's JIT included (set by :func:`measure`).
6. ``extra_info["<name>_spread"]``: median / min of samples timed outside pytest-benchmark; above the limit the row
   is flagged (and rerun). A file that times llmfast itself also stores ``extra_info["rounds"]``.
7. ``extra_info["note"]``: a short string shown beside the row in RESULTS.md (e.g. a measured peak memory).

Nothing here fails for lack of a GPU: on the CPU the ``auto`` backend is measured.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # llmfast.report when run from a checkout without an install
    sys.path.insert(0, str(REPO_ROOT))

from llmfast import report  # noqa: E402

TARGET_ROUND_SECONDS = 1e-3   # measure(): iterations per round so that a round lasts at least this long
DEFAULT_BUDGET_SECONDS = 1.0  # measure(): about this much time in timed rounds per benchmark
MAX_ROUNDS = 200
RERUN_MAX_SECONDS = 30.0      # a noisy benchmark that took longer than this is flagged, not rerun


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _iterations_for(seconds: float) -> int:
    """Calls per sample so that one sample lasts at least TARGET_ROUND_SECONDS (the timer never dominates)."""
    if seconds >= TARGET_ROUND_SECONDS:
        return 1
    return min(10_000, math.ceil(TARGET_ROUND_SECONDS / max(seconds, 1e-7)))


def sample_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1,
                   budget: float = 2.0) -> list[float]:
    """Per-call seconds of ``fn`` (synchronised on CUDA), one value per sample, sorted.

    Short calls are looped so that a sample lasts at least ``TARGET_ROUND_SECONDS``; at least
    ``llmfast.report.MIN_ROUNDS`` samples are taken when they fit in ``budget`` seconds, and up to three times
    more while the samples disagree (median over min above ``llmfast.report.MAX_SPREAD``) and the budget allows.
    """
    for _ in range(warmup):
        fn()
    one = _time_once(fn, device)
    iterations = _iterations_for(one)
    sample_cost = one * iterations
    if sample_cost * report.MIN_ROUNDS <= budget:
        repeats = max(repeats, report.MIN_ROUNDS)
    samples: list[float] = []
    spent = 0.0

    def take(n: int) -> None:
        nonlocal spent
        for _ in range(n):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iterations):
                fn()
            synchronize(device)
            elapsed = time.perf_counter() - start
            spent += elapsed
            samples.append(elapsed / iterations)

    take(repeats)
    for _ in range(2):
        samples.sort()
        if samples[len(samples) // 2] / samples[0] <= report.MAX_SPREAD or spent + repeats * sample_cost > budget:
            break
        take(repeats)
    samples.sort()
    return samples


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` (synchronised on CUDA), for the peer timings stored next to a benchmark."""
    samples = sample_seconds(fn, device, repeats=repeats, warmup=warmup)
    return samples[len(samples) // 2]


def time_peer(info: dict, name: str, fn: Callable[[], object], device: torch.device, repeats: int = 5,
              warmup: int = 1) -> float:
    """Time a peer and record ``<name>_ms`` and ``<name>_spread`` (median / min) in ``info``; returns seconds."""
    samples = sample_seconds(fn, device, repeats=repeats, warmup=warmup)
    median = samples[len(samples) // 2]
    info[f"{name}_ms"] = median * 1e3
    info[f"{name}_spread"] = round(median / samples[0], 3)
    return median


def measure(benchmark, fn: Callable[[], object], *, rounds: int | None = None, warmup: int = 1) -> None:
    """Time ``fn`` (which synchronises itself) with pytest-benchmark, robustly.

    The first call is timed on its own into ``extra_info["first_call_ms"]`` (on a GPU: Triton's compilation or
    cache load, kept out of the steady state); ``warmup`` more calls follow; then one round loops ``fn`` enough
    times to last ``TARGET_ROUND_SECONDS`` and the rounds fill about ``--llmfast-budget`` seconds (at least
    ``llmfast.report.MIN_ROUNDS``, at most ``MAX_ROUNDS``) unless ``rounds`` is given. With
    ``--benchmark-disable`` (the smoke run) ``fn`` runs once.
    """
    if benchmark.disabled:
        benchmark.pedantic(fn)  # runs fn once, untimed
        return
    start = time.perf_counter()
    fn()
    benchmark.extra_info["first_call_ms"] = (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    one = time.perf_counter() - start
    iterations = _iterations_for(one)
    if rounds is None:
        budget = getattr(benchmark, "_llmfast_budget", DEFAULT_BUDGET_SECONDS)
        rounds = max(report.MIN_ROUNDS, min(MAX_ROUNDS, int(budget / (one * iterations))))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)


def copy_gbps(x: torch.Tensor, device: torch.device) -> float | None:
    """The device's measured copy bandwidth (bytes read + written per second) for ``x``'s size; CUDA only.

    This is the ceiling a memory-bound kernel that reads and writes each element once is judged against.
    """
    if device.type != "cuda":
        return None
    out = torch.empty_like(x)
    seconds = median_seconds(lambda: out.copy_(x), device, repeats=20, warmup=3)
    return 2 * x.numel() * x.element_size() / seconds / 1e9


# ------------------------------------------------------------------------------------------------ the plugin


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llmfast", "llmfast benchmark summary")
    group.addoption("--llmfast-json", metavar="FILE", default=None,
                    help="write the summary rows, machine, date, versions and command as JSON")
    group.addoption("--llmfast-plot", metavar="DIR", default=None,
                    help="write one PNG per op: speedup against case (needs matplotlib)")
    group.addoption("--llmfast-reruns", type=int, default=2, metavar="N",
                    help="rerun a benchmark whose rounds disagree up to N times, keep the steadiest (default 2)")
    group.addoption("--llmfast-cpu-threads", type=int, default=1, metavar="N",
                    help="torch intra-op threads without CUDA (default 1; 0 keeps torch's default)")
    group.addoption("--llmfast-budget", type=float, default=DEFAULT_BUDGET_SECONDS, metavar="SECONDS",
                    help="measure(): seconds of timed rounds per benchmark (default 1)")


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("llmfast_cpu_threads")
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    config._llmfast = {"groups": {}, "current": None, "started": None}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    counts: dict[str, int] = {}
    for item in items:
        counts[report.group_of(item.nodeid)] = counts.get(report.group_of(item.nodeid), 0) + 1
    config._llmfast["groups"] = counts


@pytest.fixture
def benchmark(benchmark, request):  # noqa: F811 - wraps pytest-benchmark's fixture to pass --llmfast-budget on
    benchmark._llmfast_budget = request.config.getoption("llmfast_budget")
    return benchmark


def _bench_session(config: pytest.Config):
    return getattr(config, "_benchmarksession", None)


def _progress(config: pytest.Config, nodeid: str | None) -> None:
    """One line when an op group (benchmark file) starts, with the previous group's time."""
    state = config._llmfast
    group = report.group_of(nodeid) if nodeid else None
    if group == state["current"]:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    now = time.perf_counter()
    if state["current"] is not None:
        reporter.write_line(f"[llmfast] {state['current']}: done in {now - state['started']:.1f} s")
    if group is not None:
        reporter.write_line(f"[llmfast] {group}: {state['groups'].get(group, '?')} benchmarks ...")
    state["current"], state["started"] = group, now


def _attempt_spread(entries: list) -> float:
    worst = 1.0
    for entry in entries:
        data = entry.as_dict(include_data=False)
        stats = data.get("stats") or {}
        low, median = stats.get("min"), stats.get("median")
        if low and median:
            worst = max(worst, median / low)
        for key, value in (data.get("extra_info") or {}).items():
            if key.endswith("_spread") and isinstance(value, (int, float)):
                worst = max(worst, float(value))
    return worst


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    config = item.config
    _progress(config, item.nodeid)
    session = _bench_session(config)
    reruns = config.getoption("llmfast_reruns")
    if (session is None or session.disabled or reruns <= 0
            or "benchmark" not in getattr(item, "fixturenames", ())):
        return None  # pytest's own protocol
    from _pytest.runner import runtestprotocol

    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    attempts = []  # (spread, reports, entries)
    for attempt in range(reruns + 1):
        if attempt:
            item._initrequest()  # fresh function-scoped fixtures (a new benchmark fixture)
        before = len(session.benchmarks)
        started = time.perf_counter()
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        took = time.perf_counter() - started
        entries = session.benchmarks[before:]
        del session.benchmarks[before:]
        failed = any(r.failed for r in reports)
        spread = _attempt_spread(entries) if entries else 1.0
        attempts.append((spread, reports, entries))
        if failed or not entries or spread <= report.MAX_SPREAD or took > RERUN_MAX_SECONDS:
            break  # a long benchmark is flagged rather than run again
    last = attempts[-1]
    spread, reports, entries = last if any(r.failed for r in last[1]) else min(attempts, key=lambda a: a[0])
    for entry in entries:
        if len(attempts) > 1:
            entry.extra_info["reruns"] = len(attempts) - 1
        session.benchmarks.append(entry)
    for rep in reports:
        item.ihook.pytest_runtest_logreport(report=rep)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _rows(config: pytest.Config) -> list[dict[str, Any]]:
    session = _bench_session(config)
    if session is None:
        return []
    rows = [report.row_of(b.as_dict(include_data=False)) for b in session.benchmarks if b.stats]
    return rows


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+local changes" if dirty else "")) if commit else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where the figures were measured: device, CPU, threads, load, versions, commit."""
    import llmfast

    versions = {"python": platform.python_version(), "llmfast": llmfast.__version__, "torch": torch.__version__}
    for name in ("triton", "tiktoken"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU only ({_cpu_model()}; not a GPU figure)",
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "commit": _git_commit(),
        "versions": versions,
    }


def write_plots(rows: list[dict[str, Any]], directory: Path) -> list[Path]:
    """One PNG per (group, op): llmfast's speedup over its strongest peer and its reference, per case."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise pytest.UsageError("--llmfast-plot needs matplotlib: pip install 'llmfast[plot]'") from err
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    by_op: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        by_op.setdefault((row["group"], row["op"]), []).append(row)
    for (group, op), op_rows in by_op.items():
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(op_rows) + 2), 4.5))
        labels = [r["case"] or r["shape"] or str(i) for i, r in enumerate(op_rows)]
        xs = list(range(len(op_rows)))
        for key, label, marker in (("speedup_vs_peer", "vs strongest peer", "o"),
                                   ("speedup_vs_reference", "vs reference", "s")):
            ys = [r[key] if r[key] else float("nan") for r in op_rows]
            if any(not math.isnan(y) for y in ys):
                ax.plot(xs, ys, marker=marker, linestyle=":", label=label)
        for x, r in zip(xs, op_rows):
            if r["flags"]:
                ax.axvspan(x - 0.4, x + 0.4, color="0.85", zorder=0)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(xs, labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("speedup (peer time / llmfast time)")
        ax.set_title(f"{group}: {op} (grey: flagged, not reliable)")
        ax.legend()
        fig.tight_layout()
        path = directory / f"{group}-{op}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    _progress(config, None)
    rows = _rows(config)
    if not rows:
        return
    terminalreporter.write_sep("=", "llmfast summary: speedup = peer time / llmfast time (below 1: llmfast slower)")
    terminalreporter.write_line(report.text_table(rows))
    flagged = sum(1 for r in rows if r["flags"])
    if flagged:
        terminalreporter.write_line(f"{flagged} of {len(rows)} rows failed the timing checks (see 'check'); "
                                    "RESULTS.md withholds them.")
    command = "pytest " + shlex.join(config.invocation_params.args)
    json_path = config.getoption("llmfast_json")
    if json_path:
        document = report.run_document(rows, machine_info(), command)
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(document, indent=1) + "\n")
        terminalreporter.write_line(f"llmfast summary written to {json_path}")
    plot_dir = config.getoption("llmfast_plot")
    if plot_dir:
        written = write_plots(rows, Path(plot_dir))
        terminalreporter.write_line(f"{len(written)} plots written to {plot_dir}")
