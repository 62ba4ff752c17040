#include "train_bpe.h"

#include <algorithm>
#include <queue>
#include <stdexcept>
#include <utility>

#include "pretokenize.h"

namespace llmfast {

namespace {

inline uint64_t pair_key(uint32_t a, uint32_t b) { return (static_cast<uint64_t>(a) << 32) | b; }

struct HeapEntry {
    int64_t count;
    uint64_t pair;
    // Max-heap on count; among equal counts the smaller pair key (smaller token ids) comes first.
    bool operator<(const HeapEntry& o) const { return count < o.count || (count == o.count && pair > o.pair); }
};

struct Word {
    std::vector<uint32_t> symbols;
    int64_t count;
};

// Adjacent pairs of `symbols`, sorted (with repeats), for diffing a word before and after a merge.
void sorted_pairs(const std::vector<uint32_t>& symbols, std::vector<uint64_t>& out) {
    out.clear();
    for (size_t j = 0; j + 1 < symbols.size(); ++j) out.push_back(pair_key(symbols[j], symbols[j + 1]));
    std::sort(out.begin(), out.end());
}

}  // namespace

BpeTrainer::BpeTrainer(std::string_view pattern) {
    if (!pattern.empty()) {
        if (auto kind = recognize_pattern(pattern)) pattern_kind_ = static_cast<int>(*kind);
    }
}

void BpeTrainer::add_text(std::string_view text) {
    if (!has_native_pattern()) throw std::logic_error("this trainer's pattern has no native pre-tokenizer");
    std::string key;
    for_each_piece(static_cast<PatternKind>(pattern_kind_), text, [&](size_t begin, size_t end) {
        key.assign(text.data() + begin, end - begin);
        auto it = piece_counts_.find(key);
        if (it != piece_counts_.end())
            ++it->second;
        else
            piece_counts_.emplace(key, 1);
    });
}

void BpeTrainer::add_piece(std::string_view piece, uint64_t count) {
    if (piece.empty() || count == 0) return;
    piece_counts_[std::string(piece)] += count;
}

std::vector<std::string> BpeTrainer::train(size_t n_merges) {
    // Words in a fixed (sorted) order, so training is deterministic whatever the hash map's order.
    std::vector<std::pair<std::string, uint64_t>> pieces(piece_counts_.begin(), piece_counts_.end());
    std::sort(pieces.begin(), pieces.end());
    std::vector<Word> words;
    words.reserve(pieces.size());
    for (const auto& [bytes, count] : pieces) {
        if (bytes.size() < 2) continue;  // a single byte never takes part in a merge
        Word w;
        w.count = static_cast<int64_t>(std::min<uint64_t>(count, INT64_MAX / 4));
        w.symbols.assign(reinterpret_cast<const uint8_t*>(bytes.data()),
                         reinterpret_cast<const uint8_t*>(bytes.data()) + bytes.size());
        words.push_back(std::move(w));
    }
    pieces.clear();

    std::vector<std::string> token_bytes(256);
    std::unordered_map<std::string, uint32_t> token_id;
    for (int b = 0; b < 256; ++b) {
        token_bytes[b] = std::string(1, static_cast<char>(b));
        token_id.emplace(token_bytes[b], b);
    }

    // Initial pair counts and, per pair, the words holding it (each word listed once per pair it gained).
    std::unordered_map<uint64_t, int64_t> counts;
    std::unordered_map<uint64_t, std::vector<uint32_t>> where;
    for (uint32_t i = 0; i < words.size(); ++i) {
        const auto& s = words[i].symbols;
        for (size_t j = 0; j + 1 < s.size(); ++j) {
            const uint64_t k = pair_key(s[j], s[j + 1]);
            counts[k] += words[i].count;
            auto& list = where[k];
            if (list.empty() || list.back() != i) list.push_back(i);
        }
    }
    std::priority_queue<HeapEntry> heap;
    for (const auto& [k, c] : counts) heap.push({c, k});

    std::vector<std::string> merges;
    std::vector<uint64_t> before, after;
    std::vector<uint32_t> merged;
    while (merges.size() < n_merges && !heap.empty()) {
        const HeapEntry top = heap.top();
        heap.pop();
        auto cit = counts.find(top.pair);
        if (cit == counts.end() || cit->second != top.count) continue;  // stale entry
        if (top.count <= 0) break;
        const uint32_t a = static_cast<uint32_t>(top.pair >> 32), b = static_cast<uint32_t>(top.pair);
        std::string bytes = token_bytes[a] + token_bytes[b];
        uint32_t id;
        auto tit = token_id.find(bytes);
        if (tit != token_id.end()) {
            id = tit->second;  // same bytes reached by another split: re-use the token
        } else {
            id = static_cast<uint32_t>(token_bytes.size());
            token_bytes.push_back(bytes);
            token_id.emplace(bytes, id);
            merges.push_back(std::move(bytes));
        }
        std::vector<uint32_t> holders = std::move(where[top.pair]);
        where.erase(top.pair);
        for (uint32_t wi : holders) {
            Word& w = words[wi];
            auto& s = w.symbols;
            // Replace each occurrence of (a, b), left to right, without overlaps.
            merged.clear();
            bool changed = false;
            for (size_t j = 0; j < s.size(); ++j) {
                if (j + 1 < s.size() && s[j] == a && s[j + 1] == b) {
                    merged.push_back(id);
                    ++j;
                    changed = true;
                } else {
                    merged.push_back(s[j]);
                }
            }
            if (!changed) continue;
            sorted_pairs(s, before);
            sorted_pairs(merged, after);
            s.swap(merged);
            // Apply the difference of the two pair multisets, weighted by the word's count.
            size_t x = 0, y = 0;
            while (x < before.size() || y < after.size()) {
                uint64_t k;
                int64_t delta;
                if (y == after.size() || (x < before.size() && before[x] < after[y])) {
                    k = before[x++];
                    delta = -1;
                } else if (x == before.size() || after[y] < before[x]) {
                    k = after[y++];
                    delta = 1;
                    auto& list = where[k];
                    if (list.empty() || list.back() != wi) list.push_back(wi);
                } else {
                    ++x, ++y;
                    continue;
                }
                int64_t& c = counts[k];
                c += delta * w.count;
                if (k != top.pair && c > 0) heap.push({c, k});
            }
        }
        counts.erase(top.pair);
    }
    return merges;
}

}  // namespace llmfast
