"""Training data: a text tokenized in memory, or a token file written once by ``llmfast prepare`` and read through
``np.memmap`` (never loaded whole); the train/validation split; and the batches, drawn for the *global* batch and
then cut into each rank's share, so that the examples of a step do not depend on the number of processes.

``llmfast prepare TEXT --out DIR`` writes ``DIR/tokens.bin`` (the ids, uint16 when the vocabulary fits, else
uint32) and ``DIR/meta.json`` (the tokenizer's config, the dtype, the token count, the source).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    import argparse

TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
DATA_FORMAT = "llmfast-tokens"
# Text is encoded in pieces this long (cut after a line break), so the batch encoder can spread them over cores
# and a large file never needs one huge Python list.
CHUNK_CHARS = 1 << 20


def _error(message: str) -> Exception:
    from llmfast.cli import CliError

    return CliError(message)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def text_chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters, each ending after a line break where there is one.

    Cutting after a newline keeps the pre-tokenizer's word boundaries in almost all texts; a text shorter than
    ``size`` is one piece, so it is encoded exactly as a whole.
    """
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut >= start else end
        chunks.append(text[start:end])
        start = end
    return chunks


def encode_text(tokenizer, text: str, progress: bool = False, threads: int | None = None) -> np.ndarray:
    """Token ids of ``text`` as a 1-D array of :func:`token_dtype`, encoded chunk by chunk on all cores."""
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    if tokenizer.name == "bytes":  # the ids are the UTF-8 bytes themselves
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
    chunks = text_chunks(text)
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parts = []
    per_call = max(1, threads) * 4  # several chunks per thread per call keeps the threads busy
    with tqdm(total=len(text), desc="tokenize", unit="char", unit_scale=True, disable=not progress,
              dynamic_ncols=True) as bar:
        for i in range(0, len(chunks), per_call):
            batch = chunks[i:i + per_call]
            for ids in tokenizer.encoding.encode_ordinary_batch(batch, num_threads=max(1, threads)):
                parts.append(np.asarray(ids, dtype=dtype))
            bar.update(sum(map(len, batch)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def is_prepared(path: str) -> bool:
    """Whether ``--data path`` names a directory written by ``llmfast prepare``."""
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


@dataclass
class PreparedData:
    """A token file opened as a read-only memory map, with the tokenizer config it was encoded with."""

    tokens: np.ndarray
    meta: dict
    directory: Path


def load_prepared(path: str) -> PreparedData:
    """Open ``DIR/tokens.bin`` without reading it, after checking it against ``DIR/meta.json``."""
    directory = Path(path)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(f"--data {path}: {META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != DATA_FORMAT:
        raise _error(f"--data {path}: {META_FILE} was not written by `llmfast prepare`")
    tokens_path = directory / TOKENS_FILE
    if not tokens_path.is_file():
        raise _error(f"--data {path}: {TOKENS_FILE} is missing (run `llmfast prepare TEXT --out {path}`)")
    vocab = meta.get("tokenizer", {}).get("vocab_size")
    if meta.get("dtype") not in ("uint16", "uint32") or not isinstance(vocab, int):
        raise _error(f"--data {path}: {META_FILE} has dtype {meta.get('dtype')!r}; accepts uint16 or uint32 "
                     f"with the tokenizer's vocab_size")
    dtype = np.dtype(meta["dtype"])
    if dtype != token_dtype(vocab):
        raise _error(f"--data {path}: {TOKENS_FILE} is {dtype.name} but a {vocab}-token vocabulary is stored as "
                     f"{token_dtype(vocab).name}")
    size = tokens_path.stat().st_size
    count = meta.get("count")
    if size % dtype.itemsize or size // dtype.itemsize != count:
        raise _error(f"--data {path}: {TOKENS_FILE} holds {size} bytes, which is not {count} {dtype.name} tokens "
                     f"as {META_FILE} says (a file of the wrong dtype, or a truncated one)")
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
    # One streaming pass (the pages are not kept): an id past the vocabulary would otherwise fail inside the
    # embedding on some rank, mid-run, while the others wait in a collective.
    top = max((int(tokens[i:i + (1 << 24)].max()) for i in range(0, count, 1 << 24)), default=0)
    if top >= vocab:
        raise _error(f"--data {path}: {TOKENS_FILE} holds token id {top}, but the tokenizer in {META_FILE} has "
                     f"{vocab} tokens (ids 0..{vocab - 1})")
    return PreparedData(tokens=tokens, meta=meta, directory=directory)


def copy_tokenizer_files(meta: dict, source: Path, out_dir: Path) -> None:
    """A tokenizer trained by ``prepare`` (``--tokenizer bpe``) keeps its file beside the tokens; a checkpoint needs
    its own copy."""
    name = meta.get("file")
    if name and (source / name).is_file() and source.resolve() != out_dir.resolve():
        shutil.copyfile(source / name, out_dir / name)


def split_train_val(ids: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First 90% for training, last 10% for validation; each must hold at least one block plus its target."""
    n_val = len(ids) // 10
    train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    if len(val_ids) < block_size + 1:
        raise _error(f"the text is too short: {len(ids)} tokens, but the 10% validation split needs at least "
                     f"block_size + 1 = {block_size + 1}; give at least {10 * (block_size + 1)} tokens or "
                     f"lower --block-size")
    return train_ids, val_ids


def _windows(ids: np.ndarray, starts: Sequence[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(ids[s: s + block_size + 1], dtype=np.int64) for s in starts])
    rows_t = torch.from_numpy(rows)
    return rows_t[:, :-1], rows_t[:, 1:]


def draw_starts(n_ids: int, block_size: int, batch_size: int, generator: torch.Generator) -> list[int]:
    """``batch_size`` random window starts for one global batch; every rank draws the same ones."""
    return torch.randint(n_ids - block_size, (batch_size,), generator=generator).tolist()


def get_batch(ids: np.ndarray, block_size: int, batch_size: int, generator: torch.Generator, device: torch.device,
              rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s contiguous share of a global batch of random ``block_size`` windows, and the same windows
    shifted by one (the next-token targets). ``batch_size`` is the global batch, a multiple of ``world_size``."""
    starts = draw_starts(len(ids), block_size, batch_size, generator)
    share = batch_size // world_size
    x, y = _windows(ids, starts[rank * share: (rank + 1) * share], block_size)
    return x.to(device), y.to(device)


def micro_batches(ids: np.ndarray, block_size: int, batch_size: int, grad_accum: int, generator: torch.Generator,
                  device: torch.device, rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step's data: the global batch drawn once, cut into ``grad_accum`` micro-batches, each cut
    into ``world_size`` shares; this rank's share of each. The union over ranks and micro-steps is the global batch
    whatever the number of processes."""
    starts = draw_starts(len(ids), block_size, batch_size, generator)
    micro = batch_size // grad_accum
    share = micro // world_size
    out = []
    for m in range(grad_accum):
        mine = starts[m * micro + rank * share: m * micro + (rank + 1) * share]
        x, y = _windows(ids, mine, block_size)
        out.append((x.to(device), y.to(device)))
    return out


def cmd_prepare(args: argparse.Namespace) -> int:
    """``llmfast prepare TEXT --out DIR``: tokenize once into a memory-mappable token file."""
    from llmfast.cli import CliError, read_text, tokenizer_classes

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--out {args.out}: exists and is not a directory")
    text = read_text(args.text, flag="TEXT")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--out {args.out}: cannot create it ({exc.strerror})") from None
    name = args.tokenizer or "bytes"
    try:
        tokenizer = tokenizer_classes()[name].train(name, text, out_dir, args)
    except ValueError as exc:
        raise CliError(f"--tokenizer {name}: {exc}") from None
    ids = encode_text(tokenizer, text, progress=not args.no_progress, threads=args.threads)
    # Written under a temporary name and renamed, so a killed run never leaves a half file under the real name.
    tmp = out_dir / (TOKENS_FILE + ".tmp")
    ids.tofile(tmp)
    os.replace(tmp, out_dir / TOKENS_FILE)
    meta = {"format": DATA_FORMAT, "tokenizer": tokenizer.config(), "dtype": ids.dtype.name, "count": int(len(ids)),
            "source": str(args.text)}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"prepared {out_dir / TOKENS_FILE}: {len(ids)} tokens ({tokenizer.name}, {ids.dtype.name}) "
          f"from {len(text)} characters")
    return 0
