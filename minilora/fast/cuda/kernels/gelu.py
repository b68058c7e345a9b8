"""GELU (tanh approximation) as one elementwise kernel each way.

The reference forward makes several passes over memory and keeps t = tanh(u) for the backward.
Here the forward is one kernel, and its cache keeps only x (``FusedGeluCache``): the backward
recomputes the tanh, which costs a few arithmetic instructions per element, cheaper on a GPU than
storing and re-reading an activation as large as the MLP's hidden layer. bf16 arrays are computed in
float32 and rounded once, where the result is stored. Each thread moves 16 bytes per operand at a
time where the arrays allow it (blocks.vectorisable), one element otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

from ....layers.gelu import GELU_CUBIC, GELU_SQRT_2_OVER_PI
from .blocks import KernelModule, launch_elementwise, vectorisable

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


_SOURCE = (
    _PREAMBLE
    + r"""
// out = 0.5 x (1 + tanh(u)), in Real (float32 for bf16 arrays); VEC elements at a time (n a multiple).
template <typename Elem, int VEC>
__global__ void gelu_forward(const Elem* x, Elem* out, long long n) {
    typedef typename Compute<Elem>::type Real;
    typedef Pack<Elem, VEC> P;
    FOR_EACH_ELEMENT(p, n / VEC) {
        const P in = reinterpret_cast<const P*>(x)[p];
        P y;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const Real v = Real(in.v[e]);
            y.v[e] = Elem(Real(0.5) * v * (Real(1) + tanh(gelu_inner(v))));
        }
        reinterpret_cast<P*>(out)[p] = y;
    }
}

// dx = dout * gelu'(x), recomputing tanh(u) from x.
template <typename Elem, int VEC>
__global__ void gelu_backward(const Elem* dout, const Elem* x, Elem* dx, long long n) {
    typedef typename Compute<Elem>::type Real;
    typedef Pack<Elem, VEC> P;
    FOR_EACH_ELEMENT(p, n / VEC) {
        const P in = reinterpret_cast<const P*>(x)[p], g = reinterpret_cast<const P*>(dout)[p];
        P d;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const Real v = Real(in.v[e]);
            d.v[e] = Elem(Real(g.v[e]) * gelu_slope(v, tanh(gelu_inner(v))));
        }
        reinterpret_cast<P*>(dx)[p] = d;
    }
}
"""
)
_KERNELS = KernelModule(
    _SOURCE, ("gelu_forward", "gelu_backward"), dtypes=("float32", "float64", "bfloat16"), vectorised=True
)


class FusedGeluCache(NamedTuple):
    x: object  # (...) the input, contiguous; the backward recomputes tanh(u) from it


def gelu_forward(x):
    """gelu(x), elementwise, any shape -> (out, FusedGeluCache(x=x))."""
    import cupy

    x = cupy.ascontiguousarray(x)
    out = cupy.empty_like(x)
    kernel = _KERNELS.get("gelu_forward", x.dtype, vectorised=vectorisable(x.size, x, out))
    launch_elementwise(kernel, x.size, (x, out, x.size))
    return out, FusedGeluCache(x=x)


def gelu_backward(dout, cache: FusedGeluCache):
    """dx = dout * gelu'(x), with tanh(u) recomputed from x."""
    import cupy

    x = cupy.ascontiguousarray(cache.x)
    dout = cupy.ascontiguousarray(dout, dtype=x.dtype)
    dx = cupy.empty_like(x)
    kernel = _KERNELS.get("gelu_backward", x.dtype, vectorised=vectorisable(x.size, dout, x, dx))
    launch_elementwise(kernel, x.size, (dout, x, dx, x.size))
    return dx
