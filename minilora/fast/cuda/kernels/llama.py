"""The Llama family's layers on the GPU: RMSNorm and SwiGLU fused (grouped-query attention is
gqa_attention.py, RoPE rope.py).

- RMSNorm: one warp per row (8 rows to a block): a warp-wide sum of squares, then xhat and the
  output in one more pass over the row (a few kilobytes, still in the cache); the backward's dx the
  same way after one warp-wide sum, dw by LayerNorm's deterministic column sums.
- SwiGLU: one elementwise kernel each way, 16 bytes a thread. The reference makes a temporary per
  operator (exp, abs, where, three products ...), each a trip through memory over the MLP's widest
  activation; here sigmoid(g) and the output are written in one pass, dg and du in one more.
Both take float32, float64 or bfloat16 arrays; bf16 is read into float32 and rounded once, where a
result is stored. They return the reference's cache types, and each backward also takes the
reference forward's cache.
"""

from __future__ import annotations

from ....layers.rmsnorm import RMSNormCache
from ....layers.swiglu import SwiGLUCache
from .blocks import (
    ROWS_PER_WARP_BLOCK,
    KernelModule,
    compute_dtype,
    launch_elementwise,
    launch_warp_rows,
    vectorisable,
)
from .layernorm import column_sums

_ALL = ("float32", "float64", "bfloat16")

_NORM_SOURCE = (
    f"#define ROWS_PER_BLOCK {ROWS_PER_WARP_BLOCK}\n"
    + r"""
// Row `row` of the block's warp, or -1 past the last row (the whole warp leaves together).
__device__ __forceinline__ long long warp_row(long long n_rows) {
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    return row < n_rows ? row : -1;
}

// rstd = 1 / sqrt(mean(x^2) + eps), xhat = x * rstd, out = xhat * w. Lane l takes columns l, l + 32, ...
template <typename Elem>
__global__ void rmsnorm_forward(const Elem* x, const Elem* w, Elem* out, Elem* xhat,
                                typename Compute<Elem>::type* rstd, long long n_rows, long long C,
                                typename Compute<Elem>::type eps) {
    typedef typename Compute<Elem>::type Real;
    const long long row = warp_row(n_rows);
    if (row < 0) return;
    const int lane = threadIdx.x & 31;
    x += row * C; out += row * C; xhat += row * C;
    Real squares = 0;
    for (long long c = lane; c < C; c += 32) {
        const Real v = Real(x[c]);
        squares += v * v;
    }
    const Real r = Real(1) / sqrt(warp_sum(squares) / Real(C) + eps);
    for (long long c = lane; c < C; c += 32) {
        const Real h = Real(x[c]) * r;
        xhat[c] = Elem(h);
        out[c] = Elem(h * Real(w[c]));
    }
    if (lane == 0) rstd[row] = r;
}

// dx = rstd * (g - xhat * mean(g * xhat)), g = dout * w.
template <typename Elem>
__global__ void rmsnorm_backward_dx(const Elem* dout, const Elem* xhat, const typename Compute<Elem>::type* rstd,
                                    const Elem* w, Elem* dx, long long n_rows, long long C) {
    typedef typename Compute<Elem>::type Real;
    const long long row = warp_row(n_rows);
    if (row < 0) return;
    const int lane = threadIdx.x & 31;
    dout += row * C; xhat += row * C; dx += row * C;
    Real sum_g_xhat = 0;
    for (long long c = lane; c < C; c += 32) sum_g_xhat += Real(dout[c]) * Real(w[c]) * Real(xhat[c]);
    const Real mean_g_xhat = warp_sum(sum_g_xhat) / Real(C), r = rstd[row];
    for (long long c = lane; c < C; c += 32)
        dx[c] = Elem(r * (Real(dout[c]) * Real(w[c]) - Real(xhat[c]) * mean_g_xhat));
}
"""
)
_NORM_KERNELS = KernelModule(_NORM_SOURCE, ("rmsnorm_forward", "rmsnorm_backward_dx"), dtypes=_ALL)

_SWIGLU_SOURCE = r"""
// sig = sigmoid(g), out = g sig u; VEC elements at a time. exp(-g) = inf gives sig = 0: no NaN.
template <typename Elem, int VEC>
__global__ void swiglu_forward(const Elem* g, const Elem* u, Elem* out, Elem* sig, long long n) {
    typedef typename Compute<Elem>::type Real;
    typedef Pack<Elem, VEC> P;
    FOR_EACH_ELEMENT(p, n / VEC) {
        const P gp = reinterpret_cast<const P*>(g)[p], up = reinterpret_cast<const P*>(u)[p];
        P o, s;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const Real gv = Real(gp.v[e]), sv = Real(1) / (Real(1) + exp(-gv));
            s.v[e] = Elem(sv);
            o.v[e] = Elem(gv * sv * Real(up.v[e]));
        }
        reinterpret_cast<P*>(out)[p] = o;
        reinterpret_cast<P*>(sig)[p] = s;
    }
}

// du = dout g sig, dg = dout u sig (1 + g (1 - sig)): the reference's formulas.
template <typename Elem, int VEC>
__global__ void swiglu_backward(const Elem* dout, const Elem* g, const Elem* u, const Elem* sig,
                                Elem* dg, Elem* du, long long n) {
    typedef typename Compute<Elem>::type Real;
    typedef Pack<Elem, VEC> P;
    FOR_EACH_ELEMENT(p, n / VEC) {
        const P dp = reinterpret_cast<const P*>(dout)[p], gp = reinterpret_cast<const P*>(g)[p];
        const P up = reinterpret_cast<const P*>(u)[p], sp = reinterpret_cast<const P*>(sig)[p];
        P dgp, dup;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const Real d = Real(dp.v[e]), gv = Real(gp.v[e]), sv = Real(sp.v[e]);
            dup.v[e] = Elem(d * gv * sv);
            dgp.v[e] = Elem(d * Real(up.v[e]) * sv * (Real(1) + gv * (Real(1) - sv)));
        }
        reinterpret_cast<P*>(dg)[p] = dgp;
        reinterpret_cast<P*>(du)[p] = dup;
    }
}

"""
_SWIGLU_KERNELS = KernelModule(
    _SWIGLU_SOURCE, ("swiglu_forward", "swiglu_backward"), dtypes=_ALL, vectorised=True
)


def rmsnorm_forward(x, w, eps: float):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis.   x: (..., C) -> (y, RMSNormCache)."""
    import cupy

    C = x.shape[-1]
    rows = cupy.ascontiguousarray(x).reshape(-1, C)  # (N, C)
    out, xhat = cupy.empty_like(rows), cupy.empty_like(rows)
    real = compute_dtype(x.dtype)  # rstd in the kernel's arithmetic: float32 for bf16
    rstd = cupy.empty(x.shape[:-1] + (1,), dtype=real)  # (..., 1)
    w_c = cupy.ascontiguousarray(w, dtype=x.dtype)
    launch_warp_rows(_NORM_KERNELS.get("rmsnorm_forward", x.dtype), rows.shape[0],
                     (rows, w_c, out, xhat, rstd, rows.shape[0], C, real.type(eps)))  # fmt: skip
    return out.reshape(x.shape), RMSNormCache(xhat=xhat.reshape(x.shape), rstd=rstd, w=w)


def rmsnorm_backward(dout, cache: RMSNormCache):
    """(dx, dw) of y = xhat * w. Takes the reference's cache too."""
    import cupy

    C = dout.shape[-1]
    g = cupy.ascontiguousarray(dout).reshape(-1, C)  # (N, C)
    xhat = cupy.ascontiguousarray(cache.xhat, dtype=dout.dtype).reshape(-1, C)
    rstd = cupy.ascontiguousarray(cache.rstd, dtype=compute_dtype(dout.dtype))
    w = cupy.ascontiguousarray(cache.w, dtype=dout.dtype)
    dx = cupy.empty_like(g)
    launch_warp_rows(_NORM_KERNELS.get("rmsnorm_backward_dx", dout.dtype), g.shape[0],
                     (g, xhat, rstd, w, dx, g.shape[0], C))  # fmt: skip
    dw, _ = column_sums(g, xhat, has_bias=False)
    return dx.reshape(dout.shape), dw.astype(cache.w.dtype, copy=False)


def swiglu_forward(g, u):
    """out = g * sigmoid(g) * u in one kernel.   g, u: (...) -> (out, SwiGLUCache)."""
    import cupy

    g, u = cupy.ascontiguousarray(g), cupy.ascontiguousarray(u, dtype=g.dtype)
    out, sig = cupy.empty_like(g), cupy.empty_like(g)
    kernel = _SWIGLU_KERNELS.get("swiglu_forward", g.dtype, vectorised=vectorisable(g.size, g, u, out, sig))
    launch_elementwise(kernel, g.size, (g, u, out, sig, g.size))
    return out, SwiGLUCache(g=g, u=u, sig=sig)


def swiglu_backward(dout, cache: SwiGLUCache):
    """(dg, du) in one kernel, the reference's formulas."""
    import cupy

    g = cupy.ascontiguousarray(cache.g)
    dout, u, sig = (cupy.ascontiguousarray(a, dtype=g.dtype) for a in (dout, cache.u, cache.sig))
    dg, du = cupy.empty_like(g), cupy.empty_like(g)
    kernel = _SWIGLU_KERNELS.get(
        "swiglu_backward", g.dtype, vectorised=vectorisable(g.size, dout, g, u, sig, dg, du)
    )
    launch_elementwise(kernel, g.size, (dout, g, u, sig, dg, du, g.size))
    return dg, du
