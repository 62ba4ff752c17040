#include "bpe.h"

#include <limits>
#include <stdexcept>

namespace llmfast {

namespace {
constexpr Rank kNoRank = std::numeric_limits<Rank>::max();

Rank lookup(const RankMap& ranks, std::string_view bytes) {
    auto it = ranks.find(std::string(bytes));
    return it == ranks.end() ? kNoRank : it->second;
}
}  // namespace

std::vector<Rank> byte_pair_encode(std::string_view piece, const RankMap& ranks) {
    // Whole-piece lookup first: most words of a trained vocabulary are a single token.
    if (Rank whole = lookup(ranks, piece); whole != kNoRank) return {whole};
    // Boundaries of the current parts; merge the lowest-ranked adjacent pair until none has a rank.
    std::vector<size_t> starts;
    for (size_t i = 0; i <= piece.size(); ++i) starts.push_back(i);
    while (starts.size() > 2) {
        Rank best = kNoRank;
        size_t best_i = 0;
        for (size_t i = 0; i + 2 < starts.size(); ++i) {
            Rank r = lookup(ranks, piece.substr(starts[i], starts[i + 2] - starts[i]));
            if (r < best) best = r, best_i = i;
        }
        if (best == kNoRank) break;
        starts.erase(starts.begin() + static_cast<long>(best_i) + 1);
    }
    std::vector<Rank> out;
    for (size_t i = 0; i + 1 < starts.size(); ++i) {
        Rank r = lookup(ranks, piece.substr(starts[i], starts[i + 1] - starts[i]));
        if (r == kNoRank) throw std::invalid_argument("vocabulary has no rank for byte sequence of a piece");
        out.push_back(r);
    }
    return out;
}

}  // namespace llmfast
