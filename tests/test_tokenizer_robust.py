"""Pathological inputs (linear time, exact round trips, parity where tiktoken survives) and a fuzz run over every
entry point of the native binding (only clean Python exceptions may come out)."""
from __future__ import annotations

import multiprocessing
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmfast import _C
from llmfast.tokenizer import get_encoding

tiktoken = pytest.importorskip("tiktoken")

RUNS = {
    "letter": "a",
    "space": " ",
    "newline": "\n",
    "crlf": "\r\n",
    "digit": "7",
    "caret": "^",
    "combining": "\u0301",
    "cjk": "語",
    "emoji": "🎉",
    "mixed-space": " \t",
}
NAMES = ["cl100k_base", "o200k_base"]


def _cpu_seconds(fn) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", list(RUNS))
def test_million_character_runs_round_trip_in_linear_time(name, kind):
    enc = get_encoding(name)
    unit = RUNS[kind]
    big = unit * (1_000_000 // len(unit))
    tokens = enc.encode_ordinary(big)
    assert enc.decode(tokens) == big
    # tiktoken overflows its stack on some of these at full size; compare where it is safe.
    small = unit * (2_000 // len(unit))
    ref = tiktoken.Encoding(name, pat_str=enc.pat_str, mergeable_ranks=enc.mergeable_ranks,
                            special_tokens=enc.special_tokens)
    assert enc.encode_ordinary(small) == ref.encode_ordinary(small)
    # Linear (or n log n): a quarter of the input takes about a quarter of the time. A quadratic path would be
    # 16x; allow generous noise on a shared machine.
    quarter = big[: len(big) // 4]
    t_full = _cpu_seconds(lambda: enc.encode_ordinary(big))
    t_quarter = _cpu_seconds(lambda: enc.encode_ordinary(quarter))
    assert t_full < 9 * t_quarter + 0.05, (t_full, t_quarter)


@pytest.mark.parametrize("name", NAMES)
def test_alternating_and_long_mixed_inputs(name):
    enc = get_encoding(name)
    for text in ["ab" * 300_000, "a " * 300_000, "1a" * 200_000, "\u0301a" * 200_000, "x'" * 200_000,
                 "<|endoftext|>" * 20_000, "\x00\xff" * 100_000]:
        tokens = enc.encode(text, disallowed_special=())
        assert enc.decode(tokens) == text
    specials = "<|endoftext|>" * 50_000
    assert enc.encode(specials, allowed_special="all") == [enc.eot_token] * 50_000


def test_batch_of_huge_and_empty_documents():
    enc = get_encoding("o200k_base")
    docs = ["", " " * 200_000, "語" * 100_000, "plain text"] * 2
    assert enc.encode_batch(docs, num_threads=4) == [enc.encode(d) for d in docs]


def _encode_batch_in_child(docs):
    return get_encoding("cl100k_base").encode_batch(docs, num_threads=2)


def test_batch_pool_with_concurrent_callers_errors_and_fork():
    # The batch threads live on between calls: several Python threads may call at once, a failing batch must leave
    # the pool usable, and a forked child (which has none of the parent's threads) must get a working pool of its own.
    enc = get_encoding("cl100k_base")
    docs = [f"document {i}: " + "some words 語 " * (i % 50) for i in range(64)]
    expected = [enc.encode(d) for d in docs]
    assert enc.encode_batch(docs, num_threads=2) == expected
    with ThreadPoolExecutor(4) as pool:
        assert all(r == expected for r in pool.map(lambda _: enc.encode_batch(docs, num_threads=2), range(8)))
    with pytest.raises(ValueError, match="disallowed special"):
        enc.encode_batch(docs[:10] + ["<|endoftext|>"] + docs[10:], num_threads=2)
    assert enc.encode_batch(docs, num_threads=2) == expected
    if hasattr(os, "fork"):
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.apply_async(_encode_batch_in_child, (docs,)).get(timeout=120) == expected


# ---------------------------------------------------------------- fuzzing the binding

CLEAN = (ValueError, TypeError, KeyError, OverflowError, IndexError, UnicodeDecodeError)


def _random_text(rng: random.Random) -> str:
    pools = [
        lambda: chr(rng.randrange(0x80)),
        lambda: chr(rng.randrange(0x10FFFF + 1)),  # includes lone surrogates
        lambda: rng.choice(["<|endoftext|>", "<|endofprompt|>", "<|fim_prefix|>", "'s", "\r\n", " ", "語"]),
    ]
    return "".join(rng.choice(pools)() for _ in range(rng.randrange(40)))


def _random_value(rng: random.Random, core):
    choices = [
        lambda: _random_text(rng),
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(20))),
        lambda: [rng.randrange(-5, core.max_token_value + 50) for _ in range(rng.randrange(10))],
        lambda: rng.randrange(-(2**70), 2**70),
        lambda: None,
        lambda: 3.5,
        lambda: [[1, 2], "x"],
        lambda: {"a": 1},
        lambda: b"\x01" * core.n_specials,
        lambda: b"\x01" * (core.n_specials + 1),
    ]
    return rng.choice(choices)()


def test_fuzz_binding_entry_points_raise_only_clean_exceptions():
    rng = random.Random(1234)
    enc = get_encoding("cl100k_base")
    core = enc._core
    calls = [
        lambda a, b, c: core.encode(a, b, c),
        lambda a, b, c: core.encode_to_numpy(a, b, c),
        lambda a, b, c: core.encode_batch([a, b] if isinstance(b, str) else a, c, None, 2),
        lambda a, b, c: core.find_special(a, b),
        lambda a, b, c: core.check_disallowed(a, b),
        lambda a, b, c: core.encode_pieces(a if isinstance(a, list) else [a]),
        lambda a, b, c: core.encode_single_piece(a),
        lambda a, b, c: core.encode_single_token(a),
        lambda a, b, c: core.decode_bytes(a),
        lambda a, b, c: core.decode(a, "replace"),
        lambda a, b, c: core.decode_batch([a, b], "strict", 2),
        lambda a, b, c: core.decode_bytes_batch(a, 2),
        lambda a, b, c: core.decode_single_token_bytes(a),
        lambda a, b, c: core.special_token(a),
    ]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        call = rng.choice(calls)
        args = [_random_value(rng, core) for _ in range(3)]
        try:
            call(*args)
            outcomes["ok"] += 1
        except CLEAN:
            outcomes["error"] += 1
    assert outcomes["ok"] > 100 and outcomes["error"] > 100


def test_fuzz_vocabulary_construction():
    rng = random.Random(99)
    base = {bytes([b]): b for b in range(256)}
    built = 0
    for _ in range(200):
        ranks = dict(base)
        for _ in range(rng.randrange(12)):
            token = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 6)))
            ranks[token] = rng.choice([256 + rng.randrange(2**32 - 258), 256 + rng.randrange(10**4), 256 + rng.randrange(10**4),
                                        rng.randrange(300), -1, 2**40])
        if rng.random() < 0.2:
            ranks.pop(bytes([rng.randrange(256)]))
        specials = {_random_text(rng): rng.randrange(-2, 2**33) for _ in range(rng.randrange(3))}
        try:
            core = _C.CoreBPE(ranks, specials, rng.choice([r"\S+|\s+", "(", "", "x*"]))
        except CLEAN:
            continue
        built += 1
        text = bytes(rng.randrange(256) for _ in range(200))
        tokens = core.encode_single_piece(text)
        assert core.decode_bytes(tokens) == text
    assert built > 10


def test_fuzz_trainer():
    rng = random.Random(7)
    for _ in range(50):
        trainer = _C.BpeTrainer(rng.choice([None, "", r"\S+", get_encoding("cl100k_base").pat_str]))
        try:
            if trainer.has_native_pattern:
                trainer.add_text(_random_text(rng))
            trainer.add_piece_counts({_random_text(rng): rng.randrange(-1, 5), b"\xff\xfe": 3})
        except CLEAN:
            pass
        merges = trainer.train(rng.randrange(0, 50))
        assert len(set(merges)) == len(merges)
