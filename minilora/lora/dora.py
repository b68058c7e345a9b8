"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

DoRA splits each adapted weight into a direction and a magnitude. The direction is the LoRA-updated
weight V = W + s lora_A^T lora_B^T, shape (C_in, C_out); the magnitude is a trainable vector m, one
number per output unit, initialised to the norms of W's columns so that training starts at the
base. With n = ||V||, the norm of each column (over C_in), the adapted layer is

    y = x V * (m / n) + b = g * (x W + s (x lora_A^T) lora_B^T) + b,      g = m / n   (per output unit)

With adapter dropout we follow PEFT's definition: the base path x W keeps the whole input and only
what g rescales sees drop(x),

    y = x W + (g - 1) * drop(x) W + g * s (drop(x) lora_A^T) lora_B^T + b
      = (x - drop(x)) W + g * u + b,        u = drop(x) W + s (drop(x) lora_A^T) lora_B^T,

which is the formula above when nothing is dropped (drop(x) = x). A column of V that is all zeros
has no direction: its norm counts as 1, so g stays finite and the unit's output stays 0.

There are two backwards. The default treats the norm n as a constant (the paper's Section 4.3,
which saves the memory and time of differentiating through it; PEFT does the same with ``detach``):
it is the exact gradient of the layer with n held at its value. ``exact_norm_gradient=True`` also
follows the gradient through n = ||V||, which depends on lora_A and lora_B (W is frozen), so the
two backwards give the same dm, db and dx and differ in dlora_A and dlora_B only.

Derivation (a7):
    Write u = drop(x) W + s h lora_B^T for the rescaled part (h = drop(x) lora_A^T) and du = dout * g.
    With n held constant:

        dm = sum over rows of dout * u / n       (C_out,)
        db = sum over rows of dout
        dlora_A, dlora_B: the LoRA backward of du (see layer.py)
        dx = the LoRA backward's dx + drop'(du W^T) + (dout W^T - drop'(dout W^T))

    where drop' multiplies by the dropout mask; without dropout the last bracket is 0 and dx is the
    LoRA backward's dx plus du W^T.

    Through n: with c = -sum_rows(dout * u) * m / n^2 (the derivative of the loss by n) and
    dn/dV = V / n, the extra term is dV = V * c / n, which reaches the factors as
    dlora_A += s lora_B^T dV^T and dlora_B += s dV^T lora_A^T.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp, matmul
from .layer import LoraCache, lora_backward, lora_delta_weight, lora_forward


def column_norms(V):
    """||V[:, j]|| for each output unit j of a (C_in, C_out) weight -> (C_out,); 1 for an all-zero column.

    A zero column has no direction to normalise, and m / 0 would be NaN: its norm is taken as 1.
    """
    xp = get_xp(V)
    norms = xp.sqrt((V * V).sum(axis=0))
    return xp.where(norms > 0, norms, xp.ones_like(norms))


def dora_weight_norm(W, lora_A, lora_B, scaling: float):
    """n = column norms of V = W + s lora_A^T lora_B^T, the directions' lengths, (C_out,).

    Computed in the adapter's precision (float32 over a float16 W).
    """
    return column_norms(W + lora_delta_weight(lora_A, lora_B, scaling))


class DoraCache(NamedTuple):
    x: object  # (..., C_in) the input, for the base path's dx
    W: object  # (C_in, C_out)
    u: object  # (..., C_out) drop(x) W + s h lora_B^T, the part the magnitude rescales
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
    """y = (x - drop(x)) W + (m / n) * (drop(x) W + s (drop(x) lora_A^T) lora_B^T) + b.   (..., C_in) -> (..., C_out).

    Without dropout, y = (m / n) * (x W + s (x lora_A^T) lora_B^T) + b. The adapter's part is
    computed in the adapter's precision and y comes back in x's. ``weight_norm`` fixes n (a gradient
    check of the detached backward holds it at its current value); by default it is computed from W,
    lora_A and lora_B.
    """
    if weight_norm is None:
        weight_norm = dora_weight_norm(W, lora_A, lora_B, scaling)
    delta, lora = lora_forward(x, lora_A, lora_B, scaling, dropout_mask)
    u = matmul(lora.x_in, W).astype(delta.dtype, copy=False)  # (..., C_out) drop(x) W, as PEFT
    u += delta
    y = u * (magnitude / weight_norm)
    if dropout_mask is not None:
        y += matmul(x - x * dropout_mask, W)  # the base path's dropped-out part, x W - drop(x) W
    if b is not None:
        y += b
    return y.astype(x.dtype, copy=False), DoraCache(
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

    db is None when the layer has no bias or when it is not asked for (a frozen bias). dx comes back
    in dout's precision, the other gradients in the adapter's.
    """
    W, m, n, lora = cache.W, cache.magnitude, cache.weight_norm, cache.lora
    C_out = W.shape[1]
    mask = lora.dropout_mask
    dout_base = dout  # (..., C_out) in the base's precision
    dout = dout.astype(m.dtype, copy=False)  # the adapter's gradients in its own precision
    # BEGIN SOLUTION a7: n held constant: dm and db, then du through the LoRA layer and the base path
    dout_rows = dout.reshape(-1, C_out)  # (N, C_out)
    du_dot_u = (dout_rows * cache.u.reshape(-1, C_out)).sum(axis=0)  # (C_out,) sum over rows of dout * u
    dm = du_dot_u / n  # y = ... + u * (m / n)
    db = dout_rows.sum(axis=0) if cache.has_bias and compute_db else None  # y = ... + b
    du = dout * (m / n)  # (..., C_out)
    dx, dlora_A, dlora_B = lora_backward(du, lora)  # u = drop(x) W + delta: the adapter's path
    if mask is None:
        dx += matmul(du, W.T)  # and the base path x W, rescaled
    else:  # u's drop(x) W, and y's (x - drop(x)) W
        dx += mask * matmul(du - dout, W.T) + matmul(dout, W.T)
    # END SOLUTION
    if cache.exact_norm_gradient:
        # BEGIN SOLUTION a7: through n = ||V||: dL/dn, then dV, then its share of dlora_A and dlora_B
        V = W + lora_delta_weight(lora.lora_A, lora.lora_B, lora.scaling)  # (C_in, C_out)
        c = -du_dot_u * m / (n * n)  # (C_out,) dL/dn
        dV = V * (c / n)  # (C_in, C_out), through n = ||V[:, j]||
        # V = W + s lora_A^T lora_B^T, so dlora_A += s lora_B^T dV^T and dlora_B += s dV^T lora_A^T
        dlora_A += lora.scaling * matmul(lora.lora_B.T, dV.T)  # (r, C_in)
        dlora_B += lora.scaling * matmul(dV.T, lora.lora_A.T)  # (C_out, r)
        # END SOLUTION
    return dx.astype(dout_base.dtype, copy=False), db, dlora_A, dlora_B, dm


def dora_merged_weight(W, lora_A, lora_B, magnitude, scaling: float):
    """(m / n) * V as one matrix, and n, which undoes the merge: W = W' n / m - s lora_A^T lora_B^T."""
    V = W + lora_delta_weight(lora_A, lora_B, scaling)  # in the adapter's precision
    n = column_norms(V)
    return (V * (magnitude / n)).astype(W.dtype, copy=False), n
