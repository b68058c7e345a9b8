"""The LoRA linear layer: a frozen weight plus a trainable low-rank update (Hu et al., 2021).

A frozen linear layer y = x W + b (W of shape (C_in, C_out), GPT-2's layout) is adapted by adding

    y = x W + b + s * (drop(x) lora_A^T) lora_B^T

with lora_A of shape (r, C_in) and lora_B of shape (C_out, r), PEFT's layout (so that
lora_A^T lora_B^T is a (C_in, C_out) matrix like W), a small rank r, and the scaling
s = lora_alpha / r (or rsLoRA's rank-stabilised scale, Kalajdzievski 2023: see lora_scaling). The update
lora_A^T lora_B^T has rank at most r and only r (C_in + C_out) numbers instead of C_in C_out.
lora_B starts at zero, so training starts exactly at the base model.

The backward returns dx, dlora_A and dlora_B. The frozen W still carries gradient to x, but its own
weight gradient, a (C_in, C_out) product as costly as the forward's, is never formed.

Derivation (a5):
    Write h = drop(x) lora_A^T, shape (..., r), and delta = s h lora_B^T. Given dout = dL/dy:

        dlora_B = s dout^T h             (C_out, N) @ (N, r)       -> (C_out, r)
        dh      = s dout lora_B          (..., C_out) @ (C_out, r) -> (..., r)
        dlora_A = dh^T drop(x)           (r, N) @ (N, C_in)        -> (r, C_in)
        dx      = dout W^T + drop'(dh lora_A)   the base path plus the adapter path

    where drop' multiplies by the same dropout mask. The first term of dx is the frozen W's path;
    dW = x^T dout, a (C_in, N) @ (N, C_out) product, is never formed. At lora_B = 0, dh = 0 and hence
    dlora_A = 0: on the first step only lora_B moves.

The adapter keeps its own precision: over a float16 base its factors are float32 (init.py), the
input is cast to float32 where it enters the adapter and the update back to the base's dtype where
it meets the base's output, and the backward casts the same way, so dlora_A and dlora_B are float32.

Merging folds the update into the weight, W' = W + s lora_A^T lora_B^T, for inference with no
extra cost. (Shapes: N rows of the flattened batch, C_in and C_out the layer's sides, r the rank.)
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp, matmul
from ..layers import LinearCache, linear_backward, linear_forward


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The scale s of the update s lora_A^T lora_B^T: lora_alpha / r, or rsLoRA's with ``use_rslora``.

    rsLoRA's scale keeps the size of the update the same for every rank when its r rank-one terms
    (column i of lora_A^T times row i of lora_B^T) are independent, of zero mean and equal variance,
    and it equals lora_alpha / r at r = 1. With lora_alpha / r, large ranks learn slower and slower.

    Derivation (a7):
        A sum of r independent zero-mean terms has r times one term's variance, so the update's
        entries grow as sqrt(r); s = lora_alpha / sqrt(r) cancels that, while lora_alpha / r
        shrinks the update as 1 / sqrt(r).
    """
    # BEGIN SOLUTION a7: lora_alpha / r, or rsLoRA's rank-stabilised scale
    return lora_alpha / (r**0.5 if use_rslora else r)
    # END SOLUTION


class LoraCache(NamedTuple):
    x_in: object  # (..., C_in) the input of lora_A, after dropout
    h: object  # (..., r) x_in @ lora_A^T, the low-rank activation
    lora_A: object  # (r, C_in)
    lora_B: object  # (C_out, r)
    scaling: float
    dropout_mask: object  # (..., C_in) or None


def lora_forward(x, lora_A, lora_B, scaling: float, dropout_mask=None):
    """The adapter's contribution delta = s * (drop(x) lora_A^T) lora_B^T.  x: (..., C_in) -> (..., C_out)."""
    # BEGIN SOLUTION a5: delta = s * (drop(x) lora_A^T) lora_B^T; keep h = drop(x) lora_A^T
    x_in = x if dropout_mask is None else x * dropout_mask
    x_in = x_in.astype(lora_A.dtype, copy=False)  # into the adapter's precision (float32 over float16)
    h = matmul(x_in, lora_A.T)  # (..., r)
    delta = matmul(h, lora_B.T)  # (..., C_out)
    delta *= scaling
    # END SOLUTION
    return delta, LoraCache(
        x_in=x_in, h=h, lora_A=lora_A, lora_B=lora_B, scaling=scaling, dropout_mask=dropout_mask
    )


def lora_backward(ddelta, cache: LoraCache):
    """Gradients of delta = s * (drop(x) lora_A^T) lora_B^T.   ddelta: (..., C_out).

    Returns (dx, dlora_A, dlora_B), shaped like x (..., C_in), lora_A (r, C_in) and lora_B (C_out, r):
    the adapter's path only (``lora_linear_backward`` adds the base layer's).
    """
    r, C_in = cache.lora_A.shape
    C_out = cache.lora_B.shape[0]
    ddelta = ddelta.astype(cache.lora_A.dtype, copy=False)  # the adapter's gradients in its own precision
    # BEGIN SOLUTION a5: dlora_B, then dh (the gradient of h), dlora_A, and dx back through the mask
    ddelta_rows = ddelta.reshape(-1, C_out)  # (N, C_out)
    dlora_B = matmul(ddelta_rows.T, cache.h.reshape(-1, r))  # (C_out, r)
    dlora_B *= cache.scaling
    dh = matmul(ddelta, cache.lora_B)  # (..., r)
    dh *= cache.scaling
    dlora_A = matmul(dh.reshape(-1, r).T, cache.x_in.reshape(-1, C_in))  # (r, C_in)
    dx = matmul(dh, cache.lora_A)  # (..., C_in)
    if cache.dropout_mask is not None:
        dx *= cache.dropout_mask  # the forward was x_in = x * dropout_mask
    # END SOLUTION
    return dx, dlora_A, dlora_B


class LoraLinearCache(NamedTuple):
    base: LinearCache  # the frozen x W + b
    lora: LoraCache  # the adapter's path


def lora_linear_forward(x, W, b, lora_A, lora_B, scaling: float, dropout_mask=None):
    """y = x W + b + s * (drop(x) lora_A^T) lora_B^T.   x: (..., C_in) -> y: (..., C_out), in x's dtype."""
    y, base = linear_forward(x, W, b)
    delta, lora = lora_forward(x, lora_A, lora_B, scaling, dropout_mask)
    y += delta
    return y.astype(x.dtype, copy=False), LoraLinearCache(base=base, lora=lora)


def lora_linear_backward(dout, cache: LoraLinearCache, compute_dW: bool = False, compute_db: bool = True):
    """Returns (dx, dW, db, dlora_A, dlora_B). dW is None unless asked for: W is frozen, its product skipped.

    x feeds both the base path and the adapter path, so dx is the sum of the two.
    """
    dx, dW, db = linear_backward(dout, cache.base, compute_dW=compute_dW, compute_db=compute_db)
    dx_lora, dlora_A, dlora_B = lora_backward(dout, cache.lora)
    dx += dx_lora.astype(dx.dtype, copy=False)  # back into the base's precision
    return dx, dW, db, dlora_A, dlora_B


def lora_delta_weight(lora_A, lora_B, scaling: float):
    """The update as a full matrix, s lora_A^T lora_B^T, shape (C_in, C_out) like W."""
    # BEGIN SOLUTION a5: the update as a (C_in, C_out) matrix: s lora_A^T lora_B^T
    return scaling * matmul(lora_A.T, lora_B.T)
    # END SOLUTION


def require_finite(merged):
    """``merged`` itself if every value is finite; otherwise raise, before any weight is written."""
    if not bool(get_xp(merged).isfinite(merged).all()):
        raise FloatingPointError(
            "merging would write NaN or infinite values into the weight; nothing was changed"
        )
    return merged


def merge_weight(W, lora_A, lora_B, scaling: float):
    """W + s lora_A^T lora_B^T as a new array in W's dtype (W is not modified); raises if it is not finite."""
    return require_finite((W + lora_delta_weight(lora_A, lora_B, scaling)).astype(W.dtype, copy=False))
