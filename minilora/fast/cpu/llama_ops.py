"""The Llama family's elementwise layers for a CPU step, in fewer passes over memory.

The same formulas as ``minilora.layers.swiglu`` and ``minilora.layers.rmsnorm``, rewritten as
in-place passes over reused buffers (see ``ops.py`` for why that pays on the CPU). SwiGLU's gate is
the widest activation of a Llama (I = 1536 channels on SmolLM2 against C = 576), so its sigmoid is
the one to make cheap: sigmoid(g) = (1 + tanh(g / 2)) / 2 is the same function, has no overflow
for any g, and takes one tanh pass instead of the reference's exp, abs, two divisions and a where.
They return the reference's cache types; ``tests/test_fast_cpu_ops.py`` checks them against it.
"""

from __future__ import annotations

from ...backend import get_xp
from ...layers.rmsnorm import RMSNormCache
from ...layers.swiglu import SwiGLUCache


def swiglu_forward(g, u):
    """out = g * sigmoid(g) * u, with sigmoid(g) = 0.5 + 0.5 tanh(g / 2) built in one buffer."""
    xp = get_xp(g)
    sig = g * 0.5
    xp.tanh(sig, out=sig)
    sig *= 0.5
    sig += 0.5
    out = g * sig
    out *= u
    return out, SwiGLUCache(g=g, u=u, sig=sig)


def swiglu_backward(dout, cache: SwiGLUCache):
    """du = dout * g * sig; dg = dout * u * sig * (1 + g (1 - sig)), each in one buffer."""
    g, u, sig = cache.g, cache.u, cache.sig
    du = dout * g
    du *= sig
    dg = 1.0 - sig
    dg *= g
    dg += 1.0
    dg *= sig  # silu'(g)
    dg *= u
    dg *= dout
    return dg, du


def rmsnorm_forward(x, w, eps: float):
    """y = x * rstd * w, with each row's sum of squares by einsum (no squared temporary)."""
    xp = get_xp(x)
    C = x.shape[-1]
    ms = xp.einsum("...c,...c->...", x, x)[..., None] / C  # (..., 1)
    rstd = 1.0 / xp.sqrt(ms + eps)  # (..., 1)
    xhat = x * rstd
    out = xhat * w
    return out, RMSNormCache(xhat=xhat, rstd=rstd, w=w)


def rmsnorm_backward(dout, cache: RMSNormCache):
    """dx = rstd * (dxhat - xhat * mean(dxhat * xhat)) built in the buffer of dxhat; dw by einsum."""
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    xp = get_xp(xhat)
    C = xhat.shape[-1]
    dxhat = dout * w  # (..., C)
    mean_dxhat_xhat = xp.einsum("...c,...c->...", dxhat, xhat)[..., None] / C  # (..., 1)
    dx = dxhat
    dx -= xhat * mean_dxhat_xhat
    dx *= rstd
    dw = xp.einsum("nc,nc->c", dout.reshape(-1, C), xhat.reshape(-1, C))  # (C,), summed over every row
    return dx, dw
