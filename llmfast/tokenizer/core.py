"""The :class:`Encoding` object: tiktoken's API over llmfast's C++ byte-level BPE core."""
from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, AbstractSet, Collection, Literal, NoReturn, Sequence

from llmfast import _C

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Encoding", "InvalidTokenError", "TokenOutOfRangeError"]

#: Raised for a token id that is not in the vocabulary; a ValueError and a KeyError (tiktoken raises KeyError).
InvalidTokenError = _C.InvalidTokenError
#: Raised for an id outside [0, 2**32 - 2] (negative, huge): an InvalidTokenError and an OverflowError, as tiktoken
#: raises OverflowError for ids that do not fit its uint32.
TokenOutOfRangeError = _C.TokenOutOfRangeError

_EMPTY: frozenset = frozenset()
_MASK_CACHE_SIZE = 64


def _fix_surrogates(text: str) -> str:
    """tiktoken's fix-up for text that UTF-8 cannot hold: surrogate pairs become their character, lone ones U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_text(text: object, arg: str = "text") -> None:
    if not isinstance(text, str):
        raise TypeError(f"{arg} must be str, got {type(text).__name__}")


def _hardware_threads() -> int:
    return _C.hardware_threads()


@functools.lru_cache(maxsize=128)
def _literal_regex(tokens: frozenset):
    """A regex matching any of ``tokens`` (longest first, so the longest wins at a position)."""
    import regex

    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def raise_disallowed_special_token(token: str) -> NoReturn:
    """Raise tiktoken's ValueError for disallowed special-token text."""
    raise ValueError(
        f"Encountered text corresponding to disallowed special token {token!r}.\n"
        "If you want this text to be encoded as a special token, "
        f"pass it to `allowed_special`, e.g. `allowed_special={{{token!r}, ...}}`.\n"
        f"If you want this text to be encoded as normal text, disable the check for this token "
        f"by passing `disallowed_special=(enc.special_tokens_set - {{{token!r}}})`.\n"
        "To disable this check for all special tokens, pass `disallowed_special=()`.\n"
    )


class Encoding:
    """A byte-level BPE encoding with tiktoken's API and tokens identical to tiktoken's.

    Args:
        name: name of the encoding (pickling and ``repr`` use it).
        pat_str: the pre-tokenization regex. tiktoken's r50k/p50k, cl100k and o200k patterns run on hand-written
            C++ scanners; any other pattern runs through the ``regex`` package, pieces merged in C++.
        mergeable_ranks: token bytes -> rank; a lower rank merges first. Must hold all 256 single bytes and unique
            ranks.
        special_tokens: special token text -> token id.
        explicit_n_vocab: when given, checked against the number of tokens and the largest id.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a malformed vocabulary (duplicate ranks, missing single bytes, bad pattern, ...).
    """

    def __init__(
        self,
        name: str,
        *,
        pat_str: str,
        mergeable_ranks: Mapping[bytes, int],
        special_tokens: Mapping[str, int],
        explicit_n_vocab: int | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be str, got {type(name).__name__}")
        if not isinstance(pat_str, str):
            raise TypeError(f"pat_str must be str, got {type(pat_str).__name__}")
        if not isinstance(mergeable_ranks, Mapping):
            raise TypeError(f"mergeable_ranks must be a dict of bytes to int, got {type(mergeable_ranks).__name__}")
        if not isinstance(special_tokens, Mapping):
            raise TypeError(f"special_tokens must be a dict of str to int, got {type(special_tokens).__name__}")
        self.name = name
        self._pat_str = pat_str
        self._mergeable_ranks = mergeable_ranks if isinstance(mergeable_ranks, dict) else dict(mergeable_ranks)
        self._special_tokens = special_tokens if isinstance(special_tokens, dict) else dict(special_tokens)
        if not self._mergeable_ranks:
            raise ValueError("mergeable_ranks is empty")
        self._core = _C.CoreBPE(self._mergeable_ranks, self._special_tokens, pat_str)
        self.max_token_value = self._core.max_token_value
        if explicit_n_vocab:
            n_tokens = len(self._mergeable_ranks) + len(self._special_tokens)
            if n_tokens != explicit_n_vocab or self.max_token_value != explicit_n_vocab - 1:
                raise ValueError(
                    f"explicit_n_vocab={explicit_n_vocab} but the vocabulary has {n_tokens} tokens and largest id "
                    f"{self.max_token_value}"
                )
        self._special_token_values = set(self._special_tokens.values())
        # Masks over the specials, in the core's order (the dict's insertion order).
        self._special_order = list(self._special_tokens)
        self._special_index = {tok: i for i, tok in enumerate(self._special_order)}
        self._all_mask = b"\x01" * len(self._special_order) if self._special_order else None
        self._mask_cache: dict = {}
        self._native = self._core.has_native_pattern
        self._native_kind = _C.recognize_pattern(pat_str) if self._native else None
        self._sorted_bytes: list[bytes] | None = None
        self._pat = None
        if not self._native:
            import regex

            try:
                self._pat = regex.compile(pat_str)
            except regex.error as e:
                raise ValueError(f"pat_str is not a valid regular expression: {e}") from e

    def __repr__(self) -> str:
        return f"<Encoding {self.name!r}>"

    # ------------------------------------------------------------------ special-token arguments

    def _mask(self, tokens: AbstractSet[str]) -> bytes | None:
        key = tokens if isinstance(tokens, frozenset) else frozenset(tokens)
        mask = self._mask_cache.get(key)
        if mask is None:
            if len(self._mask_cache) >= _MASK_CACHE_SIZE:
                self._mask_cache.clear()
            m = bytearray(len(self._special_order))
            for tok in key:
                i = self._special_index.get(tok)
                if i is not None:
                    m[i] = 1
            mask = bytes(m) if any(m) else b""
            self._mask_cache[key] = mask
        return mask or None

    def _resolve(self, allowed_special, disallowed_special):
        """tiktoken's argument rules -> (allowed mask, disallowed mask, disallowed strings that are not specials)."""
        if allowed_special == "all":
            allowed = self.special_tokens_set
        elif isinstance(allowed_special, (str, bytes)):
            raise TypeError(f"allowed_special must be 'all' or a set of str, got {allowed_special!r}")
        else:
            allowed = allowed_special
        if disallowed_special == "all":
            if not allowed:
                return None, self._all_mask, None
            disallowed = self.special_tokens_set - set(allowed)
        elif isinstance(disallowed_special, (str, bytes)):
            raise TypeError(f"disallowed_special must be 'all' or a collection of str, got {disallowed_special!r}")
        else:
            disallowed = disallowed_special
        extra = None
        if disallowed:
            extra = frozenset(t for t in disallowed if t not in self._special_index) or None
        return (self._mask(allowed) if allowed else None), (self._mask(disallowed) if disallowed else None), extra

    # ------------------------------------------------------------------ encoding

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating special-token text as ordinary text."""
        if self._native:
            return self._core.encode(text)
        return self._encode_regex(text, None)

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | AbstractSet[str] = _EMPTY,
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Encode ``text`` to token ids, exactly as tiktoken does.

        Special-token text in ``allowed_special`` becomes its special token (the pattern runs separately on the
        text between specials); text of a special in ``disallowed_special`` raises ValueError (by default all
        specials are disallowed); any other special-token text is encoded as ordinary text.
        """
        if allowed_special is _EMPTY and disallowed_special == "all":
            allowed, disallowed, extra = None, self._all_mask, None
        else:
            allowed, disallowed, extra = self._resolve(allowed_special, disallowed_special)
        if extra:
            self._check_extra(text, extra)
        if self._native:
            return self._core.encode(text, allowed, disallowed)
        if disallowed is not None:
            self._core.check_disallowed(text, disallowed)
        return self._encode_regex(text, allowed)

    def encode_to_numpy(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | AbstractSet[str] = _EMPTY,
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> npt.NDArray[np.uint32]:
        """Like :meth:`encode`, returning a ``numpy.uint32`` array (no Python list in between)."""
        allowed, disallowed, extra = self._resolve(allowed_special, disallowed_special)
        if extra:
            self._check_extra(text, extra)
        if self._native:
            return self._core.encode_to_numpy(text, allowed, disallowed)
        import numpy as np

        if disallowed is not None:
            self._core.check_disallowed(text, disallowed)
        return np.asarray(self._encode_regex(text, allowed), dtype=np.uint32)

    def encode_ordinary_batch(self, text: Sequence[str], *, num_threads: int = 8) -> list[list[int]]:
        """Encode many texts in parallel, ignoring special tokens (C++ threads, GIL released)."""
        return self.encode_batch(text, num_threads=num_threads, allowed_special=_EMPTY, disallowed_special=())

    def encode_batch(
        self,
        text: Sequence[str],
        *,
        num_threads: int = 8,
        allowed_special: Literal["all"] | AbstractSet[str] = _EMPTY,
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[list[int]]:
        """Encode many texts in parallel; see :meth:`encode` for the special-token arguments.

        With a native pattern, one call runs a pool of ``min(num_threads, cores)`` C++ threads with the GIL
        released; otherwise Python threads each encode one text.
        """
        if isinstance(text, str):
            raise TypeError("text must be a list of str, got a single str (use encode)")
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
        allowed, disallowed, extra = self._resolve(allowed_special, disallowed_special)
        if self._native and not extra:
            threads = max(1, min(num_threads, _hardware_threads()))
            return self._core.encode_batch(text, allowed, disallowed, threads)
        encoder = functools.partial(
            self.encode, allowed_special=allowed_special, disallowed_special=disallowed_special
        )
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(encoder, text))

    def encode_with_unstable(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | AbstractSet[str] = _EMPTY,
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> tuple[list[int], list[list[int]]]:
        """Stable tokens of ``text`` and every token sequence that could follow them (tiktoken's API, itself marked
        unstable there).

        The stable tokens cover a prefix of ``text``; each completion, appended to them, decodes to bytes starting
        with the whole of ``text``. Completions are sorted (tiktoken returns them in a hash set's order). See
        :meth:`encode` for the special-token arguments; unlike tiktoken, lone surrogates are repaired as
        :meth:`encode` repairs them rather than raising UnicodeEncodeError.

        >>> enc.encode_with_unstable("hello fanta")  # doctest: +SKIP
        ([31373], [[277, 4910], [5113, 265], ..., [8842]])
        """
        from llmfast.tokenizer._unstable import encode_with_unstable

        tokens = self.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        return encode_with_unstable(self, tokens)

    def _encode_bytes(self, text: bytes) -> list[int]:
        """Tokens of arbitrary bytes, invalid UTF-8 included, exactly as tiktoken's ``_encode_bytes``.

        Valid UTF-8 encodes as :meth:`encode_ordinary` would; otherwise the text up to the first invalid byte is
        encoded and its last piece is byte-pair merged together with the remaining bytes.
        """
        if isinstance(text, (bytearray, memoryview)):
            text = bytes(text)
        elif not isinstance(text, bytes):
            raise TypeError(f"text must be bytes, got {type(text).__name__}")
        from llmfast.tokenizer._unstable import encode_bytes

        return encode_bytes(self, text)

    def encode_single_token(self, text_or_bytes: str | bytes) -> int:
        """Id of the single (mergeable or special) token whose text is ``text_or_bytes``; KeyError if none."""
        if isinstance(text_or_bytes, str):
            text_or_bytes = text_or_bytes.encode("utf-8")
        return self._core.encode_single_token(text_or_bytes)

    def _encode_single_piece(self, text_or_bytes: str | bytes) -> list[int]:
        """Byte-pair encode one piece without pre-tokenizing (special tokens are not recognised)."""
        if isinstance(text_or_bytes, str):
            text_or_bytes = text_or_bytes.encode("utf-8")
        return self._core.encode_single_piece(text_or_bytes)

    def _encode_only_native_bpe(self, text: str) -> list[int]:
        """Encode with the pattern run by the ``regex`` package (the reference split) and the C++ merge."""
        return self._encode_regex(text, None, force_regex=True)

    def _regex(self):
        """The pattern compiled by the ``regex`` package (compiled on first use for native patterns)."""
        if self._pat is None:
            import regex

            self._pat = regex.compile(self._pat_str)
        return self._pat

    def _check_extra(self, text: str, extra: frozenset) -> None:
        _check_text(text)
        if m := _literal_regex(extra).search(text):
            raise_disallowed_special_token(m.group())

    def _encode_regex(self, text: str, allowed: bytes | None, force_regex: bool = False) -> list[int]:
        _check_text(text)
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = _fix_surrogates(text)
        pat = self._regex()
        core = self._core
        if allowed is None:
            return core.encode_pieces(pat.findall(text))
        specials = _literal_regex(frozenset(t for t, i in self._special_index.items() if allowed[i]))
        out: list[int] = []
        start = 0
        while True:
            m = specials.search(text, start)
            end = m.start() if m else len(text)
            if end > start:
                out.extend(core.encode_pieces(pat.findall(text[start:end])))
            if m is None:
                return out
            out.append(self._special_tokens[m.group()])
            start = m.end()

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, tokens: Sequence[int]) -> bytes:
        """Concatenated bytes of ``tokens``; an unknown id raises :data:`InvalidTokenError` naming it."""
        return self._core.decode_bytes(tokens)

    def decode(self, tokens: Sequence[int], errors: str = "replace") -> str:
        """Decode ``tokens`` to text; invalid UTF-8 is handled by ``errors`` (as in ``bytes.decode``)."""
        return self._core.decode(tokens, errors)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """Bytes of one token (special tokens included)."""
        return self._core.decode_single_token_bytes(token)

    def decode_tokens_bytes(self, tokens: Sequence[int]) -> list[bytes]:
        """Bytes of each token."""
        single = self._core.decode_single_token_bytes
        return [single(t) for t in tokens]

    def decode_with_offsets(self, tokens: Sequence[int]) -> tuple[str, list[int]]:
        """Decoded text and, per token, the index of the first character holding bytes of that token."""
        token_bytes = self.decode_tokens_bytes(tokens)
        offsets = []
        n_chars = 0
        for tb in token_bytes:
            # A token starting with a continuation byte belongs to the character that began in the previous token.
            starts_mid_char = bool(tb) and 0x80 <= tb[0] < 0xC0
            offsets.append(max(0, n_chars - starts_mid_char))
            n_chars += sum(1 for c in tb if not 0x80 <= c < 0xC0)
        return b"".join(token_bytes).decode("utf-8", errors="strict"), offsets

    def decode_batch(
        self, batch: Sequence[Sequence[int]], *, errors: str = "replace", num_threads: int = 8
    ) -> list[str]:
        """Decode many token lists (C++ threads, GIL released)."""
        return self._core.decode_batch(batch, errors, max(1, min(int(num_threads), _hardware_threads())))

    def decode_bytes_batch(self, batch: Sequence[Sequence[int]], *, num_threads: int = 8) -> list[bytes]:
        """Bytes of many token lists."""
        return self._core.decode_bytes_batch(batch, max(1, min(int(num_threads), _hardware_threads())))

    # ------------------------------------------------------------------ vocabulary

    def _sorted_token_bytes(self) -> list[bytes]:
        # Sorted once per Encoding (a fraction of a second for 200k tokens); shared by token_byte_values and the
        # prefix searches of encode_with_unstable. A race computes it twice, harmlessly.
        if self._sorted_bytes is None:
            self._sorted_bytes = sorted(self._mergeable_ranks)
        return self._sorted_bytes

    def token_byte_values(self) -> list[bytes]:
        """Bytes of every mergeable token, sorted (a new list each call, as in tiktoken)."""
        return list(self._sorted_token_bytes())

    @property
    def eot_token(self) -> int:
        return self._special_tokens["<|endoftext|>"]

    @functools.cached_property
    def special_tokens_set(self) -> set[str]:
        return set(self._special_tokens)

    def is_special_token(self, token: int) -> bool:
        """Whether ``token`` is the id of a special token."""
        if not isinstance(token, int):
            try:
                token = operator.index(token)  # numpy integers
            except TypeError:
                raise TypeError(f"token must be an int, got {type(token).__name__}") from None
        return token in self._special_token_values

    @property
    def n_vocab(self) -> int:
        """``max_token_value + 1`` (as in tiktoken)."""
        return self.max_token_value + 1

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return self._mergeable_ranks

    @property
    def special_tokens(self) -> dict[str, int]:
        return self._special_tokens

    @property
    def pat_str(self) -> str:
        return self._pat_str

    @property
    def has_native_pretokenizer(self) -> bool:
        """Whether the pattern runs on a hand-written C++ scanner (else through the ``regex`` package)."""
        return self._native

    def save(self, path: str) -> None:
        """Write the mergeable ranks as a ``.tiktoken`` file (gzip-compressed when ``path`` ends in ``.gz``)."""
        from llmfast.tokenizer.load import save_tiktoken_bpe

        save_tiktoken_bpe(self._mergeable_ranks, path)

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> object:
        # As tiktoken does, an encoding that get_encoding(name) returns pickles by its name (a few bytes instead of
        # the vocabulary; the receiving process finds it the same way). Anything else pickles whole.
        from llmfast.tokenizer import registry

        if registry._is_default_encoding(self):
            return self.name
        return {
            "name": self.name,
            "pat_str": self._pat_str,
            "mergeable_ranks": self._mergeable_ranks,
            "special_tokens": self._special_tokens,
        }

    def __setstate__(self, value: object) -> None:
        if isinstance(value, str):
            from llmfast.tokenizer import registry

            self.__dict__ = registry.get_encoding(value).__dict__
            return
        self.__init__(**value)
