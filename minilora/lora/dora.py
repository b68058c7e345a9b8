"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

DoRA splits each adapted weight into a direction and a magnitude. The direction is the LoRA-updated
weight V = W + s lora_A^T lora_B^T, shape (C_in, C_out); the magnitude is a trainable vector m, one
number per output unit, initialised to the norms of W's columns so that training starts at the
base. With n = ||V||, the norm of each column (over C_in), the adapted layer is

    y = x V * (m / n) + b = g * (x W + s (drop(x) lora_A^T) lora_B^T) + b,      g = m / n   (per output unit)

There are two backwards. The default treats the norm n as a constant (the paper's Section 4.3,
which saves the memory and time of differentiating through it; PEFT does the same with ``detach``):
it is the exact gradient of the layer with n held at its value. ``exact_norm_gradient=True`` also
follows the gradient through n = ||V||, which depends on lora_A and lora_B (W is frozen), so the
two backwards give the same dm, db and dx and differ in dlora_A and dlora_B only.

Derivation (a7):
    Write u = x W + s h lora_B^T for the unscaled output (h = drop(x) lora_A^T) and du = dout * g.
    With n held constant:

        dm = sum over rows of dout * u / n       (C_out,)
        db = sum over rows of dout
        dlora_A, dlora_B, dx: the LoRA backward of du (see layer.py), plus du W^T for dx

    Through n: with c = -sum_rows(dout * u) * m / n^2 (the derivative of the loss by n) and
    dn/dV = V / n, the extra term is dV = V * c / n, which reaches the factors as
    dlora_A += s lora_B^T dV^T and dlora_B += s dV^T lora_A^T.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp, matmul
from .layer import LoraCache, lora_backward, lora_delta_weight, lora_forward


def column_norms(V):
    """||V[:, j]|| for each output unit j of a (C_in, C_out) weight -> (C_out,)."""
    xp = get_xp(V)
    return xp.sqrt((V * V).sum(axis=0))


def dora_weight_norm(W, lora_A, lora_B, scaling: float):
    """n = column norms of V = W + s lora_A^T lora_B^T, the directions' lengths, (C_out,)."""
    return column_norms(W + lora_delta_weight(lora_A, lora_B, scaling).astype(W.dtype))


class DoraCache(NamedTuple):
    x: object  # (..., C_in) the input, for the base path's dx
    W: object  # (C_in, C_out)
    u: object  # (..., C_out) x W + s h lora_B^T, before the magnitude scaling
    lora: LoraCache
    magnitude: object  # (C_out,) m
    weight_norm: object  # (C_out,) n
    has_bias: bool
    exact_norm_gradient: bool


def dora_linear_forward(
    x,
    W,
    b,
    lora_A,
    lora_B,
    magnitude,
    scaling: float,
    dropout_mask=None,
    weight_norm=None,
    exact_norm_gradient: bool = False,
):
    """y = (m / n) * (x W + s (drop(x) lora_A^T) lora_B^T) + b.   x: (..., C_in) -> y: (..., C_out).

    ``weight_norm`` fixes n (a gradient check of the detached backward holds it at its current
    value); by default it is computed from W, lora_A and lora_B.
    """
    if weight_norm is None:
        weight_norm = dora_weight_norm(W, lora_A, lora_B, scaling)
    delta, lora = lora_forward(x, lora_A, lora_B, scaling, dropout_mask)
    u = matmul(x, W)  # (..., C_out)
    u += delta
    y = u * (magnitude / weight_norm)
    if b is not None:
        y += b
    return y, DoraCache(
        x=x,
        W=W,
        u=u,
        lora=lora,
        magnitude=magnitude,
        weight_norm=weight_norm,
        has_bias=b is not None,
        exact_norm_gradient=exact_norm_gradient,
    )


def dora_linear_backward(dout, cache: DoraCache, compute_db: bool = True):
    """Returns (dx, db, dlora_A, dlora_B, dm); W is frozen and gets no gradient. See the module docstring.

    db is None when the layer has no bias or when it is not asked for (a frozen bias).
    """
    W, m, n, lora = cache.W, cache.magnitude, cache.weight_norm, cache.lora
    C_out = W.shape[1]
    # BEGIN SOLUTION a7: n held constant: dm and db, then du through the LoRA layer and the base path
    dout_rows = dout.reshape(-1, C_out)  # (N, C_out)
    du_dot_u = (dout_rows * cache.u.reshape(-1, C_out)).sum(axis=0)  # (C_out,) sum over rows of dout * u
    dm = du_dot_u / n  # y = u * (m / n)
    db = dout_rows.sum(axis=0) if cache.has_bias and compute_db else None  # y = ... + b
    du = dout * (m / n)  # (..., C_out)
    dx, dlora_A, dlora_B = lora_backward(du, lora)  # u = x W + delta: the adapter's path
    dx += matmul(du, W.T)  # and the base path x W
    # END SOLUTION
    if cache.exact_norm_gradient:
        # BEGIN SOLUTION a7: through n = ||V||: dL/dn, then dV, then its share of dlora_A and dlora_B
        V = W + lora_delta_weight(lora.lora_A, lora.lora_B, lora.scaling).astype(W.dtype)  # (C_in, C_out)
        c = -du_dot_u * m / (n * n)  # (C_out,) dL/dn
        dV = V * (c / n)  # (C_in, C_out), through n = ||V[:, j]||
        # V = W + s lora_A^T lora_B^T, so dlora_A += s lora_B^T dV^T and dlora_B += s dV^T lora_A^T
        dlora_A += lora.scaling * matmul(lora.lora_B.T, dV.T)  # (r, C_in)
        dlora_B += lora.scaling * matmul(dV.T, lora.lora_A.T)  # (C_out, r)
        # END SOLUTION
    return dx, db, dlora_A, dlora_B, dm


def dora_merged_weight(W, lora_A, lora_B, magnitude, scaling: float):
    """(m / n) * V as one matrix, and n, which undoes the merge: W = W' n / m - s lora_A^T lora_B^T."""
    V = W + lora_delta_weight(lora_A, lora_B, scaling).astype(W.dtype)
    n = column_norms(V)
    return V * (magnitude / n), n
