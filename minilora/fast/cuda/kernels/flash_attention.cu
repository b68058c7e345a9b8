// Causal flash attention: forward, and a backward in two kernels (dK/dV per key tile, dQ per query tile).
//
// The math is minilora.layers.flash_attention's. One thread block takes one tile of BM = 64 queries
// (forward, dQ) or BN = 64 keys (dK/dV) of one (batch, head); it walks the tiles of the other side
// that the causal mask lets it see, skipping every tile above the diagonal and masking only the
// diagonal tile (and the last, short tile when T is not a multiple of 64).
//
// Two families, each templated on the head size HD (a multiple of 16, at most 128):
//   *_f32   float32 in and out, products by plain FMA out of shared-memory tiles. 256 threads; thread
//           (ty, tx) = (threadIdx.x / 16, threadIdx.x % 16) owns rows ty + 16a and columns tx + 16c
//           of every 64 x 64 tile, a in 0..3, c in 0..3 (or 0..HD/16 - 1 for a head-size column).
//   *_bf16  bf16 in and out, products on the tensor cores (mma.sync m16n8k16 in inline PTX, bf16
//           inputs, float32 accumulators). 128 threads = 4 warps; warp w owns rows 16w..16w+15 of
//           the tile. Scores, probabilities and the output accumulator pass through shared memory,
//           so the softmax code reads plain rows instead of the fragments' register layout.
// Everything between the products (the scale, exp, the running max and sum, D) is float32.
//
// Tensors are addressed by strides in elements: element (b, h, t, d) of q, k, v, dq, dk, dv sits at
// b * sb + h * sh + t * st + d, and of o and do at b * ob + h * oh + t * ot + d, so the kernels read
// the per-head views of the fused qkv and write dqkv in place without copies. lse and dsum (D) are
// (B, H, T) float32; mask, if not null, is the (B, H, T, T) float32 dropout mask, already holding
// the 1 / (1 - p) scaling, that multiplies the probabilities before they meet V.
//
// Causal visibility and the tails: key j is visible from query i when j <= i and j < T. Every
// query row sees key 0 of the first key tile, so the running max is finite after the first tile and
// exp(-inf - m) = 0 everywhere a key is masked. Rows i >= T (the padding of the last query tile)
// are computed like the others and never stored.

#include <cuda_bf16.h>

#define BM 64
#define BN 64
#define NEG_INF (-__int_as_float(0x7f800000))

typedef long long i64;

// ---------------------------------------------------------------------------------------------------
// float32 family

// rows x HD floats from global (row stride st, rows past T read as 0) into shared (row stride HD + 1:
// the padding puts the 16 rows a half-warp reads at one column into 16 different banks).
template <int HD>
__device__ void load_rows_f32(float* dst, const float* src, i64 st, int row0, int T, float scale) {
    constexpr int LD = HD + 1, V4 = HD / 4;
    for (int idx = threadIdx.x; idx < BM * V4; idx += blockDim.x) {
        const int r = idx / V4, c = (idx % V4) * 4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row0 + r < T) x = *reinterpret_cast<const float4*>(src + (row0 + r) * st + c);
        float* d = dst + r * LD + c;
        d[0] = x.x * scale; d[1] = x.y * scale; d[2] = x.z * scale; d[3] = x.w * scale;
    }
}

// Max (or sum) over the 16 threads tx = 0..15 that share a row: lanes that differ only in the low 4 bits.
__device__ __forceinline__ float row16_max(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float row16_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// s[a][c] = sum_d A[ra][d] B[rc][d] for this thread's rows ra = ty + 16a of A and rc = tx + 16c of B.
template <int HD>
__device__ __forceinline__ void tile_dot_f32(float s[4][4], const float* A, const float* Bm, int ty, int tx) {
    constexpr int LD = HD + 1;
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[a][c] = 0.f;
#pragma unroll 4
    for (int d = 0; d < HD; ++d) {
        float x[4], y[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) x[a] = A[(ty + 16 * a) * LD + d];
#pragma unroll
        for (int c = 0; c < 4; ++c) y[c] = Bm[(tx + 16 * c) * LD + d];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[a][c] = fmaf(x[a], y[c], s[a][c]);
    }
}

// acc[a][c] += sum_j P[ty + 16a][j] X[j][tx + 16c], P a 64 x 64 tile (row stride BN + 1), X 64 x HD.
template <int HD>
__device__ __forceinline__ void tile_matmul_acc_f32(float acc[4][HD / 16], const float* P, const float* X,
                                                    int ty, int tx) {
    constexpr int LD = HD + 1, PLD = BN + 1, NC = HD / 16;
#pragma unroll 4
    for (int j = 0; j < BN; ++j) {
        float p[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) p[a] = P[(ty + 16 * a) * PLD + j];
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const float x = X[j * LD + tx + 16 * c];
#pragma unroll
            for (int a = 0; a < 4; ++a) acc[a][c] = fmaf(p[a], x, acc[a][c]);
        }
    }
}

// Forward. grid (ceil(T / BM), B * H), 256 threads. o, lse written for every query row < T.
template <int HD>
__global__ void __launch_bounds__(256) flash_forward_f32(
    const float* q, const float* k, const float* v, float* o, float* lse, const float* mask,
    int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot, float scale) {
    constexpr int LD = HD + 1, PLD = BN + 1, NC = HD / 16;
    extern __shared__ float smem[];
    float* Qs = smem;              // (BM, HD) queries, scaled
    float* Ks = Qs + BM * LD;      // (BN, HD) keys of the current tile
    float* Vs = Ks + BN * LD;      // (BN, HD) values of the current tile
    float* Ps = Vs + BN * LD;      // (BM, BN) probabilities after dropout
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;  // the longest rows (most key tiles) start first
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh; o += b * ob + h * oh;
    if (mask != nullptr) mask += (i64)bh * T * T;
    load_rows_f32<HD>(Qs, q, st, q0, T, scale);
    float m[4], l[4], acc[4][NC];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        m[a] = NEG_INF; l[a] = 0.f;
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[a][c] = 0.f;
    }
    const int last_query = min(q0 + BM, T) - 1;
    for (int k0 = 0; k0 <= last_query; k0 += BN) {  // causal: key tiles starting after every query are skipped
        __syncthreads();  // the previous tile's Ks, Vs, Ps are no longer read
        load_rows_f32<HD>(Ks, k, st, k0, T, 1.f);
        load_rows_f32<HD>(Vs, v, st, k0, T, 1.f);
        __syncthreads();
        float s[4][4];
        tile_dot_f32<HD>(s, Qs, Ks, ty, tx);
        const bool edge = k0 + BN - 1 > q0 || k0 + BN > T;  // diagonal or short tile: some keys masked
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            const int i = q0 + ty + 16 * a;
            float mx = NEG_INF;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = k0 + tx + 16 * c;
                if (edge && (j > i || j >= T)) s[a][c] = NEG_INF;
                mx = fmaxf(mx, s[a][c]);
            }
            const float m_new = fmaxf(m[a], row16_max(mx));
            const float rescale = __expf(m[a] - m_new);  // 0 on the first tile (m = -inf)
            float sum = 0.f;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = k0 + tx + 16 * c;
                float p = __expf(s[a][c] - m_new);
                sum += p;
                if (mask != nullptr && i < T && j < T) p *= mask[(i64)i * T + j];
                Ps[(ty + 16 * a) * PLD + tx + 16 * c] = p;
            }
            l[a] = rescale * l[a] + row16_sum(sum);  // the denominator counts the probabilities before dropout
            m[a] = m_new;
#pragma unroll
            for (int c = 0; c < NC; ++c) acc[a][c] *= rescale;
        }
        __syncthreads();
        tile_matmul_acc_f32<HD>(acc, Ps, Vs, ty, tx);
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int i = q0 + ty + 16 * a;
        if (i >= T) continue;
        const float inv = 1.f / l[a];
#pragma unroll
        for (int c = 0; c < NC; ++c) o[i * ot + tx + 16 * c] = acc[a][c] * inv;
        if (tx == 0) lse[(i64)bh * T + i] = m[a] + logf(l[a]);
    }
}

// dK, dV of one key tile. grid (ceil(T / BN), B * H), 256 threads. The thread owns key rows ty + 16a.
// For each query tile from the diagonal on, with queries as columns (the transposed scores):
//   s^T = k q_scaled^T,  P^T = exp(s^T - L),  dV += (P * mask)^T dO,  dP^T = v dO^T,
//   dS^T = P^T * (dP^T * mask - D),  dK += dS^T q_scaled.
template <int HD>
__global__ void __launch_bounds__(256) flash_backward_dkdv_f32(
    const float* q, const float* k, const float* v, const float* dout, const float* lse, const float* dsum,
    const float* mask, float* dk, float* dv, int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot,
    float scale) {
    constexpr int LD = HD + 1, PLD = BN + 1, NC = HD / 16;
    extern __shared__ float smem[];
    float* Ks = smem;               // (BN, HD) this block's keys
    float* Vs = Ks + BN * LD;       // (BN, HD) this block's values
    float* Qs = Vs + BN * LD;       // (BM, HD) scaled queries of the current query tile
    float* dOs = Qs + BM * LD;      // (BM, HD) their output gradients
    float* PTs = dOs + BM * LD;     // (BN, BM) (P * mask)^T
    float* dSTs = PTs + BN * PLD;   // (BN, BM) dS^T
    float* Ls = dSTs + BN * PLD;    // (BM) logsumexp of the query tile
    float* Ds = Ls + BM;            // (BM) D of the query tile
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int k0 = (gridDim.x - 1 - blockIdx.x) * BN;  // the key tiles seen by the most queries start first
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh;
    dk += b * sb + h * sh; dv += b * sb + h * sh; dout += b * ob + h * oh;
    lse += (i64)bh * T; dsum += (i64)bh * T;
    if (mask != nullptr) mask += (i64)bh * T * T;
    load_rows_f32<HD>(Ks, k, st, k0, T, 1.f);
    load_rows_f32<HD>(Vs, v, st, k0, T, 1.f);
    float dk_acc[4][NC], dv_acc[4][NC];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < NC; ++c) dk_acc[a][c] = dv_acc[a][c] = 0.f;
    for (int q0 = k0; q0 < T; q0 += BM) {  // causal: query tiles before the key tile see none of it
        __syncthreads();
        load_rows_f32<HD>(Qs, q, st, q0, T, scale);
        load_rows_f32<HD>(dOs, dout, ot, q0, T, 1.f);
        for (int r = threadIdx.x; r < BM; r += blockDim.x) {
            Ls[r] = q0 + r < T ? lse[q0 + r] : 0.f;
            Ds[r] = q0 + r < T ? dsum[q0 + r] : 0.f;
        }
        __syncthreads();
        float s[4][4], dp[4][4];
        tile_dot_f32<HD>(s, Ks, Qs, ty, tx);   // s^T: keys ty + 16a, queries tx + 16c
        tile_dot_f32<HD>(dp, Vs, dOs, ty, tx); // dP^T
        const bool edge = q0 < k0 + BN - 1 || q0 + BM > T;
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            const int j = k0 + ty + 16 * a;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int ii = tx + 16 * c, i = q0 + ii;
                const bool visible = !edge || (j <= i && i < T && j < T);
                const float p = visible ? __expf(s[a][c] - Ls[ii]) : 0.f;
                const float keep = (mask != nullptr && visible) ? mask[(i64)i * T + j] : 1.f;
                PTs[(ty + 16 * a) * PLD + ii] = p * keep;
                dSTs[(ty + 16 * a) * PLD + ii] = p * (dp[a][c] * keep - Ds[ii]);
            }
        }
        __syncthreads();
        tile_matmul_acc_f32<HD>(dv_acc, PTs, dOs, ty, tx);
        tile_matmul_acc_f32<HD>(dk_acc, dSTs, Qs, ty, tx);
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int j = k0 + ty + 16 * a;
        if (j >= T) continue;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            dk[j * st + tx + 16 * c] = dk_acc[a][c];  // q was scaled already: dK = dS^T q_scaled
            dv[j * st + tx + 16 * c] = dv_acc[a][c];
        }
    }
}

// dQ of one query tile: dQ = scale * sum over visible key tiles of dS k. grid (ceil(T / BM), B * H).
// Recomputes s and dP rather than adding into dQ from the dK/dV kernel: no atomics, the same bits
// on every run.
template <int HD>
__global__ void __launch_bounds__(256) flash_backward_dq_f32(
    const float* q, const float* k, const float* v, const float* dout, const float* lse, const float* dsum,
    const float* mask, float* dq, int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot, float scale) {
    constexpr int LD = HD + 1, PLD = BN + 1, NC = HD / 16;
    extern __shared__ float smem[];
    float* Qs = smem;              // (BM, HD) scaled queries
    float* dOs = Qs + BM * LD;     // (BM, HD)
    float* Ks = dOs + BM * LD;     // (BN, HD) keys of the current tile
    float* Vs = Ks + BN * LD;      // (BN, HD)
    float* dSs = Vs + BN * LD;     // (BM, BN) dS
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh;
    dq += b * sb + h * sh; dout += b * ob + h * oh;
    lse += (i64)bh * T; dsum += (i64)bh * T;
    if (mask != nullptr) mask += (i64)bh * T * T;
    load_rows_f32<HD>(Qs, q, st, q0, T, scale);
    load_rows_f32<HD>(dOs, dout, ot, q0, T, 1.f);
    float L[4], D[4], acc[4][NC];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int i = q0 + ty + 16 * a;
        L[a] = i < T ? lse[i] : 0.f;
        D[a] = i < T ? dsum[i] : 0.f;
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[a][c] = 0.f;
    }
    const int last_query = min(q0 + BM, T) - 1;
    for (int k0 = 0; k0 <= last_query; k0 += BN) {
        __syncthreads();
        load_rows_f32<HD>(Ks, k, st, k0, T, 1.f);
        load_rows_f32<HD>(Vs, v, st, k0, T, 1.f);
        __syncthreads();
        float s[4][4], dp[4][4];
        tile_dot_f32<HD>(s, Qs, Ks, ty, tx);
        tile_dot_f32<HD>(dp, dOs, Vs, ty, tx);
        const bool edge = k0 + BN - 1 > q0 || k0 + BN > T;
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            const int i = q0 + ty + 16 * a;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = k0 + tx + 16 * c;
                const bool visible = !edge || (j <= i && i < T && j < T);
                const float p = visible ? __expf(s[a][c] - L[a]) : 0.f;
                const float keep = (mask != nullptr && visible) ? mask[(i64)i * T + j] : 1.f;
                dSs[(ty + 16 * a) * PLD + tx + 16 * c] = p * (dp[a][c] * keep - D[a]);
            }
        }
        __syncthreads();
        tile_matmul_acc_f32<HD>(acc, dSs, Ks, ty, tx);
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int i = q0 + ty + 16 * a;
        if (i >= T) continue;
#pragma unroll
        for (int c = 0; c < NC; ++c) dq[i * st + tx + 16 * c] = acc[a][c] * scale;  // through q_scaled
    }
}

// ---------------------------------------------------------------------------------------------------
// bf16 family: tensor-core products through mma.sync
//
// A 16 x 16 x 16 product is two `mma.sync.m16n8k16` instructions (bf16 inputs, float32 accumulators),
// written as inline PTX: NVRTC compiles it with nothing but cuda_bf16.h (the wmma header pulls in
// parts of the CUDA toolkit that CuPy's CUDA wheels do not ship). The fragments' layouts are the
// ones the PTX ISA fixes for m16n8k16. With g = lane / 4 and t = lane % 4:
//   A (16 x 16, row-major)  4 registers of 2 bf16: (row g, cols 2t, 2t+1), (g+8, 2t..), (g, 2t+8..),
//                           (g+8, 2t+8..)
//   B (16 x 8), per half    2 registers: (rows 2t, 2t+1, col g), (rows 2t+8, 2t+9, col g); the two
//                           halves are columns 0..7 and 8..15 of the 16 x 16 B
//   C (16 x 8), per half    4 floats: (row g, cols 2t, 2t+1), (row g+8, cols 2t, 2t+1)
// Each load reads a fragment from a shared tile of leading dimension ld (even, so pairs are 4-byte aligned).

namespace tc {
typedef __nv_bfloat16 bf16;
struct FragA { unsigned int x[4]; };
struct FragB { unsigned int x[4]; };  // [2h], [2h+1]: half h (columns 8h..8h+7)
struct FragC { float x[8]; };         // [4h..4h+3]: half h

__device__ __forceinline__ unsigned int pair_at(const bf16* p) {  // two adjacent bf16, 4-byte aligned
    return *reinterpret_cast<const unsigned int*>(p);
}
__device__ __forceinline__ unsigned int pack(bf16 lo, bf16 hi) {
    return (unsigned int)__bfloat16_as_ushort(lo) | ((unsigned int)__bfloat16_as_ushort(hi) << 16);
}
__device__ __forceinline__ void fill_fragment(FragC& c, float v) {
#pragma unroll
    for (int i = 0; i < 8; ++i) c.x[i] = v;
}
// A: element (r, c) at p[r * ld + c].
__device__ __forceinline__ void load_a(FragA& a, const bf16* p, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    a.x[0] = pair_at(p + g * ld + 2 * t);
    a.x[1] = pair_at(p + (g + 8) * ld + 2 * t);
    a.x[2] = pair_at(p + g * ld + 2 * t + 8);
    a.x[3] = pair_at(p + (g + 8) * ld + 2 * t + 8);
}
// B "column-major": element (k, n) at p[n * ld + k] (a row-major B^T, read in place).
__device__ __forceinline__ void load_b_col(FragB& b, const bf16* p, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const bf16* col = p + (8 * h + g) * ld;
        b.x[2 * h] = pair_at(col + 2 * t);
        b.x[2 * h + 1] = pair_at(col + 2 * t + 8);
    }
}
// B row-major: element (k, n) at p[k * ld + n].
__device__ __forceinline__ void load_b_row(FragB& b, const bf16* p, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const bf16* col = p + 8 * h + g;
        b.x[2 * h] = pack(col[(2 * t) * ld], col[(2 * t + 1) * ld]);
        b.x[2 * h + 1] = pack(col[(2 * t + 8) * ld], col[(2 * t + 9) * ld]);
    }
}
// d += a b, 16 x 16 x 16, as two m16n8k16 products.
__device__ __forceinline__ void mma(FragC& d, const FragA& a, const FragB& b) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float* c = d.x + 4 * h;
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[2 * h]), "r"(b.x[2 * h + 1]));
    }
}
// C row-major from or to floats: element (r, c) at p[r * ld + c].
__device__ __forceinline__ void store_c(float* p, const FragC& c, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float* q = p + 8 * h + 2 * t;
        q[g * ld] = c.x[4 * h];
        q[g * ld + 1] = c.x[4 * h + 1];
        q[(g + 8) * ld] = c.x[4 * h + 2];
        q[(g + 8) * ld + 1] = c.x[4 * h + 3];
    }
}
__device__ __forceinline__ void load_c(FragC& c, const float* p, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float* q = p + 8 * h + 2 * t;
        c.x[4 * h] = q[g * ld];
        c.x[4 * h + 1] = q[g * ld + 1];
        c.x[4 * h + 2] = q[(g + 8) * ld];
        c.x[4 * h + 3] = q[(g + 8) * ld + 1];
    }
}
}  // namespace tc

typedef __nv_bfloat16 bf16;
typedef tc::FragA FragA;
typedef tc::FragB FragB;
typedef tc::FragC FragC;

// Shared row strides, in elements. bf16 rows of HD + 8 (16 bytes of padding), float rows of n + 4:
// every 16-row block then starts on a 32-byte boundary and the rows of a fragment spread over banks.
template <int HD> struct Bf16Layout {
    static constexpr int LDH = HD + 8;   // bf16 (64, HD) tiles
    static constexpr int LDS = BN + 4;   // float (64, 64) scores
    static constexpr int LDP = BN + 8;   // bf16 (64, 64) probabilities
    static constexpr int LDO = HD + 4;   // float (64, HD) accumulator staging
};

// 64 rows x HD bf16 from global into shared, 8 elements (16 bytes) a load; rows past T read as 0.
template <int HD>
__device__ void load_rows_bf16(bf16* dst, const bf16* src, i64 st, int row0, int T) {
    constexpr int V8 = HD / 8, LDH = HD + 8;
    for (int idx = threadIdx.x; idx < 64 * V8; idx += blockDim.x) {
        const int r = idx / V8, c = (idx % V8) * 8;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < T) x = *reinterpret_cast<const uint4*>(src + (row0 + r) * st + c);
        *reinterpret_cast<uint4*>(dst + r * LDH + c) = x;
    }
}

// The warp's (16, 64) block of A B^T into S (float, stride LDS): A (16, HD) rows at A, B's 64 rows at Bm.
template <int HD>
__device__ __forceinline__ void warp_scores_bf16(float* S, const bf16* A, const bf16* Bm) {
    constexpr int LDH = HD + 8, LDS = BN + 4;
#pragma unroll
    for (int n = 0; n < BN / 16; ++n) {
        FragC c;
        tc::fill_fragment(c, 0.f);
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            FragA a;
            FragB bt;  // B^T read in place: element (d, j) of B^T is Bm[j][d], column-major
            tc::load_a(a, A + kk * 16, LDH);
            tc::load_b_col(bt, Bm + n * 16 * LDH + kk * 16, LDH);
            tc::mma(c, a, bt);
        }
        tc::store_c(S + n * 16, c, LDS);
    }
}

// acc[n] += P X for the warp's 16 rows: P (16, 64) bf16 (stride LDP), X (64, HD) bf16 (stride LDH).
template <int HD>
__device__ __forceinline__ void warp_matmul_acc_bf16(FragC* acc, const bf16* P, const bf16* X) {
    constexpr int LDH = HD + 8, LDP = BN + 8;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        FragA a;
        tc::load_a(a, P + kk * 16, LDP);
#pragma unroll
        for (int n = 0; n < HD / 16; ++n) {
            FragB x;
            tc::load_b_row(x, X + kk * 16 * LDH + n * 16, LDH);
            tc::mma(acc[n], a, x);
        }
    }
}

// Store the warp's (16, HD) accumulators, times factor, as bf16 rows row0.. of dst (row stride st),
// through the float staging rows Os (stride LDO); rows >= T are not stored.
template <int HD>
__device__ void warp_store_bf16(bf16* dst, i64 st, FragC* acc, float* Os, int row0, int T, float factor) {
    constexpr int LDO = HD + 4;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int n = 0; n < HD / 16; ++n) tc::store_c(Os + n * 16, acc[n], LDO);
    __syncwarp();
    for (int idx = lane; idx < 16 * HD; idx += 32) {
        const int r = idx / HD, c = idx % HD;
        if (row0 + r < T) dst[(row0 + r) * st + c] = __float2bfloat16(Os[r * LDO + c] * factor);
    }
}

// Forward. grid (ceil(T / BM), B * H), 128 threads.
template <int HD>
__global__ void __launch_bounds__(128) flash_forward_bf16(
    const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const float* mask,
    int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot, float scale) {
    typedef Bf16Layout<HD> L;
    extern __shared__ __align__(128) unsigned char smem_bytes[];
    bf16* Qs = reinterpret_cast<bf16*>(smem_bytes);   // (BM, HD)
    bf16* Ks = Qs + BM * L::LDH;                       // (BN, HD)
    bf16* Vs = Ks + BN * L::LDH;                       // (BN, HD)
    bf16* Ps = Vs + BN * L::LDH;                       // (BM, BN) probabilities after dropout
    float* Ss = reinterpret_cast<float*>(Ps + BM * L::LDP);  // (BM, BN) scores
    float* Os = Ss + BM * L::LDS;                      // (BM, HD) the running output, unnormalised
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh; o += b * ob + h * oh;
    if (mask != nullptr) mask += (i64)bh * T * T;
    load_rows_bf16<HD>(Qs, q, st, q0, T);
    // Lane l owns row r = 16 warp + l / 2 of the tile and half of its columns: half = l % 2.
    const int r = 16 * warp + (lane >> 1), half = lane & 1, i = q0 + r;
    float m = NEG_INF, l = 0.f;
    for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) Os[r * L::LDO + c] = 0.f;
    const int last_query = min(q0 + BM, T) - 1;
    for (int k0 = 0; k0 <= last_query; k0 += BN) {
        __syncthreads();
        load_rows_bf16<HD>(Ks, k, st, k0, T);
        load_rows_bf16<HD>(Vs, v, st, k0, T);
        __syncthreads();
        warp_scores_bf16<HD>(Ss + 16 * warp * L::LDS, Qs + 16 * warp * L::LDH, Ks);
        __syncwarp();
        const bool edge = k0 + BN - 1 > q0 || k0 + BN > T;
        float* srow = Ss + r * L::LDS + half * 32;
        float mx = NEG_INF;
        for (int c = 0; c < 32; ++c) {
            const int j = k0 + half * 32 + c;
            const float s = (edge && (j > i || j >= T)) ? NEG_INF : srow[c] * scale;
            srow[c] = s;
            mx = fmaxf(mx, s);
        }
        const float m_new = fmaxf(m, fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1)));
        const float rescale = __expf(m - m_new);
        float sum = 0.f;
        for (int c = 0; c < 32; ++c) {
            const int j = k0 + half * 32 + c;
            float p = __expf(srow[c] - m_new);
            sum += p;
            if (mask != nullptr && i < T && j < T) p *= mask[(i64)i * T + j];
            Ps[r * L::LDP + half * 32 + c] = __float2bfloat16(p);
        }
        l = rescale * l + sum + __shfl_xor_sync(0xffffffffu, sum, 1);
        m = m_new;
        for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) Os[r * L::LDO + c] *= rescale;
        __syncwarp();
        FragC acc[HD / 16];
#pragma unroll
        for (int n = 0; n < HD / 16; ++n)
            tc::load_c(acc[n], Os + 16 * warp * L::LDO + n * 16, L::LDO);
        warp_matmul_acc_bf16<HD>(acc, Ps + 16 * warp * L::LDP, Vs);
#pragma unroll
        for (int n = 0; n < HD / 16; ++n)
            tc::store_c(Os + 16 * warp * L::LDO + n * 16, acc[n], L::LDO);
        __syncwarp();
    }
    if (i < T) {
        const float inv = 1.f / l;
        for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c)
            o[i * ot + c] = __float2bfloat16(Os[r * L::LDO + c] * inv);
        if (half == 0) lse[(i64)bh * T + i] = m + logf(l);
    }
}

// dK, dV of one key tile (bf16). grid (ceil(T / BN), B * H), 128 threads; warp w owns keys 16w..16w+15.
template <int HD>
__global__ void __launch_bounds__(128) flash_backward_dkdv_bf16(
    const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* dsum,
    const float* mask, bf16* dk, bf16* dv, int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot,
    float scale) {
    typedef Bf16Layout<HD> L;
    extern __shared__ __align__(128) unsigned char smem_bytes[];
    bf16* Ks = reinterpret_cast<bf16*>(smem_bytes);   // (BN, HD)
    bf16* Vs = Ks + BN * L::LDH;                       // (BN, HD)
    bf16* Qs = Vs + BN * L::LDH;                       // (BM, HD) queries of the current tile, unscaled
    bf16* dOs = Qs + BM * L::LDH;                      // (BM, HD)
    bf16* PTs = dOs + BM * L::LDH;                     // (BN, BM) (P * mask)^T
    bf16* dSTs = PTs + BN * L::LDP;                    // (BN, BM) dS^T
    float* Ss = reinterpret_cast<float*>(dSTs + BN * L::LDP);  // (BN, BM) s^T, then dP^T
    float* Os = Ss + BN * L::LDS;                      // (BN, HD) staging for the final stores
    float* Ls = Os + BN * L::LDO;                      // (BM)
    float* Ds = Ls + BM;                               // (BM)
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int k0 = (gridDim.x - 1 - blockIdx.x) * BN;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh;
    dk += b * sb + h * sh; dv += b * sb + h * sh; dout += b * ob + h * oh;
    lse += (i64)bh * T; dsum += (i64)bh * T;
    if (mask != nullptr) mask += (i64)bh * T * T;
    load_rows_bf16<HD>(Ks, k, st, k0, T);
    load_rows_bf16<HD>(Vs, v, st, k0, T);
    FragC dk_acc[HD / 16], dv_acc[HD / 16];
#pragma unroll
    for (int n = 0; n < HD / 16; ++n) { tc::fill_fragment(dk_acc[n], 0.f); tc::fill_fragment(dv_acc[n], 0.f); }
    const int r = 16 * warp + (lane >> 1), half = lane & 1, j = k0 + r;  // lane's key row and half of the queries
    float p[32];
    for (int q0 = k0; q0 < T; q0 += BM) {
        __syncthreads();
        load_rows_bf16<HD>(Qs, q, st, q0, T);
        load_rows_bf16<HD>(dOs, dout, ot, q0, T);
        for (int t = threadIdx.x; t < BM; t += blockDim.x) {
            Ls[t] = q0 + t < T ? lse[q0 + t] : 0.f;
            Ds[t] = q0 + t < T ? dsum[q0 + t] : 0.f;
        }
        __syncthreads();
        float* srow = Ss + r * L::LDS + half * 32;
        warp_scores_bf16<HD>(Ss + 16 * warp * L::LDS, Ks + 16 * warp * L::LDH, Qs);  // s^T / scale
        __syncwarp();
        const bool edge = q0 < k0 + BN - 1 || q0 + BM > T;
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            const int ii = half * 32 + c, i = q0 + ii;
            const bool visible = !edge || (j <= i && i < T && j < T);
            p[c] = visible ? __expf(srow[c] * scale - Ls[ii]) : 0.f;
        }
        __syncwarp();
        warp_scores_bf16<HD>(Ss + 16 * warp * L::LDS, Vs + 16 * warp * L::LDH, dOs);  // dP^T
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            const int ii = half * 32 + c, i = q0 + ii;
            const float keep = (mask != nullptr && p[c] != 0.f) ? mask[(i64)i * T + j] : 1.f;
            PTs[r * L::LDP + ii] = __float2bfloat16(p[c] * keep);
            dSTs[r * L::LDP + ii] = __float2bfloat16(p[c] * (srow[c] * keep - Ds[ii]));
        }
        __syncwarp();
        warp_matmul_acc_bf16<HD>(dv_acc, PTs + 16 * warp * L::LDP, dOs);
        warp_matmul_acc_bf16<HD>(dk_acc, dSTs + 16 * warp * L::LDP, Qs);
    }
    warp_store_bf16<HD>(dk, st, dk_acc, Os + 16 * warp * L::LDO, k0 + 16 * warp, T, scale);  // dK = scale dS^T q
    __syncwarp();
    warp_store_bf16<HD>(dv, st, dv_acc, Os + 16 * warp * L::LDO, k0 + 16 * warp, T, 1.f);
}

// dQ of one query tile (bf16). grid (ceil(T / BM), B * H), 128 threads; warp w owns queries 16w..16w+15.
template <int HD>
__global__ void __launch_bounds__(128) flash_backward_dq_bf16(
    const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* dsum,
    const float* mask, bf16* dq, int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot, float scale) {
    typedef Bf16Layout<HD> L;
    extern __shared__ __align__(128) unsigned char smem_bytes[];
    bf16* Qs = reinterpret_cast<bf16*>(smem_bytes);   // (BM, HD)
    bf16* dOs = Qs + BM * L::LDH;                      // (BM, HD)
    bf16* Ks = dOs + BM * L::LDH;                      // (BN, HD)
    bf16* Vs = Ks + BN * L::LDH;                       // (BN, HD)
    bf16* dSs = Vs + BN * L::LDH;                      // (BM, BN)
    float* Ss = reinterpret_cast<float*>(dSs + BM * L::LDP);  // (BM, BN) s, then dP
    float* Os = Ss + BM * L::LDS;                      // (BM, HD) staging for the final store
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh;
    dq += b * sb + h * sh; dout += b * ob + h * oh;
    lse += (i64)bh * T; dsum += (i64)bh * T;
    if (mask != nullptr) mask += (i64)bh * T * T;
    load_rows_bf16<HD>(Qs, q, st, q0, T);
    load_rows_bf16<HD>(dOs, dout, ot, q0, T);
    const int r = 16 * warp + (lane >> 1), half = lane & 1, i = q0 + r;
    const float Li = i < T ? lse[i] : 0.f, Di = i < T ? dsum[i] : 0.f;
    FragC acc[HD / 16];
#pragma unroll
    for (int n = 0; n < HD / 16; ++n) tc::fill_fragment(acc[n], 0.f);
    float p[32];
    const int last_query = min(q0 + BM, T) - 1;
    for (int k0 = 0; k0 <= last_query; k0 += BN) {
        __syncthreads();
        load_rows_bf16<HD>(Ks, k, st, k0, T);
        load_rows_bf16<HD>(Vs, v, st, k0, T);
        __syncthreads();
        float* srow = Ss + r * L::LDS + half * 32;
        warp_scores_bf16<HD>(Ss + 16 * warp * L::LDS, Qs + 16 * warp * L::LDH, Ks);
        __syncwarp();
        const bool edge = k0 + BN - 1 > q0 || k0 + BN > T;
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            const int j = k0 + half * 32 + c;
            const bool visible = !edge || (j <= i && i < T && j < T);
            p[c] = visible ? __expf(srow[c] * scale - Li) : 0.f;
        }
        __syncwarp();
        warp_scores_bf16<HD>(Ss + 16 * warp * L::LDS, dOs + 16 * warp * L::LDH, Vs);  // dP
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            const int j = k0 + half * 32 + c;
            const float keep = (mask != nullptr && p[c] != 0.f) ? mask[(i64)i * T + j] : 1.f;
            dSs[r * L::LDP + half * 32 + c] = __float2bfloat16(p[c] * (srow[c] * keep - Di));
        }
        __syncwarp();
        warp_matmul_acc_bf16<HD>(acc, dSs + 16 * warp * L::LDP, Ks);
    }
    warp_store_bf16<HD>(dq, st, acc, Os + 16 * warp * L::LDO, q0 + 16 * warp, T, scale);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

// D = rowsum(dO * O) in float32, one warp per row. grid (ceil(H * T / 8), B), 256 threads: block
// (x, b) takes rows 8x..8x+7 of the H * T rows of batch b.
template <typename Elem>
__global__ void flash_row_dot(const Elem* dout, const Elem* o, float* dsum, int H, int T, int HD,
                              i64 ob, i64 oh, i64 ot) {
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31, b = blockIdx.y;
    if (row >= H * T) return;  // the grid is rounded up to 8 rows
    const i64 offset = b * ob + (row / T) * oh + (row % T) * ot;
    float acc = 0.f;
    for (int d = lane; d < HD; d += 32) acc += to_float(dout[offset + d]) * to_float(o[offset + d]);
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) dsum[(i64)b * H * T + row] = acc;
}
