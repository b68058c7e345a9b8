"""GELU with GPT-2's tanh approximation ("gelu_new" in Hugging Face transformers).

gelu(x) = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)

The forward keeps x and t = tanh(u); the backward needs nothing else.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_xp

GELU_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


class GeluCache(NamedTuple):
    x: object  # (...) the input
    t: object  # (...) tanh(u)


def gelu_forward(x):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), elementwise, any shape."""
    xp = get_xp(x)
    # BEGIN SOLUTION a1: t = tanh(sqrt(2/pi) (x + 0.044715 x^3)); out = 0.5 x (1 + t)
    t = xp.tanh(GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * x**3))  # tanh(u)
    out = 0.5 * x * (1.0 + t)
    # END SOLUTION
    return out, GeluCache(x=x, t=t)


def gelu_backward(dout, cache: GeluCache):
    """Gradient of gelu, elementwise.   dout: (...) -> dx: (...), in x's shape and dtype.

    Derivation (a1):
        d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).

        The first term differentiates the factor x, the second the tanh (tanh' = 1 - tanh^2).
    """
    x, t = cache.x, cache.t
    # BEGIN SOLUTION a1: product rule on 0.5 x (1 + t); tanh' = 1 - tanh^2
    du_dx = GELU_SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x**2)
    dx = dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du_dx)
    # END SOLUTION
    return dx
