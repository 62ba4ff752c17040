#include "bpe.h"

#include <algorithm>
#include <atomic>
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
    LargeTable<Slot> slots(capacity);
    std::string arena;
    arena.reserve(total);
    const size_t mask = capacity - 1;
    for (const auto& [key, rank] : entries) {
        if (key.size() >= kEmpty) throw std::invalid_argument("vocabulary entry too long");
        const uint64_t h = hash_bytes(key.data(), key.size());
        const bool inline_key = key.size() <= kInlineBytes;
        const uint64_t word = inline_key ? inline_word(key.data(), key.size())
                                         : (h >> 32) << 32 | static_cast<uint32_t>(arena.size());
        size_t i = static_cast<size_t>(h) & mask;
        for (;; i = (i + 1) & mask) {
            const Slot& s = slots[i];
            if (s.len == kEmpty) break;
            if (s.len != key.size()) continue;
            const bool same = inline_key ? s.word == word
                                         : s.word >> 32 == word >> 32 &&
                                               std::memcmp(arena.data() + static_cast<uint32_t>(s.word), key.data(),
                                                           key.size()) == 0;
            if (same) return false;
        }
        slots[i] = Slot{word, static_cast<uint32_t>(key.size()), rank};
        if (!inline_key) arena.append(key.data(), key.size());
    }
    slots_ = std::move(slots);
    arena_ = std::move(arena);
    mask_ = mask;
    count_ = entries.size();
    return true;
}

// The piece caches of one thread: one per recently used encoder, so alternating between a few encodings does not
// clear them; the least recently used is taken over (and cleared) for a new encoder.
struct PieceCachePool {
    static constexpr size_t kCaches = 4;
    std::unique_ptr<PieceCache> caches[kCaches];
    uint64_t clock = 0;
};

PieceCache& PieceCache::for_thread(uint64_t owner, bool narrow) {
    thread_local PieceCachePool pool;
    const uint64_t now = ++pool.clock;
    std::unique_ptr<PieceCache>* victim = nullptr;
    for (auto& cache : pool.caches) {
        if (cache && cache->owner_ == owner) {
            cache->last_use_ = now;
            return *cache;
        }
        if (!victim || !cache || (*victim && cache->last_use_ < (*victim)->last_use_)) victim = &cache;
    }
    if (*victim) {
        std::fill_n((*victim)->sets_.data(), kSets, Set{});
        (*victim)->pair_memo_ = empty_pair_memo();
        for (size_t i = 0; i < (size_t(1) << kLongSetBits); ++i) (*victim)->long_[i] = LongSet{};
    } else
        *victim = std::make_unique<PieceCache>();
    (*victim)->owner_ = owner;
    (*victim)->last_use_ = now;
    (*victim)->narrow_ = narrow;
    return **victim;
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
    std::vector<std::pair<std::string_view, Rank>> long_views;
    for (const auto& view : views)
        if (view.first.size() > kShortPiece) long_views.push_back(view);
    long_ranks_.build(long_views);
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
    // Pair table: every way to split each token into two tokens. Each (left, right) pair has one concatenation, so
    // one rank.
    std::vector<std::pair<uint64_t, Rank>> pair_entries;
    pair_entries.reserve(mergeable.size() * 3);
    for (const auto& [bytes, rank] : mergeable) {
        for (size_t k = 1; k < bytes.size(); ++k) {
            const Rank left = map.find(bytes.data(), k);
            if (left == kNoRank) continue;
            const Rank right = map.find(bytes.data() + k, bytes.size() - k);
            if (right == kNoRank) continue;
            pair_entries.emplace_back((static_cast<uint64_t>(left) << 32) | right, rank);
        }
    }
    pairs_.build(pair_entries);
    // Trie over token bytes. Node 0 is the root; children of the root sit in a direct table.
    {
        std::vector<std::pair<uint64_t, Rank>> edges;
        std::vector<Rank> node_rank(1, kNoRank);
        // Edges are created while walking each token's path, in a growing open-addressing table (node << 32 |
        // byte -> child), then frozen into trie_.
        size_t cap = 16;
        size_t total = 0;
        for (const auto& e : mergeable) total += e.first.size();
        while (cap < total * 2 + 2) cap <<= 1;
        std::vector<uint64_t> keys(cap, UINT64_MAX);
        std::vector<uint32_t> vals(cap, 0);
        const size_t mask = cap - 1;
        int bits = 0;
        while ((size_t(1) << bits) < cap) ++bits;
        auto slot_of = [&](uint64_t key) {
            size_t i = static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> (64 - bits));
            while (keys[i] != UINT64_MAX && keys[i] != key) i = (i + 1) & mask;
            return i;
        };
        for (int b = 0; b < 256; ++b) {
            root_child_[b] = static_cast<uint32_t>(node_rank.size());
            node_rank.push_back(byte_ranks_[b]);
        }
        for (const auto& [bytes, rank] : mergeable) {
            uint32_t node = root_child_[static_cast<uint8_t>(bytes[0])];
            for (size_t i = 1; i < bytes.size(); ++i) {
                const uint64_t key = (static_cast<uint64_t>(node) << 32) | static_cast<uint8_t>(bytes[i]);
                const size_t slot = slot_of(key);
                if (keys[slot] == UINT64_MAX) {
                    keys[slot] = key;
                    vals[slot] = static_cast<uint32_t>(node_rank.size());
                    node_rank.push_back(kNoRank);
                }
                node = vals[slot];
            }
            node_rank[node] = rank;
        }
        for (size_t i = 0; i < cap; ++i)
            if (keys[i] != UINT64_MAX) edges.emplace_back(keys[i], vals[i]);
        trie_.build(edges);
        node_rank_ = std::move(node_rank);
        depth2_.assign(65536, UINT32_MAX);
        for (size_t i = 0; i < 65536; ++i) {
            const Rank child = trie_.find(root_child_[i >> 8], static_cast<Rank>(i & 255));
            if (child != kNoRank) depth2_[i] = child;
        }
    }
    byte_pair_ranks_.assign(65536, kNoRank);
    for (size_t i = 0; i < 65536; ++i) {
        const char two[2] = {static_cast<char>(i >> 8), static_cast<char>(i & 255)};
        byte_pair_ranks_[i] = map.find(two, 2);
    }
    ranks_ = std::move(map);
    max_rank_ = max_rank;
    memo_pairs_ = max_rank < (Rank(1) << 20) - 1;

    // may_span()'s bit sets.
    // Each n-gram is added at its place in the window p[k-3..k+2] that may_span() tests (`at`: the window index of
    // its first byte), under the block of the three bytes at p[k-2..k]; it goes into the small filter too when its
    // bytes fit that place between two three-byte characters.
    struct Placed {
        uint64_t bytes, context;
        unsigned len, at;
    };
    auto for_each_ngram = [&mergeable](auto&& visit) {
        for (const auto& entry : mergeable) {
            const auto* t = reinterpret_cast<const uint8_t*>(entry.first.data());
            const size_t len = entry.first.size();
            auto bytes_at = [t](size_t from, size_t count) {
                uint64_t v = 0;
                for (size_t i = 0; i < count; ++i) v |= uint64_t(t[from + i]) << (8 * i);
                return v;
            };
            if (len >= 3) visit(Placed{bytes_at(0, 3), bytes_at(0, 3), 3, 1});              // as p[k-2..k]
            if (len >= 4) visit(Placed{bytes_at(len - 4, 4), bytes_at(len - 3, 3), 4, 0});  // as p[k-3..k]
            if (len >= 5) visit(Placed{bytes_at(len - 5, 5), bytes_at(len - 4, 3), 5, 0});  // as p[k-3..k+1]
            for (size_t j = 0; j + 6 <= len; ++j) visit(Placed{bytes_at(j, 6), bytes_at(j + 1, 3), 6, 0});  // k-3..k+2
        }
    };
    // An n-gram fits between two three-byte characters when its bytes at window indices 0 and 3 are lead bytes
    // 0xE0-0xEF and the others continuation bytes 0x80-0xBF.
    auto fits_three_byte_boundary = [](const Placed& e) {
        const uint64_t in_window = ((uint64_t(1) << (8 * e.len)) - 1) << (8 * e.at);
        return ((e.bytes << (8 * e.at)) & kThreeByteBoundaryMask & in_window) == (kThreeByteBoundary & in_window);
    };
    size_t count = 0, three_byte_count = 0;
    for_each_ngram([&](const Placed& e) { ++count, three_byte_count += fits_three_byte_boundary(e); });
    // The full filter gets about thirty-two bits per entry, up to 8 MiB (4 MiB for o200k): four tests per boundary
    // are ORed and the blocks fill unevenly, so with fewer bits many boundaries inside CJK runs lost their cut to a
    // false positive, and the longer chunks cost more than the bigger table (measured on a Japanese novel: four bits
    // per entry unblocked -> sixteen -> blocked at thirty-two, first pass 35 -> 45 -> 51 MB/s).
    ngrams_.reset(count, 32, 16, 26);
    three_byte_ngrams_.reset(three_byte_count, 32, 12, 26);
    for_each_ngram([&](const Placed& e) {
        ngrams_.add(e.context, e.bytes, e.len);
        if (fits_three_byte_boundary(e)) three_byte_ngrams_.add(e.context, e.bytes, e.len);
    });
    starts2_.assign(65536 / 64, 0);
    for (const auto& entry : mergeable) {
        const auto* t = reinterpret_cast<const uint8_t*>(entry.first.data());
        if (entry.first.size() < 2) continue;
        const size_t first_two = t[0] | t[1] << 8;
        starts2_[first_two >> 6] |= uint64_t(1) << (first_two & 63);
    }
    char3_rank_.assign(65536, kNoRank);
    for (const auto& [bytes, rank] : mergeable) {
        const auto* t = reinterpret_cast<const uint8_t*>(bytes.data());
        if (bytes.size() == 3 && (t[0] & 0xF0) == 0xE0 && (t[1] & 0xC0) == 0x80 && (t[2] & 0xC0) == 0x80)
            char3_rank_[char3_index(t[0], t[1], t[2])] = rank;
    }
    // A token whose bytes alone merge into something else (possible in a hand-made vocabulary: "abc" with neither
    // "ab" nor "bc") is found by the whole-piece lookup only when it is a whole piece, so a chunk of its bytes must
    // not be encoded like a piece.
    self_merging_ = true;
    std::vector<Rank> merged;
    for (const auto& [bytes, rank] : mergeable) {
        if (bytes.size() < 2) continue;
        merged.resize(bytes.size() + TokenBuffer::kSlack);
        const Rank* end = bytes.size() <= kShortPiece ? merge_short(bytes, merged.data(), nullptr) : merge_long(bytes, merged.data());
        if (end != merged.data() + 1 || merged[0] != rank) {
            self_merging_ = false;
            break;
        }
    }
    static std::atomic<uint64_t> builds{0};
    id_ = ++builds;  // a fresh number: caches filled under any earlier vocabulary never match
}

// A short piece is merged whole, not cut into chunks first: its own cache entry serves it from now on, and entries
// for its chunks as well would crowd the cache (measured: cutting 20k new words filled it to thrashing).
Rank* BytePairEncoder::encode_short_uncached(std::string_view piece, const PieceCache::Key& key, Rank* w,
                                             PieceCache& cache, bool marked) const {
    Rank* end;
    const Rank whole = ranks_.find(piece);
    if (whole != kNoRank) {
        *w = whole, end = w + 1;
    } else {
        end = merge_short(piece, w, &cache);
    }
    const size_t count = static_cast<size_t>(end - w);
    if (count <= cache.capacity()) {
        cache.insert(key, w, count);
    } else {
        if (!marked) cache.insert_overflow(key);
        cache.insert_long(piece, hash_bytes(piece.data(), piece.size()), w, count);
    }
    return end;
}

void stream_in(const void* data, size_t size) {
    const auto* p = static_cast<const volatile uint8_t*>(data);
    for (size_t i = 0; i < size; i += 64) (void)p[i];
}

void BytePairEncoder::warm(const PieceCache& cache, bool cut_filter) const {
    stream_in(cache.memory().data(), cache.memory().size());
    if (self_merging_ && cut_filter) {
        stream_in(three_byte_ngrams_.bits.data(), three_byte_ngrams_.bits.size() * sizeof(uint64_t));
        stream_in(char3_rank_.data(), char3_rank_.size() * sizeof(Rank));
    }
    long_ranks_.stream_in();
}

Rank* BytePairEncoder::encode_long(std::string_view piece, Rank* w, PieceCache& cache) const {
    const uint64_t hash = hash_bytes(piece.data(), piece.size());  // for the whole-piece lookup and the cache
    const Rank whole = long_ranks_.find(piece.data(), piece.size(), hash);
    if (whole != kNoRank) {
        *w = whole;
        return w + 1;
    }
    const bool cacheable = piece.size() <= PieceCache::kMaxLongBytes;
    if (cacheable)
        if (Rank* end = cache.find_long(piece, hash, w)) return end;
    Rank* end = self_merging_ ? merge_cut(piece, w, cache) : merge_long(piece, w);
    if (cacheable) cache.insert_long(piece, hash, w, static_cast<size_t>(end - w));
    return end;
}

Rank* BytePairEncoder::encode_chunk(std::string_view chunk, Rank* w, PieceCache& cache, bool cut_further) const {
    if (chunk.size() == 1) {
        *w = byte_ranks_[static_cast<uint8_t>(chunk[0])];
        return w + 1;
    }
    if (chunk.size() == 3) {  // a single CJK character, usually a token (then its own, the vocabulary being self-merging)
        const auto* c = reinterpret_cast<const uint8_t*>(chunk.data());
        const Rank rank = char3_rank(c);
        if (rank != kNoRank) {
            *w = rank;
            return w + 1;
        }
    }
    if (chunk.size() <= kShortPiece) {
        return encode_short(chunk, PieceCache::key_of(chunk.data(), chunk.size()), w, cache);
    }
    return cut_further && chunk.size() <= kTrieCutPiece ? merge_chunked(chunk, w, cache) : merge_long(chunk, w);
}

// Cuts the piece where may_span() rules out a token across the cut and encodes each chunk on its own: a merge always
// makes a token covering both parts, so no merge crosses such a cut and the merges on either side never interact.
// Cuts are tried only before the first byte of a character. CJK runs fall into chunks of one or a few characters,
// which recur, so most chunks come from the piece cache; the rare long chunk is cut further by merge_chunked().
Rank* BytePairEncoder::merge_cut(std::string_view piece, Rank* w, PieceCache& cache) const {
    const size_t n = piece.size();
    const uint8_t* p = reinterpret_cast<const uint8_t*>(piece.data());
    // Byte length of the UTF-8 character a byte starts (1 for continuation and invalid bytes): stepping by it visits
    // the starts of characters (on invalid UTF-8 it may step over one, which only costs a cut).
    auto char_length = [](uint8_t b) { return size_t(1) + (b >= 0xC0) + (b >= 0xE0) + (b >= 0xF0); };
    size_t start = 0;
    for (size_t k = char_length(p[0]); k < n; k += char_length(p[k])) {
        bool span;
        if (k >= 3 && k + 3 <= n) {
            uint32_t low;
            uint16_t high;
            std::memcpy(&low, p + k - 3, 4);
            std::memcpy(&high, p + k + 1, 2);
            span = may_span_inside(low | uint64_t(high) << 32);
        } else {
            span = may_span(p, n, k);
        }
        if (span) continue;
        // Most chunks of a CJK run are one character and a token: found here without the call.
        Rank rank;
        if (k - start == 3 && (rank = char3_rank(p + start)) != kNoRank)
            *w++ = rank;
        else
            w = encode_chunk(piece.substr(start, k - start), w, cache, true);
        start = k;
    }
    if (start == 0)  // no cut: the piece (longer than kShortPiece, see encode_long()) is cut exactly or merged whole
        return n <= kTrieCutPiece ? merge_chunked(piece, w, cache) : merge_long(piece, w);
    return encode_chunk(piece.substr(start), w, cache, true);
}

// The exact cut: a position k is a cut when no token starting before k ends after it. Walking the trie from each
// start s gives the end of the longest token starting there. A chunk that is exactly the longest token from its start
// is that token (the vocabulary is self-merging); other chunks are encoded like pieces.
Rank* BytePairEncoder::merge_chunked(std::string_view piece, Rank* w, PieceCache& cache) const {
    const size_t n = piece.size();
    const uint8_t* p = reinterpret_cast<const uint8_t*>(piece.data());
    size_t chunk_start = 0;
    size_t reach = 0;            // furthest end of a token starting in [chunk_start, s)
    size_t chunk_token_end = 0;  // end of the longest token starting at chunk_start
    Rank chunk_token = kNoRank;  // and its rank
    auto emit = [&](size_t a, size_t b) {
        if (chunk_token_end == b)
            *w++ = chunk_token;
        else
            w = encode_chunk(piece.substr(a, b - a), w, cache, false);
    };
    // Walks cost up to the longest token's length each: quadratic where long tokens overlap (a rule of 80 dashes).
    // Past this many steps the rest of the piece, from the last cut, is merged whole instead.
    size_t steps_left = 8 * n + 64;
    for (size_t s = 0; s < n; ++s) {
        if (s > chunk_start && reach <= s) {
            emit(chunk_start, s);
            chunk_start = s;
        }
        // Longest token starting at s (every single byte is one).
        size_t end = s + 1;
        Rank end_rank = byte_ranks_[p[s]];
        // The first two steps come from direct tables; deeper ones from the hashed edges.
        uint32_t node = s + 1 < n ? depth2_[(size_t(p[s]) << 8) | p[s + 1]] : UINT32_MAX;
        if (node != UINT32_MAX && node_rank_[node] != kNoRank) end = s + 2, end_rank = node_rank_[node];
        for (size_t e = s + 2; node != UINT32_MAX && e < n; ++e) {
            if (--steps_left == 0) return encode_chunk(piece.substr(chunk_start), w, cache, false);
            node = trie_.find(node, p[e]);
            if (node == kNoRank) break;
            const Rank r = node_rank_[node];
            if (r != kNoRank) end = e + 1, end_rank = r;
        }
        if (s == chunk_start) chunk_token_end = end, chunk_token = end_rank;
        if (end > reach) reach = end;
        // A token reaching the end spans every later position: no cut is left to find, and the walks from the
        // remaining starts (each up to the longest token's length: quadratic on a rule of dashes) would be wasted.
        if (reach >= n) break;
    }
    emit(chunk_start, n);
    return w;
}

// tiktoken's scan over parts: token[i] is part i's rank, pair[i] the rank of parts i and i+1 joined. Each step finds
// the lowest pair (leftmost on ties), joins it, and refreshes only the two pairs that touch the joined part.
// Quadratic in the piece, so only for short pieces, where it beats a heap: the minimum is a branch-free pass over the
// live pairs, and parts shift with plain moves.
Rank* BytePairEncoder::merge_short(std::string_view piece, Rank* w, PieceCache* memo) const {
    const size_t n = piece.size();
    if (n == 0) return w;
    Rank pair[kShortPiece];
    Rank token[kShortPiece];
    const uint8_t* p = reinterpret_cast<const uint8_t*>(piece.data());
    for (size_t i = 0; i < n; ++i) token[i] = byte_ranks_[p[i]];
    for (size_t i = 0; i + 1 < n; ++i) pair[i] = byte_pair_ranks_[(size_t(p[i]) << 8) | p[i + 1]];
    pair[n - 1] = kNoRank;  // the last part has no right neighbour; merges keep this end marker in place
    size_t parts = n;
    // Each merge needs the merged part's pairs with its two neighbours, looked up in a table of megabytes: done one
    // after the other, a piece new to the cache waits for one memory miss per merge. So the lookups that any pair
    // could need once merged are prefetched as soon as the pair is known, and the misses overlap.
    auto prefetch_after_merge_of = [&](size_t j) {
        if (j + 1 >= parts || pair[j] == kNoRank) return;
        if (j > 0) pairs_.prefetch(token[j - 1], pair[j]);
        if (j + 2 < parts) pairs_.prefetch(pair[j], token[j + 2]);
    };
    for (size_t j = 0; j + 1 < n; ++j) prefetch_after_merge_of(j);
    for (;;) {
        // The lowest pair, the leftmost on ties (strict <), over the live pairs only: a few parts, mostly.
        Rank best = kNoRank;
        size_t bi = 0;
        for (size_t i = 0; i + 1 < parts; ++i) {
            const bool lower = pair[i] < best;
            best = lower ? pair[i] : best;
            bi = lower ? i : bi;
        }
        if (best == kNoRank) break;
        // Join parts bi and bi+1; the tail moves left (the end marker follows it).
        token[bi] = best;
        for (size_t i = bi + 1; i + 1 < parts; ++i) {
            token[i] = token[i + 1];
            pair[i] = pair[i + 1];
        }
        --parts;
        pair[bi] = bi + 1 < parts ? pair_rank(best, token[bi + 1], memo) : kNoRank;
        if (bi > 0) pair[bi - 1] = pair_rank(token[bi - 1], best, memo);
        // New pairs, and the pairs next to them whose neighbour is now the merged part.
        for (size_t j = bi >= 2 ? bi - 2 : 0; j <= bi + 1; ++j) prefetch_after_merge_of(j);
    }
    std::memcpy(w, token, parts * sizeof(Rank));
    return w + parts;
}

namespace {
// Per-thread scratch for long pieces, so the heap merge does not allocate per piece.
struct LongScratch {
    std::vector<uint32_t> next, prev;
    std::vector<Rank> token, pair;
    std::vector<uint64_t> heap;
};
}  // namespace

// Heap over a doubly linked list of parts. A part is named by the byte offset where it starts (which never changes);
// heap keys pack (pair rank << 32 | left part), so the minimum is the lowest rank and, among equal ranks, the
// leftmost pair. Entries go stale when a neighbour merges; a popped entry is used only if its left part is alive and
// its pair rank is still the one recorded (ranks are unique per byte string, so equal rank means the same pair).
// O(n log n).
Rank* BytePairEncoder::merge_long(std::string_view piece, Rank* w) const {
    const size_t n = piece.size();
    if (n >= UINT32_MAX) throw std::invalid_argument("piece longer than 4 GiB");
    thread_local LongScratch scratch;
    auto& next = scratch.next;
    auto& prev = scratch.prev;
    auto& token = scratch.token;
    auto& pair = scratch.pair;
    auto& heap = scratch.heap;
    next.resize(n + 1);
    prev.resize(n + 1);
    token.resize(n);
    pair.resize(n);
    heap.clear();
    const uint8_t* p = reinterpret_cast<const uint8_t*>(piece.data());
    constexpr uint32_t kNone = UINT32_MAX;
    for (size_t i = 0; i < n; ++i) {
        next[i] = static_cast<uint32_t>(i + 1);
        prev[i] = i == 0 ? kNone : static_cast<uint32_t>(i - 1);
        token[i] = byte_ranks_[p[i]];
    }
    for (size_t i = 0; i + 1 < n; ++i) {
        pair[i] = byte_pair_ranks_[(size_t(p[i]) << 8) | p[i + 1]];
        if (pair[i] != kNoRank) heap.push_back((static_cast<uint64_t>(pair[i]) << 32) | i);
    }
    pair[n - 1] = kNoRank;
    auto cmp = [](uint64_t a, uint64_t b) { return a > b; };
    std::make_heap(heap.begin(), heap.end(), cmp);
    auto push = [&](uint32_t l) {
        heap.push_back((static_cast<uint64_t>(pair[l]) << 32) | l);
        std::push_heap(heap.begin(), heap.end(), cmp);
    };
    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), cmp);
        const uint64_t key = heap.back();
        heap.pop_back();
        const Rank rank = static_cast<Rank>(key >> 32);
        const uint32_t l = static_cast<uint32_t>(key);
        // pair[] of a dead part is kNoRank, so one comparison rejects both kinds of stale entry.
        if (pair[l] != rank) continue;
        const uint32_t r = next[l];
        token[l] = rank;
        pair[r] = kNoRank;  // r is gone
        const uint32_t rr = next[r];
        next[l] = rr;
        if (rr < n) {
            prev[rr] = l;
            pair[l] = pairs_.find(rank, token[rr]);
            if (pair[l] != kNoRank) push(l);
        } else {
            pair[l] = kNoRank;
        }
        const uint32_t pl = prev[l];
        if (pl != kNone) {
            pair[pl] = pairs_.find(token[pl], rank);
            if (pair[pl] != kNoRank) push(pl);
        }
    }
    for (uint32_t i = 0; i < n; i = next[i]) *w++ = token[i];
    return w;
}

void PairRankMap::build(const std::vector<std::pair<uint64_t, Rank>>& entries) {
    size_t capacity = 16;
    int bits = 4;
    while (capacity < entries.size() * 2 + 2) capacity <<= 1, ++bits;
    const size_t mask = capacity - 1;
    const int shift = 64 - bits;
    bool packable = true;
    for (const auto& [key, rank] : entries) {
        const uint64_t left = key >> 32, right = key & 0xFFFFFFFFu;
        if ((left | right) >> kPackedBits || rank >= (Rank(1) << (64 - 2 * kPackedBits)) - 1) packable = false;
    }
    if (packable) {
        LargeTable<uint64_t> packed(capacity, kEmptyKey);
        for (const auto& [key, rank] : entries) {
            const uint64_t k = (key >> 32) << kPackedBits | (key & 0xFFFFFFFFu);
            size_t i = static_cast<size_t>((k * 0x9E3779B97F4A7C15ull) >> shift);
            while (packed[i] != kEmptyKey && (packed[i] & kPackedKeyMask) != k) i = (i + 1) & mask;
            packed[i] = k | static_cast<uint64_t>(rank) << (2 * kPackedBits);
        }
        packed_ = std::move(packed);
        slots_.clear();
    } else {
        LargeTable<Slot> slots(capacity);
        for (const auto& [key, rank] : entries) {
            size_t i = static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift);
            while (slots[i].key != kEmptyKey && slots[i].key != key) i = (i + 1) & mask;
            slots[i].key = key;
            slots[i].rank = rank;
        }
        slots_ = std::move(slots);
        packed_.clear();
    }
    mask_ = mask;
    shift_ = shift;
    // The filter: a power of two of 64-bit words, about ten bits per pair, at least 64 words.
    unsigned words_log2 = 6;
    while ((size_t(64) << words_log2) < entries.size() * 10 && words_log2 < 46) ++words_log2;
    filter_shift_ = 64 - words_log2;
    LargeTable<uint64_t> filter(size_t(1) << words_log2, 0);
    for (const auto& [key, rank] : entries) {
        const uint64_t g = filter_hash(static_cast<Rank>(key >> 32), static_cast<Rank>(key));
        filter[g >> filter_shift_] |= filter_bits(g);
    }
    filter_ = std::move(filter);
}

}  // namespace llmfast
