"""LayerNorm over the last axis: one thread block per row, and column sums for dw and db.

Forward, per row of C values (three passes over the row; the first reads device memory, the other
two mostly hit the cache, since a row is a few kilobytes; rows of up to 1024 values take one warp
each and keep the row in registers, longer rows a whole block):
    1. mean = sum(x) / C                              block-wide sum
    2. var = sum((x - mean)^2) / C                    block-wide sum around the mean (two-pass:
                                                      no cancellation, unlike E[x^2] - mean^2)
    3. xhat = (x - mean) * rstd, out = xhat * w + b   one write each
Backward, per row: the two row means that dx needs, then dx, as in minilora.layers.layernorm.
dw and db sum over all rows instead: a second kernel adds up slabs of rows per column (partial
sums), and one small reduction adds the slabs. No atomics, so the result is deterministic.
"""

from __future__ import annotations

import math

from ....layers.layernorm import LAYERNORM_EPS, LayerNormCache
from .blocks import NULL, ROWS_PER_WARP_BLOCK, KernelModule, compute_dtype, launch_rows, launch_warp_rows

TILE_COLUMNS, ROW_LANES = 32, 8  # the column-sum kernel's block: 32 columns x 8 rows at a time
ROWS_PER_SLAB = 128  # rows summed by one column-sum block
WARP_ROW_MAX = 1024  # rows this long or shorter take one warp each (blocks.launch_warp_rows)
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: more rows make the slabs taller

_SOURCE = (
    f"#define TILE_COLUMNS {TILE_COLUMNS}\n#define ROW_LANES {ROW_LANES}\n"
    f"#define WARP_ROW_MAX {WARP_ROW_MAX}\n#define ROWS_PER_BLOCK {ROWS_PER_WARP_BLOCK}\n"
    + r"""
// One block per row; passes 1, 2 and 3 of the module docstring, the first two ending in block sums.
// Real is Elem's arithmetic type (blocks.py): rstd, eps and every sum are in Real.
template <typename Elem>
__global__ void layernorm_forward(const Elem* x, const Elem* w, const Elem* b, Elem* out, Elem* xhat,
                                  typename Compute<Elem>::type* rstd, long long C,
                                  typename Compute<Elem>::type eps) {
    typedef typename Compute<Elem>::type Real;
    __shared__ Real scratch[32];
    const long long row = blockIdx.x, offset = row * C;
    x += offset; out += offset; xhat += offset;
    Real sum = 0;
    for (long long c = threadIdx.x; c < C; c += blockDim.x) sum += Real(x[c]);
    const Real mean = block_sum(sum, scratch) / Real(C);
    Real squares = 0;
    for (long long c = threadIdx.x; c < C; c += blockDim.x) {
        const Real centred = Real(x[c]) - mean;
        squares += centred * centred;
    }
    const Real r = Real(1) / sqrt(block_sum(squares, scratch) / Real(C) + eps);
    for (long long c = threadIdx.x; c < C; c += blockDim.x) {
        const Real h = (Real(x[c]) - mean) * r;
        xhat[c] = Elem(h);
        out[c] = Elem(b != nullptr ? h * Real(w[c]) + Real(b[c]) : h * Real(w[c]));
    }
    if (threadIdx.x == 0) rstd[row] = r;
}

// Rows of at most WARP_ROW_MAX values: one warp per row, the row held in registers (lane l keeps
// columns l, l + 32, ...), so the three passes read device memory once and the sums are warp
// shuffles with no barrier. ROWS_PER_BLOCK rows (warps) per block.
template <typename Elem>
__global__ void layernorm_forward_warp(const Elem* x, const Elem* w, const Elem* b, Elem* out, Elem* xhat,
                                       typename Compute<Elem>::type* rstd, long long n_rows, long long C,
                                       typename Compute<Elem>::type eps) {
    typedef typename Compute<Elem>::type Real;
    constexpr int PER_LANE = WARP_ROW_MAX / 32;
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;  // a whole warp leaves together: the shuffles below stay complete
    const long long offset = row * C;
    x += offset; out += offset; xhat += offset;
    Real v[PER_LANE], sum = 0;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const long long c = lane + 32 * k;
        v[k] = c < C ? Real(x[c]) : Real(0);
        sum += v[k];
    }
    const Real mean = warp_sum(sum) / Real(C);
    Real squares = 0;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const Real centred = lane + 32 * k < C ? v[k] - mean : Real(0);
        squares += centred * centred;
    }
    const Real r = Real(1) / sqrt(warp_sum(squares) / Real(C) + eps);
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const long long c = lane + 32 * k;
        if (c >= C) break;
        const Real h = (v[k] - mean) * r;
        xhat[c] = Elem(h);
        out[c] = Elem(b != nullptr ? h * Real(w[c]) + Real(b[c]) : h * Real(w[c]));
    }
    if (lane == 0) rstd[row] = r;
}

// A product rounded to the type, never contracted into a multiply-add with what follows it.
__device__ __forceinline__ float rounded_product(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double rounded_product(double a, double b) { return __dmul_rn(a, b); }

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dxhat = dout * w: one block per row.
template <typename Elem>
__global__ void layernorm_backward_dx(const Elem* dout, const Elem* xhat,
                                      const typename Compute<Elem>::type* rstd, const Elem* w, Elem* dx,
                                      long long C) {
    typedef typename Compute<Elem>::type Real;
    __shared__ Real scratch[32];
    const long long row = blockIdx.x, offset = row * C;
    dout += offset; xhat += offset; dx += offset;
    Real sum_g = 0, sum_g_xhat = 0;
    for (long long c = threadIdx.x; c < C; c += blockDim.x) {
        const Real g = rounded_product(Real(dout[c]), Real(w[c]));
        sum_g += g;
        sum_g_xhat += g * Real(xhat[c]);
    }
    const Real mean_g = block_sum(sum_g, scratch) / Real(C);
    const Real mean_g_xhat = block_sum(sum_g_xhat, scratch) / Real(C);
    const Real r = rstd[row];
    // g is rounded the same way in both loops: were the compiler to fuse g - mean_g into one
    // multiply-add, g's rounding error would survive the subtraction and be amplified by rstd.
    for (long long c = threadIdx.x; c < C; c += blockDim.x)
        dx[c] = Elem(r * (rounded_product(Real(dout[c]), Real(w[c])) - mean_g - Real(xhat[c]) * mean_g_xhat));
}

// layernorm_backward_dx for rows of at most WARP_ROW_MAX values: one warp per row, g and xhat in registers.
template <typename Elem>
__global__ void layernorm_backward_dx_warp(const Elem* dout, const Elem* xhat,
                                           const typename Compute<Elem>::type* rstd, const Elem* w, Elem* dx,
                                           long long n_rows, long long C) {
    typedef typename Compute<Elem>::type Real;
    constexpr int PER_LANE = WARP_ROW_MAX / 32;
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const long long offset = row * C;
    dout += offset; xhat += offset; dx += offset;
    Real g[PER_LANE], h[PER_LANE], sum_g = 0, sum_g_xhat = 0;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const long long c = lane + 32 * k;
        g[k] = c < C ? rounded_product(Real(dout[c]), Real(w[c])) : Real(0);
        h[k] = c < C ? Real(xhat[c]) : Real(0);
        sum_g += g[k];
        sum_g_xhat += g[k] * h[k];
    }
    const Real mean_g = warp_sum(sum_g) / Real(C);
    const Real mean_g_xhat = warp_sum(sum_g_xhat) / Real(C);
    const Real r = rstd[row];
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const long long c = lane + 32 * k;
        if (c >= C) break;
        dx[c] = Elem(r * (g[k] - mean_g - h[k] * mean_g_xhat));
    }
}

// Column sums over a slab of rows: dw_part[slab, c] = sum of dout * xhat, db_part[slab, c] = sum of dout.
// Block (TILE_COLUMNS = 32, ROW_LANES = 8): threadIdx.x picks one of 32 adjacent columns (a warp reads
// 32 consecutive values of a row: coalesced), threadIdx.y one of 8 row lanes that stride down the slab.
// The lanes' sums then meet in shared memory and lane 0 adds them in a fixed order.
// db_part is null without a bias. The partial sums are in Real (float32 for bf16 arrays).
template <typename Elem>
__global__ void layernorm_backward_params(const Elem* dout, const Elem* xhat, typename Compute<Elem>::type* dw_part,
                                          typename Compute<Elem>::type* db_part, long long n_rows, long long C,
                                          long long rows_per_slab) {
    typedef typename Compute<Elem>::type Real;
    __shared__ Real dw_lanes[ROW_LANES][TILE_COLUMNS], db_lanes[ROW_LANES][TILE_COLUMNS];
    const long long c = (long long)blockIdx.x * TILE_COLUMNS + threadIdx.x;
    const long long first = (long long)blockIdx.y * rows_per_slab;
    const long long end = first + rows_per_slab < n_rows ? first + rows_per_slab : n_rows;
    Real dw = 0, db = 0;
    if (c < C) {
        for (long long r = first + threadIdx.y; r < end; r += ROW_LANES) {
            const Real d = Real(dout[r * C + c]);
            dw += d * Real(xhat[r * C + c]);
            db += d;
        }
    }
    dw_lanes[threadIdx.y][threadIdx.x] = dw;
    db_lanes[threadIdx.y][threadIdx.x] = db;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        for (int lane = 1; lane < ROW_LANES; ++lane) {
            dw += dw_lanes[lane][threadIdx.x];
            db += db_lanes[lane][threadIdx.x];
        }
        dw_part[blockIdx.y * C + c] = dw;
        if (db_part != nullptr) db_part[blockIdx.y * C + c] = db;
    }
}
"""
)
_KERNELS = KernelModule(
    _SOURCE,
    (
        "layernorm_forward",
        "layernorm_forward_warp",
        "layernorm_backward_dx",
        "layernorm_backward_dx_warp",
        "layernorm_backward_params",
    ),
    dtypes=("float32", "float64", "bfloat16"),
)


def layernorm_forward(x, w, b=None, eps: float = LAYERNORM_EPS):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis.   x: (..., C) -> (y, LayerNormCache)."""
    import cupy

    C = x.shape[-1]
    rows = cupy.ascontiguousarray(x).reshape(-1, C)  # (N, C)
    out, xhat = cupy.empty_like(rows), cupy.empty_like(rows)
    real = compute_dtype(x.dtype)  # float32 for bf16 arrays
    rstd = cupy.empty(x.shape[:-1] + (1,), dtype=real)  # (..., 1)
    w_c = cupy.ascontiguousarray(w, dtype=x.dtype)
    b_c = NULL if b is None else cupy.ascontiguousarray(b, dtype=x.dtype)
    n_rows = rows.shape[0]
    if C <= WARP_ROW_MAX:
        args = (rows, w_c, b_c, out, xhat, rstd, n_rows, C, real.type(eps))
        launch_warp_rows(_KERNELS.get("layernorm_forward_warp", x.dtype), n_rows, args)
    else:
        args = (rows, w_c, b_c, out, xhat, rstd, C, real.type(eps))
        launch_rows(_KERNELS.get("layernorm_forward", x.dtype), n_rows, C, args)
    return out.reshape(x.shape), LayerNormCache(
        xhat=xhat.reshape(x.shape), rstd=rstd, w=w, has_bias=b is not None
    )


def layernorm_backward(dout, cache: LayerNormCache):
    """(dx, dw, db) of y = xhat * w + b; db is None without a bias. Takes the reference's cache too."""
    import cupy

    C = dout.shape[-1]
    g = cupy.ascontiguousarray(dout).reshape(-1, C)  # (N, C)
    xhat = cupy.ascontiguousarray(cache.xhat, dtype=dout.dtype).reshape(-1, C)
    rstd = cupy.ascontiguousarray(cache.rstd, dtype=compute_dtype(dout.dtype))  # N values, one per row
    w = cupy.ascontiguousarray(cache.w, dtype=dout.dtype)
    dx = cupy.empty_like(g)
    n_rows = g.shape[0]
    if C <= WARP_ROW_MAX:
        kernel = _KERNELS.get("layernorm_backward_dx_warp", dout.dtype)
        launch_warp_rows(kernel, n_rows, (g, xhat, rstd, w, dx, n_rows, C))
    else:
        launch_rows(_KERNELS.get("layernorm_backward_dx", dout.dtype), n_rows, C, (g, xhat, rstd, w, dx, C))
    dw, db = column_sums(g, xhat, cache.has_bias)
    w_dtype = cache.w.dtype  # the parameter's own: float32 for a trained norm over a bf16 stream
    return (
        dx.reshape(dout.shape),
        dw.astype(w_dtype, copy=False),
        None if db is None else db.astype(w_dtype, copy=False),
    )


def column_sums(g, xhat, has_bias: bool):
    """dw = sum over rows of g * xhat, db = sum over rows of g (None without a bias), each (C,), in Real."""
    import cupy

    N, C = g.shape
    rows_per_slab = max(ROWS_PER_SLAB, math.ceil(N / MAX_GRID_Y))
    n_slabs = math.ceil(N / rows_per_slab)
    real = compute_dtype(g.dtype)
    dw_part = cupy.empty((n_slabs, C), dtype=real)  # (slabs, C) partial sums
    db_part = cupy.empty((n_slabs, C), dtype=real) if has_bias else None
    if n_slabs > 0 and C > 0:
        kernel = _KERNELS.get("layernorm_backward_params", g.dtype)
        kernel(
            (math.ceil(C / TILE_COLUMNS), n_slabs),
            (TILE_COLUMNS, ROW_LANES),
            (g, xhat, dw_part, NULL if db_part is None else db_part, N, C, rows_per_slab),
        )
    return dw_part.sum(axis=0), None if db_part is None else db_part.sum(axis=0)
