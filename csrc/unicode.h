// UTF-8 decoding and character-class lookups for the pre-tokenizer.
//
// Decoding is strict (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF, no truncated sequences).
// An invalid byte is one unit of its own with the class of U+FFFD (a symbol: "other"), so scanning any bytes
// terminates, never reads past the end, and splits invalid input where a regex over U+FFFD would.
#pragma once
#include <cstddef>
#include <cstdint>

#include "unicode_tables.h"

namespace llmfast {
namespace unicode {

inline constexpr uint32_t kReplacementCharacter = 0xFFFD;

// Decodes the UTF-8 sequence at p (p < end). Returns its length in bytes and stores the code point in cp; an
// invalid byte returns 1 and stores U+FFFD.
inline size_t decode_utf8(const uint8_t* p, const uint8_t* end, uint32_t& cp) {
    const uint32_t b0 = p[0];
    if (b0 < 0x80) {
        cp = b0;
        return 1;
    }
    const size_t avail = static_cast<size_t>(end - p);
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        if (avail >= 2 && (p[1] & 0xC0) == 0x80) {
            cp = ((b0 & 0x1F) << 6) | (p[1] & 0x3F);
            return 2;
        }
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        if (avail >= 3 && (p[1] & 0xC0) == 0x80 && (p[2] & 0xC0) == 0x80) {
            const uint32_t c = ((b0 & 0x0F) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3F);
            // Rejects overlong forms (< U+0800) and UTF-16 surrogates.
            if (c >= 0x800 && (c < 0xD800 || c > 0xDFFF)) {
                cp = c;
                return 3;
            }
        }
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        if (avail >= 4 && (p[1] & 0xC0) == 0x80 && (p[2] & 0xC0) == 0x80 && (p[3] & 0xC0) == 0x80) {
            const uint32_t c = ((b0 & 0x07) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3F);
            if (c >= 0x10000 && c <= kMaxCodePoint) {
                cp = c;
                return 4;
            }
        }
    }
    cp = kReplacementCharacter;
    return 1;
}

struct CharInfo {
    uint8_t flags;  // CharFlag bits
    uint8_t len;    // bytes
};

// The flag byte of every BMP code point in one flat table (64 KiB, filled once at load from the two-level table):
// a three-byte character (all of CJK) then costs one load instead of two dependent ones and the index arithmetic.
struct BmpFlagTable {
    uint8_t flags[0x10000];
    BmpFlagTable() {
        for (uint32_t cp = 0; cp < 0x10000; ++cp) flags[cp] = char_flags(cp);
    }
};
inline const BmpFlagTable kBmpFlags;

// Class flags and byte length of the non-ASCII character at p (p < end). The three-byte form (all of CJK) is decoded
// and checked without branching on each byte.
inline CharInfo char_at_multibyte(const uint8_t* p, const uint8_t* end) {
    const uint8_t b0 = p[0];
    if ((b0 & 0xF0) == 0xE0 && end - p >= 3) {
        const uint32_t b1 = p[1] ^ 0x80u, b2 = p[2] ^ 0x80u;  // continuation bytes become 0..0x3F
        const uint32_t cp = (uint32_t(b0 & 0x0F) << 12) | (b1 << 6) | b2;
        // Both continuation bytes, not overlong (>= U+0800), not a UTF-16 surrogate.
        if ((b1 | b2) < 0x40 && cp >= 0x800 && (cp & 0xF800) != 0xD800) return {kBmpFlags.flags[cp], 3};
    }
    uint32_t cp;
    const size_t len = decode_utf8(p, end, cp);
    return {char_flags(cp), static_cast<uint8_t>(len)};
}

// Class flags and byte length of the character at p (p < end). ASCII takes one table load; the scanners call this
// per character, so it is always inlined.
__attribute__((always_inline)) inline CharInfo char_at(const uint8_t* p, const uint8_t* end) {
    if (p[0] < 0x80) return {kCharFlagBlocks[p[0]], 1};
    return char_at_multibyte(p, end);
}

// The lowercase ASCII letter that the character at p matches case-insensitively (Unicode simple case folding, as
// the regex crate's (?i)), for the letters of the contractions 's 't 're 've 'm 'll 'd. The result equals one of
// those letters only when the character matches it; otherwise it is some other value. Sets len to the byte length.
inline char contraction_letter_folded(const uint8_t* p, const uint8_t* end, size_t& len) {
    const uint8_t b0 = p[0];
    if (b0 < 0x80) {
        len = 1;
        // b0 | 0x20 equals one of the (lowercase) target letters only when b0 is that letter in either case.
        return static_cast<char>(b0 | 0x20);
    }
    uint32_t cp;
    len = decode_utf8(p, end, cp);
    for (const CaseFold& fold : kContractionFolds) {
        if (fold.code_point == cp) return fold.letter;
    }
    return 0;
}

}  // namespace unicode
}  // namespace llmfast
