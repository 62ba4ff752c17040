"""Description of one shipped kernel configuration, consumed by ``llmfast.compile_check``.

A GPU launch does not compile the kernel's source as written: Triton's launcher (``triton.runtime.jit``)
*specializes* it on the argument values. Pointers whose address is a multiple of 16 and integers that are
multiples of 16 get the attribute ``tt.divisibility = 16`` (which is what lets the compiler vectorize loads and
use ``cp.async``), and integers equal to 1 become compile-time constants. A compile check that skips this builds
a different binary from the one that runs: more registers, no vectorized loads, no pipelining.

So a spec can carry the launch itself: ``launch_args`` gives every argument the value (or, for a pointer, the
torch dtype of an aligned tensor) that a representative launch passes, and :func:`launch_specialization` turns
them into the signature, constants and attributes with Triton's own specialization routine, exactly as the
launcher does.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
from typing import Any, Callable, Iterator, Mapping, Sequence

DIVISIBILITY_16 = [["tt.divisibility", 16]]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel at one config, described so ``triton.compile`` can build it ahead of time.

    Either ``launch_args`` (preferred: every argument's value at a representative launch, a ``torch.dtype`` for
    a pointer to an aligned tensor of that dtype, constexprs included), from which the compile check derives the
    launcher's specialization; or ``signature`` (every non-constexpr argument to a Triton type: ``"*fp16"``,
    ``"i32"``, ``"fp32"``...) and ``constexprs``, compiled without any specialization (the older, less faithful
    form: a real launch would also know its pointers aligned).

    ``arches`` limits the spec to some compute capabilities (``None``: all that compile_check is asked for).
    ``matrix`` is the instruction every ``tl.dot`` of the kernel must become: ``"tensor"`` (``wgmma`` on sm_90,
    ``mma.sync`` on sm_80), ``"mma"`` (``mma.sync`` on every arch), ``"fma"`` (no tensor cores, e.g. exact fp32),
    or ``None`` (no check; ``expect_mma=True`` is the older spelling of ``"tensor"``). ``pipelined`` requires the
    main loop's loads to be asynchronous copies (``cp.async`` or TMA).
    """

    kernel: str
    fn: Any
    signature: dict[str, str] = dataclasses.field(default_factory=dict)
    constexprs: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: str = ""
    num_warps: int = 4
    num_stages: int = 2
    arches: tuple[int, ...] | None = None
    expect_mma: bool = False
    launch_args: Mapping[str, Any] | None = None
    matrix: str | None = None
    pipelined: bool = False

    @property
    def expected_matrix(self) -> str | None:
        return self.matrix if self.matrix is not None else ("tensor" if self.expect_mma else None)


def _params(fn) -> list[tuple[str, bool, bool, bool]]:
    """(name, is_constexpr, specialize, align) per parameter, for JIT and interpreted functions alike."""
    if hasattr(fn, "params"):
        return [(p.name, p.is_constexpr, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
                for p in fn.params]
    params = inspect.signature(fn.fn).parameters
    return [(name, "constexpr" in str(p.annotation), True, True) for name, p in params.items()]


def launch_specialization(fn, launch_args: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any], dict]:
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource``, as Triton's launcher builds them for a
    launch of ``fn`` with ``launch_args``: Triton's own ``native_specialize_impl`` types every argument, marks
    16-divisible pointers and integers, and turns integers equal to 1 into constants."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import MockTensor

    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    params = _params(fn)
    missing = [name for name, *_ in params if name not in launch_args]
    if missing:
        raise ValueError(f"launch_args of {getattr(fn, '__name__', fn)} lack {missing}")
    for index, (name, is_constexpr, specialize, align) in enumerate(params):
        value = launch_args[name]
        if is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        if isinstance(value, torch.dtype):
            value = MockTensor(value)  # data_ptr() 0: an aligned allocation
        kind, attr = native_specialize_impl(CUDABackend, value, False, specialize, align)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif isinstance(attr, str):
            parsed = CUDABackend.parse_attr(attr)
            if parsed:
                attrs[(index,)] = parsed
    return signature, constexprs, attrs


def spec_specialization(spec: KernelSpec) -> tuple[dict[str, str], dict[str, Any], dict]:
    """What ``compile_check`` compiles for ``spec``: its launch's specialization, or for a spec given by signature
    that signature as is (no divisibility: a kernel's spec opts into the launch's specialization by giving
    ``launch_args``, and its configs may need retuning when it does)."""
    if spec.launch_args is not None:
        return launch_specialization(spec.fn, spec.launch_args)
    return dict(spec.signature), dict(spec.constexprs), {}


# ----------------------------------------------------------------------------------------------------------------
# Capturing launches: the compile check builds a kernel from the arguments the real launch code passes.
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CapturedLaunch:
    """One kernel launch, recorded instead of run: the kernel, its grid, and its arguments."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict[str, Any]

    _OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

    def launch_args(self) -> dict[str, Any]:
        """Every kernel argument by name; tensors become their dtype (a pointer to an aligned allocation)."""
        import torch

        values = dict(zip(self.kernel.arg_names, self.args))
        values.update({k: v for k, v in self.kwargs.items() if k not in self._OPTIONS})
        return {k: v.dtype if isinstance(v, torch.Tensor) else v for k, v in values.items()}

    def option(self, name: str, default: int | None = None) -> int:
        """A launch option (``num_warps``, ``num_stages``...) as passed, else ``default``, else Triton's own default
        for the option (what the launch gets when it passes none: ``num_stages=3`` on CUDA)."""
        if name in self.kwargs:
            return int(self.kwargs[name])
        if default is not None:
            return default
        return triton_default(name)


def triton_default(option: str) -> int:
    """Triton's own default for a launch option (``num_stages``: 3 on CUDA): what a launch that passes none gets."""
    from triton.backends.nvidia.compiler import CUDAOptions

    return int(CUDAOptions.__dataclass_fields__[option].default)


_captured: contextvars.ContextVar[list | None] = contextvars.ContextVar("llmfast_captured_launches", default=None)


def launch(kernel, grid):
    """``kernel[grid]``: what launch code calls, so that :func:`capture_launches` can record instead of run."""
    calls = _captured.get()
    if calls is None:
        return kernel[grid]

    def record(*args, **kwargs):
        calls.append(CapturedLaunch(kernel, tuple(grid), args, kwargs))

    return record


@contextlib.contextmanager
def capture_launches() -> Iterator[list[CapturedLaunch]]:
    """Launches through :func:`launch` inside are recorded, not run (and not counted as kernel launches), so
    host code can run on ``meta`` tensors to show which kernels, configs and arguments a real call would use."""
    from llmfast import _backend

    counts, configs = dict(_backend._kernel_launches), dict(_backend._last_launch_configs)
    calls: list[CapturedLaunch] = []
    token = _captured.set(calls)
    try:
        yield calls
    finally:
        _captured.reset(token)
        _backend._kernel_launches.clear()
        _backend._kernel_launches.update(counts)
        _backend._last_launch_configs.clear()
        _backend._last_launch_configs.update(configs)


def captured_launches(host: Callable[[], object], arch: str) -> list[CapturedLaunch]:
    """The launches ``host()`` makes with ``arch``'s configs, recorded instead of run: ``host`` calls an op's real
    launch code on ``meta`` tensors, so the compile check builds the arguments that code passes."""
    from llmfast.ops._arch import forced_config_arch

    with forced_config_arch(arch), capture_launches() as calls:
        host()
    return calls


def launch_spec(kernel: str, call: CapturedLaunch, config: str, **fields: Any) -> KernelSpec:
    """The spec of one captured launch: its kernel, arguments and options (Triton's defaults for options the launch
    leaves out, as the launcher would use them); ``fields`` add ``arches``, ``matrix``..."""
    return KernelSpec(kernel, call.kernel, config=config, num_warps=call.option("num_warps"),
                      num_stages=call.option("num_stages"), launch_args=call.launch_args(), **fields)


def triton_signature(fn: Any, pointers: dict[str, str], floats: Sequence[str],
                     ones: Sequence[str]) -> tuple[dict[str, str], dict[str, int]]:
    """``triton.compile`` signature of ``fn``: pointers as given, ``floats`` fp32, other ints i32, and ``ones``
    specialised to the constant 1 (Triton does that to an int argument equal to 1, such as a unit column stride).
    Returns the signature and the constants it fixed."""
    signature, constants = {}, {}
    for name, is_constexpr, *_ in _params(fn):  # JIT and interpreted functions alike
        if is_constexpr:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif name in ones:
            signature[name] = "constexpr"
            constants[name] = 1
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, constants
