#!/usr/bin/env python3
"""Generate csrc/unicode_tables.{h,cpp}: the per-code-point character classes the pre-tokenizer scans with.

tiktoken runs its split patterns in Rust (fancy-regex over regex-syntax 0.8.11), whose ``\\p{..}`` classes follow
Unicode 16.0.0 and whose ``\\s`` is the ``White_Space`` property. We generate from the same data:

* general categories from ``unicodedata2`` pinned to Unicode 16.0.0 (``pip install unicodedata2==16.0.0``; it is a
  generator-only dependency, nothing at build or test time needs it),
* ``White_Space`` and the case-insensitive equivalents of the contraction letters from the ``regex`` package
  (``\\p{White_Space}`` and ``(?i)x`` with simple case folding, as the Rust regex crate does).

Which Unicode version tiktoken agrees with was determined by probing tiktoken itself on every code point (see
tests/test_pretokenize.py, which keeps checking every code point's class against tiktoken): Unicode 15.0/15.1 miss
letters and numbers that tiktoken has, 17.0 has ones that tiktoken lacks, 16.0.0 matches exactly.

Each code point gets one byte of flags (see ``CharFlag`` in the generated header). The table is two-level: the
code point's high bits pick a block, its low bits index into the block; identical blocks are stored once. Block 0
covers ASCII so the ASCII fast path indexes ``kCharFlagBlocks`` directly.

Run: ``python scripts/gen_unicode_tables.py`` (writes into csrc/ next to this script's repository root).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

UNICODE_VERSION = "16.0.0"
MAX_CODE_POINT = 0x110000

# Flag bits: one byte per code point. The names match the classes of tiktoken's patterns.
FLAG_BITS = {
    "L": (1 << 0, r"\p{L}: general category Lu, Ll, Lt, Lm or Lo"),
    "N": (1 << 1, r"\p{N}: general category Nd, Nl or No"),
    "S": (1 << 2, r"\s: the White_Space property"),
    "NL": (1 << 3, r"[\r\n]: U+000D or U+000A"),
    "SPACE": (1 << 4, "U+0020, the literal space of ' ?'"),
    "UPPER": (1 << 5, r"o200k's [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"),
    "LOWER": (1 << 6, r"o200k's [\p{Ll}\p{Lm}\p{Lo}\p{M}]"),
    "SLASH": (1 << 7, "U+002F, o200k's [\\r\\n/]"),
}

UPPER_CATEGORIES = {"Lu", "Lt", "Lm", "Lo", "Mn", "Mc", "Me"}
LOWER_CATEGORIES = {"Ll", "Lm", "Lo", "Mn", "Mc", "Me"}
CONTRACTION_LETTERS = "dlmrstve"  # the letters of 's 't 're 've 'm 'll 'd


def load_sources():
    try:
        import unicodedata2
    except ImportError:
        sys.exit(f"needs unicodedata2 at Unicode {UNICODE_VERSION}: pip install unicodedata2=={UNICODE_VERSION}")
    if unicodedata2.unidata_version != UNICODE_VERSION:
        sys.exit(
            f"unicodedata2 has Unicode {unicodedata2.unidata_version}, tiktoken's regex tables are {UNICODE_VERSION}: "
            f"pip install unicodedata2=={UNICODE_VERSION}"
        )
    import regex

    return unicodedata2, regex


def compute_flags(unicodedata2, regex) -> bytearray:
    white_space = regex.compile(r"\p{White_Space}")
    flags = bytearray(MAX_CODE_POINT)
    bit = {name: value for name, (value, _) in FLAG_BITS.items()}
    for cp in range(MAX_CODE_POINT):
        ch = chr(cp)
        category = unicodedata2.category(ch)
        f = 0
        if category[0] == "L":
            f |= bit["L"]
        if category[0] == "N":
            f |= bit["N"]
        if category in UPPER_CATEGORIES:
            f |= bit["UPPER"]
        if category in LOWER_CATEGORIES:
            f |= bit["LOWER"]
        if not 0xD800 <= cp < 0xE000 and white_space.match(ch):
            f |= bit["S"]
        flags[cp] = f
    for cp in (0x0A, 0x0D):
        flags[cp] |= bit["NL"]
    flags[0x20] |= bit["SPACE"]
    flags[0x2F] |= bit["SLASH"]
    # The classes the scanners rely on being disjoint really are (White_Space chars are Zs/Zl/Zp/Cc).
    for cp, f in enumerate(flags):
        assert bin(f & (bit["L"] | bit["N"] | bit["S"])).count("1") <= 1, hex(cp)
    return flags


def non_ascii_folds(regex) -> list[tuple[int, str]]:
    """Code points outside ASCII that (?i) matches as one of the contraction letters (simple case folding)."""
    folds = []
    for letter in CONTRACTION_LETTERS:
        pattern = regex.compile("(?i)" + letter)
        for cp in range(0x80, MAX_CODE_POINT):
            if 0xD800 <= cp < 0xE000:
                continue
            if pattern.fullmatch(chr(cp)):
                folds.append((cp, letter))
    return sorted(folds)


def build_two_level(flags: bytearray, shift: int):
    block_size = 1 << shift
    blocks: list[bytes] = []
    index_of: dict[bytes, int] = {}
    stage1 = []
    for start in range(0, MAX_CODE_POINT, block_size):
        block = bytes(flags[start : start + block_size])
        if block not in index_of:
            index_of[block] = len(blocks)
            blocks.append(block)
        stage1.append(index_of[block])
    return stage1, blocks


def choose_shift(flags: bytearray) -> int:
    def size(shift):
        stage1, blocks = build_two_level(flags, shift)
        index_bytes = 1 if len(blocks) <= 256 else 2
        return len(stage1) * index_bytes + len(blocks) * (1 << shift)

    # Blocks must cover at least ASCII so block 0 doubles as the ASCII table.
    return min(range(7, 10), key=lambda s: (size(s), s))


def format_array(values, per_line: int, width: int) -> str:
    lines = []
    for i in range(0, len(values), per_line):
        lines.append("    " + ", ".join(f"{v:#0{width + 2}x}" for v in values[i : i + per_line]) + ",")
    return "\n".join(lines)


def render(flags: bytearray, folds, regex_version: str) -> tuple[str, str]:
    shift = choose_shift(flags)
    stage1, blocks = build_two_level(flags, shift)
    assert stage1[0] == 0
    index_type = "uint8_t" if len(blocks) <= 256 else "uint16_t"
    counts = {name: sum(1 for f in flags if f & value) for name, (value, _) in FLAG_BITS.items()}
    flag_lines = "\n".join(
        f"    k{''.join(p.capitalize() for p in name.split('_'))} = {value:#04x},  // {doc} ({counts[name]} code points)"
        for name, (value, doc) in FLAG_BITS.items()
    )
    fold_lines = "\n".join(f"    {{{cp:#06x}, '{letter}'}}," for cp, letter in folds)
    total = len(stage1) * (1 if index_type == "uint8_t" else 2) + len(blocks) * (1 << shift)
    header = f"""// GENERATED by scripts/gen_unicode_tables.py -- do not edit by hand.
//
// Unicode {UNICODE_VERSION} character classes for the pre-tokenizer (the version tiktoken's Rust regex uses).
// Sources: general categories from unicodedata2 {UNICODE_VERSION}; White_Space and simple case folding from the
// regex package {regex_version}. Two-level table: {len(stage1)} block indices ({index_type}) and {len(blocks)} distinct
// blocks of {1 << shift} flag bytes, {total} bytes in all. Block 0 covers U+0000..U+{(1 << shift) - 1:04X}, so
// kCharFlagBlocks[c] is the flag byte of an ASCII byte c.
#pragma once
#include <cstdint>

namespace llmfast {{
namespace unicode {{

inline constexpr const char* kUnicodeVersion = "{UNICODE_VERSION}";

enum CharFlag : uint8_t {{
{flag_lines}
}};

inline constexpr unsigned kBlockShift = {shift};
inline constexpr uint32_t kBlockMask = {(1 << shift) - 1:#x};
inline constexpr uint32_t kMaxCodePoint = {MAX_CODE_POINT - 1:#x};

extern const {index_type} kCharFlagBlockIndex[{len(stage1)}];
extern const uint8_t kCharFlagBlocks[{len(blocks) * (1 << shift)}];

// Code points outside ASCII that (?i) matches as a contraction letter ('s 't 're 've 'm 'll 'd), with that letter.
struct CaseFold {{
    uint32_t code_point;
    char letter;
}};
inline constexpr CaseFold kContractionFolds[] = {{
{fold_lines}
}};

// The flag byte of a code point (cp <= kMaxCodePoint).
inline uint8_t char_flags(uint32_t cp) {{
    return kCharFlagBlocks[(static_cast<uint32_t>(kCharFlagBlockIndex[cp >> kBlockShift]) << kBlockShift) |
                           (cp & kBlockMask)];
}}

}}  // namespace unicode
}}  // namespace llmfast
"""
    source = f"""// GENERATED by scripts/gen_unicode_tables.py -- do not edit by hand. Unicode {UNICODE_VERSION}.
#include "unicode_tables.h"

namespace llmfast {{
namespace unicode {{

const {index_type} kCharFlagBlockIndex[{len(stage1)}] = {{
{format_array(stage1, 16, 2 if index_type == "uint8_t" else 4)}
}};

const uint8_t kCharFlagBlocks[{len(blocks) * (1 << shift)}] = {{
{format_array(b"".join(blocks), 16, 2)}
}};

}}  // namespace unicode
}}  // namespace llmfast
"""
    return header, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = pathlib.Path(__file__).resolve().parent.parent
    parser.add_argument("--out-dir", type=pathlib.Path, default=root / "csrc")
    args = parser.parse_args()
    unicodedata2, regex = load_sources()
    flags = compute_flags(unicodedata2, regex)
    folds = non_ascii_folds(regex)
    header, source = render(flags, folds, regex.__version__)
    (args.out_dir / "unicode_tables.h").write_text(header)
    (args.out_dir / "unicode_tables.cpp").write_text(source)
    print(f"wrote {args.out_dir / 'unicode_tables.h'} and unicode_tables.cpp (Unicode {UNICODE_VERSION})")


if __name__ == "__main__":
    main()
