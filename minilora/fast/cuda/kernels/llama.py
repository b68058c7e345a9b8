"""The Llama family's layers on the GPU: RMSNorm and SwiGLU fused, grouped-query attention around
the causal softmax row kernels.

- RMSNorm: one thread block per row, as LayerNorm (layernorm.py) without the mean: one block-wide
  sum of squares, then xhat and the output in one pass; the backward's dx in one pass per row after
  one block-wide sum, dw by LayerNorm's deterministic column sums.
- SwiGLU: one elementwise kernel each way. The reference makes a temporary per operator (exp, abs,
  where, three products ...), each a trip through memory over the MLP's widest activation; here
  sigmoid(g) and the output are written in one pass, dg and du in one more.
- Grouped-query attention: the reference's products with the G query heads of a group stacked as
  rows (layers/gqa_attention.py), but the mask, the softmax and its backward done in place on the
  (B, H, T, T) scores by attention_softmax's row kernels, which is most of the reference's traffic.
They return the reference's cache types: each backward also takes the reference forward's cache.
"""

from __future__ import annotations

import functools
import math

from ....backend import matmul
from ....layers.gqa_attention import GQAAttentionCache, check_heads, group_heads, ungroup_heads
from ....layers.rmsnorm import RMSNormCache
from ....layers.swiglu import SwiGLUCache
from .attention_softmax import causal_softmax, causal_softmax_backward
from .blocks import KernelModule, launch_rows
from .layernorm import column_sums

_SOURCE = r"""
// One block per row: rstd = 1 / sqrt(mean(x^2) + eps), xhat = x * rstd, out = xhat * w.
template <typename Real>
__global__ void rmsnorm_forward(const Real* x, const Real* w, Real* out, Real* xhat, Real* rstd,
                                long long C, Real eps) {
    __shared__ Real scratch[32];
    const long long row = blockIdx.x, offset = row * C;
    x += offset; out += offset; xhat += offset;
    Real squares = 0;
    for (long long c = threadIdx.x; c < C; c += blockDim.x) squares += x[c] * x[c];
    const Real r = Real(1) / sqrt(block_sum(squares, scratch) / Real(C) + eps);
    for (long long c = threadIdx.x; c < C; c += blockDim.x) {
        const Real h = x[c] * r;
        xhat[c] = h;
        out[c] = h * w[c];
    }
    if (threadIdx.x == 0) rstd[row] = r;
}

// dx = rstd * (g - xhat * mean(g * xhat)), g = dout * w: one block per row.
template <typename Real>
__global__ void rmsnorm_backward_dx(const Real* dout, const Real* xhat, const Real* rstd, const Real* w,
                                    Real* dx, long long C) {
    __shared__ Real scratch[32];
    const long long row = blockIdx.x, offset = row * C;
    dout += offset; xhat += offset; dx += offset;
    Real sum_g_xhat = 0;
    for (long long c = threadIdx.x; c < C; c += blockDim.x) sum_g_xhat += dout[c] * w[c] * xhat[c];
    const Real mean_g_xhat = block_sum(sum_g_xhat, scratch) / Real(C);
    const Real r = rstd[row];
    for (long long c = threadIdx.x; c < C; c += blockDim.x) dx[c] = r * (dout[c] * w[c] - xhat[c] * mean_g_xhat);
}
"""
_KERNELS = KernelModule(_SOURCE, ("rmsnorm_forward", "rmsnorm_backward_dx"))


@functools.cache
def _swiglu_kernels():
    import cupy

    forward = cupy.ElementwiseKernel(
        "T g, T u", "T out, T sig",
        "sig = T(1) / (T(1) + exp(-g)); out = g * sig * u;",  # exp(-g) = inf gives sig = 0: no NaN
        "minilora_swiglu_forward",
    )  # fmt: skip
    backward = cupy.ElementwiseKernel(
        "T dout, T g, T u, T sig", "T dg, T du",
        "du = dout * g * sig; dg = dout * u * sig * (T(1) + g * (T(1) - sig));",
        "minilora_swiglu_backward",
    )  # fmt: skip
    return forward, backward


def swiglu_forward(g, u):
    """out = g * sigmoid(g) * u in one kernel.   g, u: (...) -> (out, SwiGLUCache)."""
    out, sig = _swiglu_kernels()[0](g, u)
    return out, SwiGLUCache(g=g, u=u, sig=sig)


def swiglu_backward(dout, cache: SwiGLUCache):
    """(dg, du) in one kernel, the reference's formulas."""
    return _swiglu_kernels()[1](dout, cache.g, cache.u, cache.sig)


def rmsnorm_forward(x, w, eps: float):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis.   x: (..., C) -> (y, RMSNormCache)."""
    import cupy

    C = x.shape[-1]
    rows = cupy.ascontiguousarray(x).reshape(-1, C)  # (N, C)
    out, xhat = cupy.empty_like(rows), cupy.empty_like(rows)
    rstd = cupy.empty(x.shape[:-1] + (1,), dtype=x.dtype)  # (..., 1)
    w_c = cupy.ascontiguousarray(w, dtype=x.dtype)
    launch_rows(_KERNELS.get("rmsnorm_forward", x.dtype), rows.shape[0], C,
                (rows, w_c, out, xhat, rstd, C, x.dtype.type(eps)))  # fmt: skip
    return out.reshape(x.shape), RMSNormCache(xhat=xhat.reshape(x.shape), rstd=rstd, w=w)


def rmsnorm_backward(dout, cache: RMSNormCache):
    """(dx, dw) of y = xhat * w. Takes the reference's cache too."""
    import cupy

    C = dout.shape[-1]
    g = cupy.ascontiguousarray(dout).reshape(-1, C)  # (N, C)
    xhat = cupy.ascontiguousarray(cache.xhat, dtype=dout.dtype).reshape(-1, C)
    rstd = cupy.ascontiguousarray(cache.rstd, dtype=dout.dtype)
    w = cupy.ascontiguousarray(cache.w, dtype=dout.dtype)
    dx = cupy.empty_like(g)
    launch_rows(_KERNELS.get("rmsnorm_backward_dx", dout.dtype), g.shape[0], C, (g, xhat, rstd, w, dx, C))
    dw, _ = column_sums(g, xhat, has_bias=False)
    return dx.reshape(dout.shape), dw


def gqa_attention_forward(q, k, v, dropout_mask=None):
    """Grouped-query causal attention.   q: (B, H, T, hs), k, v: (B, H_kv, T, hs) -> (y, GQAAttentionCache)."""
    import cupy

    H, H_kv = check_heads(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = q * scale  # (B, H, T, hs), contiguous
    k, v = cupy.ascontiguousarray(k), cupy.ascontiguousarray(v)
    att = ungroup_heads(matmul(group_heads(q, H_kv), k.swapaxes(-1, -2)), H)  # (B, H, T, T) scores
    causal_softmax(att)  # scores -> probabilities, in place
    if dropout_mask is not None:
        dropout_mask = cupy.ascontiguousarray(dropout_mask, dtype=att.dtype)
    att_used = att if dropout_mask is None else att * dropout_mask
    y = ungroup_heads(matmul(group_heads(att_used, H_kv), v), H)  # (B, H, T, hs)
    return y, GQAAttentionCache(q=q, k=k, v=v, att=att, dropout_mask=dropout_mask, scale=scale)


def gqa_attention_backward(dout, cache: GQAAttentionCache):
    """(dq, dk, dv) with the softmax's backward in place on the (B, H, T, T) gradient."""
    import cupy

    q, k, v, mask = cache.q, cache.k, cache.v, cache.dropout_mask
    H, H_kv = q.shape[1], k.shape[1]
    att = cupy.ascontiguousarray(cache.att)
    mask = None if mask is None else cupy.ascontiguousarray(mask, dtype=att.dtype)
    dy = group_heads(cupy.ascontiguousarray(dout), H_kv)  # (B, H_kv, G*T, hs)
    att_used = att if mask is None else att * mask
    dv_t = matmul(dy.swapaxes(-1, -2), group_heads(att_used, H_kv))  # (B, H_kv, hs, T), summed over the group
    del att_used
    grad = ungroup_heads(matmul(dy, cupy.ascontiguousarray(v).swapaxes(-1, -2)), H)  # (B, H, T, T)
    causal_softmax_backward(att, grad, mask)  # -> ds, in place
    grad = group_heads(grad, H_kv)  # (B, H_kv, G*T, T)
    dq = ungroup_heads(matmul(grad, cupy.ascontiguousarray(k)), H)  # (B, H, T, hs)
    dq *= cache.scale  # through q_scaled = q * scale
    dk_t = matmul(group_heads(cupy.ascontiguousarray(q), H_kv).swapaxes(-1, -2), grad)  # (B, H_kv, hs, T)
    return dq, dk_t.swapaxes(-1, -2), dv_t.swapaxes(-1, -2)
