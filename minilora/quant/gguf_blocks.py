"""GGUF's Q4_1 and Q8_0 blocks, read as the file stores them and dequantized as llama.cpp does.

A row of a weight is cut into blocks of 32 consecutive values (io/gguf_file.py describes the file):

- Q8_0, 34 bytes a block: a float16 scale d, then 32 int8 q;              value = q * d
- Q4_1, 20 bytes a block: float16 d and m, then 16 bytes of 4-bit q;      value = d * q + m
  (value j in the low nibble of byte j, value j + 16 in its high nibble)

So a Q4_1 weight costs 20 / 32 = 0.625 bytes per value and a Q8_0 one 34 / 32 = 1.0625, against 4
in float32. Nothing is re-quantized: the blocks are the file's bytes, and dequantizing them gives
the very float32 numbers the `gguf` package gives (the products and sums in the same order; no
fused multiply-add, which would round once instead of twice).
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


def quantized_from_gguf(raw: np.ndarray, format: str, rows: int, cols: int, layout: str) -> QuantizedWeight:
    """A QuantizedWeight over a GGUF tensor's raw bytes, (rows, cols / 32 * block bytes) uint8."""
    if format not in DEQUANTIZERS:
        raise ValueError(f"unsupported GGUF block format {format!r}: supported are {sorted(DEQUANTIZERS)}")
    if cols % BLOCK:
        raise ValueError(f"a row of {cols} values is not a whole number of {BLOCK}-value blocks")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // BLOCK, BLOCK_BYTES[format])
    return QuantizedWeight(format, rows, cols, layout, {"blocks": blocks}, DEQUANTIZERS[format])
