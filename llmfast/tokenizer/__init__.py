"""Byte-level BPE tokenizer with tiktoken's API (lands with the tokenizer issue)."""
