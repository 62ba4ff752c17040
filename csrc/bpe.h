// Byte-pair merge core: no Python in here.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace llmfast {

using Rank = uint32_t;
using RankMap = std::unordered_map<std::string, Rank>;

// Split `piece` into tokens by repeatedly merging the adjacent pair whose concatenated bytes have the lowest
// rank (ties go to the leftmost pair). Returns the token ranks. Throws std::invalid_argument when a byte has
// no rank of its own (a vocabulary without all 256 single bytes cannot encode arbitrary text).
std::vector<Rank> byte_pair_encode(std::string_view piece, const RankMap& ranks);

}  // namespace llmfast
