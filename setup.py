"""Build the native extension ``llmfast._C`` (the C++ BPE tokenizer core and its pybind11 binding).

Everything else about the package lives in pyproject.toml.
"""
import glob
import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

from pybind11.setup_helpers import ParallelCompile

# Compile the C++ files in parallel (one job per core unless LLMFAST_BUILD_JOBS says otherwise).
ParallelCompile("LLMFAST_BUILD_JOBS", default=0).install()

extra_compile_args = ["-O3"]
extra_link_args = []
if sys.platform != "win32":
    extra_compile_args += ["-fvisibility=hidden", "-Wall"]

# LLMFAST_SANITIZE=address,undefined (or thread) builds the extension with those sanitizers, for CI's sanitizer
# step (.ci/run); Python itself is not instrumented, so the runtime is preloaded (LD_PRELOAD=libasan.so). Errors
# abort instead of printing and carrying on.
SANITIZE = os.environ.get("LLMFAST_SANITIZE", "").strip()
if SANITIZE:
    extra_compile_args = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={SANITIZE}",
                          "-fno-sanitize-recover=all", "-fvisibility=hidden", "-Wall"]
    extra_link_args = [f"-fsanitize={SANITIZE}"]

ext_modules = [
    Pybind11Extension(
        "llmfast._C",
        sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
