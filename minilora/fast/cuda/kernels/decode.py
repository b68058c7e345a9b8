"""The kernels of one generation step on the GPU: the embedding, attention over the key/value cache, sampling.

Each reads the step's position from device memory, not from a kernel argument, so that one CUDA
graph of the step replays at every position (``minilora.fast.cuda.decode``). ``counters`` is a
device int32 array (2,): counters[0] = pos, the cache positions already filled (the new token's
position), counters[1] = n, the column of the (B, L) id buffer that holds the new token.

    decode_embedding   x[b] = wte[ids[b, n]] + wpe[pos]                      one block per row b
    decode_attention   keys/values[b, h, pos] = the new k, v; then softmax(q k^T / sqrt(hs)) v over
                       positions 0..pos                                        one block per (b, h)
    sample_tokens      ids[b, n] = a token drawn from softmax(logits[b] / temperature), or the argmax
                       at temperature 0, with the reference's inverse-CDF rule (generate.sample_next)

The sampler follows ``minilora.generate.sample_next`` step for step, in float64: top-k keeps the
logits >= the k-th largest, the row's maximum is subtracted before dividing by the temperature, the
probabilities are normalised and summed into a running total, and the token is the number of
running totals below u * total, for the uniform draw u the reference's generator would have made.
A row with a NaN or infinite logit gets the id -1, which the host turns into an error.
"""

from __future__ import annotations

from .blocks import KernelModule, row_threads

_SOURCE = r"""
template <typename Real>
__global__ void decode_embedding(const long long* ids, long long L, const int* counters, const Real* wte,
                                 const Real* wpe, Real* x, long long V, long long C) {
    const long long b = blockIdx.x, pos = counters[0], n = counters[1];
    long long token = ids[b * L + n];
    if (token < 0 || token >= V) token = 0;  // -1 marks a failed draw, which the host reports: never read outside wte
    for (long long c = threadIdx.x; c < C; c += blockDim.x) x[b * C + c] = wte[token * C + c] + wpe[pos * C + c];
}

// -inf and the finiteness test from the bits, with no header needed (NVRTC compiles this alone).
__device__ __forceinline__ double negative_infinity() { return __longlong_as_double(0xfff0000000000000ll); }
__device__ __forceinline__ bool is_finite(double x) {
    return (__double_as_longlong(x) & 0x7ff0000000000000ll) != 0x7ff0000000000000ll;  // exponent not all ones
}

// qkv: (B, 1, 3C), q | k | v with head h at columns h hs .. h hs + hs - 1 of each; keys, values:
// (B, H, T_max, hs); y: (B, 1, C). Shared memory: q (hs values), then the scores (T_max values).
template <typename Real>
__global__ void decode_attention(const Real* qkv, Real* keys, Real* values, Real* y, const int* counters,
                                 long long H, long long T_max, long long hs, Real scale) {
    __shared__ Real scratch[32];
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    Real* q = reinterpret_cast<Real*>(shared_bytes);
    Real* att = q + hs;
    const long long bh = blockIdx.x, b = bh / H, h = bh % H, C = H * hs, pos = counters[0];
    const Real* row = qkv + b * 3 * C + h * hs;
    Real* K = keys + bh * T_max * hs;
    Real* Vs = values + bh * T_max * hs;
    for (long long d = threadIdx.x; d < hs; d += blockDim.x) {
        q[d] = row[d] * scale;  // scaled once, as the reference scales q before q k^T
        K[pos * hs + d] = row[C + d];
        Vs[pos * hs + d] = row[2 * C + d];
    }
    __syncthreads();  // the new key and value, and q, are visible to the whole block
    Real m = Real(negative_infinity());
    for (long long t = threadIdx.x; t <= pos; t += blockDim.x) {
        Real s = 0;
        for (long long d = 0; d < hs; ++d) s += q[d] * K[t * hs + d];
        att[t] = s;
        m = s > m ? s : m;
    }
    m = block_max(m, scratch);
    Real sum = 0;
    for (long long t = threadIdx.x; t <= pos; t += blockDim.x) {
        att[t] = exp(att[t] - m);
        sum += att[t];
    }
    sum = block_sum(sum, scratch);
    for (long long t = threadIdx.x; t <= pos; t += blockDim.x) att[t] /= sum;  // rows sum to 1
    __syncthreads();
    for (long long d = threadIdx.x; d < hs; d += blockDim.x) {
        Real acc = 0;
        for (long long t = 0; t <= pos; ++t) acc += att[t] * Vs[t * hs + d];
        y[b * C + h * hs + d] = acc;
    }
}

// A double's bits as an unsigned integer in the same order as the numbers: the sign bit flipped for
// positive numbers, every bit flipped for negative ones.
__device__ __forceinline__ unsigned long long order_key(double x) {
    const unsigned long long u = (unsigned long long)__double_as_longlong(x);
    return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

// One block per row b of logits (B, V). Writes ids[b, n]; u = uniforms[n - T0, b]; stop_id < 0: none.
template <typename Real>
__global__ void sample_tokens(const Real* logits, long long V, const double* uniforms, long long T0,
                              long long* ids, long long L, const int* counters, int* stopped,
                              long long stop_id, double temperature, long long top_k) {
    __shared__ double scratch[32];
    __shared__ double running[1024];
    const long long b = blockIdx.x, B = gridDim.x, n = counters[1];
    const Real* row = logits + b * V;
    double bad = 0, m = negative_infinity();
    for (long long j = threadIdx.x; j < V; j += blockDim.x) {
        const double l = row[j];
        if (!is_finite(l)) bad = 1;
        else m = l > m ? l : m;
    }
    bad = block_sum(bad, scratch);
    m = block_max(m, scratch);
    long long token;
    if (bad > 0) {
        token = -1;
    } else if (temperature == 0) {  // greedy: the first index of the maximum, as numpy's argmax
        double first = -(double)V;
        for (long long j = threadIdx.x; j < V; j += blockDim.x)
            if ((double)row[j] == m && -(double)j > first) first = -(double)j;
        token = (long long)(-block_max(first, scratch));
    } else {
        double kth = negative_infinity();  // keep the logits >= the k-th largest (all of them without top-k)
        if (top_k > 0 && top_k < V) {
            // the k-th largest key, bit by bit from the top: the largest t with #{key >= t} >= k
            unsigned long long prefix = 0;
            for (int bit = 63; bit >= 0; --bit) {
                const unsigned long long candidate = prefix | (1ull << bit);
                double count = 0;
                for (long long j = threadIdx.x; j < V; j += blockDim.x) count += order_key(row[j]) >= candidate;
                if (block_sum(count, scratch) >= (double)top_k) prefix = candidate;
            }
            for (long long j = threadIdx.x; j < V; j += blockDim.x)
                if (order_key(row[j]) == prefix) kth = row[j];
            kth = block_max(kth, scratch);
        }
        // thread t takes the contiguous chunk [lo, hi) of the row, so running totals follow the row's order
        const long long chunk = (V + blockDim.x - 1) / blockDim.x;
        const long long lo = threadIdx.x * chunk, hi = lo + chunk < V ? lo + chunk : V;
        double total = 0;
        for (long long j = lo; j < hi; ++j) total += row[j] >= kth ? exp((row[j] - m) / temperature) : 0.0;
        total = block_sum(total, scratch);
        double mine = 0;
        for (long long j = lo; j < hi; ++j) mine += row[j] >= kth ? exp((row[j] - m) / temperature) / total : 0.0;
        running[threadIdx.x] = mine;  // an inclusive scan of the chunk sums across the block
        __syncthreads();
        for (int offset = 1; offset < blockDim.x; offset <<= 1) {
            const double before = threadIdx.x >= offset ? running[threadIdx.x - offset] : 0.0;
            __syncthreads();
            running[threadIdx.x] += before;
            __syncthreads();
        }
        const double target = uniforms[(n - T0) * B + b] * running[blockDim.x - 1];
        double cumulative = threadIdx.x > 0 ? running[threadIdx.x - 1] : 0.0, below = 0;
        for (long long j = lo; j < hi; ++j) {
            cumulative += row[j] >= kth ? exp((row[j] - m) / temperature) / total : 0.0;
            below += cumulative < target;
        }
        below = block_sum(below, scratch);
        token = (long long)below < V - 1 ? (long long)below : V - 1;
    }
    if (threadIdx.x == 0) {
        if (token >= 0 && stop_id >= 0) {  // a row that has produced stop_id produces it again
            if (stopped[b]) token = stop_id;
            if (token == stop_id) stopped[b] = 1;
        }
        ids[b * L + n] = token;
    }
}
"""
_KERNELS = KernelModule(_SOURCE, ("decode_embedding", "decode_attention", "sample_tokens"))
SAMPLE_THREADS = 1024  # the sampler's block: its scan buffer holds one value per thread


def decode_embedding(ids, counters, wte, wpe):
    """(B, 1, C): wte[ids[b, n]] + wpe[pos] for every row b.   ids: (B, L) int64, contiguous."""
    import cupy

    (B, L), (V, C) = ids.shape, wte.shape
    x = cupy.empty((B, 1, C), dtype=wte.dtype)
    _KERNELS.get("decode_embedding", wte.dtype)(
        (B,), (row_threads(C),), (ids, L, counters, wte, wpe, x, V, C)
    )
    return x


def decode_attention_forward(qkv, n_head: int, keys, values, counters):
    """Attention of one new position at pos = counters[0] over positions 0..pos (generation, one token).

    The ``cached_attention_forward`` of the decode step: ``counters`` stands where the reference takes
    ``start``, the number of cached positions, as a device array. qkv: (B, 1, 3C); keys, values:
    (B, H, T_max, hs), contiguous, updated at pos. Returns y: (B, 1, C).
    """
    import cupy

    qkv = cupy.ascontiguousarray(qkv)
    B, _, C3 = qkv.shape
    _, H, T_max, hs = keys.shape
    if qkv.shape[1] != 1 or C3 != 3 * H * hs or H != n_head:
        raise ValueError(f"decode_attention_forward takes (B, 1, 3C) for {n_head} heads, got {qkv.shape}")
    y = cupy.empty((B, 1, H * hs), dtype=qkv.dtype)
    shared = (hs + T_max) * qkv.itemsize
    scale = qkv.dtype.type(1.0 / hs**0.5)
    _KERNELS.get("decode_attention", qkv.dtype)(
        (B * H,),
        (row_threads(T_max),),
        (qkv, keys, values, y, counters, H, T_max, hs, scale),
        shared_mem=shared,
    )
    return y


def sample_tokens(logits, uniforms, T0: int, ids, counters, stopped, stop_id, temperature: float, top_k):
    """ids[:, n] = one token per row of logits (B, V), n = counters[1]; see the module docstring.

    uniforms: (N, B) float64, row n - T0 for this step; stopped: (B,) int32 rows that produced stop_id.
    """
    import numpy as np

    B, V = logits.shape
    args = (logits, V, uniforms, T0, ids, ids.shape[1], counters, stopped)
    scalars = (np.int64(-1 if stop_id is None else stop_id), np.float64(temperature), np.int64(top_k or 0))
    _KERNELS.get("sample_tokens", logits.dtype)((B,), (SAMPLE_THREADS,), args + scalars)
