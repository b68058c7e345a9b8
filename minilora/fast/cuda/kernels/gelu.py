"""GELU (tanh approximation) as one elementwise kernel each way.

The reference forward makes several passes over memory and keeps t = tanh(u) for the backward.
Here the forward is one kernel, and its cache keeps only x (``FusedGeluCache``): the backward
recomputes the tanh, which costs a few arithmetic instructions per element, cheaper on a GPU than
storing and re-reading an activation as large as the MLP's hidden layer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from ....layers.gelu import GELU_CUBIC, GELU_SQRT_2_OVER_PI

# The two formulas of minilora.layers.gelu, as device functions the kernels below share.
_PREAMBLE = (
    f"""
#define GELU_K {GELU_SQRT_2_OVER_PI!r}
#define GELU_C {GELU_CUBIC!r}
"""
    + r"""
// u = sqrt(2/pi) (x + 0.044715 x^3), the argument of the tanh
template <typename Real>
__device__ __forceinline__ Real gelu_inner(Real x) {
    return Real(GELU_K) * (x + Real(GELU_C) * x * x * x);
}

// d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx, with t = tanh(u), du/dx = sqrt(2/pi) (1 + 3c x^2)
template <typename Real>
__device__ __forceinline__ Real gelu_slope(Real x, Real t) {
    const Real du_dx = Real(GELU_K) * (Real(1) + Real(3) * Real(GELU_C) * x * x);
    return Real(0.5) * (Real(1) + t) + Real(0.5) * x * (Real(1) - t * t) * du_dx;
}
"""
)


class FusedGeluCache(NamedTuple):
    x: object  # (...) the input; the backward recomputes tanh(u) from it


class _Kernels(NamedTuple):
    forward: object  # x -> 0.5 x (1 + tanh(u))
    backward: object  # (dout, x) -> dx, recomputing tanh(u)


@functools.cache
def _kernels() -> _Kernels:
    import cupy

    def kernel(in_params, body, name):
        return cupy.ElementwiseKernel(in_params, "T out", body, f"minilora_{name}", preamble=_PREAMBLE)

    return _Kernels(
        forward=kernel("T x", "out = T(0.5) * x * (T(1) + tanh(gelu_inner(x)));", "gelu_forward"),
        backward=kernel("T dout, T x", "out = dout * gelu_slope(x, tanh(gelu_inner(x)));", "gelu_backward"),
    )


def gelu_forward(x):
    """gelu(x), elementwise, any shape -> (out, FusedGeluCache(x=x))."""
    return _kernels().forward(x), FusedGeluCache(x=x)


def gelu_backward(dout, cache: FusedGeluCache):
    """dx = dout * gelu'(x), with tanh(u) recomputed from x."""
    return _kernels().backward(dout, cache.x)
