// Byte-pair merge core: no Python in here.
//
// A vocabulary maps byte strings to ranks. Encoding a piece repeatedly merges the adjacent pair of parts whose
// concatenated bytes have the lowest rank (ties go to the leftmost pair) until no adjacent pair has a rank, as
// tiktoken does. Every part is always a token of the vocabulary (single bytes to start with; a merge only happens
// when the concatenation has a rank), so the output is the parts' ranks.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace llmfast {

using Rank = uint32_t;
constexpr Rank kNoRank = UINT32_MAX;

// Fast non-cryptographic hash of a byte string (multiply-mix over 8-byte words; short keys take one or two loads).
uint64_t hash_bytes(const char* data, size_t size);

// Open-addressing hash table from byte strings to ranks. Keys are views into one arena owned by the table, so a
// lookup never allocates: it hashes the view, probes linearly, and compares a 32-bit tag and the length before the
// bytes.
class BytesRankMap {
   public:
    BytesRankMap() = default;
    // Builds the table; returns false (table unchanged) when a key occurs twice.
    bool build(const std::vector<std::pair<std::string_view, Rank>>& entries);
    Rank find(std::string_view key) const { return find(key.data(), key.size()); }
    Rank find(const char* data, size_t size) const {
        if (slots_.empty()) return kNoRank;
        const uint64_t h = hash_bytes(data, size);
        const uint32_t tag = static_cast<uint32_t>(h >> 32);
        for (size_t i = static_cast<size_t>(h) & mask_;; i = (i + 1) & mask_) {
            const Slot& s = slots_[i];
            if (s.len == kEmpty) return kNoRank;
            if (s.tag == tag && s.len == size && std::memcmp(arena_.data() + s.offset, data, size) == 0) return s.rank;
        }
    }
    size_t size() const { return count_; }
    size_t memory_bytes() const { return slots_.size() * sizeof(Slot) + arena_.size(); }

   private:
    static constexpr uint32_t kEmpty = UINT32_MAX;
    struct Slot {
        uint32_t tag = 0;
        uint32_t len = kEmpty;
        uint32_t offset = 0;
        Rank rank = kNoRank;
    };
    std::vector<Slot> slots_;
    std::string arena_;
    size_t mask_ = 0;
    size_t count_ = 0;
};

// The merge engine over one vocabulary. Thread-safe for concurrent encodes once built (read-only).
class BytePairEncoder {
   public:
    // Pieces up to this many bytes use the simple scan (quadratic in the piece, but with tiny constants); longer
    // pieces use a heap over a linked list of parts, O(n log n).
    static constexpr size_t kShortPiece = 96;

    BytePairEncoder() = default;
    // Throws std::invalid_argument on duplicate ranks, a missing single byte, or a byte string too large to index.
    void build(const std::vector<std::pair<std::string, Rank>>& mergeable);

    Rank rank_of(std::string_view bytes) const { return ranks_.find(bytes); }
    // Appends the tokens of one piece (whole-piece lookup first, then merges).
    void encode_piece(std::string_view piece, std::vector<Rank>& out) const;
    // Merge without the whole-piece shortcut (callers that already looked the piece up).
    void merge_piece(std::string_view piece, std::vector<Rank>& out) const;

    size_t vocab_size() const { return ranks_.size(); }
    Rank max_rank() const { return max_rank_; }
    Rank byte_rank(uint8_t b) const { return byte_ranks_[b]; }

   private:
    void merge_short(std::string_view piece, std::vector<Rank>& out) const;
    void merge_long(std::string_view piece, std::vector<Rank>& out) const;

    BytesRankMap ranks_;
    Rank byte_ranks_[256] = {};
    Rank max_rank_ = 0;
};

}  // namespace llmfast
