// Byte-pair merge core: no Python in here.
//
// A vocabulary maps byte strings to ranks. Encoding a piece repeatedly merges the adjacent pair of parts whose
// concatenated bytes have the lowest rank (ties go to the leftmost pair) until no adjacent pair has a rank, as
// tiktoken does. Every part is always a token of the vocabulary (single bytes to start with; a merge only happens
// when the concatenation has a rank), so the output is the parts' ranks.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(_MSC_VER)
#include <malloc.h>
#endif

namespace llmfast {

// Allocator for the big lookup tables (pair and rank tables, piece caches, filters: megabytes each, read at random).
// Blocks of 2 MiB or more are 2 MiB-aligned and, on Linux, marked for transparent huge pages: one TLB entry then
// covers 2 MiB instead of 4 KiB, and a random lookup no longer pays a page walk on top of its cache miss.
template <class T>
struct LargeTableAllocator {
    using value_type = T;
    static constexpr size_t kHugePage = size_t(1) << 21;
    LargeTableAllocator() = default;
    template <class U>
    LargeTableAllocator(const LargeTableAllocator<U>&) noexcept {}
    T* allocate(size_t n) {
        const size_t bytes = n * sizeof(T);
        if (bytes < kHugePage) return static_cast<T*>(::operator new(bytes));
        const size_t rounded = (bytes + kHugePage - 1) & ~(kHugePage - 1);
#if defined(_MSC_VER)
        void* p = _aligned_malloc(rounded, kHugePage);
#else
        void* p = std::aligned_alloc(kHugePage, rounded);
#endif
        if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        madvise(p, rounded, MADV_HUGEPAGE);  // advice only: without huge pages the table works the same
#endif
        return static_cast<T*>(p);
    }
    void deallocate(T* p, size_t n) noexcept {
        if (n * sizeof(T) < kHugePage)
            ::operator delete(p);
        else
#if defined(_MSC_VER)
            _aligned_free(p);
#else
            std::free(p);
#endif
    }
    template <class U>
    bool operator==(const LargeTableAllocator<U>&) const noexcept { return true; }
    template <class U>
    bool operator!=(const LargeTableAllocator<U>&) const noexcept { return false; }
};
template <class T>
using LargeTable = std::vector<T, LargeTableAllocator<T>>;

using Rank = uint32_t;
constexpr Rank kNoRank = UINT32_MAX;

// Reads `size` bytes at `data` front to back, one load per cache line: brings a table back into the CPU caches at
// memory bandwidth instead of one miss per lookup (see BytePairEncoder::warm()).
void stream_in(const void* data, size_t size);

// Fast non-cryptographic hash of a byte string (multiply-mix over 8-byte words; short keys take one or two loads).
uint64_t hash_bytes(const char* data, size_t size);

// Open-addressing hash table from byte strings to ranks. A lookup never allocates: it hashes the view and probes
// linearly; keys of up to 8 bytes are compared in the slot, longer ones by a 32-bit tag and the length before their
// bytes in the table's arena.
class BytesRankMap {
   public:
    BytesRankMap() = default;
    // Builds the table; returns false (table unchanged) when a key occurs twice.
    bool build(const std::vector<std::pair<std::string_view, Rank>>& entries);
    Rank find(std::string_view key) const { return find(key.data(), key.size()); }
    Rank find(const char* data, size_t size) const { return find(data, size, hash_bytes(data, size)); }
    // The same with the key's hash_bytes() already computed.
    Rank find(const char* data, size_t size, uint64_t h) const {
        if (slots_.empty()) return kNoRank;
        if (size <= kInlineBytes) {  // the key is in the slot: one memory access
            const uint64_t word = inline_word(data, size);
            for (size_t i = static_cast<size_t>(h) & mask_;; i = (i + 1) & mask_) {
                const Slot& s = slots_[i];
                if (s.len == kEmpty) return kNoRank;
                if (s.len == size && s.word == word) return s.rank;
            }
        }
        const uint32_t tag = static_cast<uint32_t>(h >> 32);
        for (size_t i = static_cast<size_t>(h) & mask_;; i = (i + 1) & mask_) {
            const Slot& s = slots_[i];
            if (s.len == kEmpty) return kNoRank;
            if (s.len == size && static_cast<uint32_t>(s.word >> 32) == tag &&
                std::memcmp(arena_.data() + static_cast<uint32_t>(s.word), data, size) == 0)
                return s.rank;
        }
    }
    // Starts loading the first slot a lookup of this key probes.
    void prefetch(const char* data, size_t size) const {
        if (!slots_.empty()) __builtin_prefetch(&slots_[static_cast<size_t>(hash_bytes(data, size)) & mask_]);
    }
    size_t size() const { return count_; }
    size_t memory_bytes() const { return slots_.size() * sizeof(Slot) + arena_.size(); }
    void stream_in() const {
        llmfast::stream_in(slots_.data(), slots_.size() * sizeof(Slot));
        llmfast::stream_in(arena_.data(), arena_.size());
    }

   private:
    static constexpr uint32_t kEmpty = UINT32_MAX;
    // Keys of up to 8 bytes (most tokens) live in the slot itself; longer ones in the arena, the slot holding a
    // 32-bit tag of their hash and their offset.
    static constexpr size_t kInlineBytes = 8;
    struct Slot {
        uint64_t word = 0;  // inline_word() of the key, or tag << 32 | arena offset
        uint32_t len = kEmpty;
        Rank rank = kNoRank;
    };
    // Together with the length, identifies a key of up to 8 bytes: its first and last four bytes cover it (or, below
    // four bytes, its first, middle and last byte).
    static uint64_t inline_word(const char* p, size_t n) {
        if (n >= 4) {
            uint32_t lo, hi;
            std::memcpy(&lo, p, 4);
            std::memcpy(&hi, p + n - 4, 4);
            return lo | uint64_t(hi) << 32;
        }
        if (n == 0) return 0;
        return uint64_t(uint8_t(p[0])) | uint64_t(uint8_t(p[n >> 1])) << 8 | uint64_t(uint8_t(p[n - 1])) << 16;
    }
    LargeTable<Slot> slots_;
    std::string arena_;
    size_t mask_ = 0;
    size_t count_ = 0;
};

// Open-addressing hash table from a pair of token ranks to the rank of their concatenated bytes. Since every part
// of a piece is a token, the merge loop looks pairs up here and never touches bytes: one multiply to hash, one
// slot (8 bytes packed, else 16) to compare.
class PairRankMap {
   public:
    void build(const std::vector<std::pair<uint64_t, Rank>>& entries);
    Rank find(Rank left, Rank right) const {
        if (!may_contain(left, right)) return kNoRank;
        if (!packed_.empty()) {
            // A pair with a part >= 2^20 was never stored in the packed form.
            if ((left | right) >> kPackedBits) return kNoRank;
            const uint64_t key = (static_cast<uint64_t>(left) << kPackedBits) | right;
            for (size_t i = static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);; i = (i + 1) & mask_) {
                const uint64_t slot = packed_[i];
                if ((slot & kPackedKeyMask) == key) return static_cast<Rank>(slot >> (2 * kPackedBits));
                if (slot == kEmptyKey) return kNoRank;
            }
        }
        const uint64_t key = (static_cast<uint64_t>(left) << 32) | right;
        for (size_t i = static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);; i = (i + 1) & mask_) {
            const Slot& s = slots_[i];
            if (s.key == key) return s.rank;
            if (s.key == kEmptyKey) return kNoRank;
        }
    }
    // Starts loading the slot where a lookup of (left, right) begins.
    void prefetch(Rank left, Rank right) const {
        if (!packed_.empty()) {
            const uint64_t key = (static_cast<uint64_t>(left) << kPackedBits) | right;
            __builtin_prefetch(&packed_[static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_) & mask_]);
        } else {
            const uint64_t key = (static_cast<uint64_t>(left) << 32) | right;
            __builtin_prefetch(&slots_[static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_) & mask_]);
        }
    }
    size_t memory_bytes() const {
        return slots_.size() * sizeof(Slot) + packed_.size() * sizeof(uint64_t) + filter_.size() * sizeof(uint64_t);
    }

   private:
    // Blocked Bloom filter over the stored pairs, about ten bits per pair in one 64-bit word per pair (three bits
    // set): most pairs the merge loop asks about are not tokens, and the filter, a fraction of the table's size,
    // answers those from the CPU's caches instead of a miss in the table (false positives, about 2%, just probe).
    static uint64_t filter_hash(Rank left, Rank right) {
        return ((static_cast<uint64_t>(left) << 32) | right) * 0xC2B2AE3D27D4EB4Full;
    }
    uint64_t filter_bits(uint64_t g) const {
        // The top bits of g pick the word; the 18 bits under them, three bits in it.
        return uint64_t(1) << ((g >> (filter_shift_ - 6)) & 63) | uint64_t(1) << ((g >> (filter_shift_ - 12)) & 63) |
               uint64_t(1) << ((g >> (filter_shift_ - 18)) & 63);
    }
    bool may_contain(Rank left, Rank right) const {
        const uint64_t g = filter_hash(left, right);
        const uint64_t bits = filter_bits(g);
        return (filter_[g >> filter_shift_] & bits) == bits;
    }
    LargeTable<uint64_t> filter_ = LargeTable<uint64_t>(2, ~uint64_t(0));  // before build(): everything may be there
    unsigned filter_shift_ = 63;
    static constexpr uint64_t kEmptyKey = UINT64_MAX;  // (kNoRank, kNoRank) is never a real pair
    // When every part is below 2^20 and every value below 2^24 - 1 (tiktoken's vocabularies: ranks < 2^18), a slot
    // packs left << 20 | right | value << 40 into 8 bytes: half the table, so twice the slots per cache line and
    // fewer misses in the merge loop, whose lookups depend on one another.
    static constexpr unsigned kPackedBits = 20;
    static constexpr uint64_t kPackedKeyMask = (uint64_t(1) << (2 * kPackedBits)) - 1;
    struct Slot {
        uint64_t key = kEmptyKey;
        Rank rank = kNoRank;
    };
    LargeTable<Slot> slots_ = LargeTable<Slot>(2);
    LargeTable<uint64_t> packed_;
    size_t mask_ = 1;
    int shift_ = 63;
};

// Token output written through a raw cursor. A piece of n bytes yields at most n tokens, so the encoder asks for
// room once per piece instead of checking capacity per token; kSlack spare slots let a cached piece copy all of its
// entry's token slots at once.
class TokenBuffer {
   public:
    static constexpr size_t kSlack = 8;

    TokenBuffer() = default;
    TokenBuffer(TokenBuffer&& other) noexcept : data_(other.data_), size_(other.size_), capacity_(other.capacity_) {
        other.data_ = nullptr;
        other.size_ = other.capacity_ = 0;
    }
    TokenBuffer& operator=(TokenBuffer&& other) noexcept {
        std::swap(data_, other.data_);
        std::swap(size_, other.size_);
        std::swap(capacity_, other.capacity_);
        return *this;
    }
    TokenBuffer(const TokenBuffer&) = delete;
    TokenBuffer& operator=(const TokenBuffer&) = delete;
    ~TokenBuffer() { std::free(data_); }

    const Rank* data() const { return data_; }
    size_t size() const { return size_; }
    bool empty() const { return size_ == 0; }
    void clear() { size_ = 0; }
    void reserve(size_t n) {
        if (n > capacity_) grow_to(n);
    }
    // Cursor at the end with room for n tokens (and kSlack more); finish with set_end().
    Rank* room(size_t n) {
        if (capacity_ - size_ < n + kSlack) grow_to(std::max(size_ + n + kSlack, capacity_ * 2));
        return data_ + size_;
    }
    void set_end(const Rank* end) { size_ = static_cast<size_t>(end - data_); }
    // The last slot a cursor may reach with kSlack spare slots after it: a writer that keeps its own cursor checks
    // against this once per piece instead of calling room() and set_end().
    const Rank* limit() const { return data_ + capacity_ - kSlack; }
    void push_back(Rank r) { *room(1) = r, ++size_; }

   private:
    void grow_to(size_t n) {
        Rank* p = static_cast<Rank*>(std::realloc(data_, n * sizeof(Rank)));
        if (!p) throw std::bad_alloc();
        data_ = p;
        capacity_ = n;
    }
    Rank* data_ = nullptr;
    size_t size_ = 0;
    size_t capacity_ = 0;
};

// Memo of recently encoded short pieces for one thread and one encoder. Text repeats its pieces (English and code
// reuse a few thousand words; a CJK run cuts into recurring one- or two-character chunks), so most pieces are found
// here and skip both the whole-piece lookup in the multi-megabyte vocabulary table and the merge. A piece of up to 16
// bytes is named exactly by its length and two overlapping 8-byte loads (see key_of), so keys sit inline and a
// lookup reads one 64-byte line: a set of two 32-byte entries, the most recent first.
class PieceCache {
   public:
    static constexpr size_t kMaxBytes = 16;
    // 16384 sets x 4 entries, 2 MiB: room for the distinct pieces of a long English text or the chunks of a CJK
    // novel. Four ways rather than two: text that cycles through more pieces than a set holds misses on all of them
    // (measured: 13% of 20k repeated words missed with 2 ways).
    static constexpr int kSetBits = 14;
    static constexpr size_t kWays = 4;  // entries per set, most recent first
    static constexpr size_t kSets = size_t(1) << kSetBits;
    // Ranks below 2^20 (all of tiktoken's) pack six to an entry; larger ones three.
    static constexpr Rank kNarrowRanks = Rank(1) << 20;
    static constexpr size_t kMaxTokens = 6;
    static_assert(kMaxTokens <= TokenBuffer::kSlack, "find() writes all of an entry's token slots");

    struct Key {
        uint64_t a, b;
        uint32_t len;
        uint32_t set;
    };
    // Key of a piece of 2 to kMaxBytes bytes: its first and last 8 (4, or 1 and 2) bytes, which together cover it.
    static Key key_of(const char* p, size_t n) {
        uint64_t a, b;
        if (n >= 8) {
            std::memcpy(&a, p, 8);
            std::memcpy(&b, p + n - 8, 8);
        } else if (n >= 4) {
            uint32_t x, y;
            std::memcpy(&x, p, 4);
            std::memcpy(&y, p + n - 4, 4);
            a = x;
            b = y;
        } else {
            a = uint64_t(uint8_t(p[0])) | uint64_t(uint8_t(p[n >> 1])) << 8 | uint64_t(uint8_t(p[n - 1])) << 16;
            b = 0;
        }
        const uint64_t h = (a ^ (b * 0x9E3779B97F4A7C15ull) ^ n) * 0xD6E8FEB86659FD93ull;
        return {a, b, static_cast<uint32_t>(n), static_cast<uint32_t>(h >> (64 - kSetBits))};
    }
    // How many tokens an entry holds.
    size_t capacity() const { return narrow_ ? 6 : 3; }
    // An entry's payload: `lo` holds the piece's length, the token count and the first tokens, `hi` the rest (see
    // Entry). lo is 0 for no entry (a cached piece has at least two bytes).
    struct Payload {
        uint64_t lo = 0, hi = 0;
    };
    // The payload of the entry holding the piece, or an empty one when the piece is not cached.
    Payload lookup(const Key& k) const {
        const Set& s = sets_[k.set];
        for (const Entry& e : s.entry)
            if (holds(e, k)) return {e.lo, e.hi};
        return {};
    }
    // Writes the tokens of a non-empty payload at w (all of an entry's token slots; the first `count` are the
    // piece's) and returns w + count.
    Rank* emit(const Payload& e, Rank* w) const {
        constexpr uint64_t m = kNarrowRanks - 1;
        if (narrow_) {
            w[0] = Rank(e.lo >> 8 & m);
            if ((e.lo >> 5 & 7) > 1) {  // more than one token (most pieces are one)
                w[1] = Rank(e.lo >> 28 & m);
                w[2] = Rank(e.lo >> 48 | (e.hi & 0xF) << 16);
                w[3] = Rank(e.hi >> 4 & m);
                w[4] = Rank(e.hi >> 24 & m);
                w[5] = Rank(e.hi >> 44);
            }
        } else {
            w[0] = Rank(e.lo >> 32);
            w[1] = Rank(e.hi);
            w[2] = Rank(e.hi >> 32);
        }
        return w + (e.lo >> 5 & 7);
    }
    // A payload whose token count field reads kOverflow holds no tokens: the piece has more than capacity() of them,
    // and they are kept with the long pieces (find_long()). A short piece of rare characters can take a token per
    // byte, and without this it would be merged anew every time it is met.
    static constexpr uint64_t kOverflow = 7;
    static bool overflowed(const Payload& e) { return (e.lo >> 5 & 7) == kOverflow; }
    // Starts loading the set a piece would occupy, so that a lookup issued a little later finds it in the L1.
    void prefetch(const Key& k) const {
        const char* set = reinterpret_cast<const char*>(&sets_[k.set]);
        for (size_t line = 0; line < sizeof(Set); line += 64) __builtin_prefetch(set + line);
    }
    // The entries' memory, for BytePairEncoder::warm().
    std::string_view memory() const { return {reinterpret_cast<const char*>(sets_.data()), kSets * sizeof(Set)}; }
    // Marks the piece as cached with its tokens among the long pieces (see kOverflow).
    void insert_overflow(const Key& k) { new_entry(k) = Entry{k.a, k.b, k.len | kOverflow << 5, 0}; }
    // Caches the tokens of a piece (count <= capacity()), as the most recent entry of its set.
    void insert(const Key& k, const Rank* tokens, size_t count) {
        Entry& e = new_entry(k);
        e.a = k.a;
        e.b = k.b;
        uint64_t t[6] = {};
        for (size_t i = 0; i < count; ++i) t[i] = tokens[i];
        e.lo = k.len | count << 5;
        if (narrow_) {
            e.lo |= t[0] << 8 | t[1] << 28 | t[2] << 48;
            e.hi = t[2] >> 16 | t[3] << 4 | t[4] << 24 | t[5] << 44;
        } else {
            e.lo |= t[0] << 32;
            e.hi = t[1] | t[2] << 32;
        }
    }

    // Memo of pair lookups for the merge loop, direct-mapped: slot = left << 20 | right | value << 40, with value
    // kMemoNoToken when the pair is not a token. A piece missing from the cache is merged byte by byte, and its
    // merges repeat the pairs of other pieces (the bytes of a common character, a common suffix), while the full pair
    // table is megabytes, where a lookup usually misses every CPU cache.
    static constexpr int kPairMemoBits = 13;  // 8192 slots, 64 KiB
    static constexpr uint64_t kMemoKeyMask = (uint64_t(1) << 40) - 1;
    static constexpr uint64_t kMemoNoToken = (uint64_t(1) << 24) - 1;
    uint64_t& pair_memo_slot(uint64_t key) {
        return pair_memo_[(key * 0x9E3779B97F4A7C15ull) >> (64 - kPairMemoBits)];
    }

    // Pieces longer than kMaxBytes (CJK runs above all: four-fifths of a Japanese novel's bytes are in pieces of 17
    // bytes or more; also runs of spaces in code, rules drawn with dashes, long words) cost a microsecond or more each
    // to cut and merge, and text repeats them: a set-associative cache keeps the bytes and tokens of those up to
    // kMaxLongBytes. A set is one cache line of four hashes and four entry pointers, most recent first, so a miss
    // reads no entry.
    static constexpr size_t kMaxLongBytes = 256;
    // 8192 sets x 4 ways (512 KiB of sets, entries allocated on first use): the 22 000 distinct long pieces of a
    // 1.1 MB Japanese novel nearly all keep their place, so a second pass over it finds them (with 4096 sets it ran at
    // 5.5x tiktoken instead of 8x; 1024 direct-mapped slots lost nearly all of the 7 700 in 400 KB).
    static constexpr int kLongSetBits = 13;
    static constexpr size_t kLongWays = 4;
    // Copies the cached tokens of a long piece to w and returns the end, or returns null.
    Rank* find_long(std::string_view piece, uint64_t hash, Rank* w) {
        LongSet& set = long_[hash >> (64 - kLongSetBits)];
        for (size_t i = 0; i < kLongWays; ++i) {
            if (set.hash[i] != hash || !set.entry[i] || !set.entry[i]->holds(piece)) continue;
            for (; i > 0; --i) {  // to the front: the least recently used entry is the one evicted
                std::swap(set.hash[i], set.hash[i - 1]);
                std::swap(set.entry[i], set.entry[i - 1]);
            }
            const LongEntry& e = *set.entry[0];
            std::memcpy(w, e.tokens(), e.count * sizeof(Rank));
            return w + e.count;
        }
        return nullptr;
    }
    void insert_long(std::string_view piece, uint64_t hash, const Rank* tokens, size_t count) {
        LongSet& set = long_[hash >> (64 - kLongSetBits)];
        LongEntryPtr entry = std::move(set.entry[kLongWays - 1]);  // evicted: its block is reused when large enough
        for (size_t i = kLongWays - 1; i > 0; --i) {
            set.hash[i] = set.hash[i - 1];
            set.entry[i] = std::move(set.entry[i - 1]);
        }
        const size_t need = LongEntry::bytes_for(piece.size(), count);
        if (!entry || entry->capacity < need) {
            // One block per entry, rounded up so that most later pieces fit in it: a new long piece costs one
            // allocation at most (a string and a vector cost three, a tenth of a first encode of Japanese).
            const size_t capacity = (need + 127) & ~size_t(127);
            entry.reset();
            void* block = std::malloc(capacity);
            if (!block) throw std::bad_alloc();
            entry.reset(new (block) LongEntry{static_cast<uint32_t>(capacity), 0, 0});
        }
        entry->size = static_cast<uint32_t>(piece.size());
        entry->count = static_cast<uint32_t>(count);
        std::memcpy(entry->tokens(), tokens, count * sizeof(Rank));
        std::memcpy(entry->bytes(), piece.data(), piece.size());
        set.hash[0] = hash;
        set.entry[0] = std::move(entry);
    }

    // The calling thread's cache for the encoder numbered `owner` (a few are kept per thread; taking over one
    // clears it). `narrow`: every rank of that encoder is below kNarrowRanks.
    static PieceCache& for_thread(uint64_t owner, bool narrow);

   private:
    // Key words, then the payload: bits 0-4 of `lo` the piece's length (0: empty; cached pieces have at least two
    // bytes), bits 5-7 the token count, then the tokens, 20 bits each from bit 8 on (narrow) or 32 bits each from
    // bit 32 on.
    struct Entry {
        uint64_t a = 0, b = 0, lo = 0, hi = 0;
    };
    // The piece's set makes room at the front (the least recent entry drops out): the entry a new piece goes in.
    Entry& new_entry(const Key& k) {
        Set& s = sets_[k.set];
        for (size_t i = kWays - 1; i > 0; --i) s.entry[i] = s.entry[i - 1];
        return s.entry[0];
    }
    static bool holds(const Entry& e, const Key& k) { return e.a == k.a && e.b == k.b && (e.lo & 0x1F) == k.len; }
    struct alignas(64) Set {
        Entry entry[kWays];
    };
    static_assert(sizeof(Set) == 32 * kWays, "a set is whole cache lines");
    LargeTable<Set> sets_ = LargeTable<Set>(kSets);
    std::unique_ptr<uint64_t[]> pair_memo_ = empty_pair_memo();
    static std::unique_ptr<uint64_t[]> empty_pair_memo() {
        std::unique_ptr<uint64_t[]> memo(new uint64_t[size_t(1) << kPairMemoBits]);
        std::fill_n(memo.get(), size_t(1) << kPairMemoBits, UINT64_MAX);  // key bits all ones: no pair of ranks
        return memo;
    }
    // A long piece's tokens then its bytes, in one malloc'd block of `capacity` bytes.
    struct LongEntry {
        uint32_t capacity, size, count;
        static size_t bytes_for(size_t size, size_t count) { return sizeof(LongEntry) + count * sizeof(Rank) + size; }
        Rank* tokens() { return reinterpret_cast<Rank*>(this + 1); }
        const Rank* tokens() const { return reinterpret_cast<const Rank*>(this + 1); }
        char* bytes() { return reinterpret_cast<char*>(tokens() + count); }
        bool holds(std::string_view piece) const {
            return size == piece.size() &&
                   std::memcmp(reinterpret_cast<const char*>(tokens() + count), piece.data(), size) == 0;
        }
    };
    struct FreeLongEntry {
        void operator()(LongEntry* e) const noexcept { std::free(e); }
    };
    using LongEntryPtr = std::unique_ptr<LongEntry, FreeLongEntry>;
    struct alignas(64) LongSet {
        uint64_t hash[kLongWays] = {};
        LongEntryPtr entry[kLongWays];
    };
    std::unique_ptr<LongSet[]> long_{new LongSet[size_t(1) << kLongSetBits]};
    uint64_t owner_ = 0;
    uint64_t last_use_ = 0;
    bool narrow_ = false;
    friend struct PieceCachePool;
};

// The merge engine over one vocabulary. Thread-safe for concurrent encodes once built (read-only; the piece caches
// are per thread).
class BytePairEncoder {
   public:
    // A piece is first looked up whole (tiktoken's rule). Pieces up to kShortPiece bytes go through the thread's
    // piece cache and, on a miss, the simple quadratic scan (tiny constants). Pieces that merge_cut() can cut where no
    // merge can cross (CJK runs, mostly) are encoded chunk by chunk, short chunks through the cache; what no cut
    // splits is merged whole, by the scan up to kShortPiece bytes and beyond by a heap over a linked list of parts,
    // O(n log n). Chunks up to kTrieCutPiece bytes are first cut exactly with the trie (merge_chunked), whose walk
    // from every byte costs up to the longest token's length: beyond that, straight to the heap.
    static constexpr size_t kShortPiece = PieceCache::kMaxBytes;
    static constexpr size_t kTrieCutPiece = 1024;

    BytePairEncoder() = default;
    // Throws std::invalid_argument on duplicate ranks, a missing single byte, or a byte string too large to index.
    void build(const std::vector<std::pair<std::string, Rank>>& mergeable);

    Rank rank_of(std::string_view bytes) const { return ranks_.find(bytes); }
    // Appends the tokens of one piece.
    void encode_piece(std::string_view piece, TokenBuffer& out) const { encode_piece(piece, out, piece_cache()); }
    // The same with the calling thread's cache for this encoder, fetched once per text.
    void encode_piece(std::string_view piece, TokenBuffer& out, PieceCache& cache) const {
        out.set_end(encode_piece(piece, out.room(piece.size()), cache));
    }
    // The same through a raw cursor: writes the tokens at w, which has room for one token per byte of the piece plus
    // TokenBuffer::kSlack, and returns the end.
    Rank* encode_piece(std::string_view piece, Rank* w, PieceCache& cache) const {
        if (piece.size() <= 1) {  // an empty piece (only through encode_single_piece) has no tokens
            if (piece.empty()) return w;
            *w = byte_ranks_[static_cast<uint8_t>(piece[0])];
            return w + 1;
        }
        return piece.size() <= kShortPiece ? encode_short(piece, w, cache) : encode_long(piece, w, cache);
    }
    // encode_piece() at a cursor for a short piece (2 to kShortPiece bytes) whose cache key is already known.
    Rank* encode_short_piece(std::string_view piece, const PieceCache::Key& key, Rank* w, PieceCache& cache) const {
        return encode_short(piece, key, w, cache);
    }
    // Starts loading the slot where a short piece new to the cache is looked up whole.
    void prefetch_whole_piece(std::string_view piece) const { ranks_.prefetch(piece.data(), piece.size()); }
    PieceCache& piece_cache() const { return PieceCache::for_thread(id_, max_rank_ < PieceCache::kNarrowRanks); }
    // Before a long text: reads the piece cache (and, for text with many multi-byte characters, the small cut filter
    // that CJK runs test at every character) front to back. Work done since the last call (in Python, in another
    // library) has usually pushed them out of the CPU caches, and streaming a megabyte in is several times cheaper
    // than missing on its lines one piece at a time; text that is mostly ASCII rarely reads the filter. The full
    // n-gram filter (megabytes, read only at the other boundaries) is not streamed: for 64 KB of Chinese that alone
    // cost as much as the encode. Streaming the 2 MiB cache pays only for texts long enough to touch a good part of
    // it: 70 KB of Chinese encoded 8-19% faster without it (interleaved with tiktoken), 400 KB of English 3-6% slower.
    static constexpr size_t kWarmText = 128 * 1024;
    void warm(const PieceCache& cache, bool cut_filter) const;

    size_t vocab_size() const { return ranks_.size(); }
    Rank max_rank() const { return max_rank_; }
    Rank byte_rank(uint8_t b) const { return byte_ranks_[b]; }

   private:
    // The encoders below write a piece's tokens at w, which has room for one token per byte plus
    // TokenBuffer::kSlack, and return the end.

    // A piece of 2 to kShortPiece bytes: the cache, else the whole-piece lookup and the merge.
    Rank* encode_short(std::string_view piece, Rank* w, PieceCache& cache) const {
        return encode_short(piece, PieceCache::key_of(piece.data(), piece.size()), w, cache);
    }
    Rank* encode_short(std::string_view piece, const PieceCache::Key& key, Rank* w, PieceCache& cache) const {
        const PieceCache::Payload e = cache.lookup(key);
        if (!e.lo) return encode_short_uncached(piece, key, w, cache, false);
        if (!PieceCache::overflowed(e)) return cache.emit(e, w);
        if (Rank* end = cache.find_long(piece, hash_bytes(piece.data(), piece.size()), w)) return end;
        return encode_short_uncached(piece, key, w, cache, true);  // its long entry was evicted since
    }
    // `marked`: the piece's cache set already holds its overflow mark.
    Rank* encode_short_uncached(std::string_view piece, const PieceCache::Key& key, Rank* w, PieceCache& cache,
                                bool marked) const;
    Rank* encode_long(std::string_view piece, Rank* w, PieceCache& cache) const;
    // One chunk of a cut piece (self-merging vocabularies only): a byte, a short chunk through the cache, or a long
    // one cut further (`cut_further`) or merged whole.
    Rank* encode_chunk(std::string_view chunk, Rank* w, PieceCache& cache, bool cut_further) const;
    Rank* merge_cut(std::string_view piece, Rank* w, PieceCache& cache) const;
    // A piece of up to kShortPiece bytes. `memo`: the calling thread's cache, whose pair memo then serves the lookups
    // (null: the pair table only).
    Rank* merge_short(std::string_view piece, Rank* w, PieceCache* memo) const;
    // Rank of the token made of parts left and right, or kNoRank; through the thread's pair memo when given.
    Rank pair_rank(Rank left, Rank right, PieceCache* memo) const {
        if (!memo || !memo_pairs_) return pairs_.find(left, right);
        const uint64_t key = uint64_t(left) << 20 | right;
        uint64_t& slot = memo->pair_memo_slot(key);
        if ((slot & PieceCache::kMemoKeyMask) != key) {
            const Rank found = pairs_.find(left, right);
            slot = key | uint64_t(found == kNoRank ? PieceCache::kMemoNoToken : found) << 40;
        }
        const uint64_t value = slot >> 40;
        return value == PieceCache::kMemoNoToken ? kNoRank : static_cast<Rank>(value);
    }
    Rank* merge_long(std::string_view piece, Rank* w) const;
    Rank* merge_chunked(std::string_view piece, Rank* w, PieceCache& cache) const;

    // Could a token of the vocabulary cover both byte k-1 and byte k of p[0, n) (0 < k < n)? False means no merge
    // joins them. Such a token starts at k-1 or k-2 (so its first two or three bytes are known), or starts earlier and
    // ends at k+1 or k+2 (its last four or five bytes are known), or holds p[k-3..k+2]: one set test each, the
    // first exact, the others in a Bloom filter (a false positive only costs a cut). For a CJK character boundary
    // only a token holding both characters (a word) blocks the cut.
    bool may_span(const uint8_t* p, size_t n, size_t k) const {
        const size_t left = std::min<size_t>(k, 3), right = std::min<size_t>(n - k, 3);
        uint64_t window = 0;  // byte 3 - left + i is p[k - left + i]: byte 2 is p[k-1], byte 3 is p[k]
        for (size_t i = 0; i < left + right; ++i) window |= uint64_t(p[k - left + i]) << (8 * (3 - left + i));
        if (left == 3 && right == 3) return may_span_inside(window);
        if (test_bit(starts2_, (window >> 16) & 0xFFFF)) return true;
        if (left < 2) return false;
        const uint64_t* block = ngrams_.block((window >> 8) & 0xFFFFFF);
        return NgramFilter::test(block, (window >> 8) & 0xFFFFFF, 3) ||
               (left == 3 && (NgramFilter::test(block, window & 0xFFFFFFFF, 4) ||
                              (right >= 2 && NgramFilter::test(block, window & 0xFFFFFFFFFF, 5))));
    }
    // may_span() with three bytes on each side, from window = p[k-3..k+2] little-endian: the tests without branches.
    // Between two three-byte characters (most boundaries in a CJK run) the n-grams come from a small filter that holds
    // only the n-grams that fit there, so the test reads the CPU's caches, not a table of megabytes.
    static constexpr uint64_t kThreeByteBoundaryMask = 0xC0C0F0C0C0F0ull;  // lead, two continuations, lead, two
    static constexpr uint64_t kThreeByteBoundary = 0x8080E08080E0ull;
    bool may_span_inside(uint64_t window) const {
        const NgramFilter& filter =
            (window & kThreeByteBoundaryMask) == kThreeByteBoundary ? three_byte_ngrams_ : ngrams_;
        const uint64_t* block = filter.block((window >> 8) & 0xFFFFFF);
        return test_bit(starts2_, (window >> 16) & 0xFFFF) | NgramFilter::test(block, (window >> 8) & 0xFFFFFF, 3) |
               NgramFilter::test(block, window & 0xFFFFFFFF, 4) | NgramFilter::test(block, window & 0xFFFFFFFFFF, 5) |
               NgramFilter::test(block, window & 0xFFFFFFFFFFFF, 6);
    }
    // A set of n-grams (3 to 6 bytes) as a Bloom filter blocked by cache line: every n-gram tested at a boundary k
    // contains p[k-2..k], so those three bytes pick one 64-byte block (`context`, little-endian) and the four tests of
    // a boundary read that one line instead of four random ones. Within the block each n-gram sets two of its 512
    // bits, from a hash with its own odd multiplier per length (little-endian in `bytes`).
    struct NgramFilter {
        static constexpr unsigned kBlockBits = 9;  // 512 bits: one cache line
        LargeTable<uint64_t> bits;
        unsigned bits_log2 = 0;
        // About `bits_per_entry` bits for each of `entries` n-grams, between 2^min_log2 and 2^max_log2 bits.
        void reset(size_t entries, size_t bits_per_entry, unsigned min_log2, unsigned max_log2) {
            bits_log2 = min_log2;
            while ((size_t(1) << bits_log2) < bits_per_entry * entries && bits_log2 < max_log2) ++bits_log2;
            bits.assign((size_t(1) << bits_log2) / 64, 0);
        }
        const uint64_t* block(uint64_t context) const {
            const size_t b = static_cast<size_t>((context * 0xA24BAED4963EE407ull) >> (64 - (bits_log2 - kBlockBits)));
            return bits.data() + (b << (kBlockBits - 6));
        }
        static uint64_t hash(uint64_t bytes, unsigned len) {
            static constexpr uint64_t kMultiplier[4] = {0x9E3779B97F4A7C15ull, 0xC2B2AE3D27D4EB4Full,
                                                        0x165667B19E3779F9ull, 0xD6E8FEB86659FD93ull};
            return bytes * kMultiplier[len - 3];
        }
        // The two bits of the block that an n-gram's hash names.
        static unsigned first_bit(uint64_t h) { return static_cast<unsigned>(h >> (64 - kBlockBits)); }
        static unsigned second_bit(uint64_t h) {
            return static_cast<unsigned>(h >> (64 - 2 * kBlockBits)) & ((1u << kBlockBits) - 1);
        }
        static bool test(const uint64_t* block, uint64_t bytes, unsigned len) {
            const uint64_t h = hash(bytes, len);
            const unsigned a = first_bit(h), b = second_bit(h);
            return (block[a >> 6] >> (a & 63) & 1) & (block[b >> 6] >> (b & 63) & 1);
        }
        void add(uint64_t context, uint64_t bytes, unsigned len) {
            uint64_t* blk = const_cast<uint64_t*>(block(context));
            const uint64_t h = hash(bytes, len);
            const unsigned a = first_bit(h), b = second_bit(h);
            blk[a >> 6] |= uint64_t(1) << (a & 63);
            blk[b >> 6] |= uint64_t(1) << (b & 63);
        }
    };
    // Rank of the token that is the three-byte UTF-8 character at c, or kNoRank (also for any three bytes that are
    // not such a character: callers then take the general path).
    Rank char3_rank(const uint8_t* c) const {
        if ((c[0] & 0xF0) != 0xE0 || (c[1] & 0xC0) != 0x80 || (c[2] & 0xC0) != 0x80) return kNoRank;
        return char3_rank_[char3_index(c[0], c[1], c[2])];
    }
    // The character's 16 payload bits: a direct index, so the characters of one script share cache lines (kana,
    // the CJK ideographs) instead of scattering over a hash table.
    static size_t char3_index(uint8_t lead, uint8_t second, uint8_t third) {
        return size_t(lead & 0x0F) << 12 | size_t(second & 0x3F) << 6 | (third & 0x3F);
    }
    template <class Bits>
    static bool test_bit(const Bits& bits, size_t i) { return bits[i >> 6] >> (i & 63) & 1; }

    BytesRankMap ranks_;
    BytesRankMap long_ranks_;  // the tokens longer than kShortPiece (a few thousand): a small table for long pieces
    PairRankMap pairs_;
    std::vector<Rank> byte_pair_ranks_;  // rank of each two-byte string (65536 entries): the first merges
    // Byte trie of all tokens: root_child_[b] and trie_ (node, byte) -> child; node_rank_[node] is the rank of the
    // token spelled by the path to node, or kNoRank.
    uint32_t root_child_[256] = {};
    std::vector<uint32_t> depth2_;  // node of each two-byte prefix (65536 entries), or UINT32_MAX
    PairRankMap trie_;
    std::vector<Rank> node_rank_;
    Rank byte_ranks_[256] = {};
    Rank max_rank_ = 0;
    // Bit sets for may_span(): bit (a | b << 8) of starts2_ is set when a token of two or more bytes starts with a b;
    // ngrams_ holds the first three, last four and last five bytes of each token and every six consecutive bytes
    // inside one; three_byte_ngrams_ those of them that fit the window between two three-byte characters
    // (kThreeByteBoundary): a few hundred for cl100k, 54 000 for o200k, kilobytes instead of megabytes.
    std::vector<uint64_t> starts2_;
    NgramFilter ngrams_;
    NgramFilter three_byte_ngrams_;
    // Rank of each three-byte character that is a token, by char3_index() (65536 entries): most chunks of a CJK run
    // are one such character.
    std::vector<Rank> char3_rank_;
    // Every token's own bytes merge into that token (true of tiktoken's vocabularies). Then a chunk of a piece encodes
    // like a piece of the same bytes, so chunks can share the piece cache.
    bool self_merging_ = false;
    bool memo_pairs_ = false;  // every rank below 2^20 - 1, so a pair packs into a memo slot's 40 key bits
    uint64_t id_ = 0;  // unique per build, never reused: names this vocabulary's piece caches
};

}  // namespace llmfast
