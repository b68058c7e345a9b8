// Causal flash attention: forward, and a backward in two kernels (dK/dV per key tile, dQ per query tile).
//
// The math is minilora.layers.flash_attention's. One thread block takes one tile of BM = 64 queries
// (forward, dQ) or BN = 64 keys (dK/dV) of one (batch, head); it walks the tiles of the other side
// that the causal mask lets it see, skipping every tile above the diagonal and masking only the
// diagonal tile (and the last, short tile when T is not a multiple of 64).
//
// Two families, each templated on the head size HD (a multiple of 16, at most 128), with the same
// structure: 128 threads = 4 warps, warp w owns rows 16w..16w+15 of the tile; scores, probabilities
// and accumulators stay in the registers of the tensor cores' fragments (the softmax works in their
// layout); only the tiles of q, k, v and dO pass through shared memory, the next tile loading
// (cp.async) while the current one is used. They differ in the products:
//   *_f32   float32 in and out, "3xTF32": mma.sync m16n8k8 on tf32 operands, each float split into
//           two tf32 halves and multiplied as three products, which keeps float32's accuracy.
//   *_bf16  bf16 in and out, mma.sync m16n8k16 on bf16 operands.
// Both accumulate in float32 (inline PTX, which NVRTC compiles with nothing but cuda_bf16.h).
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
// bf16 products through mma.sync, and the asynchronous copies both families load their tiles with
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
// Fragments come from shared tiles through ldmatrix: each of the four 8 x 8 matrices of a fragment is
// eight 16-byte rows whose addresses eight lanes supply (ldmatrix.trans for a row-major B, whose
// pairs run down a column). The C fragment of a 16 x 16 output holds exactly the elements, in the
// same registers' order, that the A fragment of the same 16 x 16 block needs: probabilities go from
// the scores' accumulators into the next product as its A operand without leaving the registers.

namespace tc {
typedef __nv_bfloat16 bf16;
struct FragA { unsigned int x[4]; };
struct FragB { unsigned int x[4]; };  // [2h], [2h+1]: half h (columns 8h..8h+7)
struct FragC { float x[8]; };         // [4h..4h+3]: half h

__device__ __forceinline__ unsigned int shared_address(const void* p) {
    return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, const bf16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int* r, const bf16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)));
}
// A: element (r, c) at p[r * ld + c]. Lanes 0-15 give rows 0-15 at column 0, lanes 16-31 at column 8.
__device__ __forceinline__ void load_a(FragA& a, const bf16* p, int ld) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4(a.x, p + (lane & 15) * ld + (lane >> 4) * 8);
}
// B "column-major": element (k, n) at p[n * ld + k] (a row-major B^T, read in place). Matrix
// m = lane / 8 is (n 0-7 | 8-15 for m / 2) x (k 0-7 | 8-15 for m % 2).
__device__ __forceinline__ void load_b_col(FragB& b, const bf16* p, int ld) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4(b.x, p + ((lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8);
}
// B row-major: element (k, n) at p[k * ld + n]; matrix m = lane / 8 is (k by m % 2) x (n by m / 2).
__device__ __forceinline__ void load_b_row(FragB& b, const bf16* p, int ld) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4_trans(b.x, p + ((lane & 7) + (((lane >> 3) & 1) << 3)) * ld + (lane >> 4) * 8);
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
__device__ __forceinline__ void fill_fragment(FragC& c, float v) {
#pragma unroll
    for (int i = 0; i < 8; ++i) c.x[i] = v;
}
__device__ __forceinline__ unsigned int pack(float lo, float hi) {  // two floats as two bf16, lo first
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned int*>(&v);
}
// The C fragment of a 16 x 16 block, rounded to bf16, as the A fragment of the same block.
__device__ __forceinline__ void to_a(FragA& a, const FragC& c) {
#pragma unroll
    for (int i = 0; i < 4; ++i) a.x[i] = pack(c.x[2 * i], c.x[2 * i + 1]);
}
// Element e of a C fragment sits at row g + 8 * c_row(e) and column 8 * (e / 4) + 2t + e % 2.
__device__ __forceinline__ int c_row(int e) { return (e >> 1) & 1; }
__device__ __forceinline__ int c_col(int e, int t) { return 8 * (e >> 2) + 2 * t + (e & 1); }

// Asynchronous copies (cp.async, sm_80 on): 16 bytes from global to shared without passing through
// registers; with valid false the 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void copy_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(shared_address(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void wait_async() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }
}  // namespace tc

typedef __nv_bfloat16 bf16;
typedef tc::FragA FragA;
typedef tc::FragB FragB;
typedef tc::FragC FragC;

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// Shared tiles are 64 rows of HD elements with 16 bytes of padding (8 bf16 or 4 floats): rows start
// 16-byte aligned, and the rows a warp's fragment loads touch fall in different banks.
template <typename Elem, int HD> struct SharedTile {
    static constexpr int LD = HD + 16 / sizeof(Elem);
    static constexpr int SIZE = 64 * LD;  // elements
};

// 64 rows x HD elements from global rows row0.. (row stride st) into a shared tile, asynchronously,
// 16 bytes per copy; rows past T are zero-filled. The caller commits the group and waits for it.
template <int HD, typename Elem>
__device__ void load_tile_async(Elem* dst, const Elem* src, i64 st, int row0, int T) {
    constexpr int PER_COPY = 16 / sizeof(Elem), COPIES = HD / PER_COPY;
    for (int idx = threadIdx.x; idx < 64 * COPIES; idx += blockDim.x) {
        const int r = idx / COPIES, c = (idx % COPIES) * PER_COPY;
        const bool valid = row0 + r < T;
        tc::copy_async_16(dst + r * SharedTile<Elem, HD>::LD + c, src + (valid ? row0 + r : 0) * st + c, valid);
    }
}

// The key-tile pipeline of the forward and dQ kernels (two shared stages of (K, V), stage s at
// KVs + 2 s TILE): start copying key tile it + 1 into the other stage, then wait until tile it's
// copies have landed and every thread sees them. The other stage was last read at tile it - 1, which
// the __syncthreads ending that iteration closed.
template <int HD, typename Elem>
__device__ __forceinline__ void next_key_stage(Elem* KVs, const Elem* k, const Elem* v, i64 st, int it,
                                               int tiles, int T) {
    constexpr int TILE = SharedTile<Elem, HD>::SIZE;
    if (it + 1 < tiles) {
        Elem* next = KVs + 2 * ((it + 1) & 1) * TILE;
        load_tile_async<HD>(next, k, st, (it + 1) * BN, T);
        load_tile_async<HD>(next + TILE, v, st, (it + 1) * BN, T);
        tc::commit_async();
        tc::wait_async<1>();
    } else {
        tc::wait_async<0>();
    }
    __syncthreads();
}

// Stage `stage` of the dK/dV kernels' query pipeline (Q at QdOs + 2 stage TILE, dO after it; L in
// log2 units at LDs + 2 stage BM, D after it): the Q and dO tiles of rows q0.. asynchronously, as one
// committed group, and their L and D by plain loads.
template <int HD, typename Elem>
__device__ __forceinline__ void load_query_stage(Elem* QdOs, float* LDs, const Elem* q, const Elem* dout,
                                                 const float* lse, const float* dsum, i64 st, i64 ot,
                                                 int stage, int q0, int T) {
    constexpr int TILE = SharedTile<Elem, HD>::SIZE;
    Elem* Qs = QdOs + 2 * stage * TILE;
    load_tile_async<HD>(Qs, q, st, q0, T);
    load_tile_async<HD>(Qs + TILE, dout, ot, q0, T);
    tc::commit_async();
    float* Ls = LDs + 2 * stage * BM;
    for (int r = threadIdx.x; r < BM; r += blockDim.x) {
        Ls[r] = q0 + r < T ? lse[q0 + r] * LOG2E : 0.f;
        Ls[BM + r] = q0 + r < T ? dsum[q0 + r] : 0.f;
    }
}

// The query-tile pipeline of the dK/dV kernels, as next_key_stage: start loading query tile it + 1
// (rows next_q0..) into the other stage, then wait until tile it has landed and every thread sees it.
template <int HD, typename Elem>
__device__ __forceinline__ void next_query_stage(Elem* QdOs, float* LDs, const Elem* q, const Elem* dout,
                                                 const float* lse, const float* dsum, i64 st, i64 ot, int it,
                                                 int tiles, int next_q0, int T) {
    if (it + 1 < tiles) {
        load_query_stage<HD>(QdOs, LDs, q, dout, lse, dsum, st, ot, (it + 1) & 1, next_q0, T);
        tc::wait_async<1>();
    } else {
        tc::wait_async<0>();
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------------------------------
// float32 family: 3xTF32 tensor-core products
//
// The tensor cores multiply float32 only as tf32 (10 mantissa bits). To keep float32 accuracy each
// operand is split in two, x = big + small with big the top 11 significant bits of x and small the
// next 11 (tf32::split), and a product is the sum of three: small_a big_b + big_a small_b + big_a big_b. The
// fourth, small_a small_b, is below 2^-22 of the product and dropped; the sums are float32. This is
// the arithmetic of CUTLASS's "3xTF32" (and of PyTorch's float32 memory-efficient attention).
//
// One m16n8k8 product (`mma.sync.m16n8k8.row.col.f32.tf32.tf32.f32`); with g = lane / 4, t = lane % 4:
//   A (16 x 8)  4 registers: (row g, col t), (g + 8, t), (g, t + 4), (g + 8, t + 4)
//   B (8 x 8)   2 registers: (row t, col g), (t + 4, g)
//   C (16 x 8)  4 floats:    (row g, cols 2t, 2t + 1), (row g + 8, cols 2t, 2t + 1)
// The C layout is not the A layout, but the order of the k index inside a product is free as long
// as A and B agree. So a C fragment of scores serves as the A fragment of the next product unchanged
// when its k slot t stands for key 2t and slot t + 4 for key 2t + 1: C's (c0, c2, c1, c3) are A's
// (a0, a1, a2, a3), and the B operand reads keys 2t and 2t + 1 for slots t and t + 4.
// Operands come from shared tiles of 64 rows with 4 floats of padding (LD = HD + 4): the 32 lanes of
// every load below then hit 32 different banks.

namespace tf32 {
// x = big + small: big keeps x's sign, exponent and top 10 mantissa bits (the rest cleared), small
// = x - big is exact in float32. The tensor cores read a tf32 operand from a 32-bit register and
// ignore its low 13 bits, so small enters the product truncated to 11 significant bits: an error
// below 2^-21 of x, far under float32's own rounding of the sums. Two ALU instructions, no cvt.
__device__ __forceinline__ void split(float x, unsigned int& big, unsigned int& small) {
    big = __float_as_uint(x) & 0xffffe000u;
    small = __float_as_uint(x - __uint_as_float(big));
}
__device__ __forceinline__ void mma(float* c, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// c += a b to float32 accuracy; a and b already split. The small terms go first, while c is small.
__device__ __forceinline__ void mma3(float* c, const unsigned int* a_big, const unsigned int* a_small,
                                     const unsigned int* b_big, const unsigned int* b_small) {
    mma(c, a_small, b_big);
    mma(c, a_big, b_small);
    mma(c, a_big, b_big);
}
}  // namespace tf32

// s[nb] (keys 8nb..8nb+7 of a 16 x 64 block) = A B^T: A the warp's 16 rows (HD floats each) in a
// shared tile at As, B a shared tile of 64 rows at Bs. Row stride LD = HD + 4 for both.
template <int HD>
__device__ __forceinline__ void warp_scores_f32(float s[8][4], const float* As, const float* Bs) {
    constexpr int LD = SharedTile<float, HD>::LD;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nb][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 8; ++kk) {
        const float* a_row = As + g * LD + 8 * kk + t;
        const float a[4] = {a_row[0], a_row[8 * LD], a_row[4], a_row[8 * LD + 4]};
        unsigned int a_big[4], a_small[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) tf32::split(a[i], a_big[i], a_small[i]);
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
            const float* b_row = Bs + (8 * nb + g) * LD + 8 * kk + t;  // B^T's row is B's column
            unsigned int b_big[2], b_small[2];
            tf32::split(b_row[0], b_big[0], b_small[0]);
            tf32::split(b_row[4], b_big[1], b_small[1]);
            tf32::mma3(s[nb], a_big, a_small, b_big, b_small);
        }
    }
}

// acc (16 x HD, as HD / 8 C fragments) += P X: P (16 x 64) as the C fragments of warp_scores_f32,
// X a row-major shared tile of 64 rows (keys) by HD.
template <int HD>
__device__ __forceinline__ void warp_accumulate_f32(float acc[][4], const float p[8][4], const float* Xs) {
    constexpr int LD = SharedTile<float, HD>::LD;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kc = 0; kc < 8; ++kc) {  // keys 8kc..8kc+7; slot t is key 2t, slot t + 4 key 2t + 1
        const float a[4] = {p[kc][0], p[kc][2], p[kc][1], p[kc][3]};
        unsigned int a_big[4], a_small[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) tf32::split(a[i], a_big[i], a_small[i]);
        const float* x_row = Xs + (8 * kc + 2 * t) * LD + g;
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            unsigned int b_big[2], b_small[2];
            tf32::split(x_row[8 * n], b_big[0], b_small[0]);
            tf32::split(x_row[LD + 8 * n], b_big[1], b_small[1]);
            tf32::mma3(acc[n], a_big, a_small, b_big, b_small);
        }
    }
}

// Element e of a float32 C fragment sits at row g + 8 * (e / 2) and column 2t + e % 2 of its 8.
__device__ __forceinline__ int c_row_f32(int e) { return e >> 1; }
__device__ __forceinline__ int c_col_f32(int e, int t) { return 2 * t + (e & 1); }

// Store the warp's (16, HD) accumulators: this lane's rows row[0], row[1] (each times factor[r];
// rows >= T are not stored) to dst (row stride st), two floats per 8-byte store.
template <int HD>
__device__ __forceinline__ void warp_store_f32(float* dst, i64 st, const float acc[][4], const int row[2],
                                               int T, const float factor[2]) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (row[r] >= T) continue;
            *reinterpret_cast<float2*>(dst + row[r] * st + 8 * n + 2 * t) =
                make_float2(acc[n][2 * r] * factor[r], acc[n][2 * r + 1] * factor[r]);
        }
}

// Forward (float32). grid (ceil(T / BM), B * H), 128 threads; warp w owns query rows 16w..16w+15.
// The same steps as flash_forward_bf16 below, with 8-key fragments: scores in log2 units, the
// online softmax in the fragments' registers, the next (K, V) tile loading while this one is used.
template <int HD>
__global__ void __launch_bounds__(128) flash_forward_f32(
    const float* q, const float* k, const float* v, float* o, float* lse, const float* mask,
    int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot, float scale) {
    constexpr int LD = SharedTile<float, HD>::LD, TILE = SharedTile<float, HD>::SIZE;
    extern __shared__ __align__(128) unsigned char smem_bytes[];
    float* Qs = reinterpret_cast<float*>(smem_bytes);  // (BM, HD)
    float* KVs = Qs + TILE;                             // stage s: K at KVs + 2 s TILE, V after it
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;  // the longest rows (most key tiles) start first
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh; o += b * ob + h * oh;
    if (mask != nullptr) mask += (i64)bh * T * T;
    const int tiles = (min(q0 + BM, T) - 1) / BN + 1;  // causal: key tiles after the last query are skipped
    load_tile_async<HD>(Qs, q, st, q0, T);
    load_tile_async<HD>(KVs, k, st, 0, T);
    load_tile_async<HD>(KVs + TILE, v, st, 0, T);
    tc::commit_async();
    const int row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};  // this lane's two query rows
    const float scale_log2 = scale * LOG2E;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};  // running max (log2 units), this lane's partial sums
    float acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
    for (int it = 0; it < tiles; ++it) {
        const int k0 = it * BN;
        const float* Ks = KVs + 2 * (it & 1) * TILE;
        const float* Vs = Ks + TILE;
        next_key_stage<HD>(KVs, k, v, st, it, tiles, T);
        float s[8][4];
        warp_scores_f32<HD>(s, Qs + 16 * warp * LD, Ks);
        const bool edge = k0 + BN - 1 > q0 || k0 + BN > T;  // diagonal or short tile: some keys masked
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = c_row_f32(e), j = k0 + 8 * nb + c_col_f32(e, t);
                const float x = (edge && (j > row[r] || j >= T)) ? NEG_INF : s[nb][e] * scale_log2;
                s[nb][e] = x;
                mx[r] = fmaxf(mx[r], x);
            }
        float rescale[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // the four lanes t = 0..3 of a row hold its 64 columns
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m[r], mx[r]);  // finite: every row sees key 0 of the first tile
            rescale[r] = exp2f(m[r] - m_new);       // 0 on the first tile (m = -inf)
            m[r] = m_new;
            l[r] *= rescale[r];
        }
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = c_row_f32(e), j = k0 + 8 * nb + c_col_f32(e, t);
                float pe = exp2f(s[nb][e] - m[r]);
                l[r] += pe;  // the denominator counts the probabilities before dropout
                if (mask != nullptr && row[r] < T && j < T) pe *= mask[(i64)row[r] * T + j];
                s[nb][e] = pe;
            }
#pragma unroll
        for (int n = 0; n < HD / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[n][e] *= rescale[c_row_f32(e)];
        warp_accumulate_f32<HD>(acc, s, Vs);
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.f / l[r];
        if (t == 0 && row[r] < T) lse[(i64)bh * T + row[r]] = (m[r] + log2f(l[r])) * LN2;
    }
    warp_store_f32<HD>(o, ot, acc, row, T, inv);
}

// dK, dV of one key tile (float32). grid (ceil(T / BN), B * H), 128 threads; warp w owns keys
// 16w..16w+15. For each query tile from the diagonal on, with queries as columns:
// s^T = k q^T, P^T = exp(scale s^T - L), dV += (P * mask)^T dO, dP^T = v dO^T,
// dS^T = P^T * (dP^T * mask - D), dK += scale dS^T q.
template <int HD>
__global__ void __launch_bounds__(128) flash_backward_dkdv_f32(
    const float* q, const float* k, const float* v, const float* dout, const float* lse, const float* dsum,
    const float* mask, float* dk, float* dv, int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot,
    float scale) {
    constexpr int LD = SharedTile<float, HD>::LD, TILE = SharedTile<float, HD>::SIZE;
    extern __shared__ __align__(128) unsigned char smem_bytes[];
    float* Ks = reinterpret_cast<float*>(smem_bytes);  // (BN, HD) this block's keys
    float* Vs = Ks + TILE;                              // (BN, HD) this block's values
    float* QdOs = Vs + TILE;                            // stage s: Q at QdOs + 2 s TILE, dO after it
    float* LDs = QdOs + 4 * TILE;                       // stage s: L (log2 units) at LDs + 2 s BM, D after it
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k0 = (gridDim.x - 1 - blockIdx.x) * BN;  // the key tiles seen by the most queries start first
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh;
    dk += b * sb + h * sh; dv += b * sb + h * sh; dout += b * ob + h * oh;
    lse += (i64)bh * T; dsum += (i64)bh * T;
    if (mask != nullptr) mask += (i64)bh * T * T;
    const int tiles = (T - k0 + BM - 1) / BM;  // causal: query tiles before the key tile see none of it
    load_tile_async<HD>(Ks, k, st, k0, T);
    load_tile_async<HD>(Vs, v, st, k0, T);
    load_query_stage<HD>(QdOs, LDs, q, dout, lse, dsum, st, ot, 0, k0, T);
    const int row[2] = {k0 + 16 * warp + g, k0 + 16 * warp + g + 8};  // this lane's two key rows
    const float scale_log2 = scale * LOG2E;
    float dk_acc[HD / 8][4], dv_acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.f;
    for (int it = 0; it < tiles; ++it) {
        const int q0 = k0 + it * BM;
        const float* Qs = QdOs + 2 * (it & 1) * TILE;
        const float* dOs = Qs + TILE;
        const float* Ls = LDs + 2 * (it & 1) * BM;
        const float* Ds = Ls + BM;
        next_query_stage<HD>(QdOs, LDs, q, dout, lse, dsum, st, ot, it, tiles, q0 + BM, T);
        float s[8][4], dp[8][4];
        warp_scores_f32<HD>(s, Ks + 16 * warp * LD, Qs);    // s^T / scale: keys as rows, queries as columns
        warp_scores_f32<HD>(dp, Vs + 16 * warp * LD, dOs);  // dP^T
        const bool edge = q0 < k0 + BN - 1 || q0 + BM > T;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = row[c_row_f32(e)], ii = 8 * nb + c_col_f32(e, t), i = q0 + ii;
                const bool visible = !edge || (j <= i && i < T && j < T);
                const float p = visible ? exp2f(s[nb][e] * scale_log2 - Ls[ii]) : 0.f;
                const float keep = (mask != nullptr && visible) ? mask[(i64)i * T + j] : 1.f;
                s[nb][e] = p * keep;
                dp[nb][e] = p * (dp[nb][e] * keep - Ds[ii]);
            }
        warp_accumulate_f32<HD>(dv_acc, s, dOs);
        warp_accumulate_f32<HD>(dk_acc, dp, Qs);
        __syncthreads();
    }
    const float dk_factor[2] = {scale, scale}, dv_factor[2] = {1.f, 1.f};  // dK = scale dS^T q
    warp_store_f32<HD>(dk, st, dk_acc, row, T, dk_factor);
    warp_store_f32<HD>(dv, st, dv_acc, row, T, dv_factor);
}

// dQ of one query tile (float32). grid (ceil(T / BM), B * H), 128 threads; warp w owns queries
// 16w..16w+15; two stages of (K, V) tiles as in the forward. dQ = scale sum over visible key
// tiles of dS k, recomputing s and dP (no atomics: the same bits on every run).
template <int HD>
__global__ void __launch_bounds__(128) flash_backward_dq_f32(
    const float* q, const float* k, const float* v, const float* dout, const float* lse, const float* dsum,
    const float* mask, float* dq, int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot, float scale) {
    constexpr int LD = SharedTile<float, HD>::LD, TILE = SharedTile<float, HD>::SIZE;
    extern __shared__ __align__(128) unsigned char smem_bytes[];
    float* Qs = reinterpret_cast<float*>(smem_bytes);  // (BM, HD)
    float* dOs = Qs + TILE;                             // (BM, HD)
    float* KVs = dOs + TILE;                            // stage s: K at KVs + 2 s TILE, V after it
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh;
    dq += b * sb + h * sh; dout += b * ob + h * oh;
    lse += (i64)bh * T; dsum += (i64)bh * T;
    if (mask != nullptr) mask += (i64)bh * T * T;
    const int tiles = (min(q0 + BM, T) - 1) / BN + 1;
    load_tile_async<HD>(Qs, q, st, q0, T);
    load_tile_async<HD>(dOs, dout, ot, q0, T);
    load_tile_async<HD>(KVs, k, st, 0, T);
    load_tile_async<HD>(KVs + TILE, v, st, 0, T);
    tc::commit_async();
    const int row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
    const float scale_log2 = scale * LOG2E;
    float L[2], D[2];  // L in log2 units
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        L[r] = row[r] < T ? lse[row[r]] * LOG2E : 0.f;
        D[r] = row[r] < T ? dsum[row[r]] : 0.f;
    }
    float acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
    for (int it = 0; it < tiles; ++it) {
        const int k0 = it * BN;
        const float* Ks = KVs + 2 * (it & 1) * TILE;
        const float* Vs = Ks + TILE;
        next_key_stage<HD>(KVs, k, v, st, it, tiles, T);
        float s[8][4], dp[8][4];
        warp_scores_f32<HD>(s, Qs + 16 * warp * LD, Ks);    // s / scale
        warp_scores_f32<HD>(dp, dOs + 16 * warp * LD, Vs);  // dP = dO v^T
        const bool edge = k0 + BN - 1 > q0 || k0 + BN > T;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = c_row_f32(e), i = row[r], j = k0 + 8 * nb + c_col_f32(e, t);
                const bool visible = !edge || (j <= i && i < T && j < T);
                const float p = visible ? exp2f(s[nb][e] * scale_log2 - L[r]) : 0.f;
                const float keep = (mask != nullptr && visible) ? mask[(i64)i * T + j] : 1.f;
                dp[nb][e] = p * (dp[nb][e] * keep - D[r]);
            }
        warp_accumulate_f32<HD>(acc, dp, Ks);  // dQ += dS k: k as a row-major B
        __syncthreads();
    }
    const float factor[2] = {scale, scale};  // through the scaled scores
    warp_store_f32<HD>(dq, st, acc, row, T, factor);
}

// ---------------------------------------------------------------------------------------------------
// bf16 family

// The warp's 16 rows (starting at p in a shared tile) as HD / 16 A fragments.
template <int HD>
__device__ __forceinline__ void load_rows_a(FragA* a, const bf16* p) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) tc::load_a(a[kk], p + kk * 16, SharedTile<bf16, HD>::LD);
}

// s[nb] (columns 16nb..16nb+15 of a 16 x 64 block) = A B^T: A's 16 rows as fragments, B a shared tile.
template <int HD>
__device__ __forceinline__ void warp_scores(FragC s[4], const FragA* a, const bf16* Bs) {
#pragma unroll
    for (int nb = 0; nb < 4; ++nb) {
        tc::fill_fragment(s[nb], 0.f);
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            FragB b;
            tc::load_b_col(b, Bs + nb * 16 * SharedTile<bf16, HD>::LD + kk * 16, SharedTile<bf16, HD>::LD);
            tc::mma(s[nb], a[kk], b);
        }
    }
}

// acc (16 x HD, as HD / 16 C fragments) += P X: P (16 x 64) as four A fragments, X a shared tile.
template <int HD>
__device__ __forceinline__ void warp_accumulate(FragC* acc, const FragA p[4], const bf16* Xs) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int n = 0; n < HD / 16; ++n) {
            FragB b;
            tc::load_b_row(b, Xs + kk * 16 * SharedTile<bf16, HD>::LD + n * 16, SharedTile<bf16, HD>::LD);
            tc::mma(acc[n], p[kk], b);
        }
}

// Store the warp's (16, HD) accumulators as bf16: this lane's two rows row[0], row[1] (each times
// factor[r]; rows >= T are not stored) to dst (row stride st), two elements per 4-byte store.
template <int HD>
__device__ __forceinline__ void warp_store(bf16* dst, i64 st, const FragC* acc, const int row[2], int T,
                                           const float factor[2]) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < HD / 16; ++n)
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
            const int r = tc::c_row(e);
            if (row[r] >= T) continue;
            *reinterpret_cast<unsigned int*>(dst + row[r] * st + n * 16 + tc::c_col(e, t)) =
                tc::pack(acc[n].x[e] * factor[r], acc[n].x[e + 1] * factor[r]);
        }
}

// Forward. grid (ceil(T / BM), B * H), 128 threads; warp w owns query rows 16w..16w+15 of the tile.
// Shared: the query tile, then two stages of (K, V) tiles: the next key tile loads while this one
// is used. Scores are kept in log2 units (times log2 e), so every exponential is one exp2.
template <int HD>
__global__ void __launch_bounds__(128) flash_forward_bf16(
    const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const float* mask,
    int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot, float scale) {
    constexpr int TILE = SharedTile<bf16, HD>::SIZE, NK = HD / 16;
    extern __shared__ __align__(128) unsigned char smem_bytes[];
    bf16* Qs = reinterpret_cast<bf16*>(smem_bytes);  // (BM, HD)
    bf16* KVs = Qs + TILE;                            // stage s: K at KVs + 2 s TILE, V after it
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;  // the longest rows (most key tiles) start first
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh; o += b * ob + h * oh;
    if (mask != nullptr) mask += (i64)bh * T * T;
    const int tiles = (min(q0 + BM, T) - 1) / BN + 1;  // causal: key tiles after the last query are skipped
    load_tile_async<HD>(Qs, q, st, q0, T);
    load_tile_async<HD>(KVs, k, st, 0, T);
    load_tile_async<HD>(KVs + TILE, v, st, 0, T);
    tc::commit_async();
    const int row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};  // this lane's two query rows
    const float scale_log2 = scale * LOG2E;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};  // running max (log2 units), this lane's partial sums
    FragA qf[NK];
    FragC acc[NK];
#pragma unroll
    for (int n = 0; n < NK; ++n) tc::fill_fragment(acc[n], 0.f);
    for (int it = 0; it < tiles; ++it) {
        const int k0 = it * BN;
        const bf16* Ks = KVs + 2 * (it & 1) * TILE;
        const bf16* Vs = Ks + TILE;
        next_key_stage<HD>(KVs, k, v, st, it, tiles, T);
        if (it == 0) load_rows_a<HD>(qf, Qs + 16 * warp * SharedTile<bf16, HD>::LD);
        FragC s[4];
        warp_scores<HD>(s, qf, Ks);
        const bool edge = k0 + BN - 1 > q0 || k0 + BN > T;  // diagonal or short tile: some keys masked
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nb = 0; nb < 4; ++nb)
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int r = tc::c_row(e), j = k0 + 16 * nb + tc::c_col(e, t);
                const float x = (edge && (j > row[r] || j >= T)) ? NEG_INF : s[nb].x[e] * scale_log2;
                s[nb].x[e] = x;
                mx[r] = fmaxf(mx[r], x);
            }
        float rescale[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // the four lanes t = 0..3 of a row hold its 64 columns
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m[r], mx[r]);  // finite: every row sees key 0 of the first tile
            rescale[r] = exp2f(m[r] - m_new);       // 0 on the first tile (m = -inf)
            m[r] = m_new;
            l[r] *= rescale[r];
        }
        FragA p[4];
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int r = tc::c_row(e), j = k0 + 16 * nb + tc::c_col(e, t);
                float pe = exp2f(s[nb].x[e] - m[r]);
                l[r] += pe;  // the denominator counts the probabilities before dropout
                if (mask != nullptr && row[r] < T && j < T) pe *= mask[(i64)row[r] * T + j];
                s[nb].x[e] = pe;
            }
            tc::to_a(p[nb], s[nb]);
        }
#pragma unroll
        for (int n = 0; n < NK; ++n)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[n].x[e] *= rescale[tc::c_row(e)];
        warp_accumulate<HD>(acc, p, Vs);
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.f / l[r];
        if (t == 0 && row[r] < T) lse[(i64)bh * T + row[r]] = (m[r] + log2f(l[r])) * LN2;
    }
    warp_store<HD>(o, ot, acc, row, T, inv);
}

// dK, dV of one key tile (bf16). grid (ceil(T / BN), B * H), 128 threads; warp w owns keys
// 16w..16w+15. For each query tile from the diagonal on (two stages of Q, dO, L and D in shared),
// with queries as columns: s^T = k q^T, P^T = exp(scale s^T - L), dV += (P * mask)^T dO,
// dP^T = v dO^T, dS^T = P^T * (dP^T * mask - D), dK += scale dS^T q.
template <int HD>
__global__ void __launch_bounds__(128) flash_backward_dkdv_bf16(
    const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* dsum,
    const float* mask, bf16* dk, bf16* dv, int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot,
    float scale) {
    constexpr int TILE = SharedTile<bf16, HD>::SIZE, NK = HD / 16;
    extern __shared__ __align__(128) unsigned char smem_bytes[];
    bf16* Ks = reinterpret_cast<bf16*>(smem_bytes);  // (BN, HD) this block's keys
    bf16* Vs = Ks + TILE;                             // (BN, HD) this block's values
    bf16* QdOs = Vs + TILE;                           // stage s: Q at QdOs + 2 s TILE, dO after it
    float* LDs = reinterpret_cast<float*>(QdOs + 4 * TILE);  // stage s: L (log2 units) at LDs + 2 s BM, D after it
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k0 = (gridDim.x - 1 - blockIdx.x) * BN;  // the key tiles seen by the most queries start first
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh;
    dk += b * sb + h * sh; dv += b * sb + h * sh; dout += b * ob + h * oh;
    lse += (i64)bh * T; dsum += (i64)bh * T;
    if (mask != nullptr) mask += (i64)bh * T * T;
    const int tiles = (T - k0 + BM - 1) / BM;  // causal: query tiles before the key tile see none of it
    load_tile_async<HD>(Ks, k, st, k0, T);
    load_tile_async<HD>(Vs, v, st, k0, T);
    load_query_stage<HD>(QdOs, LDs, q, dout, lse, dsum, st, ot, 0, k0, T);
    const int row[2] = {k0 + 16 * warp + g, k0 + 16 * warp + g + 8};  // this lane's two key rows
    const float scale_log2 = scale * LOG2E;
    FragA kf[NK], vf[NK];
    FragC dk_acc[NK], dv_acc[NK];
#pragma unroll
    for (int n = 0; n < NK; ++n) { tc::fill_fragment(dk_acc[n], 0.f); tc::fill_fragment(dv_acc[n], 0.f); }
    for (int it = 0; it < tiles; ++it) {
        const int q0 = k0 + it * BM;
        const bf16* Qs = QdOs + 2 * (it & 1) * TILE;
        const bf16* dOs = Qs + TILE;
        const float* Ls = LDs + 2 * (it & 1) * BM;
        const float* Ds = Ls + BM;
        next_query_stage<HD>(QdOs, LDs, q, dout, lse, dsum, st, ot, it, tiles, q0 + BM, T);
        if (it == 0) {
            load_rows_a<HD>(kf, Ks + 16 * warp * SharedTile<bf16, HD>::LD);
            load_rows_a<HD>(vf, Vs + 16 * warp * SharedTile<bf16, HD>::LD);
        }
        FragC s[4], dp[4];
        warp_scores<HD>(s, kf, Qs);    // s^T / scale: keys as rows, queries as columns
        warp_scores<HD>(dp, vf, dOs);  // dP^T
        const bool edge = q0 < k0 + BN - 1 || q0 + BM > T;
        FragA pf[4], dsf[4];
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int j = row[tc::c_row(e)], ii = 16 * nb + tc::c_col(e, t), i = q0 + ii;
                const bool visible = !edge || (j <= i && i < T && j < T);
                const float p = visible ? exp2f(s[nb].x[e] * scale_log2 - Ls[ii]) : 0.f;
                const float keep = (mask != nullptr && visible) ? mask[(i64)i * T + j] : 1.f;
                s[nb].x[e] = p * keep;
                dp[nb].x[e] = p * (dp[nb].x[e] * keep - Ds[ii]);
            }
            tc::to_a(pf[nb], s[nb]);
            tc::to_a(dsf[nb], dp[nb]);
        }
        warp_accumulate<HD>(dv_acc, pf, dOs);
        warp_accumulate<HD>(dk_acc, dsf, Qs);
        __syncthreads();
    }
    const float dk_factor[2] = {scale, scale}, dv_factor[2] = {1.f, 1.f};  // dK = scale dS^T q
    warp_store<HD>(dk, st, dk_acc, row, T, dk_factor);
    warp_store<HD>(dv, st, dv_acc, row, T, dv_factor);
}

// dQ of one query tile (bf16). grid (ceil(T / BM), B * H), 128 threads; warp w owns queries
// 16w..16w+15; two stages of (K, V) tiles as in the forward. dQ = scale sum over visible key
// tiles of dS k, recomputing s and dP (no atomics: the same bits on every run).
template <int HD>
__global__ void __launch_bounds__(128) flash_backward_dq_bf16(
    const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* dsum,
    const float* mask, bf16* dq, int H, int T, i64 sb, i64 sh, i64 st, i64 ob, i64 oh, i64 ot, float scale) {
    constexpr int TILE = SharedTile<bf16, HD>::SIZE, NK = HD / 16;
    extern __shared__ __align__(128) unsigned char smem_bytes[];
    bf16* Qs = reinterpret_cast<bf16*>(smem_bytes);  // (BM, HD)
    bf16* dOs = Qs + TILE;                            // (BM, HD)
    bf16* KVs = dOs + TILE;                           // stage s: K at KVs + 2 s TILE, V after it
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    q += b * sb + h * sh; k += b * sb + h * sh; v += b * sb + h * sh;
    dq += b * sb + h * sh; dout += b * ob + h * oh;
    lse += (i64)bh * T; dsum += (i64)bh * T;
    if (mask != nullptr) mask += (i64)bh * T * T;
    const int tiles = (min(q0 + BM, T) - 1) / BN + 1;
    load_tile_async<HD>(Qs, q, st, q0, T);
    load_tile_async<HD>(dOs, dout, ot, q0, T);
    load_tile_async<HD>(KVs, k, st, 0, T);
    load_tile_async<HD>(KVs + TILE, v, st, 0, T);
    tc::commit_async();
    const int row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
    const float scale_log2 = scale * LOG2E;
    float L[2], D[2];  // L in log2 units
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        L[r] = row[r] < T ? lse[row[r]] * LOG2E : 0.f;
        D[r] = row[r] < T ? dsum[row[r]] : 0.f;
    }
    FragA qf[NK], dof[NK];
    FragC acc[NK];
#pragma unroll
    for (int n = 0; n < NK; ++n) tc::fill_fragment(acc[n], 0.f);
    for (int it = 0; it < tiles; ++it) {
        const int k0 = it * BN;
        const bf16* Ks = KVs + 2 * (it & 1) * TILE;
        const bf16* Vs = Ks + TILE;
        next_key_stage<HD>(KVs, k, v, st, it, tiles, T);
        if (it == 0) {
            load_rows_a<HD>(qf, Qs + 16 * warp * SharedTile<bf16, HD>::LD);
            load_rows_a<HD>(dof, dOs + 16 * warp * SharedTile<bf16, HD>::LD);
        }
        FragC s[4], dp[4];
        warp_scores<HD>(s, qf, Ks);    // s / scale
        warp_scores<HD>(dp, dof, Vs);  // dP = dO v^T
        const bool edge = k0 + BN - 1 > q0 || k0 + BN > T;
        FragA dsf[4];
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int r = tc::c_row(e), i = row[r], j = k0 + 16 * nb + tc::c_col(e, t);
                const bool visible = !edge || (j <= i && i < T && j < T);
                const float p = visible ? exp2f(s[nb].x[e] * scale_log2 - L[r]) : 0.f;
                const float keep = (mask != nullptr && visible) ? mask[(i64)i * T + j] : 1.f;
                dp[nb].x[e] = p * (dp[nb].x[e] * keep - D[r]);
            }
            tc::to_a(dsf[nb], dp[nb]);
        }
        warp_accumulate<HD>(acc, dsf, Ks);  // dQ += dS k: k as a row-major B
        __syncthreads();
    }
    const float factor[2] = {scale, scale};  // through the scaled scores
    warp_store<HD>(dq, st, acc, row, T, factor);
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
