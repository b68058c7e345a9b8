"""Fused CuPy kernels behind the layer functions: the same math as minilora.layers, fewer trips to memory.

The readable layers compute with whole-array operations. On a GPU each of those is a kernel launch
that reads its inputs from device memory and writes a fresh temporary back: LayerNorm's forward
makes about ten such passes, and the attention backward copies two (B, H, T, T) transposes. The
kernels here do the same arithmetic with one pass per data dependency:

    gelu             forward and backward, one elementwise kernel each; the cache drops tanh(u)
    layernorm        one block per row (two-pass mean and variance), dw and db by column partial sums
    cross_entropy    softmax, probabilities and per-row loss in one block per row; the backward in one kernel
    attention        cuBLAS batched matmuls around fused causal-softmax kernels; for long blocks a
                     variant that keeps the per-row log-sum-exp instead of the (T, T) probabilities
    adamw            one launch updates every parameter, through a table of device pointers
    grad_norm        the global gradient norm in two launches, no host sync

Each layer function asks ``use_fused(x)`` and hands CuPy arrays to these modules; NumPy arrays, and
everything inside ``with reference_kernels():``, take the readable path. Importing this package never
imports CuPy: a kernel is compiled on its first call and cached (by CuPy, also on disk).
"""

from __future__ import annotations

from contextlib import contextmanager

from ....backend import device_of
from .blocks import KERNEL_TYPES

_fused_enabled = True  # module-level switch; reference_kernels() turns it off for a block


def use_fused(x) -> bool:
    """True when ``x`` is a CuPy array of a type the kernels are built for (float32, float64) and
    fused kernels are enabled."""
    return _fused_enabled and device_of(x) == "cuda" and x.dtype.name in KERNEL_TYPES


@contextmanager
def reference_kernels():
    """Run the readable reference layers on the GPU too, inside the block (e.g. to check the kernels).

    A backward still follows its forward's cache: a cache only the fused path makes (GELU's without
    tanh, attention's log-sum-exp one) is always differentiated by the fused kernels.
    """
    global _fused_enabled
    outer, _fused_enabled = _fused_enabled, False
    try:
        yield
    finally:
        _fused_enabled = outer
