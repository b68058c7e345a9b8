"""Inverted dropout with an explicit mask.

The mask is an argument, not hidden state: during training it is drawn fresh each step from a
device generator (``make_dropout_mask``); a gradient check passes the same mask to every evaluation.
Kept units are scaled by 1 / (1 - p) at training time, so evaluation needs no rescaling.
"""

from __future__ import annotations


def make_dropout_mask(rng, shape, p: float, dtype):
    """A mask of zeros (probability p) and 1 / (1 - p) (probability 1 - p), drawn with ``rng``.

    ``rng`` is a generator of the array module that the mask should live in (see backend.device_rng).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    keep = rng.random(shape, dtype="float32") >= p  # (shape) bool
    return keep.astype(dtype) * (1.0 / (1.0 - p))


def dropout_forward(x, mask):
    """out = x * mask; the mask already holds the 1 / (1 - p) scaling. Returns (out, cache=mask)."""
    return x * mask, mask


def dropout_backward(dout, mask):
    """The forward was out = x * mask, so dx = dout * mask."""
    return dout * mask
