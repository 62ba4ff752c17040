"""tiktoken's ``_encode_bytes`` and ``encode_with_unstable``: the byte-level and prefix-completion encoders.

Both are written in Python over the C++ core: they run per call on one short tail of the text (the last piece and
the tokens that could complete it), so they are not where time goes; the whole-text encode under them is the C++
one. Their rules follow tiktoken's behaviour exactly, including its quick fixes (runs of whitespace tokens are
treated as one unstable piece; a trailing whitespace character is tried split off), because callers compare
completions against tiktoken's.
"""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmfast.tokenizer.core import Encoding

# Unicode's White_Space property (what tiktoken's Rust ``char::is_whitespace`` tests). Python's str.isspace() differs:
# it also counts U+001C..U+001F.
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
# Bytes a token may consist of to count as "all space" when widening the unstable tail (tiktoken's set).
_SPACE_BYTES = frozenset(b" \n\t")


def byte_pair_encode(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """Plain byte-pair merge of ``piece`` (lowest-ranked adjacent pair first, leftmost on ties).

    Unlike the piece encoder, a piece that is itself a token is not looked up whole first: a token the merges cannot
    reach stays split, as in tiktoken's ``byte_pair_encode``, which the rules below call in places.
    """
    if len(piece) == 1:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    get = ranks.get
    while len(parts) > 1:
        best = None
        best_i = -1
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def _last_piece(enc: "Encoding", segment: str) -> str | None:
    """The last piece the pattern splits ``segment`` into (None for empty text)."""
    if not segment:
        return None
    if enc._native:
        from llmfast import _C

        pieces = _C.pretokenize(enc._native_kind, segment)
        return pieces[-1] if pieces else None
    last = None
    for m in enc._regex().finditer(segment):
        last = m
    return last.group() if last is not None else None


def _last_piece_token_count(enc: "Encoding", tokens: list[int]) -> int:
    """How many of ``tokens`` (an encode's output) came from the last piece of the text after the last special.

    Zero when the tokens end with a special token (or are empty). The ordinary tokens after the last special decode
    to that final stretch of text exactly, so it is split again to find its last piece, whose tokens are the tail.
    """
    if not tokens or tokens[-1] in enc._special_token_values:
        return 0
    start = len(tokens)
    specials = enc._special_token_values
    while start > 0 and tokens[start - 1] not in specials:
        start -= 1
    segment = enc.decode_bytes(tokens[start:]).decode("utf-8")
    piece = _last_piece(enc, segment)
    if piece is None:
        return 0
    return len(enc._core.encode_single_piece(piece.encode("utf-8")))


def _widen_over_spaces(enc: "Encoding", tokens: list[int], n_last: int) -> int:
    """tiktoken's fix for unstable splits of whitespace: a last piece that starts with an all-space token takes in
    the all-space tokens before it (cl100k's ``\\s*[\\r\\n]`` can join "\\n" and " " once more text follows)."""
    specials = enc._special_token_values
    single = enc._core.decode_single_token_bytes

    def all_space(token: int) -> bool:
        return token not in specials and all(b in _SPACE_BYTES for b in single(token))

    if n_last > 0 and all_space(tokens[len(tokens) - n_last]):
        while n_last < len(tokens) and all_space(tokens[len(tokens) - n_last - 1]):
            n_last += 1
    return n_last


def encode_bytes(enc: "Encoding", data: bytes) -> list[int]:
    """Tokens of arbitrary bytes, as tiktoken's ``Encoding._encode_bytes``.

    Valid UTF-8 encodes as text (special-token text as ordinary text). Otherwise the longest valid prefix is
    encoded, the tokens of its last piece (widened over trailing whitespace tokens) are taken back, and their bytes
    plus everything from the first invalid byte on are byte-pair encoded as one piece.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        valid = e.start
    else:
        return enc.encode_ordinary(text)
    tokens = enc.encode_ordinary(data[:valid].decode("utf-8"))
    n_last = _widen_over_spaces(enc, tokens, _last_piece_token_count(enc, tokens))
    if tokens and n_last > 0:
        unstable = enc.decode_bytes(tokens[-n_last:]) + data[valid:]
        del tokens[-n_last:]
    else:
        unstable = data[valid:]
    tokens.extend(enc._core.encode_single_piece(unstable))
    return tokens


def encode_with_unstable(enc: "Encoding", tokens: list[int]) -> tuple[list[int], list[list[int]]]:
    """Split an encode's ``tokens`` into the stable ones and every token sequence that could replace the unstable
    tail once more text follows (tiktoken's ``encode_with_unstable``; completions sorted, tiktoken's order is a
    hash set's)."""
    n_last = _last_piece_token_count(enc, tokens)
    if n_last == 0:
        return tokens, []
    n_last = _widen_over_spaces(enc, tokens, n_last)
    unstable = enc.decode_bytes(tokens[-n_last:])
    del tokens[-n_last:]
    if not unstable:
        return tokens, []
    ranks = enc._mergeable_ranks
    sorted_bytes = enc._sorted_token_bytes()
    completions: set[tuple[int, ...]] = set()

    # Every single token that starts with the unstable bytes (the bytes themselves included).
    i = bisect.bisect_left(sorted_bytes, unstable)
    while i < len(sorted_bytes) and sorted_bytes[i].startswith(unstable):
        completions.add((ranks[sorted_bytes[i]],))
        i += 1

    # A token straddling the end: keep a prefix of the unstable bytes, append any token that starts with the rest,
    # encode that, and keep tokens until they cover the unstable bytes. Valid UTF-8 goes through the full encoder (a
    # pattern split may appear inside); the rest is merged as one piece.
    single = enc._core.decode_single_token_bytes
    for cut in range(1, len(unstable)):
        prefix, suffix = unstable[:cut], unstable[cut:]
        j = bisect.bisect_left(sorted_bytes, suffix)
        while j < len(sorted_bytes) and sorted_bytes[j].startswith(suffix):
            possibility = prefix + sorted_bytes[j]
            try:
                encoded = enc.encode_ordinary(possibility.decode("utf-8"))
            except UnicodeDecodeError:
                encoded = byte_pair_encode(ranks, possibility)
            seq = []
            covered = 0
            for token in encoded:
                seq.append(token)
                covered += len(single(token))
                if covered >= len(unstable):
                    break
            completions.add(tuple(seq))
            j += 1

    # Whitespace at the end may split off once text follows (gpt2: "   \n\n" + "\n" is not split like "   \n\n").
    if len(unstable) > 1:
        last_len = _last_char_len(unstable)
        if last_len and len(unstable) > last_len:
            last = unstable[-last_len:].decode("utf-8")
            if last in _WHITE_SPACE:
                completions.add(
                    tuple(byte_pair_encode(ranks, unstable[:-last_len]) + byte_pair_encode(ranks, unstable[-last_len:]))
                )
    return tokens, [list(c) for c in sorted(completions)]


def _last_char_len(data: bytes) -> int:
    """Byte length of the valid UTF-8 character ending ``data``, 0 when it does not end with one."""
    for n in range(1, min(4, len(data)) + 1):
        try:
            data[-n:].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return n
    return 0
