// Binding for the pre-tokenizer (filled in by the tokenizer issue).
#include <pybind11/pybind11.h>

namespace llmfast {
void bind_pretokenize(pybind11::module_& m) { (void)m; }
}  // namespace llmfast
