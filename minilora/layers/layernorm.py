"""Layer normalisation over the channel axis: y = (x - mean) / sqrt(var + eps) * w + b.

Forward stores the normalised input xhat and the reciprocal standard deviation rstd, the two things
the backward needs; it does not store x itself.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp

LAYERNORM_EPS = 1e-5


class LayerNormCache(NamedTuple):
    xhat: object  # (..., C) the normalised input (x - mean) * rstd
    rstd: object  # (..., 1) 1 / sqrt(var + eps)
    w: object  # (C,) the gain, needed for dxhat
    has_bias: bool


def layernorm_forward(x, w, b=None, eps: float = LAYERNORM_EPS):
    """y = xhat * w + b with xhat = (x - mean(x)) / sqrt(var(x) + eps) over the last axis.

    x: (..., C), w: (C,), b: (C,) or None -> y: (..., C). The variance is the biased one (divide
    by C), as in PyTorch and GPT-2.
    """
    xp = get_xp(x)
    # BEGIN SOLUTION a2: normalise each row (mean, biased variance, eps in the root), then w (and b)
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat = (x - mean) * rstd  # (..., C)
    out = xhat * w if b is None else xhat * w + b
    # END SOLUTION
    return out, LayerNormCache(xhat=xhat, rstd=rstd, w=w, has_bias=b is not None)


def layernorm_backward(dout, cache: LayerNormCache):
    """Gradients of y = xhat * w + b.   dout: (..., C) -> dx (..., C), dw (C,), db (C,).

    Returns (dx, dw, db); db is None without a bias.

    Derivation (a2):
        The forward was y = xhat * w + b, so dw = sum(dout * xhat) and db = sum(dout) over all rows,
        and dxhat = dout * w. Since xhat = (x - mean) * rstd, where both mean and rstd depend on every
        element of the row, the chain rule through them gives three terms:

            dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

        The middle term comes through the mean, the last through the variance.
    """
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    C = xhat.shape[-1]
    # BEGIN SOLUTION a2: dx has three terms: direct, via the mean, via the variance
    dxhat = dout * w  # (..., C)
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)  # (..., 1), the path through the mean
    mean_dxhat_xhat = (dxhat * xhat).mean(axis=-1, keepdims=True)  # (..., 1), the path through the variance
    dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)  # (..., C)
    dw = (dout * xhat).reshape(-1, C).sum(axis=0)  # (C,), summed over every row
    db = dout.reshape(-1, C).sum(axis=0) if cache.has_bias else None  # (C,)
    # END SOLUTION
    return dx, dw, db
