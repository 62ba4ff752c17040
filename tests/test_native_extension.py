"""The native core llmfast._C: merge order, clean errors, GIL-free entry points."""
import random

import pytest

from llmfast import _C


def _byte_ranks(offset=100):
    # Single-byte ranks deliberately differ from the byte values.
    return {bytes([b]): offset + b for b in range(256)}


def test_merge_takes_lowest_rank_first_and_leftmost_on_ties():
    ranks = _byte_ranks()
    ranks.update({b"ab": 1, b"bc": 0, b"abc": 2, b"aa": 3})
    core = _C.CoreBPE(ranks, {}, r"\S+")
    # "bc" outranks "ab"; then "a"+"bc" forms "abc", which has a rank; "abc"+"d" has none.
    assert core.encode_single_piece(b"abcd") == [2, 100 + ord("d")]
    assert core.encode_single_piece(b"abd") == [1, 100 + ord("d")]
    assert core.encode_single_piece(b"abc") == [2]
    # Three a's: both pairs are "aa" (rank 3); the leftmost merges.
    assert core.encode_single_piece(b"aaa") == [3, 100 + ord("a")]
    assert core.encode_single_piece(b"") == []  # no bytes, no tokens (and no read before the piece)


def test_long_piece_heap_path_matches_short_scan():
    ranks = _byte_ranks()
    ranks.update({b"ab": 1, b"abab": 2, b"ba": 0, b"bab": 4})
    core = _C.CoreBPE(ranks, {}, r"\S+")
    piece = b"ab" * 300 + b"a"
    tokens = core.encode_single_piece(piece)
    assert core.decode_bytes(tokens) == piece
    # Splitting the long piece into independent short checks is not valid, so compare with a Python reference.
    parts = [bytes([c]) for c in piece]
    while True:
        best = min(
            ((ranks.get(parts[i] + parts[i + 1], 1 << 40), i) for i in range(len(parts) - 1)), default=(1 << 40, 0)
        )
        if best[0] == 1 << 40:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    assert tokens == [ranks[p] for p in parts]


def test_missing_byte_and_duplicate_rank_raise_value_error():
    with pytest.raises(ValueError, match="single-byte"):
        _C.CoreBPE({b"x": 0}, {}, "x")
    ranks = _byte_ranks()
    ranks[b"ab"] = 100  # same rank as byte 0
    with pytest.raises(ValueError, match="duplicate rank"):
        _C.CoreBPE(ranks, {}, "x")


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError):
        _C.CoreBPE({"a": 0}, {}, "x")
    core = _C.CoreBPE(_byte_ranks(), {}, r"\S+")
    with pytest.raises(TypeError):
        core.encode_single_piece("text")
    with pytest.raises(TypeError):
        core.decode_bytes(["a"])


def test_unknown_id_raises_invalid_token_error():
    core = _C.CoreBPE(_byte_ranks(), {"<s>": 7}, r"\S+")
    assert core.decode_bytes([7, 100 + ord("a")]) == b"<s>a"
    with pytest.raises(_C.InvalidTokenError, match="token id 5 "):
        core.decode_bytes([100, 5])
    with pytest.raises(ValueError, match="-1"):
        core.decode_bytes([-1])
    with pytest.raises(KeyError):
        core.decode_single_token_bytes(99999)


def _reference_bpe(ranks: dict, piece: bytes) -> list:
    """tiktoken's rule: a piece that is a token stays whole; else join the lowest-ranked adjacent pair (leftmost on
    ties) until no adjacent pair is a token."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [bytes([c]) for c in piece]
    while len(parts) > 1:
        rank, i = min((ranks.get(parts[i] + parts[i + 1], 1 << 40), i) for i in range(len(parts) - 1))
        if rank == 1 << 40:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def _random_vocab(rng: random.Random, alphabet: bytes = b"abc ") -> dict:
    ranks = _byte_ranks(offset=rng.randrange(1000))
    words = {bytes(rng.choice(alphabet) for _ in range(rng.randrange(2, 7))) for _ in range(60)}
    for rank, word in zip(rng.sample(range(100), len(words)), sorted(words - set(ranks))):
        ranks[word] = rank
    return ranks


def test_piece_cache_is_private_to_each_vocabulary():
    # Each thread memoizes short pieces per vocabulary (a few vocabularies at a time). Cycling through more
    # vocabularies than it keeps, dropping and rebuilding them, must never serve one vocabulary's tokens to another.
    rng = random.Random(5)
    pieces = sorted({bytes(rng.choice(b"abc ") for _ in range(rng.randrange(2, 17))) for _ in range(300)})
    texts = [p.decode() for p in pieces]
    vocabs = [_random_vocab(rng) for _ in range(7)]
    expected = [[_reference_bpe(v, p) for p in pieces] for v in vocabs]
    cores = [_C.CoreBPE(v, {}, r"\S+") for v in vocabs]
    for round_ in range(3):
        for i, (core, want) in enumerate(zip(cores, expected)):
            assert [core.encode_single_piece(p) for p in pieces] == want, (round_, i)
            assert core.encode_pieces(texts) == [t for w in want for t in w]
        cores[round_] = _C.CoreBPE(vocabs[round_], {}, r"\S+")  # a new encoder where an old one was


def test_piece_cache_conflicts_keep_tokens_exact():
    # Far more distinct short pieces than the cache holds, each seen twice (second time possibly from the cache).
    rng = random.Random(6)
    ranks = _random_vocab(rng, alphabet=b"abcdefgh")
    pieces = [bytes(rng.choice(b"abcdefgh") for _ in range(rng.randrange(2, 17))) for _ in range(40000)]
    core = _C.CoreBPE(ranks, {}, r"\S+")
    first = [core.encode_single_piece(p) for p in pieces]
    assert [core.encode_single_piece(p) for p in pieces] == first
    for p, got in list(zip(pieces, first))[:: 97]:
        assert got == _reference_bpe(ranks, p)


def test_token_whose_own_bytes_merge_differently():
    # "abc" is a token but neither "ab" nor "bc" is, so merging never makes it: only a whole piece "abc" is that
    # token. Inside a longer piece (where pieces are cut into chunks) it must stay three bytes, as in tiktoken.
    ranks = _byte_ranks()
    ranks[b"abc"] = 0
    core = _C.CoreBPE(ranks, {}, r"\S+")
    assert core.encode_single_piece(b"abc") == [0]
    for piece in (b"abc" * 6, b"abc" * 2, b"xabc" * 5):
        assert core.encode_single_piece(piece) == [100 + c for c in piece]


_ALPHABET = ["a", "b", " ", "é", "日", "本", "語", "の", "ー", "\U0001f600"]


@pytest.mark.parametrize("seed", range(4))
def test_random_vocabularies_match_tiktoken_on_multibyte_pieces(seed):
    # Random vocabularies (usually with tokens their own bytes do not merge into) and trained ones (whose tokens all
    # merge from their bytes, which enables cutting pieces into cached chunks), on pieces of 1 to 80 bytes mixing
    # one- to four-byte characters: every path of the merge against tiktoken.
    tiktoken = pytest.importorskip("tiktoken")
    rng = random.Random(seed)
    text = "".join(rng.choice(_ALPHABET) for _ in range(4000))
    random_ranks = _byte_ranks(offset=50_000)
    encoded = text.encode()
    for rank in range(3000):
        start = rng.randrange(len(encoded) - 8)
        random_ranks.setdefault(encoded[start : start + rng.randrange(2, 9)], rank)
    from llmfast.tokenizer import train_bpe

    trained = train_bpe(text, 256 + 600, pat_str=r"\S+").mergeable_ranks
    for ranks in (random_ranks, trained):
        ref = tiktoken.Encoding("t", pat_str=r"\S+", mergeable_ranks=ranks, special_tokens={})
        core = _C.CoreBPE(ranks, {}, r"\S+")
        pieces = []
        for _ in range(600):
            start = rng.randrange(len(text) - 40)
            pieces.append(text[start : start + rng.randrange(1, 40)].encode())
        for piece in pieces + pieces:  # the second time, short pieces and chunks come from the cache
            assert core.encode_single_piece(piece) == ref._encode_single_piece(piece), piece


def test_short_pieces_with_more_tokens_than_a_cache_entry_holds():
    # A short piece whose tokens do not fit a cache entry (more than six) is marked in the short cache and keeps its
    # tokens with the long pieces. Encoded again at once it comes from there; after a flood of other such pieces its
    # long entry is gone while the mark may remain, and it is merged anew. Every time the tokens must be exact.
    ranks = _byte_ranks()
    ranks[b"ab"] = 1
    core = _C.CoreBPE(ranks, {}, r"\S+")
    rng = random.Random(8)
    pieces = [bytes(rng.choice(b"abcdefgh") for _ in range(rng.randrange(7, 17))) for _ in range(100000)]
    checked = pieces[:2000]
    first = [core.encode_single_piece(p) for p in checked]
    assert first == [_reference_bpe(ranks, p) for p in checked]
    assert sum(len(t) > 6 for t in first) > 1000  # most of them overflow an entry
    assert [core.encode_single_piece(p) for p in checked] == first
    for p in pieces:
        core.encode_single_piece(p)
    assert [core.encode_single_piece(p) for p in checked] == first
