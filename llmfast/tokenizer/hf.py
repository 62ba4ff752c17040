"""Loaders for GPT-2-style vocabularies: ``encoder.json`` + ``vocab.bpe`` and Hugging Face ``tokenizer.json``.

Both store tokens as text through GPT-2's byte-to-unicode table: the 188 printable Latin-1 bytes stand for
themselves and the other 68 bytes for U+0100 onwards, in byte order. Ranks are token ids, which must follow the
merge order (tiktoken merges by rank, Hugging Face by merge index; the two agree when ids follow the merges).
"""
from __future__ import annotations

import json
import os
from typing import Any

from llmfast.tokenizer.core import Encoding

__all__ = ["bytes_to_unicode", "from_gpt2_files", "from_tokenizer_json", "gpt2_ranks_from_files"]

# Hugging Face's ByteLevel pre-tokenizer regex (GPT-2's original pattern).
GPT2_HF_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != 0x20]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _to_bytes(token: str) -> bytes | None:
    """Bytes a GPT-2-mapped token stands for, or None when it holds a character outside the table."""
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        return None


def _read_json(path: str | os.PathLike, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {os.fspath(path)} is not valid JSON: {e}") from e


def _parse_merges(merges: list, source: str) -> list[tuple[str, str]]:
    pairs = []
    for i, m in enumerate(merges):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, (list, tuple)):
            parts = list(m)
        else:
            parts = []
        if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise ValueError(f"merge {i} of {source} is not a pair of tokens: {m!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _ranks_from_vocab(
    vocab: dict, merges: list[tuple[str, str]], source: str, special_ids: set[int]
) -> tuple[dict[bytes, int], dict[str, int]]:
    """(mergeable ranks, extra special tokens) from a GPT-2-mapped vocab and its merges, checked for consistency."""
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{source}: the vocabulary must be a non-empty JSON object of token -> id")
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for text, idx in vocab.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ValueError(f"{source}: token {text!r} has id {idx!r}, expected a non-negative int")
        if idx in special_ids:
            continue
        b = _to_bytes(text)
        if b is None or not b:
            specials[text] = idx  # not byte-level text: an added/control token
            continue
        if b in ranks:
            raise ValueError(f"{source}: tokens {text!r} and another both stand for bytes {b!r}")
        ranks[b] = idx
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{source}: the vocabulary lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}); "
            "not a byte-level BPE vocabulary"
        )
    # Merge order must agree with ids, so ranking pairs by id reproduces the merge priority.
    last = -1
    for i, (a, b) in enumerate(merges):
        ba, bb = _to_bytes(a), _to_bytes(b)
        if ba is None or bb is None:
            raise ValueError(f"merge {i} of {source} ({a!r} {b!r}) has characters outside GPT-2's byte table")
        merged = ba + bb
        idx = ranks.get(merged)
        if idx is None:
            raise ValueError(f"merge {i} of {source} ({a!r} {b!r}) makes a token that is not in the vocabulary")
        if ba not in ranks or bb not in ranks:
            raise ValueError(f"merge {i} of {source} ({a!r} {b!r}) joins a token that is not in the vocabulary")
        if idx <= last:
            raise ValueError(
                f"{source}: token ids do not follow the merge order (merge {i}, {a!r} {b!r}, makes id {idx} after "
                f"id {last}); tiktoken-style rank merging would not reproduce this tokenizer"
            )
        last = idx
    return ranks, specials


def gpt2_ranks_from_files(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> dict[bytes, int]:
    """Mergeable ranks from GPT-2's ``encoder.json`` and ``vocab.bpe`` (special tokens dropped)."""
    encoder = _read_json(encoder_json, "encoder.json")
    merges = _read_merges_file(vocab_bpe)
    ranks, _ = _ranks_from_vocab(encoder, merges, os.fspath(encoder_json), set())
    for special in (b"<|endoftext|>", b"<|startoftext|>"):
        ranks.pop(special, None)
    return ranks


def _read_merges_file(vocab_bpe: str | os.PathLike) -> list[tuple[str, str]]:
    with open(vocab_bpe, "rb") as f:
        try:
            text = f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{os.fspath(vocab_bpe)} is not UTF-8: {e}") from e
    lines = [line for line in text.split("\n") if line]
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return _parse_merges(lines, os.fspath(vocab_bpe))


def from_gpt2_files(
    encoder_json: str | os.PathLike,
    vocab_bpe: str | os.PathLike,
    *,
    name: str = "gpt2",
    pat_str: str | None = None,
    special_tokens: dict[str, int] | None = None,
) -> Encoding:
    """An :class:`Encoding` from GPT-2's ``encoder.json`` + ``vocab.bpe``.

    Entries of ``encoder.json`` that are not byte-level text or that no merge produces and are longer than one byte
    (``<|endoftext|>``) become special tokens unless ``special_tokens`` is given. ``pat_str`` defaults to
    tiktoken's r50k pattern (GPT-2's).
    """
    from llmfast.tokenizer.registry import R50K_PAT_STR

    encoder = _read_json(encoder_json, "encoder.json")
    merges = _read_merges_file(vocab_bpe)
    ranks, extra = _ranks_from_vocab(encoder, merges, os.fspath(encoder_json), set())
    merged = {_to_bytes(a) + _to_bytes(b) for a, b in merges}
    if special_tokens is None:
        special_tokens = dict(extra)
        for tok, idx in list(ranks.items()):
            if len(tok) > 1 and tok not in merged:
                special_tokens[tok.decode("latin-1")] = idx
                del ranks[tok]
    else:
        for text in special_tokens:
            ranks.pop(text.encode("utf-8"), None)
    return Encoding(name, pat_str=pat_str or R50K_PAT_STR, mergeable_ranks=ranks, special_tokens=special_tokens)


def _pattern_of(pre: Any, source: str) -> str | None:
    """The split regex of a Hugging Face pre-tokenizer (None when it has no byte-level part)."""
    if not isinstance(pre, dict):
        return None
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise ValueError(f"{source}: ByteLevel pre-tokenizer with add_prefix_space=true is not supported")
        return GPT2_HF_PAT_STR if pre.get("use_regex", True) else ""
    if kind == "Split":
        pattern = pre.get("pattern", {})
        if pre.get("invert") or pre.get("behavior") not in ("Isolated", None):
            raise ValueError(f"{source}: Split pre-tokenizer with behavior {pre.get('behavior')!r} is not supported")
        if "Regex" in pattern:
            return pattern["Regex"]
        if "String" in pattern:
            import regex

            return regex.escape(pattern["String"])
        raise ValueError(f"{source}: Split pre-tokenizer without a pattern")
    if kind == "Sequence":
        found = [p for p in (_pattern_of(x, source) for x in pre.get("pretokenizers", [])) if p]
        if len(found) > 1:
            raise ValueError(f"{source}: more than one splitting pre-tokenizer is not supported")
        return found[0] if found else ""
    raise ValueError(f"{source}: pre-tokenizer {kind!r} is not supported (need ByteLevel or Split)")


def from_tokenizer_json(path: str | os.PathLike, *, name: str | None = None) -> Encoding:
    """An :class:`Encoding` from a Hugging Face byte-level BPE ``tokenizer.json`` (GPT-2, RoBERTa-style, Llama 3,
    Qwen2 ...).

    The vocabulary is read through GPT-2's byte-to-unicode table, merges are checked against the ids, added tokens
    become special tokens, and the pre-tokenizer's regex (or GPT-2's for a plain ByteLevel one) is the pattern.

    Raises:
        ValueError: not a byte-level BPE tokenizer, or one whose ids do not follow its merges.
    """
    source = os.fspath(path)
    data = _read_json(path, "tokenizer.json")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{source}: no 'model' object; not a Hugging Face tokenizer.json")
    model = data["model"]
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"{source}: model type {model.get('type')!r} is not BPE")
    if model.get("byte_fallback"):
        raise ValueError(f"{source}: byte_fallback BPE (sentencepiece-style) is not byte-level BPE")
    specials: dict[str, int] = {}
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
            specials[added["content"]] = added["id"]
    merges = _parse_merges(model.get("merges") or [], source)
    ranks, extra = _ranks_from_vocab(model.get("vocab"), merges, source, set(specials.values()))
    for text, idx in extra.items():
        specials.setdefault(text, idx)
    pat = _pattern_of(data.get("pre_tokenizer"), source)
    if pat is None:
        raise ValueError(f"{source}: no ByteLevel/Split pre-tokenizer; not a byte-level BPE tokenizer")
    if not pat:
        pat = r"(?s:.+)"  # no regex split: the whole text is one piece
    if name is None:
        name = os.path.basename(os.path.dirname(os.path.abspath(source))) or "tokenizer"
    return Encoding(name, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
