// Thin pybind11 binding over the C++ core. C++ exceptions surface as ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "bpe.h"

namespace py = pybind11;

namespace llmfast {
void bind_pretokenize(py::module_& m);  // bind_pretokenize.cpp
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "llmfast native core: byte-level BPE";
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const std::invalid_argument& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });
    m.def(
        "byte_pair_encode",
        [](py::bytes piece, const std::unordered_map<std::string, llmfast::Rank>& ranks) {
            std::string data = piece;
            py::gil_scoped_release release;
            return llmfast::byte_pair_encode(data, ranks);
        },
        py::arg("piece"), py::arg("ranks"),
        "Merge one piece's bytes by rank (lowest first, ties leftmost); returns the token ranks.");
    llmfast::bind_pretokenize(m);
}
