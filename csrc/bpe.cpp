#include "bpe.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace llmfast {

namespace {

inline uint64_t load64(const char* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}
inline uint64_t load32(const char* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// 64x64 -> 128 multiply folded to 64 bits: the mixing step of the hash.
inline uint64_t fold_mul(uint64_t a, uint64_t b) {
#if defined(__SIZEOF_INT128__)
    const __uint128_t r = static_cast<__uint128_t>(a) * b;
    return static_cast<uint64_t>(r) ^ static_cast<uint64_t>(r >> 64);
#else
    const uint64_t lo = a * b;
    const uint64_t x = (a ^ (a >> 29)) * (b | 1);
    return lo ^ (x >> 31) ^ (x << 33);
#endif
}

constexpr uint64_t kSeed0 = 0xa0761d6478bd642full;
constexpr uint64_t kSeed1 = 0xe7037ed1a0b428dbull;
constexpr uint64_t kSeed2 = 0x8ebc6af09c88c6e3ull;

}  // namespace

uint64_t hash_bytes(const char* p, size_t n) {
    uint64_t seed = kSeed0 ^ (n * kSeed2);
    uint64_t a, b;
    if (n <= 16) {
        if (n >= 8) {
            a = load64(p);
            b = load64(p + n - 8);
        } else if (n >= 4) {
            a = load32(p);
            b = load32(p + n - 4);
        } else if (n > 0) {
            a = (static_cast<uint64_t>(static_cast<uint8_t>(p[0])) << 16) |
                (static_cast<uint64_t>(static_cast<uint8_t>(p[n >> 1])) << 8) | static_cast<uint8_t>(p[n - 1]);
            b = 0;
        } else {
            a = b = 0;
        }
    } else {
        size_t i = n;
        const char* q = p;
        while (i > 16) {
            seed = fold_mul(load64(q) ^ kSeed1, load64(q + 8) ^ seed);
            q += 16;
            i -= 16;
        }
        a = load64(p + n - 16);
        b = load64(p + n - 8);
    }
    return fold_mul(a ^ kSeed1, b ^ seed) ^ seed;
}

bool BytesRankMap::build(const std::vector<std::pair<std::string_view, Rank>>& entries) {
    size_t total = 0;
    for (const auto& e : entries) total += e.first.size();
    if (total >= std::numeric_limits<uint32_t>::max() || entries.size() >= (size_t(1) << 30))
        throw std::invalid_argument("vocabulary is too large to index (over 4 GiB of token bytes or 2^30 tokens)");
    size_t capacity = 16;
    while (capacity < entries.size() * 2 + 2) capacity <<= 1;  // load factor <= 0.5 keeps probe chains short
    std::vector<Slot> slots(capacity);
    std::string arena;
    arena.reserve(total);
    const size_t mask = capacity - 1;
    for (const auto& [key, rank] : entries) {
        if (key.size() >= kEmpty) throw std::invalid_argument("vocabulary entry too long");
        const uint64_t h = hash_bytes(key.data(), key.size());
        const uint32_t tag = static_cast<uint32_t>(h >> 32);
        size_t i = static_cast<size_t>(h) & mask;
        for (;; i = (i + 1) & mask) {
            Slot& s = slots[i];
            if (s.len == kEmpty) break;
            if (s.tag == tag && s.len == key.size() &&
                std::memcmp(arena.data() + s.offset, key.data(), key.size()) == 0)
                return false;
        }
        slots[i] = Slot{tag, static_cast<uint32_t>(key.size()), static_cast<uint32_t>(arena.size()), rank};
        arena.append(key.data(), key.size());
    }
    slots_ = std::move(slots);
    arena_ = std::move(arena);
    mask_ = mask;
    count_ = entries.size();
    return true;
}

void BytePairEncoder::build(const std::vector<std::pair<std::string, Rank>>& mergeable) {
    std::vector<std::pair<std::string_view, Rank>> views;
    views.reserve(mergeable.size());
    Rank max_rank = 0;
    for (const auto& [bytes, rank] : mergeable) {
        if (bytes.empty()) throw std::invalid_argument("vocabulary contains an empty byte string");
        if (rank == kNoRank) throw std::invalid_argument("rank 4294967295 is reserved");
        views.emplace_back(bytes, rank);
        max_rank = std::max(max_rank, rank);
    }
    // Ranks must be unique: a rank names exactly one byte string, and the merge relies on it.
    {
        std::vector<Rank> sorted;
        sorted.reserve(mergeable.size());
        for (const auto& e : mergeable) sorted.push_back(e.second);
        std::sort(sorted.begin(), sorted.end());
        auto dup = std::adjacent_find(sorted.begin(), sorted.end());
        if (dup != sorted.end())
            throw std::invalid_argument("duplicate rank " + std::to_string(*dup) +
                                        " in the vocabulary: each rank must name exactly one byte string");
    }
    BytesRankMap map;
    if (!map.build(views)) throw std::invalid_argument("duplicate byte string in the vocabulary");
    std::string missing;
    int n_missing = 0;
    for (int b = 0; b < 256; ++b) {
        const char c = static_cast<char>(b);
        byte_ranks_[b] = map.find(&c, 1);
        if (byte_ranks_[b] == kNoRank) {
            if (n_missing < 8) missing += (n_missing ? ", " : "") + std::to_string(b);
            ++n_missing;
        }
    }
    if (n_missing)
        throw std::invalid_argument("vocabulary lacks " + std::to_string(n_missing) +
                                    " of the 256 single-byte tokens (e.g. byte values " + missing +
                                    "); a byte-level BPE needs every byte to encode arbitrary text");
    ranks_ = std::move(map);
    max_rank_ = max_rank;
}

void BytePairEncoder::encode_piece(std::string_view piece, std::vector<Rank>& out) const {
    if (piece.empty()) return;
    if (piece.size() == 1) {
        out.push_back(byte_ranks_[static_cast<uint8_t>(piece[0])]);
        return;
    }
    const Rank whole = ranks_.find(piece);
    if (whole != kNoRank) {
        out.push_back(whole);
        return;
    }
    merge_piece(piece, out);
}

void BytePairEncoder::merge_piece(std::string_view piece, std::vector<Rank>& out) const {
    if (piece.size() <= kShortPiece)
        merge_short(piece, out);
    else
        merge_long(piece, out);
}

// tiktoken's scan: parts[i] starts at start[i]; pair[i] is the rank of parts i and i+1 joined. Each step finds the
// lowest pair (leftmost on ties), joins it, and refreshes only the two pairs that touch the joined part.
void BytePairEncoder::merge_short(std::string_view piece, std::vector<Rank>& out) const {
    const size_t n = piece.size();
    uint32_t start[kShortPiece + 1];
    Rank pair[kShortPiece + 1];
    Rank token[kShortPiece + 1];
    const char* p = piece.data();
    for (size_t i = 0; i < n; ++i) {
        start[i] = static_cast<uint32_t>(i);
        token[i] = byte_ranks_[static_cast<uint8_t>(p[i])];
    }
    start[n] = static_cast<uint32_t>(n);
    token[n] = kNoRank;
    for (size_t i = 0; i + 1 < n; ++i) pair[i] = ranks_.find(p + i, 2);
    pair[n - 1] = pair[n] = kNoRank;
    size_t parts = n;
    while (parts > 1) {
        Rank best = kNoRank;
        size_t bi = 0;
        for (size_t i = 0; i + 1 < parts; ++i) {
            if (pair[i] < best) {
                best = pair[i];
                bi = i;
            }
        }
        if (best == kNoRank) break;
        token[bi] = best;
        // Remove part bi+1 by shifting the tail left.
        for (size_t j = bi + 1; j < parts; ++j) {
            start[j] = start[j + 1];
            token[j] = token[j + 1];
            pair[j] = pair[j + 1];
        }
        --parts;
        // start[parts] is still the end sentinel n after the shift.
        pair[bi] = bi + 1 < parts ? ranks_.find(p + start[bi], start[bi + 2] - start[bi]) : kNoRank;
        if (bi > 0) pair[bi - 1] = ranks_.find(p + start[bi - 1], start[bi + 1] - start[bi - 1]);
    }
    out.insert(out.end(), token, token + parts);
}

// Heap over a doubly linked list of parts. A part is named by the byte offset where it starts (which never changes);
// heap keys pack (pair rank << 32 | left part), so the minimum is the lowest rank and, among equal ranks, the
// leftmost pair. Entries go stale when a neighbour merges; a popped entry is used only if its left part is alive and
// its pair rank is still the one recorded (ranks are unique per byte string, so equal rank means the same pair).
void BytePairEncoder::merge_long(std::string_view piece, std::vector<Rank>& out) const {
    const size_t n = piece.size();
    if (n >= UINT32_MAX) throw std::invalid_argument("piece too long");
    const char* p = piece.data();
    std::vector<uint32_t> next(n + 1), prev(n + 1);
    std::vector<Rank> token(n), pair(n, kNoRank);
    std::vector<uint8_t> alive(n + 1, 1);
    std::vector<uint64_t> heap;
    heap.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        next[i] = static_cast<uint32_t>(i + 1);
        prev[i] = static_cast<uint32_t>(i == 0 ? UINT32_MAX : i - 1);
        token[i] = byte_ranks_[static_cast<uint8_t>(p[i])];
    }
    for (size_t i = 0; i + 1 < n; ++i) {
        pair[i] = ranks_.find(p + i, 2);
        if (pair[i] != kNoRank) heap.push_back((static_cast<uint64_t>(pair[i]) << 32) | i);
    }
    auto cmp = [](uint64_t a, uint64_t b) { return a > b; };
    std::make_heap(heap.begin(), heap.end(), cmp);
    // Rank of the pair starting at part `l` (whose right neighbour is next[l]), or kNoRank at the end.
    auto pair_rank = [&](uint32_t l) -> Rank {
        const uint32_t r = next[l];
        if (r >= n) return kNoRank;
        return ranks_.find(p + l, next[r] - l);
    };
    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), cmp);
        const uint64_t key = heap.back();
        heap.pop_back();
        const Rank rank = static_cast<Rank>(key >> 32);
        const uint32_t l = static_cast<uint32_t>(key);
        if (!alive[l] || pair[l] != rank) continue;
        const uint32_t r = next[l];
        token[l] = rank;
        alive[r] = 0;
        next[l] = next[r];
        if (next[r] < n) prev[next[r]] = l;
        pair[l] = pair_rank(l);
        if (pair[l] != kNoRank) {
            heap.push_back((static_cast<uint64_t>(pair[l]) << 32) | l);
            std::push_heap(heap.begin(), heap.end(), cmp);
        }
        const uint32_t pl = prev[l];
        if (pl != UINT32_MAX) {
            pair[pl] = pair_rank(pl);
            if (pair[pl] != kNoRank) {
                heap.push_back((static_cast<uint64_t>(pair[pl]) << 32) | pl);
                std::push_heap(heap.begin(), heap.end(), cmp);
            }
        }
    }
    for (uint32_t i = 0; i < n; i = next[i]) out.push_back(token[i]);
}

}  // namespace llmfast
