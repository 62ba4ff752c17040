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

// Open-addressing hash table from a pair of token ranks to the rank of their concatenated bytes. Since every part
// of a piece is a token, the merge loop looks pairs up here and never touches bytes: one multiply to hash, one
// 16-byte slot to compare.
class PairRankMap {
   public:
    void build(const std::vector<std::pair<uint64_t, Rank>>& entries);
    Rank find(Rank left, Rank right) const {
        const uint64_t key = (static_cast<uint64_t>(left) << 32) | right;
        for (size_t i = static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);; i = (i + 1) & mask_) {
            const Slot& s = slots_[i];
            if (s.key == key) return s.rank;
            if (s.key == kEmptyKey) return kNoRank;
        }
    }
    size_t memory_bytes() const { return slots_.size() * sizeof(Slot); }

   private:
    static constexpr uint64_t kEmptyKey = UINT64_MAX;  // (kNoRank, kNoRank) is never a real pair
    struct Slot {
        uint64_t key = kEmptyKey;
        Rank rank = kNoRank;
    };
    std::vector<Slot> slots_ = std::vector<Slot>(2);
    size_t mask_ = 1;
    int shift_ = 63;
};

// The merge engine over one vocabulary. Thread-safe for concurrent encodes once built (read-only).
class BytePairEncoder {
   public:
    // Pieces up to kShortPiece bytes use the simple scan (quadratic in the piece, with tiny constants). Longer ones
    // up to kChunkPiece are first cut where no vocabulary token spans the cut (no merge can cross it), and each
    // chunk is merged on its own (CJK runs cut into about one chunk per character). Longer pieces use a heap over a
    // linked list of parts, O(n log n).
    static constexpr size_t kShortPiece = 12;
    static constexpr size_t kChunkPiece = 1024;

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
    void merge_chunked(std::string_view piece, std::vector<Rank>& out) const;
    // Merge a chunk already known not to be one token.
    void merge_any(std::string_view piece, std::vector<Rank>& out) const {
        if (piece.size() <= kShortPiece)
            merge_short(piece, out);
        else
            merge_long(piece, out);
    }

    BytesRankMap ranks_;
    PairRankMap pairs_;
    std::vector<Rank> byte_pair_ranks_;
    // Byte trie of all tokens: root_child_[b] and trie_ (node, byte) -> child; node_rank_[node] is the rank of the
    // token spelled by the path to node, or kNoRank.
    uint32_t root_child_[256] = {};
    std::vector<uint32_t> depth2_;  // node of each two-byte prefix (65536 entries), or UINT32_MAX
    PairRankMap trie_;
    std::vector<Rank> node_rank_;  // rank of each two-byte string (65536 entries): the first merges
    Rank byte_ranks_[256] = {};
    Rank max_rank_ = 0;
};

}  // namespace llmfast
