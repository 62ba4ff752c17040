"""Triton kernels with their autograd Functions, one file per op.

Every module listed in ``KERNEL_MODULES`` exposes ``compile_specs() -> list[KernelSpec]``: the kernels it
ships, at every config it ships, so ``python -m llmfast.compile_check`` can build each one for real GPUs.
This tuple is the one place kernels register.
"""
KERNEL_MODULES = (
    "llmfast.ops.softmax",
    "llmfast.ops.cross_entropy",
    "llmfast.ops.attention",
    "llmfast.ops.rms_norm",
    "llmfast.ops.layer_norm",
    "llmfast.ops.rotary",
    "llmfast.ops.swiglu",
    "llmfast.ops.decode",
)
