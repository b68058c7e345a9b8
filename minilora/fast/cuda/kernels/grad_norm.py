"""The global L2 norm of many gradients, sqrt(sum of every squared element), in two launches.

Launch 1 gives each chunk of each tensor a thread block (through a tensor table) and writes one
partial sum of squares per block. Launch 2, a single block, adds the partials and takes the square
root. Both sums run in float64 whatever the gradients' dtype, since they add up millions of terms;
the result is a 0-d device array of the gradients' dtype, which nothing has to copy to the host.
"""

from __future__ import annotations

from .blocks import MAX_THREADS, KernelModule
from .tensor_table import CHUNK, CHUNK_THREADS, tensor_table

_SOURCE = r"""
template <typename Real>
__global__ void chunk_sum_of_squares(const unsigned long long* pointers, const long long* sizes,
                                     const long long* chunk_tensor, const long long* chunk_start,
                                     long long chunk, double* partial) {
    __shared__ double scratch[32];
    const long long t = chunk_tensor[blockIdx.x], start = chunk_start[blockIdx.x];
    const long long end = start + chunk < sizes[t] ? start + chunk : sizes[t];
    const Real* g = reinterpret_cast<const Real*>(pointers[t]);
    double sum = 0;
    for (long long e = start + threadIdx.x; e < end; e += blockDim.x) {
        const double value = g[e];
        sum += value * value;
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// One block: every thread adds a strided share of the partials, then a block-wide sum.
template <typename Real>
__global__ void sqrt_of_sum(const double* partial, long long n, Real* norm) {
    __shared__ double scratch[32];
    double sum = 0;
    for (long long b = threadIdx.x; b < n; b += blockDim.x) sum += partial[b];
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) *norm = Real(sqrt(sum));
}
"""
_KERNELS = KernelModule(_SOURCE, ("chunk_sum_of_squares", "sqrt_of_sum"))


def global_grad_norm(grads: list):
    """sqrt(sum over all tensors of sum(g * g)) -> 0-d device array, for a non-empty list of CuPy arrays."""
    import cupy

    if not grads:
        raise ValueError("global_grad_norm needs at least one gradient")
    dtype = grads[0].dtype
    grads = [cupy.ascontiguousarray(g) for g in grads]
    table = tensor_table(grads)
    partial = cupy.zeros(max(table.n_chunks, 1), dtype=cupy.float64)  # one partial sum per block
    if table.n_chunks > 0:
        _KERNELS.get("chunk_sum_of_squares", dtype)(
            (table.n_chunks,),
            (CHUNK_THREADS,),
            (table.pointers, table.sizes, table.chunk_tensor, table.chunk_start, CHUNK, partial),
        )
    norm = cupy.empty((), dtype=dtype)
    _KERNELS.get("sqrt_of_sum", dtype)((1,), (MAX_THREADS,), (partial, len(partial), norm))
    return norm
