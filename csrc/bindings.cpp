// Thin pybind11 binding over the C++ core (encoder.h, bpe.h, train_bpe.h).
//
// Every encode/decode call converts its arguments with the GIL held, releases the GIL for the C++ work, and
// re-acquires it only to build the result. C++ exceptions surface as ValueError (MemoryError for bad_alloc);
// unknown token ids raise InvalidTokenError, a subclass of both ValueError and KeyError (tiktoken raises KeyError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "encoder.h"
#include "train_bpe.h"


namespace py = pybind11;

namespace llmfast {
void bind_pretokenize(py::module_& m);  // bind_pretokenize.cpp
}

namespace {

using llmfast::Encoder;
using llmfast::Rank;

PyObject* g_invalid_token_error = nullptr;
// An id that does not fit a uint32 (negative, huge): also an OverflowError, which tiktoken raises for those.
PyObject* g_token_out_of_range_error = nullptr;

std::string type_name(py::handle obj) { return Py_TYPE(obj.ptr())->tp_name; }

// UTF-8 bytes of a Python str without copying (CPython caches them in the object). A str with lone surrogates has
// no UTF-8 form; like tiktoken, it is re-encoded through UTF-16 with surrogatepass and decoded with "replace" (valid
// surrogate pairs become their character, lone ones U+FFFD); `holder` keeps that new string alive.
std::string_view utf8_of(py::handle obj, const char* arg, py::object& holder) {
    if (!PyUnicode_Check(obj.ptr())) throw py::type_error(std::string(arg) + " must be str, got " + type_name(obj));
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
    if (!data) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) throw py::error_already_set();
        PyErr_Clear();
        holder = py::reinterpret_borrow<py::object>(obj)
                     .attr("encode")("utf-16", "surrogatepass")
                     .attr("decode")("utf-16", "replace");
        data = PyUnicode_AsUTF8AndSize(holder.ptr(), &size);
        if (!data) throw py::error_already_set();
    }
    return {data, static_cast<size_t>(size)};
}

// The UTF-8 views of a list of str (each item through utf8_of); `holders` holds a reference to every string a view
// points into (the item itself, or its repaired copy) and must outlive the views. The views are read without the
// GIL, while another Python thread may replace or delete the list's items: the references keep the strings (and
// their UTF-8 buffers) alive whatever happens to the list. `arg` names the list in the TypeError for anything that
// is not a sequence.
std::vector<std::string_view> utf8_views(py::handle list, const char* arg, std::vector<py::object>& holders) {
    py::object seq = py::reinterpret_steal<py::object>(PySequence_Fast(list.ptr(), ""));
    if (!seq) {
        PyErr_Clear();
        throw py::type_error(std::string(arg) + " must be a list of str, got " + type_name(list));
    }
    const size_t n = static_cast<size_t>(PySequence_Fast_GET_SIZE(seq.ptr()));
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    const std::string item_arg = std::string(arg) + " items";
    holders.assign(n, py::object());
    std::vector<std::string_view> views(n);
    for (size_t i = 0; i < n; ++i) {
        views[i] = utf8_of(items[i], item_arg.c_str(), holders[i]);
        if (!holders[i]) holders[i] = py::reinterpret_borrow<py::object>(items[i]);
    }
    return views;
}

std::string_view bytes_of(py::handle obj, const char* arg) {
    if (PyBytes_Check(obj.ptr())) return {PyBytes_AS_STRING(obj.ptr()), static_cast<size_t>(PyBytes_GET_SIZE(obj.ptr()))};
    if (PyByteArray_Check(obj.ptr()))
        return {PyByteArray_AS_STRING(obj.ptr()), static_cast<size_t>(PyByteArray_GET_SIZE(obj.ptr()))};
    throw py::type_error(std::string(arg) + " must be bytes, got " + type_name(obj));
}

Rank rank_of(py::handle value, const char* what) {
    if (!PyLong_Check(value.ptr()) || PyBool_Check(value.ptr()))
        throw py::type_error(std::string(what) + " must be an int, got " + type_name(value));
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (overflow || v < 0 || v >= static_cast<long long>(llmfast::kNoRank))
        throw py::value_error(std::string(what) + " must be in [0, 4294967294], got " +
                              py::str(value).cast<std::string>());
    return static_cast<Rank>(v);
}

// Token ids from a list/tuple/iterable of ints or a 1-D integer buffer (numpy array, array.array).
std::vector<Rank> read_ids(py::handle tokens, const char* arg) {
    std::vector<Rank> ids;
    auto bad_id = [&](size_t i, const std::string& value) {
        PyErr_SetString(g_token_out_of_range_error, ("token id " + value + " at position " + std::to_string(i) + " of " +
                                                arg + " is not in the vocabulary")
                                                   .c_str());
        throw py::error_already_set();
    };
    if (PyObject_CheckBuffer(tokens.ptr()) && !PyBytes_Check(tokens.ptr()) && !PyUnicode_Check(tokens.ptr())) {
        py::buffer buf = py::reinterpret_borrow<py::buffer>(tokens);
        py::buffer_info info = buf.request();
        if (info.ndim != 1)
            throw py::value_error(std::string(arg) + " must be 1-dimensional, got " + std::to_string(info.ndim) +
                                  " dimensions");
        std::string fmt = info.format;
        if (!fmt.empty() && (fmt[0] == '<' || fmt[0] == '=' || fmt[0] == '@' || fmt[0] == '!' || fmt[0] == '>'))
            fmt = fmt.substr(1);
        if (fmt.size() != 1 || std::string("bBhHiIlLqQnN").find(fmt[0]) == std::string::npos)
            throw py::type_error(std::string(arg) + " must hold integers, got a buffer of format '" + info.format + "'");
        const bool is_signed = std::islower(static_cast<unsigned char>(fmt[0]));
        ids.resize(static_cast<size_t>(info.shape[0]));
        const char* base = static_cast<const char*>(info.ptr);
        for (size_t i = 0; i < ids.size(); ++i) {
            const char* p = base + static_cast<py::ssize_t>(i) * info.strides[0];
            long long sv = 0;
            unsigned long long uv = 0;
            switch (info.itemsize) {
                case 1: is_signed ? (sv = *reinterpret_cast<const int8_t*>(p)) : (uv = *reinterpret_cast<const uint8_t*>(p)); break;
                case 2: { int16_t s; uint16_t u; std::memcpy(&s, p, 2); std::memcpy(&u, p, 2); is_signed ? sv = s : uv = u; break; }
                case 4: { int32_t s; uint32_t u; std::memcpy(&s, p, 4); std::memcpy(&u, p, 4); is_signed ? sv = s : uv = u; break; }
                case 8: { int64_t s; uint64_t u; std::memcpy(&s, p, 8); std::memcpy(&u, p, 8); is_signed ? sv = s : uv = u; break; }
                default: throw py::type_error(std::string(arg) + " has an unsupported integer size");
            }
            if (is_signed) {
                if (sv < 0 || sv >= static_cast<long long>(llmfast::kNoRank)) bad_id(i, std::to_string(sv));
                ids[i] = static_cast<Rank>(sv);
            } else {
                if (uv >= llmfast::kNoRank) bad_id(i, std::to_string(uv));
                ids[i] = static_cast<Rank>(uv);
            }
        }
        return ids;
    }
    py::object seq = py::reinterpret_steal<py::object>(PySequence_Fast(tokens.ptr(), ""));
    if (!seq) {
        PyErr_Clear();
        throw py::type_error(std::string(arg) + " must be a sequence of ints, got " + type_name(tokens));
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    ids.resize(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* item = items[i];
        long long v;
        int overflow = 0;
        if (PyLong_Check(item)) {
            v = PyLong_AsLongLongAndOverflow(item, &overflow);
        } else {
            py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(item));
            if (!index) {
                PyErr_Clear();
                throw py::type_error(std::string(arg) + " must hold ints, got " + Py_TYPE(item)->tp_name +
                                     " at position " + std::to_string(i));
            }
            v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
        }
        if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
        if (overflow || v < 0 || v >= static_cast<long long>(llmfast::kNoRank))
            bad_id(static_cast<size_t>(i), py::str(py::handle(item)).cast<std::string>());
        ids[static_cast<size_t>(i)] = static_cast<Rank>(v);
    }
    return ids;
}

// The encoder plus a table of ready-made Python ints for every rank, so building a result list costs an INCREF
// per token instead of an allocation.
class CoreBPE {
   public:
    CoreBPE(py::dict mergeable, py::dict specials, py::str pattern) {
        std::vector<std::pair<std::string, Rank>> merge_list, special_list;
        merge_list.reserve(mergeable.size());
        for (auto item : mergeable) {
            std::string_view b = bytes_of(item.first, "mergeable_ranks keys");
            merge_list.emplace_back(std::string(b), rank_of(item.second, "mergeable_ranks values"));
        }
        if (merge_list.empty()) throw py::value_error("mergeable_ranks is empty");
        for (auto item : specials) {
            py::object holder;
            if (!PyUnicode_Check(item.first.ptr()))
                throw py::type_error("special_tokens keys must be str, got " + type_name(item.first));
            std::string_view s = utf8_of(item.first, "special_tokens keys", holder);
            special_list.emplace_back(std::string(s), rank_of(item.second, "special_tokens values"));
        }
        py::object holder;
        std::string pat(utf8_of(pattern, "pat_str", holder));
        {
            py::gil_scoped_release release;
            encoder_ = std::make_unique<Encoder>(merge_list, special_list, pat);
        }
        const size_t n_ints = std::min<size_t>(static_cast<size_t>(encoder_->max_token_value()) + 1, size_t(1) << 21);
        ints_.reserve(n_ints);
        for (size_t i = 0; i < n_ints; ++i) ints_.push_back(py::int_(i));
    }

    const Encoder& encoder() const { return *encoder_; }

    py::list to_list(const llmfast::TokenBuffer& tokens) const {
        const size_t n = tokens.size();
        const Rank* t = tokens.data();
        PyObject* list = PyList_New(static_cast<Py_ssize_t>(n));
        if (!list) throw py::error_already_set();
        // The ints' reference counts are scattered over megabytes that other work has usually pushed out of the
        // cache: fetch the table slot, then the int, some tokens ahead, so the misses overlap.
        const size_t n_ints = ints_.size();
        constexpr size_t kSlotAhead = 64, kIntAhead = 32;
        for (size_t i = 0; i < n; ++i) {
            if (i + kSlotAhead < n && t[i + kSlotAhead] < n_ints) __builtin_prefetch(&ints_[t[i + kSlotAhead]]);
            if (i + kIntAhead < n && t[i + kIntAhead] < n_ints) __builtin_prefetch(ints_[t[i + kIntAhead]].ptr(), 1);
            const Rank r = t[i];
            PyObject* v;
            if (r < n_ints) {
                v = ints_[r].ptr();
                Py_INCREF(v);
            } else {
                v = PyLong_FromUnsignedLong(r);
                if (!v) {
                    Py_DECREF(list);
                    throw py::error_already_set();
                }
            }
            PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), v);
        }
        return py::reinterpret_steal<py::list>(list);
    }

    static py::array_t<uint32_t> to_numpy(const llmfast::TokenBuffer& tokens) {
        py::array_t<uint32_t> arr(static_cast<py::ssize_t>(tokens.size()));
        if (!tokens.empty()) std::memcpy(arr.mutable_data(), tokens.data(), tokens.size() * sizeof(Rank));
        return arr;
    }

    // A mask over the special tokens (one byte each, non-zero = member), or null.
    const uint8_t* mask_of(const py::object& mask, const char* arg) const {
        if (mask.is_none()) return nullptr;
        std::string_view m = bytes_of(mask, arg);
        if (m.size() != encoder_->n_specials())
            throw py::value_error(std::string(arg) + " must have one byte per special token (" +
                                  std::to_string(encoder_->n_specials()) + "), got " + std::to_string(m.size()));
        return reinterpret_cast<const uint8_t*>(m.data());
    }

    [[noreturn]] void raise_disallowed(size_t index) const {
        const std::string& tok = encoder_->special_bytes(index);
        py::str s(tok);
        const std::string r = py::repr(s).cast<std::string>();
        throw py::value_error(
            "Encountered text corresponding to disallowed special token " + r +
            ".\nIf you want this text to be encoded as a special token, pass it to `allowed_special`, e.g. "
            "`allowed_special={" + r + ", ...}`.\nIf you want this text to be encoded as normal text, disable the "
            "check for this token by passing `disallowed_special=(enc.special_tokens_set - {" + r + "})`.\n"
            "To disable this check for all special tokens, pass `disallowed_special=()`.\n");
    }

    void require_native() const {
        if (!encoder_->has_native_pattern())
            throw py::value_error("this encoding's pattern has no native pre-tokenizer; split pieces in Python");
    }

    // Shared by encode / encode_to_numpy: disallowed check, then encode, all without the GIL.
    llmfast::TokenBuffer encode_tokens(py::handle text, const py::object& allowed, const py::object& disallowed) const {
        require_native();
        py::object holder;
        std::string_view t = utf8_of(text, "text", holder);
        const uint8_t* allow = mask_of(allowed, "allowed_mask");
        const uint8_t* forbid = mask_of(disallowed, "disallowed_mask");
        llmfast::TokenBuffer out;
        size_t pos = 0, index = 0;
        bool bad = false;
        {
            py::gil_scoped_release release;
            bad = forbid && encoder_->find_special(t, 0, forbid, pos, index);
            if (!bad) {
                out.reserve(t.size() / 4 + 8);
                encoder_->encode(t, allow, out);
            }
        }
        if (bad) raise_disallowed(index);
        return out;
    }

    py::list encode_batch(py::handle texts, const py::object& allowed, const py::object& disallowed,
                          size_t num_threads) const {
        require_native();
        std::vector<py::object> holders;
        const std::vector<std::string_view> views = utf8_views(texts, "text", holders);
        const size_t n = views.size();
        const uint8_t* allow = mask_of(allowed, "allowed_mask");
        const uint8_t* forbid = mask_of(disallowed, "disallowed_mask");
        std::vector<llmfast::TokenBuffer> results(n);
        std::vector<long long> bad(n, -1);
        std::unique_ptr<std::atomic<bool>[]> encoded(new std::atomic<bool>[n]);
        for (size_t i = 0; i < n; ++i) encoded[i].store(false, std::memory_order_relaxed);
        std::atomic<size_t> next{0};
        // A document that throws (out of memory, or the test hook) stops the batch: its exception is kept, the
        // other threads stop claiming documents, and the caller raises it once every thread has returned. The
        // document still counts as done, so the list-building loop below never waits for it (no hang).
        std::atomic<bool> failed{false};
        std::exception_ptr failure;
        std::mutex failure_mutex;
        auto encode_one = [&](size_t i) {
            try {
                llmfast::maybe_inject_worker_fault();
                size_t pos = 0, index = 0;
                if (forbid && encoder_->find_special(views[i], 0, forbid, pos, index)) {
                    bad[i] = static_cast<long long>(index);
                } else {
                    results[i].reserve(views[i].size() / 4 + 8);
                    encoder_->encode(views[i], allow, results[i]);
                }
            } catch (...) {
                {
                    std::lock_guard<std::mutex> lock(failure_mutex);
                    if (!failure) failure = std::current_exception();
                }
                failed.store(true, std::memory_order_release);
                next.store(n, std::memory_order_relaxed);
            }
            encoded[i].store(true, std::memory_order_release);
        };
        // Building the lists needs the GIL, so only the calling thread does it: between documents of its own it
        // turns the finished prefix of the batch into lists while the pool threads keep encoding. The list building
        // overlaps the encoding instead of following it, which is what lets a batch scale with threads.
        py::list out(n);
        bool any_bad = false;
        size_t total_bytes = 0;
        for (std::string_view v : views) total_bytes += v.size();
        const size_t threads = std::max<size_t>(1, std::min(num_threads, n));
        // The documents' kind of text, from a few of them (see Encoder::prepare(); only a large share warms up).
        std::string sample;
        if (total_bytes / threads >= llmfast::BytePairEncoder::kWarmText)
            for (size_t i = 0; i < n && sample.size() < 4096; i += std::max<size_t>(1, n / 16))
                sample.append(views[i].substr(0, 256));
        {
            py::gil_scoped_release release;
            llmfast::parallel_run(threads, [&](size_t thread) {
                encoder_->prepare(total_bytes / threads, sample);
                if (thread != 0) {
                    for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) encode_one(i);
                    return;
                }
                constexpr size_t kListBatch = 8;  // documents per GIL acquisition
                size_t listed = 0;
                while (listed < n && !failed.load(std::memory_order_acquire)) {
                    size_t ready = listed;
                    while (ready < n && encoded[ready].load(std::memory_order_acquire)) ++ready;
                    const bool all_claimed = next.load(std::memory_order_relaxed) >= n;
                    if (ready - listed >= kListBatch || (ready > listed && all_claimed)) {
                        py::gil_scoped_acquire gil;
                        for (; listed < ready && !failed.load(std::memory_order_acquire); ++listed) {
                            if (bad[listed] >= 0) {
                                any_bad = true;
                            } else if (!any_bad) {
                                PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(listed),
                                                to_list(results[listed]).release().ptr());
                            }
                        }
                    } else if (!all_claimed) {
                        const size_t i = next.fetch_add(1, std::memory_order_relaxed);
                        if (i < n) encode_one(i);
                    } else {
                        std::this_thread::yield();  // a pool thread is finishing the last documents
                    }
                }
            });
        }
        if (failure) std::rethrow_exception(failure);
        for (size_t i = 0; i < n; ++i)
            if (bad[i] >= 0) raise_disallowed(static_cast<size_t>(bad[i]));
        return out;
    }

    [[noreturn]] void raise_unknown(Rank id, size_t position) const {
        PyErr_SetString(g_invalid_token_error,
                        ("token id " + std::to_string(id) + " at position " + std::to_string(position) +
                         " is not in the vocabulary (ids run from 0 to " +
                         std::to_string(encoder_->max_token_value()) + ")")
                            .c_str());
        throw py::error_already_set();
    }

    py::bytes decode_bytes(py::handle tokens) const {
        std::vector<Rank> ids = read_ids(tokens, "tokens");
        size_t bad = 0, size = 0;
        {
            py::gil_scoped_release release;
            size = encoder_->decoded_size(ids.data(), ids.size(), bad);
        }
        if (size == SIZE_MAX) raise_unknown(ids[bad], bad);
        PyObject* b = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size));
        if (!b) throw py::error_already_set();
        {
            py::gil_scoped_release release;
            encoder_->decode_into(ids.data(), ids.size(), PyBytes_AS_STRING(b), size);
        }
        return py::reinterpret_steal<py::bytes>(b);
    }

    py::str decode(py::handle tokens, const std::string& errors) const {
        std::vector<Rank> ids = read_ids(tokens, "tokens");
        size_t bad = 0, size = 0;
        std::unique_ptr<char[]> buf;
        {
            py::gil_scoped_release release;
            size = encoder_->decoded_size(ids.data(), ids.size(), bad);
            if (size != SIZE_MAX) {
                buf.reset(new char[size + 1]);  // uninitialized: every byte is written
                encoder_->decode_into(ids.data(), ids.size(), buf.get(), size);
            }
        }
        if (size == SIZE_MAX) raise_unknown(ids[bad], bad);
        PyObject* s = PyUnicode_DecodeUTF8(buf.get(), static_cast<Py_ssize_t>(size), errors.c_str());
        if (!s) throw py::error_already_set();
        return py::reinterpret_steal<py::str>(s);
    }

    py::list decode_batch(py::handle batch, const std::string& errors, size_t num_threads, bool as_bytes) const {
        py::object seq = py::reinterpret_steal<py::object>(PySequence_Fast(batch.ptr(), ""));
        if (!seq) {
            PyErr_Clear();
            throw py::type_error("batch must be a sequence of token sequences, got " + type_name(batch));
        }
        const size_t n = static_cast<size_t>(PySequence_Fast_GET_SIZE(seq.ptr()));
        PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
        std::vector<std::vector<Rank>> ids(n);
        for (size_t i = 0; i < n; ++i) ids[i] = read_ids(items[i], "batch item");
        std::vector<std::string> bufs(n);
        std::vector<size_t> bad(n, SIZE_MAX);
        {
            py::gil_scoped_release release;
            llmfast::parallel_for(n, num_threads, [&](size_t i) {
                size_t b = 0;
                if (!encoder_->decode(ids[i].data(), ids[i].size(), bufs[i], b)) bad[i] = b;
            });
        }
        for (size_t i = 0; i < n; ++i)
            if (bad[i] != SIZE_MAX) raise_unknown(ids[i][bad[i]], bad[i]);
        py::list out(n);
        for (size_t i = 0; i < n; ++i) {
            PyObject* o = as_bytes ? PyBytes_FromStringAndSize(bufs[i].data(), static_cast<Py_ssize_t>(bufs[i].size()))
                                   : PyUnicode_DecodeUTF8(bufs[i].data(), static_cast<Py_ssize_t>(bufs[i].size()),
                                                          errors.c_str());
            if (!o) throw py::error_already_set();
            out[i] = py::reinterpret_steal<py::object>(o);
        }
        return out;
    }

    py::bytes decode_single_token_bytes(py::handle token) const {
        std::vector<Rank> ids;
        if (!PyLong_Check(token.ptr())) {
            py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(token.ptr()));
            if (!index) {
                PyErr_Clear();
                throw py::type_error("token must be an int, got " + type_name(token));
            }
            return decode_single_token_bytes(index);
        }
        int overflow = 0;
        const long long v = PyLong_AsLongLongAndOverflow(token.ptr(), &overflow);
        std::string_view out;
        const bool out_of_range = overflow || v < 0 || v >= static_cast<long long>(llmfast::kNoRank);
        if (out_of_range || !encoder_->token_bytes(static_cast<Rank>(v), out)) {
            PyErr_SetString(out_of_range ? g_token_out_of_range_error : g_invalid_token_error, ("token id " + py::str(token).cast<std::string>() +
                                                    " is not in the vocabulary")
                                                       .c_str());
            throw py::error_already_set();
        }
        return py::bytes(out.data(), out.size());
    }

   private:
    std::unique_ptr<Encoder> encoder_;
    std::vector<py::object> ints_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "llmfast native core: byte-level BPE tokenizer (encode, decode, special tokens, training)";

    g_invalid_token_error = PyErr_NewExceptionWithDoc(
        "llmfast._C.InvalidTokenError", "A token id that is not in the vocabulary (a ValueError and a KeyError).",
        py::make_tuple(py::handle(PyExc_ValueError), py::handle(PyExc_KeyError)).release().ptr(), nullptr);
    if (!g_invalid_token_error) throw py::error_already_set();
    m.attr("InvalidTokenError") = py::handle(g_invalid_token_error);
    g_token_out_of_range_error = PyErr_NewExceptionWithDoc(
        "llmfast._C.TokenOutOfRangeError",
        "A token id outside [0, 2**32 - 2]: an InvalidTokenError and an OverflowError (tiktoken raises OverflowError).",
        py::make_tuple(py::handle(g_invalid_token_error), py::handle(PyExc_OverflowError)).release().ptr(), nullptr);
    if (!g_token_out_of_range_error) throw py::error_already_set();
    m.attr("TokenOutOfRangeError") = py::handle(g_token_out_of_range_error);

    // C++ exceptions from the core become ValueError; pybind11's own exceptions pass through to its translator.
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const py::builtin_exception&) {
            throw;
        } catch (const py::error_already_set&) {
            throw;
        } catch (const std::bad_alloc&) {
            PyErr_SetString(PyExc_MemoryError, "out of memory in the llmfast tokenizer");
        } catch (const std::exception& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });

    py::class_<CoreBPE>(m, "CoreBPE", "Native tokenizer state for one vocabulary (immutable, thread-safe).")
        .def(py::init<py::dict, py::dict, py::str>(), py::arg("mergeable_ranks"), py::arg("special_tokens"),
             py::arg("pat_str"))
        .def_property_readonly("has_native_pattern", [](const CoreBPE& c) { return c.encoder().has_native_pattern(); })
        .def_property_readonly("max_token_value", [](const CoreBPE& c) { return c.encoder().max_token_value(); })
        .def_property_readonly("n_specials", [](const CoreBPE& c) { return c.encoder().n_specials(); })
        .def("special_token", [](const CoreBPE& c, size_t i) {
                if (i >= c.encoder().n_specials()) throw py::index_error("special token index out of range");
                return py::make_tuple(py::str(c.encoder().special_bytes(i)), c.encoder().special_rank(i));
            }, py::arg("index"), "(text, rank) of the index-th special token, in the order masks use.")
        .def("encode",
             [](const CoreBPE& c, py::handle text, py::object allowed, py::object disallowed) {
                 return c.to_list(c.encode_tokens(text, allowed, disallowed));
             },
             py::arg("text"), py::arg("allowed_mask") = py::none(), py::arg("disallowed_mask") = py::none(),
             "Encode with the native pre-tokenizer. Masks have one byte per special token; a disallowed special "
             "in the text raises ValueError.")
        .def("encode_to_numpy",
             [](const CoreBPE& c, py::handle text, py::object allowed, py::object disallowed) {
                 return CoreBPE::to_numpy(c.encode_tokens(text, allowed, disallowed));
             },
             py::arg("text"), py::arg("allowed_mask") = py::none(), py::arg("disallowed_mask") = py::none())
        .def("encode_batch", &CoreBPE::encode_batch, py::arg("texts"), py::arg("allowed_mask") = py::none(),
             py::arg("disallowed_mask") = py::none(), py::arg("num_threads") = 8,
             "Encode many texts on a pool of C++ threads (GIL released).")
        .def("find_special",
             [](const CoreBPE& c, py::handle text, py::object mask) -> py::object {
                 py::object holder;
                 std::string_view t = utf8_of(text, "text", holder);
                 const uint8_t* m = c.mask_of(mask, "mask");
                 size_t pos = 0, index = 0;
                 bool found;
                 {
                     py::gil_scoped_release release;
                     found = c.encoder().find_special(t, 0, m, pos, index);
                 }
                 if (!found) return py::none();
                 return py::make_tuple(pos, index);
             },
             py::arg("text"), py::arg("mask"),
             "(utf8 byte position, special index) of the leftmost special in mask, or None.")
        .def("check_disallowed",
             [](const CoreBPE& c, py::handle text, py::object mask) {
                 py::object holder;
                 std::string_view t = utf8_of(text, "text", holder);
                 const uint8_t* m = c.mask_of(mask, "mask");
                 size_t pos = 0, index = 0;
                 bool found;
                 {
                     py::gil_scoped_release release;
                     found = c.encoder().find_special(t, 0, m, pos, index);
                 }
                 if (found) c.raise_disallowed(index);
             },
             py::arg("text"), py::arg("mask"), "Raise tiktoken's ValueError if a special in mask occurs in text.")
        .def("encode_pieces",
             [](const CoreBPE& c, py::handle pieces) {
                 std::vector<py::object> holders;
                 const std::vector<std::string_view> views = utf8_views(pieces, "pieces", holders);
                 llmfast::TokenBuffer out;
                 {
                     py::gil_scoped_release release;
                     c.encoder().encode_pieces(views, out);
                 }
                 return c.to_list(out);
             },
             py::arg("pieces"), "Byte-pair encode pieces already split by the pattern (the regex path).")
        .def("encode_single_piece",
             [](const CoreBPE& c, py::handle piece) {
                 std::string_view b = bytes_of(piece, "piece");
                 llmfast::TokenBuffer out;
                 {
                     py::gil_scoped_release release;
                     c.encoder().bpe().encode_piece(b, out);
                 }
                 return c.to_list(out);
             },
             py::arg("piece"), "Byte-pair encode one piece's bytes without pre-tokenizing.")
        .def("encode_single_token",
             [](const CoreBPE& c, py::handle piece) -> Rank {
                 std::string_view b = bytes_of(piece, "token");
                 Rank r = c.encoder().bpe().rank_of(b);
                 if (r != llmfast::kNoRank) return r;
                 for (size_t i = 0; i < c.encoder().n_specials(); ++i)
                     if (c.encoder().special_bytes(i) == b) return c.encoder().special_rank(i);
                 throw py::key_error(py::repr(py::reinterpret_borrow<py::object>(piece)).cast<std::string>());
             },
             py::arg("token"))
        .def("decode_bytes", &CoreBPE::decode_bytes, py::arg("tokens"))
        .def("decode", &CoreBPE::decode, py::arg("tokens"), py::arg("errors") = "replace")
        .def(
            "decode_batch",
            [](const CoreBPE& c, py::handle batch, const std::string& errors, size_t num_threads) {
                return c.decode_batch(batch, errors, num_threads, false);
            },
            py::arg("batch"), py::arg("errors") = "replace", py::arg("num_threads") = 8)
        .def(
            "decode_bytes_batch",
            [](const CoreBPE& c, py::handle batch, size_t num_threads) {
                return c.decode_batch(batch, "strict", num_threads, true);
            },
            py::arg("batch"), py::arg("num_threads") = 8)
        .def("decode_single_token_bytes", &CoreBPE::decode_single_token_bytes, py::arg("token"));

    py::class_<llmfast::BpeTrainer>(m, "BpeTrainer", "Counts pre-tokenized pieces and learns byte-level BPE merges.")
        .def(py::init([](py::object pattern) {
                 py::object holder;
                 std::string pat = pattern.is_none() ? std::string() : std::string(utf8_of(pattern, "pat_str", holder));
                 return std::make_unique<llmfast::BpeTrainer>(pat);
             }),
             py::arg("pat_str"))
        .def_property_readonly("has_native_pattern", &llmfast::BpeTrainer::has_native_pattern)
        .def_property_readonly("distinct_pieces",
                               [](llmfast::BpeTrainer& t) {
                                   py::gil_scoped_release release;
                                   std::lock_guard<std::mutex> lock(t.mutex());
                                   return t.distinct_pieces();
                               })
        // A trainer may be shared by Python threads, and its methods run without the GIL: each one takes the
        // trainer's mutex, always after releasing the GIL (a thread holding the mutex never waits for the GIL, so
        // the two locks cannot deadlock).
        .def(
            "add_text",
            [](llmfast::BpeTrainer& t, py::handle text) {
                if (!t.has_native_pattern()) throw py::value_error("add_text needs a pattern with a native pre-tokenizer");
                py::object holder;
                std::string_view v = utf8_of(text, "text", holder);
                py::gil_scoped_release release;
                std::lock_guard<std::mutex> lock(t.mutex());
                t.add_text(v);
            },
            py::arg("text"), "Pre-tokenize text natively (GIL released) and count its pieces.")
        .def(
            "add_piece_counts",
            [](llmfast::BpeTrainer& t, py::dict counts) {
                // Read (and check) the whole dict under the GIL first, then count without it.
                std::vector<std::pair<std::string, uint64_t>> pieces;
                pieces.reserve(counts.size());
                for (auto item : counts) {
                    py::object holder;
                    std::string_view piece = PyBytes_Check(item.first.ptr()) ? bytes_of(item.first, "piece")
                                                                             : utf8_of(item.first, "piece", holder);
                    if (!PyLong_Check(item.second.ptr())) throw py::type_error("piece counts must be ints");
                    const long long c = PyLong_AsLongLong(item.second.ptr());
                    if (c == -1 && PyErr_Occurred()) throw py::error_already_set();
                    if (c < 0) throw py::value_error("piece counts must be non-negative");
                    pieces.emplace_back(std::string(piece), static_cast<uint64_t>(c));
                }
                py::gil_scoped_release release;
                std::lock_guard<std::mutex> lock(t.mutex());
                for (const auto& [piece, c] : pieces) t.add_piece(piece, c);
            },
            py::arg("counts"), "Count already split pieces: {piece (str or bytes): count}.")
        .def(
            "train",
            [](llmfast::BpeTrainer& t, size_t n_merges) {
                std::vector<std::string> merges;
                {
                    py::gil_scoped_release release;
                    std::lock_guard<std::mutex> lock(t.mutex());
                    merges = t.train(n_merges);
                }
                py::list out;
                for (const auto& m : merges) out.append(py::bytes(m));
                return out;
            },
            py::arg("n_merges"), "Learn up to n_merges merges; the new tokens' bytes in rank order (from 256).");

    m.def("hardware_threads", [] { return std::max(1u, std::thread::hardware_concurrency()); });
    m.def("_inject_worker_faults", &llmfast::inject_worker_faults, py::arg("n"),
          "Test hook: the next n documents encoded on a pool worker thread fail (ValueError; 0 disarms).");

    llmfast::bind_pretokenize(m);
}
