"""Rotary position embedding on the GPU: the rotation of every (x1, x2) pair in one kernel each way.

The reference (layers/rope.py) splits x into two strided halves and makes six temporaries and a
concatenation, eight passes over q or k per call. Here one thread rotates one pair, reading x at its
own strides (the per-head view of a projection's output is read in place) and writing the result
once. The backward is the same kernel with the sine negated: the transpose of a rotation is the
rotation by the negative angle. Its result is laid out as (B, T, H, hs) underneath, so that the
model's ``merge_heads`` of it is a view, not a copy. bf16 arrays are rotated in float32 arithmetic.
The tables are (T, hs/2), shared by every row, or (B, 1, T, hs/2) for packed rows, whose positions
restart with each example: then row b reads its own table.
"""

from __future__ import annotations

import numpy as np

from ....layers.rope import ROPE_PAIRINGS, RopeCache
from .blocks import KernelModule, head_strides, launch_elementwise

_SOURCE = r"""
// out[pair] = (x1 cos - x2 s, x1 s + x2 cos) with s = sin (forward) or -sin (backward). Element i
// of the loop is pair j of position t of head h of row b; the pair is (j, j + half) or (2j, 2j + 1).
template <typename Elem>
__global__ void rope_rotate(const Elem* x, const Elem* cos_table, const Elem* sin_table, Elem* out,
                            int H, int T, int half, int adjacent, int negate_sin, int table_per_row,
                            long long xb, long long xh, long long xt,
                            long long ob, long long oh, long long ot, long long n) {
    typedef typename Compute<Elem>::type Real;
    FOR_EACH_ELEMENT(i, n) {  // i over (B, H, T, half)
        const int j = i % half;
        const long long rest = i / half;
        const int t = rest % T, h = (rest / T) % H;
        const long long b = rest / ((long long)T * H);
        const int d1 = adjacent ? 2 * j : j, d2 = adjacent ? 2 * j + 1 : j + half;
        const Elem* xr = x + b * xb + h * xh + t * xt;
        Elem* outr = out + b * ob + h * oh + t * ot;
        const Real x1 = Real(xr[d1]), x2 = Real(xr[d2]);
        const long long at = ((table_per_row ? b * T : 0) + t) * half + j;  // this position's angle, pair j
        const Real c = Real(cos_table[at]), s_raw = Real(sin_table[at]);
        const Real s = negate_sin ? -s_raw : s_raw;
        outr[d1] = Elem(x1 * c - x2 * s);
        outr[d2] = Elem(x1 * s + x2 * c);
    }
}
"""
_KERNELS = KernelModule(_SOURCE, ("rope_rotate",), dtypes=("float32", "float64", "bfloat16"))


def _rotate(x, cos, sin, pairing: str, out, negate_sin: bool):
    import cupy

    B, H, T, hs = x.shape
    if pairing not in ROPE_PAIRINGS:
        raise ValueError(f"unknown RoPE pairing {pairing!r}; choose one of {ROPE_PAIRINGS}")
    shapes = ((T, hs // 2), (B, 1, T, hs // 2))
    if cos.shape not in shapes or sin.shape != cos.shape:
        raise ValueError(
            f"RoPE tables have shape {cos.shape}, expected (T, hs/2) = {shapes[0]} or {shapes[1]}"
        )
    if x.strides[3] != x.dtype.itemsize:
        x = cupy.ascontiguousarray(x)
    cos, sin = (cupy.ascontiguousarray(table, dtype=x.dtype) for table in (cos, sin))
    n = B * H * T * (hs // 2)
    args = (x, cos, sin, out, np.int32(H), np.int32(T), np.int32(hs // 2), np.int32(pairing == "adjacent"),
            np.int32(negate_sin), np.int32(cos.ndim == 4), *head_strides(x, "x"), *head_strides(out, "out"),
            np.int64(n))  # fmt: skip
    launch_elementwise(_KERNELS.get("rope_rotate", x.dtype), n, args)
    return out


def rope_forward(x, cos, sin, pairing: str = "half"):
    """Rotate every pair of x.   x: (B, H, T, hs), any strides; cos, sin: (T, hs/2) or (B, 1, T, hs/2).

    Returns (out contiguous, RopeCache).
    """
    import cupy

    out = _rotate(x, cos, sin, pairing, cupy.empty(x.shape, dtype=x.dtype), negate_sin=False)
    return out, RopeCache(cos=cos, sin=sin, pairing=pairing)


def rope_backward(dout, cache: RopeCache):
    """dx: the rotation by the negative angle.   dout: (B, H, T, hs) -> (B, H, T, hs) view of (B, T, H, hs)."""
    import cupy

    B, H, T, hs = dout.shape
    dx = cupy.empty((B, T, H, hs), dtype=dout.dtype).transpose(0, 2, 1, 3)  # (B, H, T, hs) view
    return _rotate(dout, cache.cos, cache.sin, cache.pairing, dx, negate_sin=True)
