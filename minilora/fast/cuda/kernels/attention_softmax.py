"""Row kernels over the (B, H, T, T) attention scores, in place: causal softmax, its backward, and
the recomputation of the probabilities from the per-row log-sum-exp.

One thread block per row of B * H * T rows. Row r holds the scores of query position i = r mod T
against every key position j; the causal mask lets it see j = 0..i only. Each kernel reads the
visible part of the row and writes the whole row, with 0 above the diagonal, so the probabilities
and their gradient are exact zeros where the reference has exp(-inf) = 0.
"""

from __future__ import annotations

import math

from .blocks import NULL, KernelModule, launch_rows

_SOURCE = r"""
// Real is Elem's arithmetic type (float32 for bf16 scores); lse is always in Real.

// scores -> probabilities. Also writes lse[r] = m + log(s), the log-sum-exp of the row, when lse is
// not null (the long-block variant keeps it instead of the probabilities).
template <typename Elem>
__global__ void causal_softmax(Elem* att, typename Compute<Elem>::type* lse, long long T) {
    typedef typename Compute<Elem>::type Real;
    __shared__ Real scratch[32];
    const long long r = blockIdx.x, i = r % T;
    Elem* row = att + r * T;
    Real m = Real(row[0]);  // key 0 is visible from every query: a safe start for the maximum
    for (long long j = threadIdx.x; j <= i; j += blockDim.x) m = Real(row[j]) > m ? Real(row[j]) : m;
    m = block_max(m, scratch);
    Real s = 0;
    for (long long j = threadIdx.x; j <= i; j += blockDim.x) s += exp(Real(row[j]) - m);
    s = block_sum(s, scratch);  // its barriers also order every read of row[0] before the writes below
    for (long long j = threadIdx.x; j < T; j += blockDim.x)
        row[j] = Elem(j <= i ? exp(Real(row[j]) - m) / s : Real(0));
    if (lse != nullptr && threadIdx.x == 0) lse[r] = m + log(s);
}

// scores -> probabilities again, from the saved log-sum-exp: p_ij = exp(s_ij - lse_i). No reduction.
template <typename Elem>
__global__ void causal_probs_from_lse(Elem* att, const typename Compute<Elem>::type* lse, long long T) {
    typedef typename Compute<Elem>::type Real;
    const long long r = blockIdx.x, i = r % T;
    Elem* row = att + r * T;
    const Real l = lse[r];
    for (long long j = threadIdx.x; j < T; j += blockDim.x)
        row[j] = Elem(j <= i ? exp(Real(row[j]) - l) : Real(0));
}

// grad: d loss / d att (before dropout) -> d loss / d scores, in place. With dropout the gradient
// reaching att is grad * mask (mask null without dropout). Then, per row,
//     ds_j = att_j * (g_j - sum_k g_k att_k)            one block-wide sum
template <typename Elem>
__global__ void causal_softmax_backward(const Elem* att, Elem* grad, const Elem* mask, long long T) {
    typedef typename Compute<Elem>::type Real;
    __shared__ Real scratch[32];
    const long long r = blockIdx.x, i = r % T, offset = r * T;
    att += offset; grad += offset;
    if (mask != nullptr) mask += offset;
    Real dot = 0;
    for (long long j = threadIdx.x; j <= i; j += blockDim.x)
        dot += (mask != nullptr ? Real(grad[j]) * Real(mask[j]) : Real(grad[j])) * Real(att[j]);
    dot = block_sum(dot, scratch);
    for (long long j = threadIdx.x; j < T; j += blockDim.x) {
        const Real g = mask != nullptr ? Real(grad[j]) * Real(mask[j]) : Real(grad[j]);
        grad[j] = Elem(j <= i ? Real(att[j]) * (g - dot) : Real(0));
    }
}
"""
_KERNELS = KernelModule(
    _SOURCE,
    ("causal_softmax", "causal_probs_from_lse", "causal_softmax_backward"),
    dtypes=("float32", "float64", "bfloat16"),
)


def _rows(att) -> int:
    return math.prod(att.shape[:-1])  # B * H * T


def causal_softmax(att, lse=None) -> None:
    """att (B, H, T, T), contiguous: scores -> causal softmax, in place; lse (B, H, T) if given."""
    T = att.shape[-1]
    launch_rows(
        _KERNELS.get("causal_softmax", att.dtype), _rows(att), T, (att, NULL if lse is None else lse, T)
    )


def causal_probs_from_lse(att, lse) -> None:
    """att (B, H, T, T), contiguous: the same scores as the forward's -> its probabilities, in place."""
    T = att.shape[-1]
    launch_rows(_KERNELS.get("causal_probs_from_lse", att.dtype), _rows(att), T, (att, lse, T))


def causal_softmax_backward(att, grad, mask=None) -> None:
    """grad (B, H, T, T) = d loss / d (att * mask) -> d loss / d scores, in place; all contiguous."""
    T = att.shape[-1]
    launch_rows(
        _KERNELS.get("causal_softmax_backward", att.dtype),
        _rows(att),
        T,
        (att, grad, NULL if mask is None else mask, T),
    )
