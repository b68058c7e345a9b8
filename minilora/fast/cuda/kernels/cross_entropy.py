"""Softmax cross-entropy: one thread block per row of logits forward, one elementwise kernel back.

Forward, per row of V logits (the reference makes about eight passes and five temporaries):
    1. m = max(logits)                                        block-wide maximum
    2. s = sum(exp(logits - m))                               block-wide sum; every term is <= 1
    3. probs = exp(logits - m) / s,  loss_row = log(s) - (logits[target] - m)
The mean of the per-row losses is one small reduction and stays on the device (no host sync).
Target ids are not range-checked here (the model checks them on the host).
"""

from __future__ import annotations

import functools

from ....layers.cross_entropy import CrossEntropyCache
from .blocks import KernelModule, launch_rows

_SOURCE = r"""
template <typename Real>
__global__ void softmax_cross_entropy_forward(const Real* logits, const long long* targets, Real* probs,
                                              Real* row_loss, long long V) {
    __shared__ Real scratch[32];
    const long long row = blockIdx.x, offset = row * V;
    logits += offset; probs += offset;
    Real m = logits[0];  // every row has a column 0: a safe start for the maximum
    for (long long c = threadIdx.x; c < V; c += blockDim.x) m = logits[c] > m ? logits[c] : m;
    m = block_max(m, scratch);
    Real s = 0;
    for (long long c = threadIdx.x; c < V; c += blockDim.x) s += exp(logits[c] - m);
    s = block_sum(s, scratch);
    for (long long c = threadIdx.x; c < V; c += blockDim.x) probs[c] = exp(logits[c] - m) / s;
    if (threadIdx.x == 0) row_loss[row] = log(s) - (logits[targets[row]] - m);
}
"""
_KERNELS = KernelModule(_SOURCE, ("softmax_cross_entropy_forward",))


@functools.cache
def _backward_kernel():
    import cupy

    # The flat index i walks the (N, V) output row by row: row = i / V, column = i - row * V.
    return cupy.ElementwiseKernel(
        "T p, raw int64 targets, T dloss, int64 n_cols, int64 n_rows",
        "T dlogits",
        """
        const long long row = i / n_cols;
        const T onehot = (i - row * n_cols == targets[row]) ? T(1) : T(0);
        dlogits = (p - onehot) * (dloss / T(n_rows));
        """,
        "minilora_cross_entropy_backward",
    )


def cross_entropy_forward(logits, targets):
    """Mean cross-entropy in nats.   logits: (..., V), targets: (...) int -> (0-d loss, CrossEntropyCache)."""
    import cupy

    logits_shape = logits.shape
    V = logits_shape[-1]
    rows = cupy.ascontiguousarray(logits).reshape(-1, V)  # (N, V)
    targets = cupy.ascontiguousarray(targets, dtype=cupy.int64).reshape(-1)  # (N,)
    probs = cupy.empty_like(rows)
    row_loss = cupy.empty(rows.shape[0], dtype=rows.dtype)  # (N,)
    launch_rows(
        _KERNELS.get("softmax_cross_entropy_forward", rows.dtype),
        rows.shape[0],
        V,
        (rows, targets, probs, row_loss, V),
    )
    return row_loss.mean(), CrossEntropyCache(probs=probs, targets=targets, logits_shape=logits_shape)


def cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """dlogits = dloss * (probs - onehot(targets)) / N, in the logits' shape; dloss a float or 0-d array."""
    import cupy

    probs = cache.probs  # (N, V)
    if isinstance(dloss, cupy.ndarray):
        dloss = dloss.astype(probs.dtype, copy=False)
    else:  # a Python number: filled in on the device, so nothing waits on a host-to-device copy
        dloss = cupy.full((), dloss, dtype=probs.dtype)
    N, V = probs.shape
    targets = cupy.ascontiguousarray(cache.targets, dtype=cupy.int64)
    return _backward_kernel()(probs, targets, dloss, V, N).reshape(cache.logits_shape)
