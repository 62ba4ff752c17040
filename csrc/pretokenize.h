// Pre-tokenization: splitting text into the pieces that tiktoken's split regex finds, without a regex engine.
//
// Each built-in pattern has a hand-written scanner that returns the end of the piece starting at a given byte
// offset. The scanners reproduce the regex's ordered alternation (the leftmost alternative that matches wins, not the
// longest) and the result of its backtracking, worked out once per construct:
//
//   \s+(?!\S)                 a white-space run followed by a non-space leaves its last character to the next piece
//                              ("a   b" -> "a" "  " " b"); a run of one character then falls to \s or \s+;
//   \s*[\r\n] / \s*[\r\n]+     a run containing a newline ends right after its last \r or \n;
//   \s++$                     (r50k, cl100k, tried before the newline rule) a run reaching the end of the text is
//                              one piece; o200k has no such alternative, so there the newline rule comes first;
//   " ?X++", "P?+\p{L}++"      the optional space (r50k: letters, numbers, others; cl100k/o200k: others) or prefix
//                              character (cl100k: any but \r \n letters numbers) joins the run that follows it;
//   o200k's P?U*W+C? | P?U+W*C?   with U = [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}], W = [\p{Ll}\p{Lm}\p{Lo}\p{M}],
//                              P = [^\r\n\p{L}\p{N}], C = the optional contraction: after the maximal U run the
//                              match takes the W run that follows, or else ends after the last W inside the U run;
//                              so CamelCase splits before an upper-case letter that follows a lower-case one
//                              ("helloWorld" -> "hello" "World"; "HTTPServer" stays whole). A combining mark is both
//                              P and U/W, so a mark before an all-capitals word is a piece of its own.
//
// Every scanner looks at each byte a bounded number of times, so any input scans in linear time (no backtracking
// blow-up on long runs of one class), and never reads outside [text, text + size).
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "unicode.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace llmfast {

enum class PatternKind { R50K, CL100K, O200K };

// The built-in pattern whose pat_str equals `pat_str` byte for byte, or std::nullopt.
std::optional<PatternKind> recognize_pattern(std::string_view pat_str);

// The pat_str of a built-in pattern (as in tiktoken_ext/openai_public.py).
std::string_view pattern_string(PatternKind kind);

// Split `text` (UTF-8) into the pieces tiktoken's regex would find, appending [begin, end) byte offsets.
void pretokenize(PatternKind kind, std::string_view text, std::vector<std::pair<size_t, size_t>>& pieces);

namespace pretokenize_detail {

using unicode::char_at;
using unicode::CharInfo;
using unicode::kCharFlagBlocks;
namespace flag = unicode;  // flag::kL, flag::kN, ...

inline constexpr uint8_t kLetterNumberSpace = flag::kL | flag::kN | flag::kS;

// End of the run of characters starting at j whose flags intersect `mask`.
inline size_t run_with(const uint8_t* s, size_t n, size_t j, uint8_t mask) {
    while (j < n) {
        const CharInfo c = char_at(s + j, s + n);
        if (!(c.flags & mask)) break;
        j += c.len;
    }
    return j;
}

// End of the run of characters starting at j whose flags do not intersect `mask`.
inline size_t run_without(const uint8_t* s, size_t n, size_t j, uint8_t mask) {
    while (j < n) {
        const CharInfo c = char_at(s + j, s + n);
        if (c.flags & mask) break;
        j += c.len;
    }
    return j;
}

// Up to three \p{N} characters from j (the character at j is one).
inline size_t digits_up_to_3(const uint8_t* s, size_t n, size_t j) {
    for (int k = 0; k < 3 && j < n; ++k) {
        const CharInfo c = char_at(s + j, s + n);
        if (!(c.flags & flag::kN)) break;
        j += c.len;
    }
    return j;
}

struct WhitespaceRun {
    size_t end;           // end of the maximal \s run
    size_t last_start;    // start of its last character
    size_t last_newline;  // end of its last \r or \n, or 0 when it has none (a run never ends at 0)
    bool several;         // at least two characters
};

inline WhitespaceRun whitespace_run(const uint8_t* s, size_t n, size_t i) {
    WhitespaceRun r{i, i, 0, false};
    size_t count = 0;
    size_t j = i;
    while (j < n) {
        const CharInfo c = char_at(s + j, s + n);
        if (!(c.flags & flag::kS)) break;
        r.last_start = j;
        j += c.len;
        if (c.flags & flag::kNl) r.last_newline = j;
        ++count;
    }
    r.end = j;
    r.several = count >= 2;
    return r;
}

// Case-insensitive contraction ('s 't 're 've 'm 'll 'd, letters matched as (?i) does) starting at the apostrophe
// at j. Returns its end, or j when there is none.
inline size_t contraction_folded_at(const uint8_t* s, size_t n, size_t j);
// Inlined test first: almost no piece is followed by an apostrophe.
__attribute__((always_inline)) inline size_t contraction_folded(const uint8_t* s, size_t n, size_t j) {
    if (j + 1 >= n || s[j] != '\'') return j;
    return contraction_folded_at(s, n, j);
}
inline size_t contraction_folded_at(const uint8_t* s, size_t n, size_t j) {
    size_t len1;
    const char a = unicode::contraction_letter_folded(s + j + 1, s + n, len1);
    const size_t k = j + 1 + len1;
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return k;
    if (k >= n) return j;
    if (a == 'l' || a == 'r' || a == 'v') {
        size_t len2;
        const char b = unicode::contraction_letter_folded(s + k, s + n, len2);
        if ((a == 'l' && b == 'l') || (a != 'l' && b == 'e')) return k + len2;
    }
    return j;
}

// r50k_base / p50k_base / gpt2:
//   '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
inline size_t next_piece_r50k(const uint8_t* s, size_t n, size_t i) {
    if (s[i] == '\'' && i + 1 < n) {  // case-sensitive contractions
        const uint8_t a = s[i + 1];
        if (a == 's' || a == 'd' || a == 'm' || a == 't') return i + 2;
        if (i + 2 < n) {
            const uint8_t b = s[i + 2];
            if ((a == 'l' && b == 'l') || ((a == 'v' || a == 'r') && b == 'e')) return i + 3;
        }
    }
    const CharInfo c0 = char_at(s + i, s + n);
    size_t j = i;
    uint8_t f = c0.flags;
    if ((f & flag::kSpace) && i + 1 < n) {  // " ?" joins a following letter, number or other run
        const CharInfo c1 = char_at(s + i + 1, s + n);
        if (!(c1.flags & flag::kS)) {
            j = i + 1;
            f = c1.flags;
        }
    }
    if (f & flag::kL) return run_with(s, n, j, flag::kL);
    if (f & flag::kN) return run_with(s, n, j, flag::kN);
    if (!(f & flag::kS)) return run_without(s, n, j, kLetterNumberSpace);
    const WhitespaceRun ws = whitespace_run(s, n, i);
    if (ws.end == n) return n;                  // \s++$
    if (ws.several) return ws.last_start;       // \s+(?!\S)
    return ws.end;                              // \s
}

// The fast path of the cl100k and o200k scanners: most pieces of English and code are a run of ASCII letters, maybe
// after one ASCII prefix character. Returns where the letters from `start` on begin (the prefix taken), or n + 1
// when the piece at i is not of that form.
inline size_t ascii_letters_start(const uint8_t* s, size_t n, size_t i) {
    const uint8_t f0 = kCharFlagBlocks[s[i]];  // s[i] < 0x80
    if (f0 & flag::kL) return i;
    // A prefix is anything but \r \n, a letter or a number.
    if (!(f0 & (flag::kN | flag::kNl)) && i + 1 < n && s[i + 1] < 0x80 && (kCharFlagBlocks[s[i + 1]] & flag::kL))
        return i + 1;
    return n + 1;
}

// End of the run of ASCII bytes from j whose flags intersect `mask`.
inline size_t ascii_run(const uint8_t* s, size_t n, size_t j, uint8_t mask) {
    while (j < n && s[j] < 0x80 && (kCharFlagBlocks[s[j]] & mask)) ++j;
    return j;
}

// End of the run of bytes from j in [lo, hi] (ASCII letters: [a-z], [A-Z]; with fold, either case). Sixteen bytes
// per step where SSE2 is available: one well-predicted branch per step instead of a mispredicted one at the end of
// every word.
template <uint8_t lo, uint8_t hi, bool fold>
inline size_t ascii_range_run(const uint8_t* s, size_t n, size_t j) {
#if defined(__SSE2__)
    const __m128i low = _mm_set1_epi8(static_cast<char>(lo));
    const __m128i span = _mm_set1_epi8(static_cast<char>(hi - lo));
    const __m128i case_bit = _mm_set1_epi8(fold ? 0x20 : 0);
    while (j + 16 <= n) {
        const __m128i bytes = _mm_or_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j)), case_bit);
        const __m128i offset = _mm_sub_epi8(bytes, low);  // in range <=> offset <= span, unsigned
        const __m128i inside = _mm_cmpeq_epi8(_mm_min_epu8(offset, span), offset);
        const unsigned outside = ~static_cast<unsigned>(_mm_movemask_epi8(inside)) & 0xFFFF;
        if (outside) return j + static_cast<size_t>(__builtin_ctz(outside));
        j += 16;
    }
#endif
    while (j < n && static_cast<uint8_t>((s[j] | (fold ? 0x20 : 0)) - lo) <= hi - lo) ++j;
    return j;
}

// End of [A-Z]*[a-z]* from j: o200k's U*W+ (or U+) over ASCII letters. Both runs of most words end within one
// 16-byte step, so one load classifies them; longer runs continue with ascii_range_run().
inline size_t ascii_upper_then_lower_run(const uint8_t* s, size_t n, size_t j) {
#if defined(__SSE2__)
    if (j + 16 <= n) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j));
        auto mask_of = [&bytes](char lo, char hi) {  // bit i set: byte i in [lo, hi]
            const __m128i offset = _mm_sub_epi8(bytes, _mm_set1_epi8(lo));
            const __m128i inside = _mm_cmpeq_epi8(_mm_min_epu8(offset, _mm_set1_epi8(static_cast<char>(hi - lo))), offset);
            return static_cast<unsigned>(_mm_movemask_epi8(inside));
        };
        const unsigned upper = mask_of('A', 'Z'), lower = mask_of('a', 'z');
        const unsigned u = static_cast<unsigned>(__builtin_ctz(~upper));  // capitals first: <= 16 (bits 16+ of ~upper)
        if (u == 16) return ascii_range_run<'a', 'z', false>(s, n, ascii_range_run<'A', 'Z', false>(s, n, j + 16));
        const unsigned l = static_cast<unsigned>(__builtin_ctz(~(lower >> u)));  // then small letters: <= 16 - u
        if (u + l < 16) return j + u + l;
        return ascii_range_run<'a', 'z', false>(s, n, j + 16);
    }
#endif
    return ascii_range_run<'a', 'z', false>(s, n, ascii_range_run<'A', 'Z', false>(s, n, j));
}

// cl100k_base:
//   '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|
//   \s+(?!\S)|\s
inline size_t next_piece_cl100k(const uint8_t* s, size_t n, size_t i) {
    if (s[i] < 0x80 && s[i] != '\'') {  // the apostrophe may start a contraction
        const size_t start = ascii_letters_start(s, n, i);
        if (start <= n) {
            const size_t e = ascii_range_run<'a', 'z', true>(s, n, start);  // [A-Za-z]: the ASCII \p{L}
            if (e == n || s[e] < 0x80) return e;  // else a letter may follow: the general path decides
        }
    }
    if (s[i] == '\'') {
        const size_t e = contraction_folded(s, n, i);
        if (e != i) return e;
    }
    const CharInfo c0 = char_at(s + i, s + n);
    const uint8_t f0 = c0.flags;
    if (f0 & flag::kL) return run_with(s, n, i, flag::kL);
    const size_t i1 = i + c0.len;
    if (!(f0 & (flag::kN | flag::kNl)) && i1 < n) {  // one prefix character before letters
        if (char_at(s + i1, s + n).flags & flag::kL) return run_with(s, n, i1, flag::kL);
    }
    if (f0 & flag::kN) return digits_up_to_3(s, n, i);
    size_t j = i;
    uint8_t f = f0;
    if ((f0 & flag::kSpace) && i1 < n) {
        const CharInfo c1 = char_at(s + i1, s + n);
        if (!(c1.flags & kLetterNumberSpace)) {
            j = i1;
            f = c1.flags;
        }
    }
    if (!(f & kLetterNumberSpace)) {  // other run, then newlines
        const size_t e = run_without(s, n, j, kLetterNumberSpace);
        return run_with(s, n, e, flag::kNl);
    }
    const WhitespaceRun ws = whitespace_run(s, n, i);
    if (ws.end == n) return n;                    // \s++$
    if (ws.last_newline) return ws.last_newline;  // \s*[\r\n]
    if (ws.several) return ws.last_start;         // \s+(?!\S)
    return ws.end;                                // \s
}

// o200k's letter alternatives from `start` (after the optional prefix): U* W+, backtracking as the regex does.
struct CaseWordScan {
    size_t upper_end;  // end of the maximal U run from start
    size_t end;        // end of the U*W+ match, or 0 when U*W+ does not match here
};

inline CaseWordScan case_word(const uint8_t* s, size_t n, size_t start) {
    size_t j = start;
    size_t last_lower_end = 0;
    while (j < n) {
        const CharInfo c = char_at(s + j, s + n);
        if (!(c.flags & flag::kUpper)) {
            // The U run is maximal; a following W character (necessarily Ll) starts the W+ run.
            if (c.flags & flag::kLower) return {j, run_with(s, n, j + c.len, flag::kLower)};
            break;
        }
        j += c.len;
        if (c.flags & flag::kLower) last_lower_end = j;
    }
    // No W after the U run: U* gives back characters until W+ can take the last W inside it, if any.
    return {j, last_lower_end};
}

// o200k_base:
//   [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
//   [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
//   \p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
inline size_t next_piece_o200k(const uint8_t* s, size_t n, size_t i) {
    if (s[i] < 0x80) {
        const size_t start = ascii_letters_start(s, n, i);
        if (start <= n) {
            // ASCII letters are [A-Z] (U) or [a-z] (W): U*W+ when lower-case letters follow the capitals, else U+.
            const size_t e = ascii_upper_then_lower_run(s, n, start);
            if (e == n || s[e] < 0x80) return contraction_folded(s, n, e);
        }
    }
    const CharInfo c0 = char_at(s + i, s + n);
    const uint8_t f0 = c0.flags;
    const size_t i1 = i + c0.len;
    if (f0 & flag::kL) {
        // No prefix possible. A letter is in U or W: U*W+ matches, or else U+W* takes the whole U run.
        const CaseWordScan w = case_word(s, n, i);
        return contraction_folded(s, n, w.end ? w.end : w.upper_end);
    }
    if (!(f0 & (flag::kN | flag::kNl))) {  // c0 can be the optional prefix
        const CaseWordScan w = case_word(s, n, i1);
        if (w.end) return contraction_folded(s, n, w.end);  // P U* W+
        // Without the prefix, a combining mark (in P and in both U and W) is itself the W+ of U*W+.
        if (f0 & flag::kUpper) return contraction_folded(s, n, i1);
        if (w.upper_end > i1) return contraction_folded(s, n, w.upper_end);  // P U+
    }
    if (f0 & flag::kN) return digits_up_to_3(s, n, i);
    size_t j = i;
    uint8_t f = f0;
    if ((f0 & flag::kSpace) && i1 < n) {
        const CharInfo c1 = char_at(s + i1, s + n);
        if (!(c1.flags & kLetterNumberSpace)) {
            j = i1;
            f = c1.flags;
        }
    }
    if (!(f & kLetterNumberSpace)) {  // other run, then newlines and slashes
        const size_t e = run_without(s, n, j, kLetterNumberSpace);
        return run_with(s, n, e, flag::kNl | flag::kSlash);
    }
    const WhitespaceRun ws = whitespace_run(s, n, i);
    if (ws.last_newline) return ws.last_newline;  // \s*[\r\n]+
    if (ws.end == n) return n;                    // \s+(?!\S) at the end
    if (ws.several) return ws.last_start;         // \s+(?!\S)
    return ws.end;                                // \s+ of one character
}

template <size_t (*Next)(const uint8_t*, size_t, size_t), class F>
__attribute__((flatten)) inline void scan_pieces(const uint8_t* s, size_t n, F& on_piece) {
    size_t i = 0;
    while (i < n) {
        const size_t e = Next(s, n, i);
        on_piece(i, e);
        i = e;
    }
}

}  // namespace pretokenize_detail

// Calls on_piece(begin, end) with the byte offsets of each piece of `text`, in order. The inlined form of
// pretokenize() for callers that consume pieces as they are found.
template <class F>
inline void for_each_piece(PatternKind kind, std::string_view text, F&& on_piece) {
    namespace d = pretokenize_detail;
    const auto* s = reinterpret_cast<const uint8_t*>(text.data());
    const size_t n = text.size();
    switch (kind) {
        case PatternKind::R50K:
            d::scan_pieces<d::next_piece_r50k>(s, n, on_piece);
            break;
        case PatternKind::CL100K:
            d::scan_pieces<d::next_piece_cl100k>(s, n, on_piece);
            break;
        case PatternKind::O200K:
            d::scan_pieces<d::next_piece_o200k>(s, n, on_piece);
            break;
    }
}

}  // namespace llmfast
