"""Byte-level BPE tokenizer with tiktoken's API and tokens identical to tiktoken's, on a C++ core.

>>> from llmfast.tokenizer import get_encoding
>>> enc = get_encoding("cl100k_base")          # found offline; see llmfast.tokenizer.registry
>>> enc.decode(enc.encode("hello world"))
'hello world'

Pre-tokenization of tiktoken's r50k/p50k, cl100k and o200k patterns, the special-token split, the byte-pair merge
and decoding run in C++ with the GIL released; other patterns run through the ``regex`` package. Vocabularies load
from ``.tiktoken`` files, GPT-2's ``encoder.json``/``vocab.bpe`` and Hugging Face ``tokenizer.json``, and
:func:`train_bpe` trains new ones.
"""
from llmfast.tokenizer.core import Encoding, InvalidTokenError, TokenOutOfRangeError, raise_disallowed_special_token
from llmfast.tokenizer.hf import bytes_to_unicode, from_gpt2_files, from_tokenizer_json
from llmfast.tokenizer.load import (
    data_gym_to_mergeable_bpe_ranks,
    dump_tiktoken_bpe,
    load_tiktoken_bpe,
    parse_tiktoken_bpe,
    save_tiktoken_bpe,
)
from llmfast.tokenizer.train import train_bpe
from llmfast.tokenizer.registry import (
    CL100K_PAT_STR,
    O200K_PAT_STR,
    R50K_PAT_STR,
    VocabularyNotFoundError,
    encoding_for_model,
    encoding_name_for_model,
    get_encoding,
    list_encoding_names,
)

__all__ = [
    "Encoding",
    "InvalidTokenError",
    "TokenOutOfRangeError",
    "VocabularyNotFoundError",
    "get_encoding",
    "list_encoding_names",
    "encoding_for_model",
    "encoding_name_for_model",
    "load_tiktoken_bpe",
    "parse_tiktoken_bpe",
    "save_tiktoken_bpe",
    "dump_tiktoken_bpe",
    "data_gym_to_mergeable_bpe_ranks",
    "train_bpe",
    "from_tokenizer_json",
    "from_gpt2_files",
    "bytes_to_unicode",
    "raise_disallowed_special_token",
    "R50K_PAT_STR",
    "CL100K_PAT_STR",
    "O200K_PAT_STR",
]
