#include <cstring>
#include "encoder.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#if __has_include("pretokenize.h")
#include "pretokenize.h"
#define LLMFAST_HAVE_PRETOKENIZE 1
#else
#define LLMFAST_HAVE_PRETOKENIZE 0
#endif

namespace llmfast {

namespace {
// Above this many ranks per token the decoder uses a sorted table instead of a dense array (a vocabulary with a
// few huge ranks must not allocate gigabytes).
constexpr size_t kDenseSlack = size_t(1) << 20;
}  // namespace

Encoder::Encoder(const std::vector<std::pair<std::string, Rank>>& mergeable,
                 const std::vector<std::pair<std::string, Rank>>& specials, std::string_view pattern) {
    bpe_.build(mergeable);
    max_token_value_ = bpe_.max_rank();

    // Special tokens: a table from bytes to index, the set of first bytes (a cheap filter while scanning), and the
    // distinct lengths (longest first, so the longest special at a position wins).
    std::vector<std::pair<std::string_view, Rank>> views;
    for (size_t i = 0; i < specials.size(); ++i) {
        const auto& [bytes, rank] = specials[i];
        if (bytes.empty()) throw std::invalid_argument("special token is the empty string");
        if (rank == kNoRank) throw std::invalid_argument("special token rank 4294967295 is reserved");
        specials_.emplace_back(bytes, rank);
        special_first_byte_[static_cast<uint8_t>(bytes[0])] = true;
        special_lengths_.push_back(bytes.size());
        max_token_value_ = std::max(max_token_value_, rank);
    }
    // Views into specials_, which no longer reallocates.
    for (size_t i = 0; i < specials_.size(); ++i) views.emplace_back(specials_[i].first, static_cast<Rank>(i));
    if (!special_index_.build(views)) throw std::invalid_argument("duplicate special token");
    std::sort(special_lengths_.begin(), special_lengths_.end(), std::greater<size_t>());
    only_first_byte_ = specials_.empty() ? -1 : static_cast<uint8_t>(specials_[0].first[0]);
    for (const auto& special : specials_)
        if (static_cast<uint8_t>(special.first[0]) != only_first_byte_) only_first_byte_ = -1;
    special_lengths_.erase(std::unique(special_lengths_.begin(), special_lengths_.end()), special_lengths_.end());

    // Decoder over mergeable tokens, then specials (a mergeable token keeps its rank if a special reuses it, as in
    // tiktoken, which looks the mergeable decoder up first).
    size_t total = 0, count = mergeable.size() + specials_.size();
    for (const auto& e : mergeable) total += e.first.size();
    for (const auto& e : specials_) total += e.first.size();
    if (total >= UINT32_MAX) throw std::invalid_argument("vocabulary too large");
    decode_arena_.reserve(total);
    const bool dense = static_cast<size_t>(max_token_value_) < 2 * count + kDenseSlack;
    if (dense) dense_.assign(static_cast<size_t>(max_token_value_) + 1, kMissing);
    auto add = [&](const std::string& bytes, Rank rank) {
        const uint64_t entry = (static_cast<uint64_t>(decode_arena_.size()) << 32) | bytes.size();
        if (dense) {
            if (dense_[rank] != kMissing) return;
            dense_[rank] = entry;
        } else {
            sparse_.emplace_back(rank, entry);
        }
        decode_arena_.append(bytes);
    };
    for (const auto& [bytes, rank] : mergeable) add(bytes, rank);
    for (const auto& [bytes, rank] : specials_) add(bytes, rank);
    if (dense) {
        inline_.resize(dense_.size());
        for (size_t rank = 0; rank < dense_.size(); ++rank) {
            InlineToken& t = inline_[rank];
            const uint64_t e = dense_[rank];
            const size_t len = static_cast<uint32_t>(e);
            if (e == kMissing) {
                t.len = kInlineMissing;
            } else if (len <= sizeof(t.bytes)) {
                std::memcpy(t.bytes, decode_arena_.data() + (e >> 32), len);
                t.len = static_cast<uint8_t>(len);
            } else {
                t.len = kInlineLong;
            }
        }
    } else {
        // Stable sort keeps the mergeable entry first when a special shares its rank; then drop the later ones.
        std::stable_sort(sparse_.begin(), sparse_.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
        sparse_.erase(std::unique(sparse_.begin(), sparse_.end(),
                                  [](const auto& a, const auto& b) { return a.first == b.first; }),
                      sparse_.end());
    }

#if LLMFAST_HAVE_PRETOKENIZE
    if (auto kind = recognize_pattern(pattern)) pattern_kind_ = static_cast<int>(*kind);
#else
    (void)pattern;
#endif
}

bool Encoder::find_special(std::string_view text, size_t from, const uint8_t* mask, size_t& pos,
                           size_t& index) const {
    if (!mask || specials_.empty()) return false;
    const char* data = text.data();
    const size_t n = text.size();
    for (size_t i = from; i < n; ++i) {
        if (only_first_byte_ >= 0) {  // memchr skips to the candidates many bytes at a time
            const void* hit = std::memchr(data + i, only_first_byte_, n - i);
            if (!hit) return false;
            i = static_cast<size_t>(static_cast<const char*>(hit) - data);
        } else if (!special_first_byte_[static_cast<uint8_t>(data[i])]) {
            continue;
        }
        for (size_t len : special_lengths_) {
            if (len > n - i) continue;
            const Rank idx = special_index_.find(data + i, len);
            if (idx != kNoRank && mask[idx]) {
                pos = i;
                index = idx;
                return true;
            }
        }
    }
    return false;
}

void Encoder::encode_segment(std::string_view segment, TokenBuffer& out, PieceCache& cache) const {
#if LLMFAST_HAVE_PRETOKENIZE
    // Pieces are merged as the scanner finds them, kLag pieces behind it: no piece list in between, and the memory
    // each piece needs loads while the pieces before it are merged. A short piece's cache set is prefetched when the
    // scanner finds it; kProbe pieces later the set is looked up: a hit keeps its entry's payload (the set is read
    // once, and a later insert into the set cannot change what was found), a piece that will miss gets the slot of
    // its whole-piece lookup prefetched. (A cached piece takes a few tens of nanoseconds, a miss to memory about a
    // hundred: hence a few pieces of lag.) Tried and slower: batches of 16 pieces in three passes (more loop
    // overhead than the ring's bookkeeping).
    constexpr size_t kLag = 4, kProbe = 2;
    struct Pending {
        std::string_view piece;
        PieceCache::Key key;
        PieceCache::Payload cached;  // the cache's entry, once looked up and found
        bool short_piece;
    };
    const char* base = segment.data();
    Pending pending[kLag];
    size_t found = 0;
    // Tokens go through a local cursor: a piece of n bytes yields at most n tokens, so one comparison per piece
    // keeps room, and the buffer's size is written once at the end.
    Rank* w = out.room(0);
    const Rank* limit = out.limit();
    auto encode_pending = [&](const Pending& p) {
        if (static_cast<size_t>(limit - w) < p.piece.size()) {
            out.set_end(w);
            w = out.room(p.piece.size());
            limit = out.limit();
        }
        if (!p.short_piece)
            w = bpe_.encode_piece(p.piece, w, cache);
        else if (p.cached.lo && !PieceCache::overflowed(p.cached))
            w = cache.emit(p.cached, w);
        else  // a miss, a piece with more tokens than an entry holds, or one of the last pieces, not looked up: the
              // cache once more (an earlier piece may have inserted it since), then the merge
            w = bpe_.encode_short_piece(p.piece, p.key, w, cache);
    };
    for_each_piece(static_cast<PatternKind>(pattern_kind_), segment, [&](size_t begin, size_t end) {
        Pending& slot = pending[found % kLag];
        if (found >= kLag) encode_pending(slot);
        slot.piece = std::string_view(base + begin, end - begin);
        slot.short_piece = slot.piece.size() - 2 <= BytePairEncoder::kShortPiece - 2;  // 2 to kShortPiece bytes
        if (slot.short_piece) {
            slot.key = PieceCache::key_of(slot.piece.data(), slot.piece.size());
            cache.prefetch(slot.key);
        }
        if (found >= kProbe) {
            Pending& probe = pending[(found - kProbe) % kLag];
            if (probe.short_piece) {
                probe.cached = cache.lookup(probe.key);
                if (!probe.cached.lo) bpe_.prefetch_whole_piece(probe.piece);
            }
        }
        ++found;
    });
    // The last kProbe pieces were never looked up (their payload slots hold an earlier piece's).
    for (size_t i = found > kProbe ? found - kProbe : 0; i < found; ++i) pending[i % kLag].cached = {};
    for (size_t i = found > kLag ? found - kLag : 0; i < found; ++i) encode_pending(pending[i % kLag]);
    out.set_end(w);
#else
    (void)segment;
    (void)out;
    (void)cache;
    throw std::logic_error("no native pre-tokenizer in this build");
#endif
}

void Encoder::encode(std::string_view text, const uint8_t* allowed_mask, TokenBuffer& out) const {
    if (!has_native_pattern()) throw std::logic_error("this encoding's pattern has no native pre-tokenizer");
    PieceCache& cache = bpe_.piece_cache();
    prepare(text.size(), text);
    size_t start = 0;
    for (;;) {
        size_t pos = 0, index = 0;
        const bool found = find_special(text, start, allowed_mask, pos, index);
        const size_t end = found ? pos : text.size();
        if (end > start) encode_segment(text.substr(start, end - start), out, cache);
        if (!found) break;
        out.push_back(specials_[index].second);
        start = pos + specials_[index].first.size();
    }
}

void Encoder::encode_ordinary(std::string_view text, TokenBuffer& out) const {
    if (!has_native_pattern()) throw std::logic_error("this encoding's pattern has no native pre-tokenizer");
    PieceCache& cache = bpe_.piece_cache();
    prepare(text.size(), text);
    if (!text.empty()) encode_segment(text, out, cache);
}

void Encoder::prepare(size_t text_bytes, std::string_view sample) const {
    if (text_bytes >= BytePairEncoder::kWarmText) bpe_.warm(bpe_.piece_cache(), mostly_multibyte(sample));
}

bool Encoder::mostly_multibyte(std::string_view text) {
    constexpr size_t kSamples = 1024;
    const size_t step = std::max<size_t>(1, text.size() / kSamples);
    size_t seen = 0, high = 0;
    for (size_t i = 0; i < text.size() && seen < kSamples; i += step, ++seen)
        high += static_cast<uint8_t>(text[i]) >= 0x80;
    return high * 8 >= seen && seen > 0;
}

void Encoder::encode_pieces(const std::vector<std::string_view>& pieces, TokenBuffer& out) const {
    PieceCache& cache = bpe_.piece_cache();
    for (std::string_view piece : pieces) bpe_.encode_piece(piece, out, cache);
}

uint64_t Encoder::lookup_decoder(Rank id) const {
    if (!dense_.empty() || sparse_.empty()) return id < dense_.size() ? dense_[id] : kMissing;
    auto it = std::lower_bound(sparse_.begin(), sparse_.end(), id,
                               [](const auto& e, Rank r) { return e.first < r; });
    return it != sparse_.end() && it->first == id ? it->second : kMissing;
}

bool Encoder::token_bytes(Rank id, std::string_view& out) const {
    const uint64_t e = lookup_decoder(id);
    if (e == kMissing) return false;
    out = std::string_view(decode_arena_.data() + (e >> 32), static_cast<uint32_t>(e));
    return true;
}

size_t Encoder::decoded_size(const Rank* ids, size_t n, size_t& bad_position) const {
    size_t total = 0;
    if (!inline_.empty()) {
        for (size_t i = 0; i < n; ++i) {
            const Rank id = ids[i];
            const uint8_t len = id < inline_.size() ? inline_[id].len : kInlineMissing;
            if (len <= sizeof(InlineToken::bytes)) {
                total += len;
            } else if (len == kInlineLong) {
                total += static_cast<uint32_t>(dense_[id]);
            } else {
                bad_position = i;
                return SIZE_MAX;
            }
        }
        return total;
    }
    for (size_t i = 0; i < n; ++i) {
        const uint64_t e = lookup_decoder(ids[i]);
        if (e == kMissing) {
            bad_position = i;
            return SIZE_MAX;
        }
        total += static_cast<uint32_t>(e);
    }
    return total;
}

void Encoder::decode_into(const Rank* ids, size_t n, char* dst, size_t size) const {
    const char* arena = decode_arena_.data();
    if (!inline_.empty()) {
        // Whole 16-byte entries are copied while that much room is left (then the next token overwrites the excess).
        char* const end = dst + size;
        for (size_t i = 0; i < n; ++i) {
            const InlineToken& t = inline_[ids[i]];
            if (t.len <= sizeof(t.bytes)) {
                std::memcpy(dst, t.bytes, end - dst >= static_cast<ptrdiff_t>(sizeof(t)) ? sizeof(t) : t.len);
                dst += t.len;
            } else {
                const uint64_t e = dense_[ids[i]];
                std::memcpy(dst, arena + (e >> 32), static_cast<uint32_t>(e));
                dst += static_cast<uint32_t>(e);
            }
        }
        return;
    }
    for (size_t i = 0; i < n; ++i) {
        const uint64_t e = lookup_decoder(ids[i]);
        const size_t len = static_cast<uint32_t>(e);
        std::memcpy(dst, arena + (e >> 32), len);
        dst += len;
    }
}

bool Encoder::decode(const Rank* ids, size_t n, std::string& out, size_t& bad_position) const {
    const size_t size = decoded_size(ids, n, bad_position);
    if (size == SIZE_MAX) return false;
    const size_t old = out.size();
    out.resize(old + size);
    decode_into(ids, n, out.data() + old, size);
    return true;
}

namespace {
thread_local bool t_in_pool_worker = false;
std::atomic<long long> g_worker_faults{0};
}  // namespace

bool in_pool_worker() { return t_in_pool_worker; }

void inject_worker_faults(long long n) { g_worker_faults.store(n, std::memory_order_relaxed); }

void maybe_inject_worker_fault() {
    if (!t_in_pool_worker || g_worker_faults.load(std::memory_order_relaxed) <= 0) return;
    if (g_worker_faults.fetch_sub(1, std::memory_order_relaxed) > 0)
        throw std::runtime_error("injected failure in a tokenizer worker thread (llmfast._C._inject_worker_faults)");
}

namespace {

// Worker threads kept for the life of the process, so each keeps its piece caches warm from one batch to the next
// (a fresh thread would start with empty caches and pay for every piece again). One run at a time; a run from a
// second caller waits for the first. Never destroyed: threads parked on a condition variable are harmless at exit,
// while joining them during static destruction is not.
class WorkerPool {
   public:
    // Callers run without the GIL, so two threads may ask for the pool at once: creation is under create_mutex_
    // (one pool, never two half-built ones). The fork handlers hold that mutex across fork(), so a child never
    // inherits it locked, and reset the child's pool.
    static WorkerPool& instance() {
        static std::once_flag registered;
        std::call_once(registered, [] {
#if defined(__unix__) || defined(__APPLE__)
            // A forked child has none of the parent's threads (and maybe a locked mutex): it starts a new pool.
            pthread_atfork([] { create_mutex_.lock(); }, [] { create_mutex_.unlock(); },
                           [] {
                               current_.store(nullptr, std::memory_order_relaxed);
                               create_mutex_.unlock();
                           });
#endif
        });
        WorkerPool* pool = current_.load(std::memory_order_acquire);
        if (pool) return *pool;
        std::lock_guard<std::mutex> lock(create_mutex_);
        pool = current_.load(std::memory_order_relaxed);
        if (!pool) {
            pool = new WorkerPool();
            current_.store(pool, std::memory_order_release);
        }
        return *pool;
    }

    void run(size_t threads, const std::function<void(size_t)>& fn) {
        std::lock_guard<std::mutex> one_run(run_mutex_);
        std::exception_ptr error;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            while (workers_ < threads - 1) {
                std::thread(&WorkerPool::work, this, workers_++).detach();
            }
            job_ = &fn;
            helpers_ = threads - 1;
            remaining_ = threads - 1;
            error_ = nullptr;
            ++generation_;
        }
        wake_.notify_all();
        try {
            fn(0);
        } catch (...) {
            error = std::current_exception();
        }
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [this] { return remaining_ == 0; });
        if (!error) error = error_;
        if (error) std::rethrow_exception(error);
    }

   private:
    void work(size_t index) {
        t_in_pool_worker = true;
        uint64_t seen = 0;
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            wake_.wait(lock, [&] { return generation_ != seen; });
            seen = generation_;
            if (index >= helpers_) continue;
            const std::function<void(size_t)>* job = job_;
            lock.unlock();
            std::exception_ptr error;
            try {
                (*job)(index + 1);
            } catch (...) {
                error = std::current_exception();
            }
            lock.lock();
            if (error && !error_) error_ = error;
            if (--remaining_ == 0) done_.notify_one();
        }
    }

    static inline std::atomic<WorkerPool*> current_{nullptr};
    static inline std::mutex create_mutex_;
    std::mutex run_mutex_;
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    const std::function<void(size_t)>* job_ = nullptr;
    uint64_t generation_ = 0;
    size_t workers_ = 0, helpers_ = 0, remaining_ = 0;
    std::exception_ptr error_;
};

}  // namespace

void parallel_run(size_t threads, const std::function<void(size_t)>& fn) {
    if (threads <= 1) {
        fn(0);
        return;
    }
    WorkerPool::instance().run(threads, fn);
}

void parallel_for(size_t n, size_t threads, const std::function<void(size_t)>& fn) {
    threads = std::max<size_t>(1, std::min(threads, n));
    std::atomic<size_t> next{0};
    parallel_run(threads, [&](size_t) {
        for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
            try {
                fn(i);
            } catch (...) {
                next.store(n, std::memory_order_relaxed);  // the others stop early
                throw;
            }
        }
    });
}

}  // namespace llmfast
