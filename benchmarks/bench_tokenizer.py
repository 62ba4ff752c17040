"""Tokenizer throughput: llmfast vs tiktoken on the same vocabulary and text (CPU).

encode_ordinary, encode_batch (batch of 4 KB documents, 1 vs 2 threads) and decode, for cl100k_base and o200k_base, on
English, code, Chinese and Japanese text (``../shared/corpus`` or ``$LLMFAST_CORPUS_DIR`` when present, else pydoc_data;
stdlib sources; Vim's Chinese tutors in ``/usr/share/vim``; generated CJK where a text is missing). llmfast and
tiktoken are timed interleaved in one process, median of rounds; MB/s and ratios go to ``benchmark.extra_info``.
Single-thread timings use the thread's CPU time (robust on a shared machine); batch timings
use wall time (that is what threads buy), over many short rounds, since one round is a few milliseconds.

Single-thread figures with and without llmfast's per-thread cache of encoded pieces (tiktoken has none):
``encode_ordinary`` encodes the same text every round (pieces seen before: the steady state of a long job), while
``first_pass`` streams a longer corpus through an Encoding built for the round, in 20 000-character slices, so every
piece is met for the first time in that pass (the worst case: a fresh process on new text); ``second_pass`` streams the
same corpus again through that Encoding, so first and second pass compare on one text.

Run ``python benchmarks/bench_tokenizer.py`` for a table, or ``pytest benchmarks/bench_tokenizer.py``.
"""
from __future__ import annotations

import functools
import os
import pathlib
import random
import statistics
import sysconfig
import time
from typing import Callable

import pytest

from llmfast.tokenizer import get_encoding

def _corpus_dir() -> pathlib.Path:
    """``$LLMFAST_CORPUS_DIR``, else the first ``shared/corpus`` beside the checkout or one of its parents (a git
    worktree may sit a level deeper than the main checkout)."""
    if os.environ.get("LLMFAST_CORPUS_DIR"):
        return pathlib.Path(os.environ["LLMFAST_CORPUS_DIR"])
    for parent in pathlib.Path(__file__).resolve().parents[1].parents:
        if (parent / "shared" / "corpus").is_dir():
            return parent / "shared" / "corpus"
    return pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


CORPUS = _corpus_dir()
NAMES = ["cl100k_base", "o200k_base"]
KINDS = ["english", "code", "chinese", "japanese"]
TEXT_BYTES = 400_000


@functools.cache
def text_of(kind: str) -> str:
    if kind == "english":
        path = CORPUS / "botchan_en.txt"
        if path.exists():
            return path.read_text(encoding="utf-8")
        import pydoc_data.topics

        return "\n".join(pydoc_data.topics.topics.values())[:TEXT_BYTES]
    if kind == "code":
        stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
        parts, size = [], 0
        for path in sorted(stdlib.glob("*.py")):
            src = path.read_text(encoding="utf-8", errors="replace")
            parts.append(src)
            size += len(src)
            if size > TEXT_BYTES:
                break
        return "\n".join(parts)
    if kind == "chinese":
        text = _chinese_text()
        if text:
            return text
    else:
        path = CORPUS / "neko_ja.txt"
        if path.exists():
            return path.read_text(encoding="utf-8")[: TEXT_BYTES // 3]
    return _generated_cjk()


# Real Chinese prose on most Linux machines: Vim's tutor in Simplified and Traditional Chinese (70 KB, with the ASCII
# of Vim commands mixed in, as Chinese technical text has).
CHINESE_SOURCES = ["/usr/share/vim/vim*/tutor/tutor.zh_cn.utf-8", "/usr/share/vim/vim*/tutor/tutor.zh_tw.utf-8"]


@functools.cache
def _chinese_text() -> str:
    import glob

    paths = [sorted(glob.glob(pattern))[-1:] for pattern in CHINESE_SOURCES]
    return "\n".join(pathlib.Path(p[0]).read_text(encoding="utf-8") for p in paths if p)


def _generated_cjk() -> str:
    rng = random.Random(0)  # generated CJK: hanzi/kana runs with punctuation and spaces
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + [chr(c) for c in range(0x3041, 0x3097)]
    out = []
    while len(out) < TEXT_BYTES // 3:
        out.extend(rng.choice(chars) for _ in range(rng.randrange(5, 40)))
        out.append(rng.choice(["。", "、", "\n", " ", "「", "」"]))
    return "".join(out)


@functools.cache
def pair(name: str):
    tiktoken = pytest.importorskip("tiktoken")
    ours = get_encoding(name)
    ref = tiktoken.Encoding(
        name, pat_str=ours.pat_str, mergeable_ranks=ours.mergeable_ranks, special_tokens=ours.special_tokens
    )
    return ours, ref


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, clock=time.thread_time,
                spreads: dict[str, float] | None = None) -> dict[str, float]:
    """Median seconds of each function, timed in alternation so both see the same machine state; ``spreads``, when
    given, receives each function's median / min (how much its rounds disagree)."""
    for fn in fns.values():
        fn()  # warm up (caches, lazily built state)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            start = clock()
            fn()
            times[key].append(clock() - start)
    if spreads is not None:
        spreads.update(_spreads(times))
    return {k: statistics.median(v) for k, v in times.items()}


def _spreads(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(statistics.median(v) / max(min(v), 1e-9), 3) for k, v in times.items()}


def _rounds(benchmark, rounds: int = 7) -> int:
    return 1 if getattr(benchmark, "disabled", False) else rounds


BATCH_ROUNDS = 31  # a batch round takes a few milliseconds: many rounds keep one scheduling hiccup from deciding


@functools.cache
def corpus_of(kind: str) -> str:
    """A longer text per kind for the first-pass figure (the whole novel, all of pydoc, 2 MB of stdlib sources)."""
    if kind == "english":
        import pydoc_data.topics

        path = CORPUS / "botchan_en.txt"
        novel = path.read_text(encoding="utf-8") if path.exists() else ""
        return novel + "\n".join(pydoc_data.topics.topics.values())
    if kind == "code":
        stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
        sources = (p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py")))
        return "\n".join(sources)[:2_000_000]
    if kind == "chinese":
        return text_of("chinese")  # all the Chinese text there is
    path = CORPUS / "neko_ja.txt"
    return path.read_text(encoding="utf-8") if path.exists() else text_of("japanese")


def fresh_encoding(name: str):
    """A new llmfast Encoding of the named vocabulary: its own (empty) piece caches."""
    ours, _ = pair(name)
    return type(ours)(f"{name}-fresh", pat_str=ours.pat_str, mergeable_ranks=ours.mergeable_ranks,
                      special_tokens=ours.special_tokens)


def first_pass(name: str, text: str, rounds: int, slice_chars: int = 20_000,
               spreads: dict[str, float] | None = None) -> dict[str, float]:
    """Median thread-CPU seconds to encode ``text`` slice by slice with a freshly built llmfast Encoding (empty piece
    caches): its first pass ("llmfast") and a second pass over the same slices ("llmfast_again", the steady state on
    this text), and with tiktoken (no cache: one figure). The passes alternate within each round."""
    _, ref = pair(name)
    slices = [text[i : i + slice_chars] for i in range(0, len(text), slice_chars)]
    times: dict[str, list[float]] = {"llmfast": [], "tiktoken": [], "llmfast_again": []}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(rounds):
        fresh = fresh_encoding(name)
        fresh.encode_ordinary("warm up")  # native state other than the piece cache
        for key, enc in (("llmfast", fresh), ("tiktoken", ref), ("llmfast_again", fresh)):
            start = time.thread_time()
            tokens[key] = [enc.encode_ordinary(piece) for piece in slices]
            times[key].append(time.thread_time() - start)
    assert tokens["llmfast"] == tokens["tiktoken"] == tokens["llmfast_again"]
    if spreads is not None:
        spreads.update(_spreads(times))
    return {k: statistics.median(v) for k, v in times.items()}


def _sample(text: str, benchmark) -> str:
    # The CI smoke run (--benchmark-disable) only checks that everything runs: keep it to a few KB.
    return text[:20_000] if getattr(benchmark, "disabled", False) else text


def _record_speed(benchmark, nbytes: int, seconds: dict[str, float], spreads: dict[str, float],
                  rounds: int, ours: str = "llmfast") -> None:
    """MB/s and the ratio, plus the interleaved medians in the summary's conventions (``llmfast_ms``,
    ``tiktoken_ms``, their spreads and the round count): these, not pytest-benchmark's own timing, are the row."""
    benchmark.extra_info.update(
        llmfast_ms=seconds[ours] * 1e3,
        tiktoken_ms=seconds["tiktoken"] * 1e3,
        llmfast_spread=spreads[ours],
        tiktoken_spread=spreads["tiktoken"],
        rounds=rounds,
        bytes=nbytes,
        llmfast_MBps=round(nbytes / seconds[ours] / 1e6, 2),
        tiktoken_MBps=round(nbytes / seconds["tiktoken"] / 1e6, 2),
        speedup_vs_tiktoken=round(seconds["tiktoken"] / seconds[ours], 2),
        load_average=round(os.getloadavg()[0], 2),
    )


def _race(benchmark, nbytes: int, ours_fn: Callable, ref_fn: Callable, arg) -> None:
    """Same result from both, then interleaved medians into extra_info, then pytest-benchmark's own timing."""
    assert ours_fn(arg) == ref_fn(arg)
    spreads: dict[str, float] = {}
    rounds = _rounds(benchmark)
    t = interleaved({"llmfast": lambda: ours_fn(arg), "tiktoken": lambda: ref_fn(arg)}, rounds, spreads=spreads)
    _record_speed(benchmark, nbytes, t, spreads, rounds)
    benchmark(ours_fn, arg)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_encode_ordinary(benchmark, name, kind):
    ours, ref = pair(name)
    text = _sample(text_of(kind), benchmark)
    nbytes = len(text.encode("utf-8"))
    _race(benchmark, nbytes, ours.encode_ordinary, ref.encode_ordinary, text)


@pytest.mark.parametrize("which", ["first_pass", "second_pass"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_encode_corpus(benchmark, name, kind, which):
    """The corpus in slices through a fresh Encoding: its first pass, or the second pass over the same slices."""
    text = _sample(corpus_of(kind), benchmark)
    nbytes = len(text.encode("utf-8"))
    spreads: dict[str, float] = {}
    rounds = _rounds(benchmark, 5)
    t = first_pass(name, text, rounds, spreads=spreads)
    _record_speed(benchmark, nbytes, t, spreads, rounds, ours="llmfast" if which == "first_pass" else "llmfast_again")
    benchmark.extra_info["op"] = f"encode_{which}"
    benchmark.pedantic(
        lambda enc: [enc.encode_ordinary(text[i : i + 20_000]) for i in range(0, len(text), 20_000)],
        setup=lambda: ((fresh_encoding(name),), {}),
        rounds=1,
    )


def _documents(text: str, size: int = 4096) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_encode_batch(benchmark, name, kind):
    ours, ref = pair(name)
    docs = _documents(_sample(text_of(kind), benchmark))
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert ours.encode_batch(docs, num_threads=2) == ref.encode_batch(docs, num_threads=2)
    spreads: dict[str, float] = {}
    t = interleaved(
        {
            "llmfast_1": lambda: ours.encode_batch(docs, num_threads=1),
            "llmfast_2": lambda: ours.encode_batch(docs, num_threads=2),
            "tiktoken_1": lambda: ref.encode_batch(docs, num_threads=1),
            "tiktoken_2": lambda: ref.encode_batch(docs, num_threads=2),
        },
        _rounds(benchmark, BATCH_ROUNDS),
        clock=time.perf_counter,
        spreads=spreads,
    )
    benchmark.extra_info.update(
        llmfast_ms=t["llmfast_2"] * 1e3,  # the row: both libraries on two threads
        tiktoken_ms=t["tiktoken_2"] * 1e3,
        llmfast_spread=spreads["llmfast_2"],
        tiktoken_spread=spreads["tiktoken_2"],
        rounds=_rounds(benchmark, BATCH_ROUNDS),
        docs=len(docs),
        llmfast_1thread_MBps=round(nbytes / t["llmfast_1"] / 1e6, 2),
        llmfast_2threads_MBps=round(nbytes / t["llmfast_2"] / 1e6, 2),
        llmfast_thread_scaling=round(t["llmfast_1"] / t["llmfast_2"], 2),
        tiktoken_2threads_MBps=round(nbytes / t["tiktoken_2"] / 1e6, 2),
        tiktoken_thread_scaling=round(t["tiktoken_1"] / t["tiktoken_2"], 2),
        speedup_vs_tiktoken=round(t["tiktoken_2"] / t["llmfast_2"], 2),
        load_average=round(os.getloadavg()[0], 2),
    )
    benchmark(ours.encode_batch, docs, num_threads=2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_decode(benchmark, name, kind):
    ours, ref = pair(name)
    text = _sample(text_of(kind), benchmark)
    tokens = ours.encode_ordinary(text)
    nbytes = len(text.encode("utf-8"))
    _race(benchmark, nbytes, ours.decode, ref.decode, tokens)


def _print_rows(name: str, kind: str) -> None:
    ours, ref = pair(name)
    text = text_of(kind)
    nbytes = len(text.encode("utf-8"))

    def row(op: str, ours_s: float, ref_s: float, note: str = "") -> None:
        print(f"{name:12} {kind:8} {op:18} {nbytes / ours_s / 1e6:13.1f} {nbytes / ref_s / 1e6:14.1f} "
              f"{ref_s / ours_s:6.2f}{note}")

    t = interleaved({"o": lambda: ours.encode_ordinary(text), "r": lambda: ref.encode_ordinary(text)}, 7)
    row("encode_ordinary", t["o"], t["r"])
    corpus = corpus_of(kind)
    t = first_pass(name, corpus, 3)
    corpus_bytes = len(corpus.encode("utf-8"))
    row("first_pass", t["llmfast"] * nbytes / corpus_bytes, t["tiktoken"] * nbytes / corpus_bytes,
        f"   ({corpus_bytes / 1e6:.2f} MB, each piece new to the pass)")
    row("second_pass", t["llmfast_again"] * nbytes / corpus_bytes, t["tiktoken"] * nbytes / corpus_bytes,
        "   (the same corpus again: its pieces cached)")
    docs = _documents(text)
    t = interleaved(
        {
            "o1": lambda: ours.encode_batch(docs, num_threads=1),
            "o2": lambda: ours.encode_batch(docs, num_threads=2),
            "r2": lambda: ref.encode_batch(docs, num_threads=2),
        },
        BATCH_ROUNDS,
        clock=time.perf_counter,
    )
    row("encode_batch x2", t["o2"], t["r2"], f"   (llmfast 2 vs 1 thread: {t['o1'] / t['o2']:.2f}x)")
    tokens = ours.encode_ordinary(text)
    t = interleaved({"o": lambda: ours.decode(tokens), "r": lambda: ref.decode(tokens)}, 7)
    row("decode", t["o"], t["r"])


def main() -> None:
    """Print the comparison table (CPU), with the machine's load average (other processes skew the figures)."""
    print(f"CPU, {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}")
    print(f"{'encoding':12} {'text':8} {'op':18} {'llmfast MB/s':>13} {'tiktoken MB/s':>14} {'ratio':>6}")
    for name in NAMES:
        for kind in KINDS:
            _print_rows(name, kind)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
