"""Softmax cross-entropy: one thread block per row of logits forward, one elementwise kernel back.

bf16 logits are read into float32: the maximum, the sum, the log and the loss are float32 arithmetic,
and the loss is a float32 number whatever the logits' dtype.

Forward, per row of V logits (the reference makes about eight passes and five temporaries):
    1. m = max(logits)                                        block-wide maximum
    2. s = sum(exp(logits - m))                               block-wide sum; every term is <= 1
    3. probs = exp(logits - m) / s,  loss_row = log(s) - (logits[target] - m)   (0 for an IGNORE target)
The loss is the per-row losses weighted by the reference's ``scored_weights`` (each scored row's share
of the mean, 0 for IGNORE), one small reduction that stays on the device (no host sync). The backward
scales row n by dloss * weights[n]. Target ids are not range-checked here (the model checks them on
the host).
"""

from __future__ import annotations

from ....layers.cross_entropy import IGNORE, CrossEntropyCache, scored_weights
from .blocks import KernelModule, compute_dtype, launch_elementwise, launch_rows

_SOURCE = r"""
// Real is Elem's arithmetic type (float32 for bf16 logits): the row's max, sum and loss are in Real.
template <typename Elem>
__global__ void softmax_cross_entropy_forward(const Elem* logits, const long long* targets, Elem* probs,
                                              typename Compute<Elem>::type* row_loss, long long V,
                                              long long ignore) {
    typedef typename Compute<Elem>::type Real;
    __shared__ Real scratch[32];
    const long long row = blockIdx.x, offset = row * V;
    logits += offset; probs += offset;
    Real m = Real(logits[0]);  // every row has a column 0: a safe start for the maximum
    for (long long c = threadIdx.x; c < V; c += blockDim.x) m = Real(logits[c]) > m ? Real(logits[c]) : m;
    m = block_max(m, scratch);
    Real s = 0;
    for (long long c = threadIdx.x; c < V; c += blockDim.x) s += exp(Real(logits[c]) - m);
    s = block_sum(s, scratch);
    for (long long c = threadIdx.x; c < V; c += blockDim.x) probs[c] = Elem(exp(Real(logits[c]) - m) / s);
    if (threadIdx.x == 0) row_loss[row] = targets[row] == ignore ? Real(0) : log(s) - (Real(logits[targets[row]]) - m);
}

// dlogits = (probs - onehot(targets)) * dloss * weights[row] over the flat (N, V) array: row = i / V,
// column = i - row V. An IGNORE target matches no column, and its row's weight is 0.
template <typename Elem>
__global__ void softmax_cross_entropy_backward(const Elem* probs, const long long* targets,
                                               const typename Compute<Elem>::type* dloss,
                                               const typename Compute<Elem>::type* weights, Elem* dlogits,
                                               long long V, long long N) {
    typedef typename Compute<Elem>::type Real;
    FOR_EACH_ELEMENT(i, N * V) {
        const long long row = i / V;
        const Real onehot = (i - row * V == targets[row]) ? Real(1) : Real(0);
        dlogits[i] = Elem((Real(probs[i]) - onehot) * (*dloss * weights[row]));
    }
}
"""
_KERNELS = KernelModule(
    _SOURCE,
    ("softmax_cross_entropy_forward", "softmax_cross_entropy_backward"),
    dtypes=("float32", "float64", "bfloat16"),
)


def cross_entropy_forward(logits, targets):
    """Mean cross-entropy in nats over the scored targets.   logits: (..., V), targets: (...) int -> (0-d, cache)."""
    import cupy

    logits_shape = logits.shape
    V = logits_shape[-1]
    rows = cupy.ascontiguousarray(logits).reshape(-1, V)  # (N, V)
    targets = cupy.ascontiguousarray(targets, dtype=cupy.int64).reshape(-1)  # (N,)
    probs = cupy.empty_like(rows)
    row_loss = cupy.empty(rows.shape[0], dtype=compute_dtype(rows.dtype))  # (N,): float32 for bf16 logits
    launch_rows(
        _KERNELS.get("softmax_cross_entropy_forward", rows.dtype),
        rows.shape[0],
        V,
        (rows, targets, probs, row_loss, V, IGNORE),
    )
    weights = scored_weights(targets, row_loss.dtype)  # (N,)
    cache = CrossEntropyCache(probs=probs, targets=targets, weights=weights, logits_shape=logits_shape)
    return (weights * row_loss).sum(), cache


def cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """dlogits = dloss * weights * (probs - onehot(targets)), in the logits' shape; dloss a float or 0-d array."""
    import cupy

    probs = cache.probs  # (N, V)
    real = compute_dtype(probs.dtype)
    if isinstance(dloss, cupy.ndarray):
        dloss = dloss.astype(real, copy=False)
    else:  # a Python number: filled in on the device, so nothing waits on a host-to-device copy
        dloss = cupy.full((), dloss, dtype=real)
    N, V = probs.shape
    targets = cupy.ascontiguousarray(cache.targets, dtype=cupy.int64)
    dlogits = cupy.empty_like(probs)
    launch_elementwise(
        _KERNELS.get("softmax_cross_entropy_backward", probs.dtype),
        N * V,
        (probs, targets, dloss, cache.weights, dlogits, V, N),
    )
    return dlogits.reshape(cache.logits_shape)
