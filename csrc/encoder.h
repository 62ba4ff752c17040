// The tokenizer core: vocabulary, special tokens, pre-tokenizer choice, encode and decode. No Python in here.
//
// Encoding with a native pre-tokenizer runs entirely here: special-token split, pre-tokenization of each segment,
// then the byte-pair merge of each piece. Encodings whose pattern has no native scanner get their pieces from the
// caller (the Python binding runs the pattern through the `regex` package) and use encode_pieces().
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bpe.h"

namespace llmfast {

class Encoder {
   public:
    // `pattern` is the tiktoken pat_str; when it is one of the patterns with a native scanner, encode() and
    // encode_ordinary() pre-tokenize natively. Throws std::invalid_argument on a malformed vocabulary.
    Encoder(const std::vector<std::pair<std::string, Rank>>& mergeable,
            const std::vector<std::pair<std::string, Rank>>& specials, std::string_view pattern);

    bool has_native_pattern() const { return pattern_kind_ >= 0; }
    size_t n_specials() const { return specials_.size(); }
    const std::string& special_bytes(size_t index) const { return specials_[index].first; }
    Rank special_rank(size_t index) const { return specials_[index].second; }
    Rank max_token_value() const { return max_token_value_; }
    const BytePairEncoder& bpe() const { return bpe_; }

    // Encodes `text`, turning occurrences of the specials whose mask byte is non-zero into their ranks (mask may be
    // null: none allowed). Each stretch between specials is pre-tokenized on its own, as tiktoken does. Requires a
    // native pattern.
    void encode(std::string_view text, const uint8_t* allowed_mask, TokenBuffer& out) const;
    void encode_ordinary(std::string_view text, TokenBuffer& out) const;
    // Readies this thread's piece cache and the cut filters for about `text_bytes` of text like `sample` (see
    // BytePairEncoder::warm()); encode() and encode_ordinary() do it for their own text.
    void prepare(size_t text_bytes, std::string_view sample) const;
    // Whether a strided sample of `text` has many bytes of multi-byte characters (an eighth or more).
    static bool mostly_multibyte(std::string_view text);
    // Byte-pair encodes each already split piece.
    void encode_pieces(const std::vector<std::string_view>& pieces, TokenBuffer& out) const;

    // Leftmost occurrence at or after `from` of a special token whose mask byte is set; the longest one at that
    // position. Returns false when there is none.
    bool find_special(std::string_view text, size_t from, const uint8_t* mask, size_t& pos, size_t& index) const;

    // Bytes of one token (mergeable or special); false when the id is unknown.
    bool token_bytes(Rank id, std::string_view& out) const;
    // Concatenated bytes of `ids`; on an unknown id returns false and sets `bad_position`.
    bool decode(const Rank* ids, size_t n, std::string& out, size_t& bad_position) const;
    // Byte length of the decoded `ids`, or SIZE_MAX (with bad_position set) on an unknown id.
    size_t decoded_size(const Rank* ids, size_t n, size_t& bad_position) const;
    // Writes the bytes of already validated `ids` into `dst`, which holds `size` = decoded_size() bytes.
    void decode_into(const Rank* ids, size_t n, char* dst, size_t size) const;

   private:
    void encode_segment(std::string_view segment, TokenBuffer& out, PieceCache& cache) const;
    uint64_t lookup_decoder(Rank id) const;

    BytePairEncoder bpe_;
    std::vector<std::pair<std::string, Rank>> specials_;
    BytesRankMap special_index_;  // special bytes -> index into specials_
    bool special_first_byte_[256] = {};
    int only_first_byte_ = -1;  // the first byte of every special when they share one ("<" in tiktoken's), else -1
    std::vector<size_t> special_lengths_;  // distinct lengths, longest first
    int pattern_kind_ = -1;
    Rank max_token_value_ = 0;

    // Decoder: rank -> (offset << 32 | length) into decode_arena_. Dense when ranks are compact, else a sorted table.
    static constexpr uint64_t kMissing = UINT64_MAX;
    std::string decode_arena_;
    std::vector<uint64_t> dense_;
    std::vector<std::pair<Rank, uint64_t>> sparse_;
    // With a dense decoder, each rank's bytes inline when they fit (most tokens), so decoding a token reads one
    // 16-byte entry (one cache line) instead of a table slot and then the arena.
    struct InlineToken {
        char bytes[15];
        uint8_t len;  // <= 15: the bytes are inline; else kInlineLong (see dense_) or kInlineMissing
    };
    static constexpr uint8_t kInlineLong = 0xFF, kInlineMissing = 0xFE;
    std::vector<InlineToken> inline_;
};

// Whether the calling thread is one of the pool's worker threads.
bool in_pool_worker();
// Test hook: the next `n` calls of maybe_inject_worker_fault() on a pool worker thread throw std::runtime_error, so
// tests can prove a worker's exception reaches the caller (never a hang). One relaxed atomic load when unused.
void inject_worker_faults(long long n);
void maybe_inject_worker_fault();

// Runs fn(t) for t in [0, threads) at the same time: t = 0 on the calling thread, the others on a pool of worker
// threads kept for the process's life. Returns when all have returned; the first exception thrown is rethrown.
void parallel_run(size_t threads, const std::function<void(size_t)>& fn);

// Runs fn(i) for i in [0, n) on up to `threads` threads (the caller's thread included), handing out indices in
// order. The first exception thrown by any call is rethrown here after all threads stop.
void parallel_for(size_t n, size_t threads, const std::function<void(size_t)>& fn);

}  // namespace llmfast
