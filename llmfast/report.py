"""Benchmark results a person can read: the summary rows, their quality flags, and ``benchmarks/RESULTS.md``.

``benchmarks/conftest.py`` turns every pytest-benchmark result into one *row* with :func:`row_of` and prints
:func:`text_table` after pytest-benchmark's own table; ``--llmfast-json FILE`` writes :func:`run_document`.

``python -m llmfast.report benchmarks/results/*.json`` regenerates ``benchmarks/RESULTS.md`` from such files, one
section per file (machine, date, versions, the command that produced it). Rows flagged as unreliable (see
:func:`quality_flags`) are listed with the reason and without their figures, never published as results.

This module imports neither torch nor Triton, so the report needs only the JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent

# Quality thresholds. A timing is published only when its rounds agree and the timer could resolve them.
MIN_ROUNDS = 5            # fewer rounds than this: a median of too few samples
MAX_SPREAD = 1.5          # median / min above this: rounds disagree (a busy machine, a one-off stall)
MIN_ROUND_SECONDS = 50e-6  # one round (all its iterations) shorter than this: the timer and call overhead dominate

# extra_info keys ending in _ms that are not peers
_NOT_PEERS = {"llmfast_ms", "first_call_ms"}


def format_seconds(seconds: float | None) -> str:
    """``1.23 ms``-style time, ``—`` for a missing one."""
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds):
        return "—"
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def format_speedup(ratio: float | None, peer: str | None = None) -> str:
    """``×3.2 vs torch``; a slower llmfast shows as a ratio below 1 (``×0.62 vs torch``), never hidden."""
    if ratio is None or not isinstance(ratio, (int, float)) or math.isnan(ratio) or ratio <= 0:
        return "—"
    if ratio >= 10:
        text = f"×{ratio:.0f}"
    elif ratio >= 0.995:
        text = f"×{ratio:.1f}"
    else:
        text = f"×{ratio:.2f}"
    return f"{text} vs {peer}" if peer else text


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) or value <= 0 else value


def group_of(fullname: str) -> str:
    """The op group of a benchmark: its file, ``benchmarks/bench_softmax.py::...`` -> ``softmax``."""
    module = fullname.split("::", 1)[0].rsplit("/", 1)[-1]
    if module.endswith(".py"):
        module = module[:-3]
    return module[len("bench_"):] if module.startswith("bench_") else module


def quality_flags(stats: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> list[str]:
    """Why a timing cannot be trusted (empty when it can).

    ``stats`` is pytest-benchmark's stats dict (``min``, ``median``, ``rounds``, ``iterations``; per-iteration
    seconds), or None when the row's llmfast time was taken outside pytest-benchmark. ``extra`` may carry
    ``<name>_spread`` (median / min of a timing's own samples) and ``rounds`` (how many samples such a timing had).
    """
    flags = []
    extra = extra or {}
    own_rounds = extra.get("rounds")
    if isinstance(own_rounds, int) and not isinstance(own_rounds, bool) and own_rounds < MIN_ROUNDS:
        flags.append(f"few rounds ({own_rounds})")
    if stats:
        rounds = stats.get("rounds") or 0
        low, median = _number(stats.get("min")), _number(stats.get("median"))
        iterations = stats.get("iterations") or 1
        if rounds < MIN_ROUNDS:
            flags.append(f"few rounds ({rounds})")
        if low and median and median / low > MAX_SPREAD:
            flags.append(f"spread: median {median / low:.1f}x min")
        if median and median * iterations < MIN_ROUND_SECONDS:
            flags.append(f"timer-bound: {format_seconds(median * iterations)} per round")
    for key, value in extra.items():
        spread = _number(value)
        if key.endswith("_spread") and spread and spread > MAX_SPREAD:
            flags.append(f"{key[: -len('_spread')]} spread: median {spread:.1f}x min")
    return flags


def row_of(bench: dict[str, Any]) -> dict[str, Any]:
    """One summary row from a pytest-benchmark result (the dict form in its JSON).

    The conventions it reads (see ``benchmarks/conftest.py``): the op is ``extra_info["op"]`` or the test's name
    without ``test_``; llmfast's time is ``extra_info["llmfast_ms"]`` or pytest-benchmark's median; every other
    ``extra_info["<peer>_ms"]`` is a peer, ``reference`` being the pure-PyTorch reference; ``speedup_vs_<peer>``
    overrides the ratio computed from the times; ``first_call_ms`` is the first call (Triton's JIT included);
    ``note`` (a string) is printed beside the row in RESULTS.md (e.g. a measured peak memory).
    """
    extra = dict(bench.get("extra_info") or {})
    stats = bench.get("stats") or {}
    fullname = bench.get("fullname") or bench.get("name") or "?"
    test_name = (bench.get("name") or fullname.rsplit("::", 1)[-1]).split("[", 1)[0]
    op = extra.get("op") if isinstance(extra.get("op"), str) else None
    if not op:
        op = test_name[len("test_"):] if test_name.startswith("test_") else test_name
    case = bench.get("param") or ""
    if not case and "[" in (bench.get("name") or ""):
        case = bench["name"].split("[", 1)[1].rstrip("]")
    ours_ms = _number(extra.get("llmfast_ms"))
    ours = ours_ms / 1e3 if ours_ms else _number(stats.get("median"))
    peers: dict[str, float] = {}
    for key, value in extra.items():
        if key.endswith("_ms") and key not in _NOT_PEERS and not key.startswith("llmfast_"):
            seconds = _number(value)
            if seconds:
                peers[key[: -len("_ms")]] = seconds / 1e3

    def speedup(peer: str) -> float | None:
        given = _number(extra.get(f"speedup_vs_{peer}"))
        if given:
            return given
        return peers[peer] / ours if ours and peer in peers else None

    others = {k: v for k, v in peers.items() if k != "reference"}
    best = min(others, key=others.get) if others else None
    first = _number(extra.get("first_call_ms"))
    # llmfast timed by the benchmark itself (llmfast_ms): its spreads and rounds are in extra_info, and
    # pytest-benchmark's own stats are not what the row shows.
    flags = quality_flags(stats if stats and not ours_ms else None, extra)
    return {
        "group": bench.get("group") or group_of(fullname),
        "op": op,
        "case": case,
        "shape": str(extra["shape"]) if "shape" in extra else "",
        "benchmark": fullname,
        "llmfast_s": ours,
        "rounds": extra.get("rounds") if ours_ms else stats.get("rounds"),
        "min_s": _number(stats.get("min")),
        "reference_s": peers.get("reference"),
        "peer": best,
        "peer_s": peers.get(best) if best else None,
        "speedup_vs_peer": speedup(best) if best else None,
        "speedup_vs_reference": speedup("reference") if "reference" in peers else None,
        "first_call_s": first / 1e3 if first else None,
        "flags": flags,
        "reruns": extra.get("reruns", 0),
        "note": extra["note"] if isinstance(extra.get("note"), str) else "",
    }


def _columns(row: dict[str, Any]) -> list[str]:
    return [
        row["op"],
        row["case"] or row["shape"] or "—",
        format_seconds(row["llmfast_s"]),
        format_seconds(row["reference_s"]),
        f"{format_seconds(row['peer_s'])} ({row['peer']})" if row["peer"] else "—",
        format_speedup(row["speedup_vs_peer"], _short_peer(row["peer"])) if row["peer"] else "—",
        format_speedup(row["speedup_vs_reference"], "ref") if row["reference_s"] else "—",
        format_seconds(row["first_call_s"]),
        "; ".join(row["flags"]) or "ok",
    ]


HEADER = ["op", "case", "llmfast", "reference", "strongest peer", "speedup", "vs reference", "1st call", "check"]


def _short_peer(peer: str | None) -> str | None:
    """``torch_flash_attention`` -> ``torch``: the speedup column names the library, the peer column the kernel."""
    if peer is None:
        return None
    return peer.split("_", 1)[0] if peer.startswith("torch_") else peer


def text_table(rows: Sequence[dict[str, Any]]) -> str:
    """The terminal summary: a fixed-width table grouped by op group, flagged rows marked."""
    cells = [HEADER] + [_columns(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    widths[-1] = len(HEADER[-1])  # the last column runs free

    def line(c: Sequence[str]) -> str:
        return "  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip()

    out = [line(HEADER), "  ".join("-" * w for w in widths)]
    group = None
    for row, c in zip(rows, cells[1:]):
        if row["group"] != group:
            group = row["group"]
            out.append(f"[{group}]")
        out.append(line(c))
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Published rows (no flags) as a markdown table; flagged ones as a list of what was withheld and why."""
    good = [r for r in rows if not r["flags"]]
    bad = [r for r in rows if r["flags"]]
    notes = any(r.get("note") for r in good)
    header = HEADER[:-1] + (["note"] if notes else [])
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in good:
        cells = _columns(row)[:-1] + ([row.get("note") or ""] if notes else [])
        out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    if not good:
        out.append("| (no reliable rows) |" + " — |" * (len(header) - 1))
    if bad:
        out += ["", f"Withheld ({len(bad)} rows whose timing failed the checks; their figures are not published):", ""]
        for row in bad:
            note = f" (not a timing, still measured: {row['note']})" if row.get("note") else ""
            out.append(f"- `{row['group']}` {row['op']} `{row['case']}`: {'; '.join(row['flags'])}{note}")
    return "\n".join(out)


def run_document(rows: Sequence[dict[str, Any]], machine: dict[str, Any], command: str,
                 when: datetime.datetime | None = None) -> dict[str, Any]:
    """What ``--llmfast-json`` writes: the rows plus where, when and how they were measured."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return {
        "format": "llmfast-benchmarks/1",
        "date": when.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine,
        "thresholds": {"min_rounds": MIN_ROUNDS, "max_spread": MAX_SPREAD, "min_round_seconds": MIN_ROUND_SECONDS},
        "rows": list(rows),
    }


RESULTS_HEADER = """# Benchmark results

Generated by `python -m llmfast.report` from the JSON files in `benchmarks/results/`; do not edit by hand. Each
section names the command that measured it, the machine, the date and the versions. Each JSON file is written by
the main job with `--llmfast-json`:

    pytest benchmarks/ --benchmark-only --llmfast-json benchmarks/results/<machine>.json
    python -m llmfast.report            # rewrites this file from benchmarks/results/*.json

Columns: llmfast's median time; the pure-PyTorch reference's; the strongest peer's (the fastest of torch's
kernels, or tiktoken); the speedup = peer time / llmfast time (above 1: llmfast is faster, below 1: slower);
`1st call` = the first call's time (on a GPU it includes Triton's compilation or cache load). A row is published
only if its rounds agree (median within {spread}x of the fastest round), it had at least {rounds} rounds and each
round lasted at least {round_us:.0f} µs; the others are listed as withheld, with the reason. CPU sections measure
the `auto` backend, which runs torch's CPU kernels for most ops: they say nothing about GPU speed.
"""


def section(document: dict[str, Any], source: str) -> str:
    """One RESULTS.md section for one ``--llmfast-json`` document."""
    machine = document.get("machine") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (machine.get("versions") or {}).items())
    title = machine.get("device") or "unknown device"
    lines = [f"## {title} — {document.get('date', '?')}", ""]
    lines.append(f"Command: `{document.get('command', '?')}` (file `{source}`).")
    details = [machine.get("cpu"), f"{machine['cpu_count']} CPUs" if machine.get("cpu_count") else None,
               f"torch threads {machine['torch_threads']}" if machine.get("torch_threads") else None,
               f"load average {machine['load_average']}" if machine.get("load_average") is not None else None,
               f"commit {machine['commit']}" if machine.get("commit") else None]
    lines.append("Machine: " + ", ".join(d for d in details if d) + ".")
    if versions:
        lines.append(f"Versions: {versions}.")
    if document.get("tests"):
        lines.append(f"Tests on this device: {document['tests']}.")
    for note in document.get("notes") or []:  # gpu_report: driver, copy bandwidth, failing tests, autotune picks
        lines.append(f"- {note}")
    lines += ["", markdown_table(document.get("rows") or [])]
    return "\n".join(lines) + "\n"


def results_markdown(documents: Iterable[tuple[str, dict[str, Any]]]) -> str:
    parts = [RESULTS_HEADER.format(spread=MAX_SPREAD, rounds=MIN_ROUNDS, round_us=MIN_ROUND_SECONDS * 1e6)]
    for source, document in documents:
        parts.append(section(document, source))
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmfast.report",
                                     description="Regenerate benchmarks/RESULTS.md from --llmfast-json files.")
    parser.add_argument("json", nargs="*", type=Path,
                        help="--llmfast-json files (default: benchmarks/results/*.json, sorted by name)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md",
                        help="markdown file to write (default: benchmarks/RESULTS.md); '-' prints it")
    args = parser.parse_args(argv)
    paths = args.json or sorted((REPO_ROOT / "benchmarks" / "results").glob("*.json"))
    if not paths:
        print("llmfast.report: no JSON files given and none in benchmarks/results/", file=sys.stderr)
        return 1
    documents = []
    for path in paths:
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"llmfast.report: cannot read {path}: {err}", file=sys.stderr)
            return 1
        if document.get("format") != "llmfast-benchmarks/1":
            print(f"llmfast.report: {path} is not an --llmfast-json file (format {document.get('format')!r})",
                  file=sys.stderr)
            return 1
        try:
            source = str(path.resolve().relative_to(REPO_ROOT))
        except ValueError:
            source = str(path)
        documents.append((source, document))
    text = results_markdown(documents)
    if str(args.out) == "-":
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        rows = sum(len(d.get("rows") or []) for _, d in documents)
        print(f"wrote {args.out} ({len(documents)} sections, {rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
