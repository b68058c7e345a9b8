"""Dequantization on the GPU in one kernel per slab: Q4_1, Q8_0 and NF4 blocks to float32.

The reference dequantizers (minilora/quant/) are array expressions: a float16 view, a cast, the
nibbles split and joined, a product and a sum, each one more pass over the slab in memory. Here one
thread computes one value straight from its block's bytes, with the reference's arithmetic and
rounding (a product, then a sum, each rounded to float32: ``__fmul_rn`` and ``__fadd_rn`` keep the
compiler from fusing them into one multiply-add), so the values are the reference's bit for bit.

They plug in at the weight's seam: a QuantizedWeight carries its dequantizer, and
``fuse_dequantizers`` gives every quantized weight of a model its fused twin (``accelerate`` calls
it on a GPU); the layers that read the weights do not change.
"""

from __future__ import annotations

import dataclasses
import functools

from ....weight_formats import QUANTIZED, format_of

THREADS = 256

_SOURCE = r"""
#include <cuda_fp16.h>

__device__ __forceinline__ float half_at(const unsigned char* p) {  // a float16 stored little-endian
    return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
}

// Q4_1, 20 bytes a block of 32: float16 d, float16 m, 16 bytes of nibbles. value = d * q + m
extern "C" __global__ void dequantize_q4_1(const unsigned char* blocks, const long long* rows, float* out,
                                           long long n_values, long long cols) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n_values) return;
    const long long r = i / cols, c = i % cols;
    const unsigned char* block = blocks + (rows[r] * (cols / 32) + c / 32) * 20;
    const int j = c % 32;
    const unsigned char byte = block[4 + (j & 15)];
    const float q = (float)(j < 16 ? (byte & 0x0F) : (byte >> 4));  // low nibbles first, then high
    out[i] = __fadd_rn(__fmul_rn(half_at(block), q), half_at(block + 2));
}

// Q8_0, 34 bytes a block of 32: float16 d, then 32 int8 q. value = q * d
extern "C" __global__ void dequantize_q8_0(const unsigned char* blocks, const long long* rows, float* out,
                                           long long n_values, long long cols) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n_values) return;
    const long long r = i / cols, c = i % cols;
    const unsigned char* block = blocks + (rows[r] * (cols / 32) + c / 32) * 34;
    out[i] = __fmul_rn((float)(signed char)block[2 + c % 32], half_at(block));
}

// NF4, blocks of 64 codes (two a byte, even code low); each block's absmax from its int8, the scale of
// its group of 256 blocks and the mean. value = codebook[code] * (absmax_q * scale + mean)
extern "C" __global__ void dequantize_nf4(const unsigned char* codes, const signed char* absmax_q,
                                          const float* scale, const float* mean, const float* codebook,
                                          const long long* rows, float* out, long long n_values, long long cols) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n_values) return;
    const long long r = i / cols, c = i % cols;
    const long long b = rows[r] * (cols / 64) + c / 64;  // the block's index in row order
    const int j = c % 64;
    const unsigned char byte = codes[b * 32 + j / 2];
    const int code = (j & 1) ? (byte >> 4) : (byte & 0x0F);
    const float absmax = __fadd_rn(__fmul_rn((float)absmax_q[b], scale[b / 256]), mean[0]);
    out[i] = __fmul_rn(codebook[code], absmax);
}
"""


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=_SOURCE)


def _dequantize(kernel: str, arrays: tuple, rows, cols: int):
    """Launch ``kernel`` over len(rows) x cols values; rows may be any integer array of stored rows."""
    import cupy

    rows = cupy.ascontiguousarray(rows.reshape(-1), dtype=cupy.int64)
    out = cupy.empty((rows.size, cols), dtype=cupy.float32)
    n_values = out.size
    if n_values:
        grid = (n_values + THREADS - 1) // THREADS
        _module().get_function(kernel)((grid,), (THREADS,), (*arrays, rows, out, n_values, cols))
    return out


def dequantize_q4_1(arrays: dict, rows, cols: int):
    """The reference's ``quant.gguf_blocks.dequantize_q4_1``, in one kernel."""
    return _dequantize("dequantize_q4_1", (arrays["blocks"],), rows, cols)


def dequantize_q8_0(arrays: dict, rows, cols: int):
    """The reference's ``quant.gguf_blocks.dequantize_q8_0``, in one kernel."""
    return _dequantize("dequantize_q8_0", (arrays["blocks"],), rows, cols)


def dequantize_nf4(arrays: dict, rows, cols: int):
    """The reference's ``quant.nf4.dequantize_nf4``, in one kernel."""
    names = ("codes", "absmax_q", "scale", "mean", "codebook")
    return _dequantize("dequantize_nf4", tuple(arrays[name] for name in names), rows, cols)


FUSED_DEQUANTIZERS = {"q4_1": dequantize_q4_1, "q8_0": dequantize_q8_0, "nf4": dequantize_nf4}


def fuse_dequantizers(model) -> int:
    """Give every quantized weight of ``model`` (and of its base, for a LoRA model) the fused dequantizer.

    Returns how many weights were changed. The weights' blocks are shared, not copied.
    """
    changed = 0
    for params in model.weight_dicts():
        for name, value in params.items():
            if format_of(value) is QUANTIZED and value.format in FUSED_DEQUANTIZERS:
                params[name] = dataclasses.replace(value, dequantize_rows=FUSED_DEQUANTIZERS[value.format])
                changed += 1
    return changed
