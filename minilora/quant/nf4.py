"""NF4, the 4-bit NormalFloat of QLoRA (Dettmers et al., 2023), with double quantization.

Pretrained weights are close to normally distributed, so QLoRA spends its 16 codes where a normal
variable is likely: the codebook holds quantiles of N(0, 1), scaled into [-1, 1]. A block of 64
consecutive values of a row is divided by its largest magnitude (absmax), and each quotient is
stored as the index of the nearest code: 4 bits. To keep an exact zero and use all 16 codes, the
paper takes 8 quantiles for the positive half and 7 for the negative half, joined at 0
(``nf4_codebook``, equal to the paper's Appendix E table to float32 precision).

Double quantization: the absmax constants cost 32 / 64 = 0.5 bits per value in float32. QLoRA
quantizes them too, in groups of 256: each constant minus their mean, scaled by its group's
largest magnitude, in 8 bits. That leaves 8 / 64 + 32 / (64 * 256) = 0.127 bits per value, so
NF4 costs 4.127 bits, 0.516 bytes per value. (The paper's second level is an 8-bit float; here it
is a signed 8-bit integer, simpler to read and as large.)
"""

from __future__ import annotations

import statistics

import numpy as np

from ..backend import get_xp
from .weight import QuantizedWeight

BLOCK = 64  # values per absmax block (the paper's block size)
GROUP = 256  # absmax constants per group of the second quantization
# Where the outermost quantiles sit: halfway between the tails of 15 and 16 equal-probability bins,
# (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, so that the largest code is 1 after scaling (as bitsandbytes).
OUTER = (1 - 1 / 30 + 1 - 1 / 32) / 2


def nf4_codebook() -> np.ndarray:
    """The 16 NF4 codes, ascending, from -1 to 1 with an exact 0: quantiles of N(0, 1), rescaled."""
    normal = statistics.NormalDist()
    positive = [normal.inv_cdf(p) for p in np.linspace(OUTER, 0.5, 9)[:-1]]  # 8 quantiles above 0
    negative = [-normal.inv_cdf(p) for p in np.linspace(OUTER, 0.5, 8)[:-1]]  # 7 below
    codes = np.array(sorted(positive + [0.0] + negative))
    return (codes / codes.max()).astype(np.float32)


NF4_CODEBOOK = nf4_codebook()


def quantize_nf4(weight, layout: str = "linear") -> QuantizedWeight:
    """Quantize a stored (rows, cols) float matrix (cols a multiple of 64) to NF4, double-quantized."""
    xp = get_xp(weight)
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"NF4 needs rows of whole {BLOCK}-value blocks, got {cols} values a row")
    blocks = weight.astype(np.float32).reshape(rows, cols // BLOCK, BLOCK)  # (R, nb, 64)
    absmax = xp.abs(blocks).max(axis=-1)  # (R, nb)
    scaled = blocks / xp.where(absmax == 0, 1, absmax)[..., None]  # in [-1, 1]
    codebook = xp.asarray(NF4_CODEBOOK)
    midpoints = (codebook[1:] + codebook[:-1]) / 2  # (15,) the decision boundaries
    codes = xp.searchsorted(midpoints, scaled).astype(np.uint8)  # (R, nb, 64), the nearest code
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (R, nb, 32): two codes a byte
    flat = absmax.reshape(-1)  # (R * nb,) the constants, in row order
    mean = flat.mean(keepdims=True)  # (1,)
    padded = xp.zeros(-(-flat.size // GROUP) * GROUP, dtype=np.float32)
    padded[: flat.size] = flat - mean
    groups = padded.reshape(-1, GROUP)  # (n_groups, 256)
    scale = xp.abs(groups).max(axis=-1) / 127  # (n_groups,)
    absmax_q = (
        xp.rint(groups / xp.where(scale == 0, 1, scale)[:, None]).astype(np.int8).reshape(-1)[: flat.size]
    )
    arrays = {
        "codes": packed,
        "absmax_q": absmax_q,
        "scale": scale.astype(np.float32),
        "mean": mean,
        "codebook": codebook,
    }  # fmt: skip  (the codebook travels with the blocks: no copy per use)
    return QuantizedWeight("nf4", rows, cols, layout, arrays, dequantize_nf4)


def dequantize_nf4(arrays: dict, rows, cols: int):
    """The rows ``rows`` -> (n, cols) float32: codebook[code] * absmax, absmax from its 8 bits."""
    xp = get_xp(arrays["codes"])
    nb = cols // BLOCK
    packed = arrays["codes"][rows]  # (n, nb, 32)
    codes = xp.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(len(rows), nb, BLOCK)  # (n, nb, 64)
    constant = rows[:, None] * nb + xp.arange(nb)  # (n, nb) index of each block's absmax
    absmax = arrays["absmax_q"][constant].astype(np.float32) * arrays["scale"][constant // GROUP]
    absmax += arrays["mean"]
    values = arrays["codebook"][codes] * absmax[..., None]
    return values.reshape(len(rows), cols)
