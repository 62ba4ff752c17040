// Byte-level BPE training: no Python in here (bind_training() in train_bpe.cpp is the binding).
//
// Text is pre-tokenized into pieces, identical pieces are counted once with their frequency, and merges are learned
// by repeatedly joining the most frequent adjacent pair. Pair counts are updated incrementally: a merge touches only
// the words that contain the pair (found through a per-pair word index) and adjusts the counts of the pairs around
// each occurrence; a max-heap with lazy invalidation yields the next pair. Nothing is recounted per merge.
#pragma once
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace llmfast {

class BpeTrainer {
   public:
    // `pattern`: a pat_str with a native pre-tokenizer, or empty to feed pieces with add_piece().
    explicit BpeTrainer(std::string_view pattern);
    bool has_native_pattern() const { return pattern_kind_ >= 0; }

    // Pre-tokenizes `text` natively and counts its pieces.
    void add_text(std::string_view text);
    // Counts one already split piece `count` times.
    void add_piece(std::string_view piece, uint64_t count);
    size_t distinct_pieces() const { return piece_counts_.size(); }

    // Learns up to `n_merges` merges over the 256 single bytes; returns the bytes of each new token, in rank order
    // (rank 256 + i). Stops early when no pair is left. Ties on count go to the pair whose token
    // ids are smaller (deterministic). A merge whose bytes already name a token re-uses it and adds nothing.
    std::vector<std::string> train(size_t n_merges);

    // Not taken by the methods above: the binding holds it around every call (see bindings.cpp).
    std::mutex& mutex() { return mutex_; }

   private:
    std::mutex mutex_;
    int pattern_kind_ = -1;
    std::unordered_map<std::string, uint64_t> piece_counts_;
};

}  // namespace llmfast
