"""The tokenizer under Python threads: inputs mutated during encode_batch, a worker's exception, the pool's first
use from many threads at once, and a BPE trainer shared by threads.

These tests also run in CI against a build with AddressSanitizer and UndefinedBehaviorSanitizer (``.ci/run``,
step "sanitizers"), where a read of a freed string or a data race on the pool's creation is reported as an error
instead of passing by luck.
"""
from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading

import pytest

from llmfast import _C
from llmfast.tokenizer import get_encoding
from llmfast.tokenizer.train import train_bpe

WORDS = ["alpha", " beta", " gamma", "δέλτα", " 数据", "😀", "\n\n", "  ", "x" * 40, " 1234567", "don't", "?!"]
ALLOWED_CHARS = set("".join(WORDS))


def fresh_text(rng: random.Random, n: int) -> str:
    # "".join builds a new str object each call: once the list drops it, nothing else holds it, so a view into a
    # replaced item would point into freed memory (which ASan reports).
    return "".join(rng.choice(WORDS) for _ in range(n))


def watchdog(fn, seconds: float = 120.0):
    """Run fn in a thread and fail, instead of hanging the test run, if it does not return in time."""
    outcome: dict[str, object] = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome["error"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"no return within {seconds} s: a hang"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def test_encode_batch_while_other_threads_mutate_the_list():
    enc = get_encoding("cl100k_base")
    rng = random.Random(0)
    docs = [fresh_text(rng, rng.randrange(1, 60)) for _ in range(400)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def mutate(seed: int) -> None:
        r = random.Random(seed)
        while not stop.is_set():
            i = r.randrange(len(docs))
            docs[i] = fresh_text(r, r.randrange(1, 60))  # the old string is freed right here
            if r.random() < 0.05:
                docs.append(fresh_text(r, 5))
                docs.pop()

    def encode_many(seed: int) -> None:
        try:
            for _ in range(15):
                # The native call pins the strings it reads; whatever the list holds afterwards, each result must
                # decode to text built from WORDS (never garbage from freed memory).
                out = enc._core.encode_batch(docs, None, None, 4)
                for ids in out:
                    assert set(enc.decode(ids)) <= ALLOWED_CHARS
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    mutators = [threading.Thread(target=mutate, args=(s,)) for s in range(2)]
    encoders = [threading.Thread(target=encode_many, args=(10 + s,)) for s in range(3)]
    for t in mutators + encoders:
        t.start()
    for t in encoders:
        t.join(300)
    stop.set()
    for t in mutators:
        t.join(60)
    assert not any(t.is_alive() for t in mutators + encoders)
    assert not errors, errors[0]


def test_encode_batch_results_stable_under_concurrent_callers():
    enc = get_encoding("o200k_base")
    rng = random.Random(1)
    docs = [fresh_text(rng, rng.randrange(0, 80)) for _ in range(300)]
    expected = [enc.encode_ordinary(d) for d in docs]
    results: list[object] = []

    def run() -> None:
        for _ in range(5):
            results.append(enc.encode_batch(docs, num_threads=4) == expected)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == [True] * 20


def test_worker_thread_exception_reaches_the_caller():
    enc = get_encoding("cl100k_base")
    docs = [f"document {i}: " + "some words here " * 20 for i in range(3000)]
    raised = 0
    try:
        for _ in range(30):  # the fault fires only if a pool worker (not the caller's thread) claims a document
            _C._inject_worker_faults(1)
            try:
                watchdog(lambda: enc._core.encode_batch(docs, None, None, 4))
            except ValueError as err:  # the core's C++ exceptions arrive as ValueError (bindings.cpp)
                assert "injected failure" in str(err)
                raised += 1
                if raised >= 3:
                    break
    finally:
        _C._inject_worker_faults(0)
    assert raised >= 1, "no worker thread ever encoded a document"
    # the pool is still usable and right after a failed batch
    assert watchdog(lambda: enc.encode_batch(docs[:50], num_threads=4)) == [enc.encode_ordinary(d) for d in docs[:50]]


def test_pool_first_use_from_many_threads_at_once():
    # A fresh process: the pool does not exist yet when eight threads call encode_batch at the same moment.
    code = textwrap.dedent("""
        import threading
        from llmfast.tokenizer import get_encoding
        enc = get_encoding("cl100k_base")
        docs = ["hello world %d " % i * 30 for i in range(200)]
        expected = [enc.encode_ordinary(d) for d in docs]
        barrier = threading.Barrier(8)
        ok = []
        def run():
            barrier.wait()
            ok.append(enc._core.encode_batch(docs, None, None, 3) == expected)
        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join(120)
        assert ok == [True] * 8, ok
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_shared_trainer_from_threads_matches_one_thread():
    pat = get_encoding("cl100k_base").pat_str
    rng = random.Random(2)
    texts = [fresh_text(rng, 200) for _ in range(64)]
    alone = _C.BpeTrainer(pat)
    for t in texts:
        alone.add_text(t)
    shared = _C.BpeTrainer(pat)
    barrier = threading.Barrier(4)

    def feed(part: list[str]) -> None:
        barrier.wait()
        for i, t in enumerate(part):
            shared.add_text(t)
            if i % 4 == 0:
                shared.add_piece_counts({"zz": 1})
                _ = shared.distinct_pieces

    threads = [threading.Thread(target=feed, args=(texts[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    alone.add_piece_counts({"zz": 16})
    assert shared.distinct_pieces == alone.distinct_pieces
    assert shared.train(300) == alone.train(300)


def test_train_bpe_in_parallel_threads_is_deterministic():
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "lorem ipsum dolor sit amet " * 30]
    first = train_bpe(texts, 300).mergeable_ranks
    results: list[bool] = []

    def run() -> None:
        results.append(train_bpe(texts, 300).mergeable_ranks == first)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [True] * 4


@pytest.mark.parametrize("bad", [None, 3, b"bytes"])
def test_bad_item_in_batch_is_a_type_error_not_a_crash(bad):
    enc = get_encoding("cl100k_base")
    with pytest.raises(TypeError, match="text items"):
        enc._core.encode_batch(["ok", bad], None, None, 2)
