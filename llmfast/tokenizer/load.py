"""Reading and writing ``.tiktoken`` vocabularies (base64 token, space, rank; one per line; optionally gzipped)."""
from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import os
import tempfile
from typing import Mapping, Union

__all__ = [
    "load_tiktoken_bpe",
    "parse_tiktoken_bpe",
    "save_tiktoken_bpe",
    "dump_tiktoken_bpe",
    "data_gym_to_mergeable_bpe_ranks",
    "read_vocabulary_file",
]

PathLike = Union[str, "os.PathLike[str]"]

_GZIP_MAGIC = b"\x1f\x8b"


def read_vocabulary_file(path: PathLike) -> bytes:
    """Bytes of a vocabulary file, gunzipped when it is gzip data (whatever its name)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{os.fspath(path)} looks gzip-compressed but cannot be decompressed: {e}") from e
    return data


def parse_tiktoken_bpe(data: bytes, source: str = "<data>") -> dict[bytes, int]:
    """Parse ``.tiktoken`` content into ``{token bytes: rank}``.

    Raises:
        ValueError: naming the line, on a malformed line, bad base64, a negative rank, a repeated token or a
            repeated rank.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    ranks: dict[bytes, int] = {}
    b64decode = base64.b64decode
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"line {lineno} of {source}: expected '<base64 token> <rank>', got {line[:80]!r}")
        token_b64, rank_text = parts
        try:
            token = b64decode(token_b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"line {lineno} of {source}: bad base64 token {token_b64[:80]!r} ({e})") from e
        try:
            rank = int(rank_text)
        except ValueError:
            raise ValueError(f"line {lineno} of {source}: rank {rank_text[:40]!r} is not an integer") from None
        if rank < 0 or rank >= 2**32 - 1:
            raise ValueError(f"line {lineno} of {source}: rank {rank} is out of range [0, 4294967294]")
        if not token:
            raise ValueError(f"line {lineno} of {source}: empty token")
        if token in ranks:
            raise ValueError(f"line {lineno} of {source}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{source} holds no tokens")
    if len(set(ranks.values())) != len(ranks):
        seen: dict[int, bytes] = {}
        for token, rank in ranks.items():
            if rank in seen:
                raise ValueError(f"{source}: rank {rank} is given to both {seen[rank]!r} and {token!r}")
            seen[rank] = token
    return ranks


def _read_checked(path: PathLike, expected_hash: str | None, arg: str) -> bytes:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{arg} must be a str or os.PathLike, got {type(path).__name__}")
    data = read_vocabulary_file(path)
    if expected_hash is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_hash:
            raise ValueError(f"{os.fspath(path)} has sha256 {actual}, expected {expected_hash}")
    return data


def load_tiktoken_bpe(tiktoken_bpe_file: PathLike, expected_hash: str | None = None) -> dict[bytes, int]:
    """Load a ``.tiktoken`` or ``.tiktoken.gz`` file into ``{token bytes: rank}`` (tiktoken's format and signature;
    a local path only, llmfast never downloads).

    Args:
        tiktoken_bpe_file: the file.
        expected_hash: optional sha256 hex digest of the (uncompressed) content; a mismatch raises ValueError.
    """
    data = _read_checked(tiktoken_bpe_file, expected_hash, "tiktoken_bpe_file")
    return parse_tiktoken_bpe(data, source=os.fspath(tiktoken_bpe_file))


def dump_tiktoken_bpe(bpe_ranks: Mapping[bytes, int], tiktoken_bpe_file: PathLike) -> None:
    """tiktoken's name and signature for :func:`save_tiktoken_bpe` (a local path; no ``blobfile`` needed)."""
    save_tiktoken_bpe(bpe_ranks, tiktoken_bpe_file)


def data_gym_to_mergeable_bpe_ranks(
    vocab_bpe_file: PathLike,
    encoder_json_file: PathLike,
    vocab_bpe_hash: str | None = None,
    encoder_json_hash: str | None = None,
    clobber_one_byte_tokens: bool = False,
) -> dict[bytes, int]:
    """Mergeable ranks from GPT-2's ``vocab.bpe`` + ``encoder.json`` (tiktoken's signature; local paths only).

    The ranks are encoder.json's ids, checked against the merges, so ``clobber_one_byte_tokens`` (tiktoken's switch
    for taking the single bytes' ranks from encoder.json) changes nothing here; it is accepted for compatibility.
    Raises ValueError for a hash mismatch or files that disagree.
    """
    from llmfast.tokenizer.hf import gpt2_ranks_from_files

    _read_checked(vocab_bpe_file, vocab_bpe_hash, "vocab_bpe_file")
    _read_checked(encoder_json_file, encoder_json_hash, "encoder_json_file")
    del clobber_one_byte_tokens
    return gpt2_ranks_from_files(encoder_json_file, vocab_bpe_file)


def save_tiktoken_bpe(mergeable_ranks: Mapping[bytes, int], path: PathLike) -> None:
    """Write ``{token bytes: rank}`` as a ``.tiktoken`` file, ordered by rank; gzip when ``path`` ends in ``.gz``.

    The file is written to a temporary name and renamed, so readers never see half a file.
    """
    if not isinstance(mergeable_ranks, Mapping):
        raise TypeError(f"mergeable_ranks must be a dict of bytes to int, got {type(mergeable_ranks).__name__}")
    lines = []
    for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
        if not isinstance(token, bytes) or not isinstance(rank, int):
            raise TypeError(f"mergeable_ranks must map bytes to int, got {token!r}: {rank!r}")
        lines.append(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    data = b"".join(lines)
    path = os.fspath(path)
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".tiktoken")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
