"""Elementwise sums as vectorised kernels: the residual add, and the bias added onto a product.

CuPy's own add is one element per thread, through its general indexer; on bf16 arrays, measured
in a gpt2s step on an H200, its 97 adds a step (bias, residual) took 4.8 ms of a 19.9 ms step. Here
each thread moves 16 bytes at a time (8 bf16, 4 float32 or 2 float64 values: one vector load per
operand) and adds in ``Real`` (float32 for bf16, rounding once where it stores). Arrays whose
addresses or length do not allow 16-byte vectors take the same kernels one element at a time.
"""

from __future__ import annotations

from .blocks import KernelModule, launch_elementwise, vectorisable

_SOURCE = r"""
// out = x + y over n elements (n a multiple of VEC), VEC at a time.
template <typename Elem, int VEC>
__global__ void add_arrays(const Elem* x, const Elem* y, Elem* out, long long n) {
    typedef typename Compute<Elem>::type Real;
    typedef Pack<Elem, VEC> P;
    FOR_EACH_ELEMENT(p, n / VEC) {
        const P a = reinterpret_cast<const P*>(x)[p], b = reinterpret_cast<const P*>(y)[p];
        P c;
#pragma unroll
        for (int e = 0; e < VEC; ++e) c.v[e] = Elem(Real(a.v[e]) + Real(b.v[e]));
        reinterpret_cast<P*>(out)[p] = c;
    }
}

// y[r, c] += b[c] in place over rows of C values (C a multiple of VEC: no pack straddles two rows).
template <typename Elem, int VEC>
__global__ void add_bias(Elem* y, const Elem* b, long long n, long long C) {
    typedef typename Compute<Elem>::type Real;
    typedef Pack<Elem, VEC> P;
    FOR_EACH_ELEMENT(p, n / VEC) {
        P a = reinterpret_cast<P*>(y)[p];
        const P bias = reinterpret_cast<const P*>(b)[(p * VEC % C) / VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) a.v[e] = Elem(Real(a.v[e]) + Real(bias.v[e]));
        reinterpret_cast<P*>(y)[p] = a;
    }
}
"""
_KERNELS = KernelModule(
    _SOURCE, ("add_arrays", "add_bias"), dtypes=("float32", "float64", "bfloat16"), vectorised=True
)


def residual_add(x, branch):
    """x + branch in one vectorised kernel.   x, branch: (B, T, C) of one dtype -> a new array."""
    import cupy

    if x.shape != branch.shape or x.dtype != branch.dtype or x.dtype.name not in _KERNELS.dtypes:
        return x + branch  # broadcasting or mixed dtypes: CuPy's own add
    x, branch = cupy.ascontiguousarray(x), cupy.ascontiguousarray(branch)
    out = cupy.empty_like(x)
    kernel = _KERNELS.get("add_arrays", x.dtype, vectorised=vectorisable(x.size, x, branch, out))
    launch_elementwise(kernel, x.size, (x, branch, out, x.size))
    return out


def add_bias_(y, b) -> None:
    """y += b in place over the last axis.   y: (..., C) C-contiguous, b: (C,) of y's dtype."""
    import cupy

    C = y.shape[-1]
    b = cupy.ascontiguousarray(b, dtype=y.dtype)
    kernel = _KERNELS.get("add_bias", y.dtype, vectorised=vectorisable(C, y, b))
    launch_elementwise(kernel, y.size, (y, b, y.size, C))
