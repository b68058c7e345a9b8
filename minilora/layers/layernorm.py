"""Layer normalisation over the channel axis: y = (x - mean) / sqrt(var + eps) * w + b.

Forward stores the normalised input xhat and the reciprocal standard deviation rstd, the two things
the backward needs; it does not store x itself.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp
from ..fast.cuda.kernels import use_fused

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
    if use_fused(x):  # on a GPU: one block per row (minilora.fast.cuda.kernels), same arithmetic
        from ..fast.cuda.kernels.layernorm import layernorm_forward as fused_layernorm_forward

        return fused_layernorm_forward(x, w, b, eps)
    xp = get_xp(x)
    # BEGIN SOLUTION a2: xhat = (x - mean) * rstd; out = xhat * w (+ b)
    C = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xhat = x - mean  # (..., C), centred here and scaled in place below
    var = xp.einsum("...c,...c->...", xhat, xhat)[..., None] / C  # (..., 1), sum of squares without a temporary
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat *= rstd  # (..., C)
    out = xhat * w
    if b is not None:
        out += b
    # END SOLUTION
    return out, LayerNormCache(xhat=xhat, rstd=rstd, w=w, has_bias=b is not None)


def layernorm_backward(dout, cache: LayerNormCache):
    """Gradients of y = xhat * w + b.   Returns (dx, dw, db); db is None without a bias.

    The forward was y = xhat * w + b, so dw = sum(dout * xhat) and db = sum(dout) over all rows,
    and dxhat = dout * w. Since xhat = (x - mean) * rstd, where both mean and rstd depend on every
    element of the row, the chain rule through them gives three terms:

        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

    The middle term comes through the mean, the last through the variance.
    """
    if use_fused(dout):
        from ..fast.cuda.kernels.layernorm import layernorm_backward as fused_layernorm_backward

        return fused_layernorm_backward(dout, cache)
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    xp = get_xp(xhat)
    C = xhat.shape[-1]
    # BEGIN SOLUTION a2: dx has three terms: direct, via the mean, via the variance
    dxhat = dout * w  # (..., C)
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_dxhat_xhat = xp.einsum("...c,...c->...", dxhat, xhat)[..., None] / C  # (..., 1)
    dx = dxhat  # (..., C), built in place: rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dx -= mean_dxhat
    dx -= xhat * mean_dxhat_xhat
    dx *= rstd
    rows = (-1, C)
    dw = xp.einsum("nc,nc->c", dout.reshape(rows), xhat.reshape(rows))  # (C,) sum over rows of dout * xhat
    db = dout.reshape(rows).sum(axis=0) if cache.has_bias else None  # (C,)
    # END SOLUTION
    return dx, dw, db
