"""GELU with GPT-2's tanh approximation ("gelu_new" in Hugging Face transformers).

gelu(x) = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)

The forward keeps x and t = tanh(u); the backward needs nothing else.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_xp
from ..fast.cuda.kernels import use_fused

GELU_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


class GeluCache(NamedTuple):
    x: object  # (...) the input
    t: object  # (...) tanh(u)


def gelu_forward(x):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), elementwise, any shape.

    Written as a few in-place passes over one buffer (u = k x + k c x^3 = x (k + k c x^2)) rather
    than one expression, which would allocate a temporary per operator.
    """
    if use_fused(x):  # on a GPU: one fused kernel (minilora.fast.cuda.kernels), same arithmetic
        from ..fast.cuda.kernels.gelu import gelu_forward as fused_gelu_forward

        return fused_gelu_forward(x)
    xp = get_xp(x)
    # BEGIN SOLUTION a1: t = tanh(sqrt(2/pi) (x + 0.044715 x^3)); out = 0.5 x (1 + t)
    t = x * x
    t *= GELU_SQRT_2_OVER_PI * GELU_CUBIC
    t += GELU_SQRT_2_OVER_PI
    t *= x  # u = sqrt(2/pi) (x + 0.044715 x^3)
    xp.tanh(t, out=t)  # t = tanh(u)
    out = t * 0.5
    out += 0.5
    out *= x  # 0.5 x (1 + t)
    # END SOLUTION
    return out, GeluCache(x=x, t=t)


def gelu_backward(dout, cache: GeluCache):
    """d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).

    The first term differentiates the factor x, the second the tanh (tanh' = 1 - tanh^2).
    """
    if use_fused(dout) or cache.t is None:  # the fused forward's cache keeps no t: its kernel recomputes it
        from ..fast.cuda.kernels.gelu import gelu_backward as fused_gelu_backward

        return fused_gelu_backward(dout, cache)
    x, t = cache.x, cache.t
    # BEGIN SOLUTION a1: product rule on 0.5 x (1 + t); tanh' = 1 - tanh^2
    du_dx = x * x
    du_dx *= 3.0 * GELU_CUBIC * GELU_SQRT_2_OVER_PI
    du_dx += GELU_SQRT_2_OVER_PI  # du/dx
    grad = t * t
    grad -= 1.0
    grad *= -0.5  # 0.5 (1 - t^2)
    grad *= x
    grad *= du_dx  # the tanh's term: 0.5 x (1 - t^2) du/dx
    half_t = get_xp(t).multiply(t, 0.5, out=du_dx)  # reuse the buffer for the factor's term, 0.5 (1 + t)
    grad += half_t
    grad += 0.5
    grad *= dout
    # END SOLUTION
    return grad
