"""RMS normalisation over the channel axis (Llama's norm): y = x / sqrt(mean(x^2) + eps) * w.

LayerNorm without its two centring parts: no mean is subtracted and there is no bias, so each row is
only rescaled to unit root-mean-square and then multiplied by a learned gain. Shapes: C channels,
any leading axes (B, T, ...).

Forward stores the normalised input xhat and the reciprocal RMS rstd, the two things the backward
needs. ``eps`` has no default: checkpoints disagree (Llama and SmolLM2 use 1e-5, Hugging Face's
``LlamaRMSNorm`` defaults to 1e-6), so the model passes its config's value. Hugging Face computes
the norm in float32 whatever its input; here it is computed in the input's own dtype.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp


class RMSNormCache(NamedTuple):
    xhat: object  # (..., C) the normalised input x * rstd
    rstd: object  # (..., 1) 1 / sqrt(mean(x^2) + eps)
    w: object  # (C,) the gain, needed for dxhat


def rmsnorm_forward(x, w, eps: float):
    """y = xhat * w with xhat = x / sqrt(mean(x^2) + eps) over the last axis.

    x: (..., C), w: (C,) -> y: (..., C).
    """
    xp = get_xp(x)
    ms = (x * x).mean(axis=-1, keepdims=True)  # (..., 1) the mean square of each row
    rstd = 1.0 / xp.sqrt(ms + eps)  # (..., 1)
    xhat = x * rstd  # (..., C), unit root-mean-square (up to eps)
    out = xhat * w  # (..., C)
    return out, RMSNormCache(xhat=xhat, rstd=rstd, w=w)


def rmsnorm_backward(dout, cache: RMSNormCache):
    """Gradients of y = xhat * w.   Returns (dx, dw).

    A close cousin of a2's LayerNorm backward, so a student build opens it with a2's holes.

    Derivation (a2):
        The forward was y = xhat * w, so dw = sum(dout * xhat) over all rows and dxhat = dout * w.
        Since xhat = x * rstd with rstd = (mean(x^2) + eps)^(-1/2), and d rstd / dx_j = -rstd^3 x_j / C,
        the chain rule gives two terms:

            dx = rstd * (dxhat - xhat * mean(dxhat * xhat))

        the first direct, the second through rstd. LayerNorm's third term (through the mean) is absent.
    """
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    C = xhat.shape[-1]
    # BEGIN SOLUTION a2: RMSNorm's backward: dx through xhat and rstd, dw summed over every row
    dxhat = dout * w  # (..., C), from y = xhat * w
    mean_dxhat_xhat = (dxhat * xhat).mean(axis=-1, keepdims=True)  # (..., 1), the path through rstd
    dx = rstd * (dxhat - xhat * mean_dxhat_xhat)  # (..., C)
    dw = (dout * xhat).reshape(-1, C).sum(axis=0)  # (C,), summed over every row
    # END SOLUTION
    return dx, dw
