// Pattern recognition and the vector form of the pre-tokenizer (the scanners are inline in pretokenize.h).
#include "pretokenize.h"

namespace llmfast {
namespace {

// tiktoken_ext/openai_public.py (tiktoken 0.14): r50k_pat_str, used by gpt2, r50k_base, p50k_base, p50k_edit.
constexpr std::string_view kR50kPattern =
    R"pat('(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s)pat";
constexpr std::string_view kCl100kPattern =
    R"pat('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s)pat";
// o200k_base and o200k_harmony: the seven alternatives joined with "|".
constexpr std::string_view kO200kPattern =
    R"pat([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|)pat"
    R"pat([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|)pat"
    R"pat(\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)pat";

}  // namespace

std::optional<PatternKind> recognize_pattern(std::string_view pat_str) {
    if (pat_str == kR50kPattern) return PatternKind::R50K;
    if (pat_str == kCl100kPattern) return PatternKind::CL100K;
    if (pat_str == kO200kPattern) return PatternKind::O200K;
    return std::nullopt;
}

std::string_view pattern_string(PatternKind kind) {
    switch (kind) {
        case PatternKind::R50K:
            return kR50kPattern;
        case PatternKind::CL100K:
            return kCl100kPattern;
        case PatternKind::O200K:
            return kO200kPattern;
    }
    return {};
}

void pretokenize(PatternKind kind, std::string_view text, std::vector<std::pair<size_t, size_t>>& pieces) {
    for_each_piece(kind, text, [&pieces](size_t begin, size_t end) { pieces.emplace_back(begin, end); });
}

}  // namespace llmfast
