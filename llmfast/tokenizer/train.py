"""Training a byte-level BPE vocabulary (the merge loop runs in C++ with incremental pair counts)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

from llmfast import _C
from llmfast.tokenizer.core import Encoding
from llmfast.tokenizer.registry import CL100K_PAT_STR, ENDOFTEXT

__all__ = ["train_bpe"]

TextSource = Union[str, Iterable[str]]


def train_bpe(
    text_or_iterable: TextSource,
    vocab_size: int,
    pat_str: str = CL100K_PAT_STR,
    special_tokens: Sequence[str] | Mapping[str, int] = (ENDOFTEXT,),
    *,
    name: str = "trained_bpe",
) -> Encoding:
    """Train a byte-level BPE :class:`Encoding` on text.

    The text is split by ``pat_str`` (natively for tiktoken's patterns, else with the ``regex`` package), special
    tokens are cut out of it first (they never merge with text), identical pieces are counted, and the most frequent
    adjacent pair is merged until the vocabulary holds ``vocab_size`` tokens: 256 single bytes, the merges in the
    order learned (rank = merge order), then the special tokens. Encoding the training text with the result gives the
    tokens training implies; save it with :meth:`Encoding.save` and load with ``load_tiktoken_bpe``.

    Args:
        text_or_iterable: a str, or an iterable of str (documents, lines, chunks of a file).
        vocab_size: total tokens including the 256 bytes and the special tokens. Training stops early when no pair
            is left, giving a smaller vocabulary.
        pat_str: the pre-tokenization pattern.
        special_tokens: special token strings (ids follow the merges), or a dict of string -> id.
        name: the Encoding's name.

    Raises:
        TypeError: text that is not str / iterable of str.
        ValueError: a vocab_size too small for the bytes and specials, or a bad pattern.
    """
    if isinstance(special_tokens, str):
        raise TypeError("special_tokens must be a sequence of str or a dict of str to int, not a single str")
    specials = list(special_tokens)
    if not all(isinstance(s, str) and s for s in specials):
        raise TypeError(f"special_tokens must be non-empty strings, got {specials!r}")
    if len(set(specials)) != len(specials):
        raise ValueError(f"special_tokens has repeats: {specials!r}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size must be at least 256 + {len(specials)} special tokens = {256 + len(specials)}, got {vocab_size}"
        )
    if not isinstance(pat_str, str):
        raise TypeError(f"pat_str must be str, got {type(pat_str).__name__}")
    if isinstance(text_or_iterable, str):
        texts: Iterable[str] = (text_or_iterable,)
    elif isinstance(text_or_iterable, (bytes, bytearray)):
        raise TypeError("text_or_iterable must be str or an iterable of str, got bytes (decode it first)")
    else:
        try:
            texts = iter(text_or_iterable)
        except TypeError:
            raise TypeError(
                f"text_or_iterable must be str or an iterable of str, got {type(text_or_iterable).__name__}"
            ) from None

    import regex

    trainer = _C.BpeTrainer(pat_str)
    native = trainer.has_native_pattern
    if not native:
        try:
            pattern = regex.compile(pat_str)
        except regex.error as e:
            raise ValueError(f"pat_str is not a valid regular expression: {e}") from e
    special_split = (
        regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None
    )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"item {i} of text_or_iterable must be str, got {type(text).__name__}")
        segments = special_split.split(text) if special_split is not None else (text,)
        for segment in segments:
            if not segment:
                continue
            if native:
                trainer.add_text(segment)
            else:
                counts = Counter(pattern.findall(segment))
                trainer.add_piece_counts({p.encode("utf-8", "surrogatepass"): c for p, c in counts.items()})

    n_merges = vocab_size - 256 - len(specials)
    merged = trainer.train(n_merges)
    ranks = {bytes([b]): b for b in range(256)}
    for i, token in enumerate(merged):
        ranks[token] = 256 + i
    if isinstance(special_tokens, Mapping):
        special_ids = dict(special_tokens)
    else:
        special_ids = {s: len(ranks) + i for i, s in enumerate(specials)}
    return Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_ids)
