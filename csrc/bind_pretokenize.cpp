// pybind11 binding of the pre-tokenizer, for tests and for Python callers that want the pieces themselves.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "pretokenize.h"

namespace py = pybind11;

namespace llmfast {
namespace {

const char* kind_name(PatternKind kind) {
    switch (kind) {
        case PatternKind::R50K:
            return "r50k";
        case PatternKind::CL100K:
            return "cl100k";
        case PatternKind::O200K:
            return "o200k";
    }
    return "";
}

PatternKind parse_kind(const std::string& kind) {
    for (PatternKind k : {PatternKind::R50K, PatternKind::CL100K, PatternKind::O200K}) {
        if (kind == kind_name(k)) return k;
    }
    throw std::invalid_argument("kind must be one of 'r50k', 'cl100k', 'o200k'; got '" + kind + "'");
}

// Byte offsets of the pieces of UTF-8 `data`, computed without the GIL.
std::vector<std::pair<size_t, size_t>> piece_offsets(PatternKind kind, const std::string& data) {
    std::vector<std::pair<size_t, size_t>> pieces;
    py::gil_scoped_release release;
    pretokenize(kind, data, pieces);
    return pieces;
}

// UTF-8 of `text`. Lone surrogates become U+FFFD first, as tiktoken's encode does (a UTF-16 round trip, which also
// joins a surrogate pair into its code point).
std::string utf8_of(const py::str& text) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
    if (data) return std::string(data, static_cast<size_t>(size));
    PyErr_Clear();
    const py::str fixed = text.attr("encode")("utf-16", "surrogatepass").attr("decode")("utf-16", "replace");
    data = PyUnicode_AsUTF8AndSize(fixed.ptr(), &size);
    if (!data) throw py::error_already_set();
    return std::string(data, static_cast<size_t>(size));
}

}  // namespace

void bind_pretokenize(py::module_& m) {
    m.def(
        "pretokenize",
        [](const std::string& kind, const py::str& text) {
            const PatternKind k = parse_kind(kind);
            const std::string data = utf8_of(text);
            const auto pieces = piece_offsets(k, data);
            py::list out(pieces.size());
            for (size_t i = 0; i < pieces.size(); ++i) {
                const auto [b, e] = pieces[i];
                out[i] = py::reinterpret_steal<py::str>(
                    PyUnicode_DecodeUTF8(data.data() + b, static_cast<Py_ssize_t>(e - b), "strict"));
            }
            return out;
        },
        py::arg("kind"), py::arg("text"),
        "Split `text` into the pieces of the built-in pattern `kind` ('r50k', 'cl100k' or 'o200k').");
    m.def(
        "pretokenize_offsets",
        [](const std::string& kind, const py::bytes& data) {
            const PatternKind k = parse_kind(kind);
            return piece_offsets(k, std::string(data));
        },
        py::arg("kind"), py::arg("data"),
        "[begin, end) byte offsets of the pieces of the bytes `data` (any bytes; invalid UTF-8 is scanned as U+FFFD "
        "units of one byte).");
    m.def(
        "pretokenize_count",
        [](const std::string& kind, const py::bytes& data) {
            const PatternKind k = parse_kind(kind);
            const std::string bytes = data;
            py::gil_scoped_release release;
            size_t count = 0;
            for_each_piece(k, bytes, [&count](size_t, size_t) { ++count; });
            return count;
        },
        py::arg("kind"), py::arg("data"), "Number of pieces of the bytes `data` (scans without building a list).");
    m.def(
        "recognize_pattern",
        [](const std::string& pat_str) -> std::optional<std::string> {
            const auto kind = recognize_pattern(pat_str);
            if (!kind) return std::nullopt;
            return std::string(kind_name(*kind));
        },
        py::arg("pat_str"), "'r50k', 'cl100k' or 'o200k' when `pat_str` is that built-in pattern exactly, else None.");
    m.def(
        "pretokenize_char_flags",
        []() {
            std::string flags(unicode::kMaxCodePoint + 1, '\0');
            for (uint32_t cp = 0; cp <= unicode::kMaxCodePoint; ++cp) flags[cp] = static_cast<char>(unicode::char_flags(cp));
            return py::bytes(flags);
        },
        "The pre-tokenizer's class flag byte of every code point (bit 0 L, 1 N, 2 White_Space, 3 [\\r\\n], 4 space, "
        "5 o200k upper class, 6 o200k lower class, 7 '/'), for tests.");
    m.attr("PRETOKENIZE_UNICODE_VERSION") = unicode::kUnicodeVersion;
}

}  // namespace llmfast
