"""The SwiGLU gate of Llama's MLP: out = silu(g) * u, with silu(g) = g * sigmoid(g).

Llama's MLP is down_proj(silu(gate_proj(x)) * up_proj(x)): two parallel bias-free projections of
the same input, one of them passed through SiLU and used to gate the other elementwise, then a third
projection back down. The three projections are ordinary linear layers (``linear_forward(x, W,
None)``) that the model applies; this module is only the elementwise part in the middle, on
g = gate_proj(x) and u = up_proj(x) of any common shape, e.g. (B, T, I) with I the MLP width.

The forward keeps g, u and sigmoid(g); silu(g) = g * sigmoid(g) is recomputed in the backward.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp


class SwiGLUCache(NamedTuple):
    g: object  # (...) the gate, gate_proj(x)
    u: object  # (...) the gated value, up_proj(x)
    sig: object  # (...) sigmoid(g)


def sigmoid(x):
    """1 / (1 + exp(-x)), elementwise, without overflow for any x.

    exp(-x) overflows for x below about -709 (float64) or -88 (float32). With e = exp(-|x|), which
    lies in (0, 1], the two algebraically equal forms 1 / (1 + e) for x >= 0 and e / (1 + e) for
    x < 0 never overflow; for very negative x, e underflows to 0 and sigmoid(x) to 0, its limit.
    """
    xp = get_xp(x)
    e = xp.exp(-xp.abs(x))  # (...) in (0, 1]
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def swiglu_forward(g, u):
    """out = silu(g) * u = g * sigmoid(g) * u, elementwise.   g, u: (...) -> out: (...)."""
    sig = sigmoid(g)
    out = g * sig * u
    return out, SwiGLUCache(g=g, u=u, sig=sig)


def swiglu_backward(dout, cache: SwiGLUCache):
    """Gradients of out = silu(g) * u.   Returns (dg, du).

    du = dout * silu(g), from the product with u. For g, the product rule on silu(g) = g * sigmoid(g)
    with sigmoid' = sigmoid (1 - sigmoid) gives

        silu'(g) = sigmoid(g) + g sigmoid(g) (1 - sigmoid(g)) = sigmoid(g) (1 + g (1 - sigmoid(g)))

    so dg = dout * u * silu'(g).
    """
    g, u, sig = cache.g, cache.u, cache.sig
    du = dout * g * sig  # dout * silu(g)
    dg = dout * u * sig * (1.0 + g * (1.0 - sig))  # dout * u * silu'(g)
    return dg, du
