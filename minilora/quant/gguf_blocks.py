"""GGUF's Q4_1 and Q8_0 blocks, read as the file stores them and dequantized as llama.cpp does.

A row of a weight is cut into blocks of 32 consecutive values (io/gguf_file.py describes the file):

- Q8_0, 34 bytes a block: a float16 scale d, then 32 int8 q;              value = q * d
- Q4_1, 20 bytes a block: float16 d and m, then 16 bytes of 4-bit q;      value = d * q + m
  (value j in the low nibble of byte j, value j + 16 in its high nibble)

So a Q4_1 weight costs 20 / 32 = 0.625 bytes per value and a Q8_0 one 34 / 32 = 1.0625, against 4
in float32. A GGUF base keeps the file's bytes as they are (``quantized_from_gguf``), and
dequantizing them gives the very float32 numbers the `gguf` package gives (the products and sums in
the same order; no fused multiply-add, which would round once instead of twice).

Any float matrix can also be quantized to either format (``quantize_gguf_blocks``), as llama.cpp
quantizes, in float32 with its rounding (half away from zero):

- Q8_0: d = max|x| / 127, q = round(x / d);
- Q4_1: d = (max x - min x) / 15, m = min x, q = round((x - m) / d) clipped to 0..15;

d and m are then stored in float16, so the stored block dequantizes with the rounded constants.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp
from .weight import QuantizedWeight

BLOCK = 32  # values per block, both formats
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}


def dequantize_q4_1(arrays: dict, rows, cols: int):
    """The rows ``rows`` of (R, cols / 32, 20) uint8 blocks -> (n, cols) float32: d * q + m per block."""
    blocks = arrays["blocks"][rows]
    xp = get_xp(blocks)
    d = blocks[..., 0:2].copy().view(xp.float16).astype(xp.float32)  # (n, nb, 1)
    m = blocks[..., 2:4].copy().view(xp.float16).astype(xp.float32)  # (n, nb, 1)
    packed = blocks[..., 4:]  # (n, nb, 16)
    q = xp.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(
        xp.float32
    )  # (n, nb, 32): low, then high
    values = d * q
    values += m
    return values.reshape(blocks.shape[0], cols)


def dequantize_q8_0(arrays: dict, rows, cols: int):
    """The rows ``rows`` of (R, cols / 32, 34) uint8 blocks -> (n, cols) float32: q * d per block."""
    blocks = arrays["blocks"][rows]
    xp = get_xp(blocks)
    d = blocks[..., 0:2].copy().view(xp.float16).astype(xp.float32)  # (n, nb, 1)
    q = blocks[..., 2:].copy().view(xp.int8).astype(xp.float32)  # (n, nb, 32)
    return (q * d).reshape(blocks.shape[0], cols)


DEQUANTIZERS = {"q4_1": dequantize_q4_1, "q8_0": dequantize_q8_0}


def round_half_away(xp, values):
    """Round to the nearest integer, halves away from zero (C's roundf), exactly in float32."""
    magnitude = xp.abs(values)
    whole = xp.floor(magnitude)
    return xp.sign(values) * (whole + (magnitude - whole >= 0.5))  # magnitude - whole is exact


def reciprocal_or_zero(xp, d):
    """1 / d, and 0 where d = 0 (a block of equal values: every q is then 0)."""
    return xp.where(d == 0, 0, 1 / xp.where(d == 0, 1, d)).astype(xp.float32)


def float16_bytes(xp, values):
    """(n, nb, 1) float32 -> (n, nb, 2) uint8: the values rounded to float16, as the file stores them."""
    return values.astype(xp.float16).view(xp.uint8)


def quantize_q8_0_blocks(xp, blocks):
    """(R, nb, 32) float32 -> (R, nb, 34) uint8 Q8_0 blocks."""
    d = xp.abs(blocks).max(axis=-1, keepdims=True) / xp.float32(127)  # (R, nb, 1)
    q = round_half_away(xp, blocks * reciprocal_or_zero(xp, d)).astype(xp.int8)  # (R, nb, 32) in -127..127
    return xp.concatenate([float16_bytes(xp, d), q.view(xp.uint8)], axis=-1)


def quantize_q4_1_blocks(xp, blocks):
    """(R, nb, 32) float32 -> (R, nb, 20) uint8 Q4_1 blocks (value j low nibble, j + 16 high)."""
    low, high = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)  # (R, nb, 1)
    d = (high - low) / xp.float32(15)
    steps = (blocks - low) * reciprocal_or_zero(xp, d)  # (R, nb, 32) in [0, 15]
    q = xp.clip(xp.floor(steps + xp.float32(0.5)), 0, 15).astype(xp.uint8)  # steps >= 0: half rounds up
    packed = q[..., :16] | (q[..., 16:] << 4)  # (R, nb, 16)
    return xp.concatenate([float16_bytes(xp, d), float16_bytes(xp, low), packed], axis=-1)


QUANTIZERS = {"q4_1": quantize_q4_1_blocks, "q8_0": quantize_q8_0_blocks}


def quantize_gguf_blocks(weight, format: str, layout: str = "linear") -> QuantizedWeight:
    """Quantize a stored (rows, cols) float matrix (cols a multiple of 32) to Q4_1 or Q8_0 blocks."""
    if format not in QUANTIZERS:
        raise ValueError(f"unsupported GGUF block format {format!r}: supported are {sorted(QUANTIZERS)}")
    xp = get_xp(weight)
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"{format} needs rows of whole {BLOCK}-value blocks, got {cols} values a row")
    blocks = weight.astype(xp.float32).reshape(rows, cols // BLOCK, BLOCK)  # (R, nb, 32)
    stored = QUANTIZERS[format](xp, blocks)
    return QuantizedWeight(format, rows, cols, layout, {"blocks": stored}, DEQUANTIZERS[format])


def quantized_from_gguf(raw: np.ndarray, format: str, rows: int, cols: int, layout: str) -> QuantizedWeight:
    """A QuantizedWeight over a GGUF tensor's raw bytes, (rows, cols / 32 * block bytes) uint8."""
    if format not in DEQUANTIZERS:
        raise ValueError(f"unsupported GGUF block format {format!r}: supported are {sorted(DEQUANTIZERS)}")
    if cols % BLOCK:
        raise ValueError(f"a row of {cols} values is not a whole number of {BLOCK}-value blocks")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // BLOCK, BLOCK_BYTES[format])
    return QuantizedWeight(format, rows, cols, layout, {"blocks": blocks}, DEQUANTIZERS[format])
