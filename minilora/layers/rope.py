"""Rotary position embedding (RoPE): each pair of a head's dimensions is rotated by a position-dependent angle.

Llama has no position-embedding table. Instead, the queries and keys of every head (B, H, T, hs:
batch, heads, positions, head size) are split into hs/2 pairs of coordinates (x1, x2), and pair j
at position p is rotated in its plane by the angle p * theta^(-2j/hs):

    x1' = x1 cos - x2 sin
    x2' = x1 sin + x2 cos

Rotating q at position m and k at position n makes their dot product depend on m - n only, which is
how attention learns relative position. Values are not rotated. The angles depend on the position
and the pair only, so ``rope_tables`` computes cos and sin once per forward and every layer shares them.

Which dimensions form a pair is a layout choice, and both are in use:

    pairing="half"      pair j is (j, j + hs/2): Hugging Face's ``rotate_half`` layout
    pairing="adjacent"  pair j is (2j, 2j + 1): the original RoPE and GGML/llama.cpp's layout

They are the same map up to a fixed permutation of the head dimension, the one llama.cpp's converter
applies to the rows of q_proj and k_proj when it writes Hugging Face weights to GGUF. So weights
from a safetensors checkpoint go with "half", weights read back from a GGUF file with "adjacent".
Left out: the scaled variants (Llama-3's frequency bands, YaRN, dynamic NTK).
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp

ROPE_PAIRINGS = ("half", "adjacent")


class RopeCache(NamedTuple):
    cos: object  # (T, hs/2) cos of each position's angle, per pair; (B, 1, T, hs/2) for packed rows
    sin: object  # the sin of the same
    pairing: str  # "half" or "adjacent": which dimensions were rotated together


def rope_tables(T: int, hs: int, start: int, theta: float, dtype, xp):
    """cos and sin of the angles (start + t) * theta^(-2j/hs) for t < T and j < hs/2, each (T, hs/2).

    Positions run start..start+T-1: in generation with a key/value cache the new positions start
    after the cached ones. ``theta`` is the base (Llama 2: 10000, SmolLM2: 100000). The angles are
    computed in float64 whatever ``dtype`` the tables are returned in: at position 10^4 a float32
    angle would already be off by up to 5e-4 radian. ``xp`` is the array module to build them in.
    """
    return _tables_at(xp.arange(start, start + T, dtype=xp.float64), hs, theta, dtype)  # (T, hs/2) each


def rope_tables_at(positions, hs: int, theta: float, dtype):
    """cos and sin at each token's own position, for packed rows: positions (B, T) -> (B, 1, T, hs/2) each.

    A packed row holds several examples, and each example's positions start again at 0
    (training/examples.py), so the angles differ from row to row; the tables broadcast over the heads.
    """
    xp = get_xp(positions)
    cos, sin = _tables_at(positions.astype(xp.float64), hs, theta, dtype)  # (B, T, hs/2) each
    return cos[:, None], sin[:, None]


def _tables_at(position, hs: int, theta: float, dtype):
    """cos and sin of position * theta^(-2j/hs), in float64, returned in ``dtype``: (..., hs/2) each."""
    xp = get_xp(position)
    if hs % 2 != 0:
        raise ValueError(f"RoPE rotates pairs of dimensions; head size {hs} is odd")
    inv_freq = 1.0 / theta ** (xp.arange(0, hs, 2, dtype=xp.float64) / hs)  # (hs/2,), 1 down to ~1/theta
    angle = position[..., None] * inv_freq  # (..., hs/2), an outer product
    return xp.cos(angle).astype(dtype), xp.sin(angle).astype(dtype)


def _split_pairs(x, pairing: str):
    """(..., hs) -> x1, x2, each (..., hs/2): the first and second coordinate of every pair (views)."""
    if pairing == "half":
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    return x[..., 0::2], x[..., 1::2]  # "adjacent"


def _join_pairs(x1, x2, pairing: str, xp):
    """The inverse of _split_pairs: x1, x2 (..., hs/2) -> (..., hs)."""
    if pairing == "half":
        return xp.concatenate([x1, x2], axis=-1)
    return xp.stack([x1, x2], axis=-1).reshape(*x1.shape[:-1], 2 * x1.shape[-1])  # interleaved


def rope_forward(x, cos, sin, pairing: str = "half"):
    """Rotate every pair (x1, x2) of x: x1' = x1 cos - x2 sin, x2' = x1 sin + x2 cos.

    x: (B, H, T, hs) queries or keys; cos, sin: (T, hs/2) from ``rope_tables``, or (B, 1, T, hs/2)
    from ``rope_tables_at`` for packed rows, in x's dtype -> out: (B, H, T, hs). The default pairing
    is Hugging Face's, the layout of the state dicts minilora reads.
    """
    xp = get_xp(x)
    if pairing not in ROPE_PAIRINGS:
        raise ValueError(f"unknown RoPE pairing {pairing!r}; choose one of {ROPE_PAIRINGS}")
    B, _, T, hs = x.shape
    shapes = ((T, hs // 2), (B, 1, T, hs // 2))
    if cos.shape not in shapes or sin.shape != cos.shape:
        # a (1, hs/2) table would broadcast silently over every position: refuse it
        raise ValueError(
            f"RoPE tables have shape {cos.shape}, expected (T, hs/2) = {shapes[0]} or {shapes[1]}"
        )
    x1, x2 = _split_pairs(x, pairing)  # (B, H, T, hs/2) each
    out = _join_pairs(x1 * cos - x2 * sin, x1 * sin + x2 * cos, pairing, xp)  # (B, H, T, hs)
    return out, RopeCache(cos=cos, sin=sin, pairing=pairing)


def rope_backward(dout, cache: RopeCache):
    """Gradient of the rotation.   dout: (B, H, T, hs) -> dx: (B, H, T, hs).

    The forward was (x1', x2') = R(angle) (x1, x2) for each pair, a linear map, so the gradient is
    the transpose, and the transpose of a rotation is the rotation by the negative angle
    (cos stays, sin changes sign):

        dx1 =  dx1' cos + dx2' sin
        dx2 = -dx1' sin + dx2' cos

    The backward therefore needs only the tables, not x.
    """
    xp = get_xp(dout)
    cos, sin = cache.cos, cache.sin
    dx1_out, dx2_out = _split_pairs(dout, cache.pairing)  # (B, H, T, hs/2) each
    dx1 = dx1_out * cos + dx2_out * sin
    dx2 = -dx1_out * sin + dx2_out * cos
    return _join_pairs(dx1, dx2, cache.pairing, xp)  # (B, H, T, hs)
